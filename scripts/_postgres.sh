# Sourced by scripts/test after the Debian packages are installed: make sure a local
# PostgreSQL server runs, and tell the tests how to reach it (IOTMESH_TEST_PG_URL; the
# tests create a database of their own per session there and drop it at the end).
# On the development machine the server already runs with trust auth for user postgres.
pg_sudo=""
[ "$(id -u)" = 0 ] || pg_sudo="sudo"
as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi
}
if ! pg_lsclusters -h | awk '$4 == "online" { found = 1 } END { exit !found }'; then
  pg_lsclusters -h | while read -r version cluster _; do
    echo "starting PostgreSQL cluster $version/$cluster"
    $pg_sudo pg_ctlcluster "$version" "$cluster" start
  done
fi
if [ -z "${IOTMESH_TEST_PG_URL:-}" ]; then
  IOTMESH_TEST_PG_URL="postgresql://postgres@127.0.0.1:5432/postgres"
  if ! psql "$IOTMESH_TEST_PG_URL" -Atqc "SELECT 1" >/dev/null 2>&1; then
    # A fresh Debian install wants a password over TCP: a test role of our own.
    as_postgres psql -q -c "DO \$\$ BEGIN
      IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'iotmesh_test') THEN
        CREATE ROLE iotmesh_test LOGIN CREATEDB PASSWORD 'iotmesh_test';
      END IF; END \$\$"
    IOTMESH_TEST_PG_URL="postgresql://iotmesh_test:iotmesh_test@127.0.0.1:5432/postgres"
  fi
  export IOTMESH_TEST_PG_URL
fi
