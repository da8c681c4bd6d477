# Install the real thingsboard-gateway (pinned, with every dependency pinned in
# scripts/tb-gateway-requirements.txt) into its own virtualenv .venv-tbgw: its pins are
# not ours, so it never shares .venv. tests/integration/test_tb_gateway.py runs it from
# there. Idempotent: nothing to do when .venv-tbgw already holds exactly that list.
# Usage, from the project root: `source scripts/_tb_gateway.sh` (scripts/test does, after
# _venv.sh) or `bash scripts/_tb_gateway.sh`. About 20 s the first time.
tbgw_requirements=scripts/tb-gateway-requirements.txt
tbgw_stamp=.venv-tbgw/.requirements.sha256
tbgw_want="$(sha256sum "$tbgw_requirements" | cut -d' ' -f1)"
if [ "$(cat "$tbgw_stamp" 2>/dev/null)" != "$tbgw_want" ]; then
  echo "installing thingsboard-gateway into .venv-tbgw (for tests/integration/test_tb_gateway.py)"
  if [ ! -x .venv-tbgw/bin/python ]; then
    "${python:-python3}" -m venv .venv-tbgw || { echo "cannot create .venv-tbgw" >&2; exit 1; }
  fi
  # -qq: pip's warnings about this machine's extra package indexes are noise here.
  .venv-tbgw/bin/python -m pip install -qq --disable-pip-version-check -r "$tbgw_requirements" ||
    { echo "cannot install $tbgw_requirements into .venv-tbgw" >&2; exit 1; }
  echo "$tbgw_want" >"$tbgw_stamp"
fi
