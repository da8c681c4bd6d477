"""The one `Settings` object of a process.

Precedence, lowest first: built-in defaults < the TOML file (`iotmesh.toml` in the working
directory, or the file given with `--config`) < `IOTMESH_*` environment variables (nested
keys joined with `__`, e.g. `IOTMESH_HTTP__PORT`) < CLI flags. It is built once at start-up
by `load_settings` and handed down; no other module reads the environment.

Every key is documented in docs/configuration.md (a test keeps the two in step).
"""

from __future__ import annotations

import contextvars
import itertools
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from iotmesh.core.errors import ConfigError

DEFAULT_CONFIG_FILE = Path("iotmesh.toml")
# Where Kubernetes mounts a pod's service-account token, CA certificate and namespace.
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"

# The TOML file of the settings being built. A context variable, not a class attribute,
# so that two `load_settings` calls (e.g. in tests) cannot see each other's file.
_toml_data: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("toml_data")


class _Section(BaseModel):
    """Base of every settings section: unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class HttpSettings(_Section):
    """The HTTP server: REST API and device HTTP API."""

    port: int = Field(8080, ge=0, le=65535, description="TCP port; 0 picks a free port.")
    server: Literal["granian", "hypercorn"] = Field(
        "granian",
        description="HTTP server software: granian (Rust, embedded in the event loop; fast)"
        " or hypercorn (pure Python).",
    )
    max_payload_bytes: int = Field(
        64 * 1024, ge=1, description="Largest device upload accepted; larger gets 413."
    )
    enqueue_timeout_s: float = Field(
        5.0,
        gt=0,
        description="How long an upload may wait for room in the pipeline before 503.",
    )
    keep_alive_s: float = Field(75.0, gt=0, description="Idle keep-alive of HTTP connections.")
    tls_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="HTTPS port (HTTP/2 and HTTP/1.1 by ALPN; 443 or 8443 are usual);"
        " unset: no TLS listener.",
    )
    certfile: Path | None = Field(None, description="Server certificate (PEM) for HTTPS.")
    keyfile: Path | None = Field(None, description="Private key (PEM) of the certificate.")
    max_concurrent_requests: int = Field(
        10_000,
        ge=1,
        description="Requests the app handles at once (waiting long-polls count); more wait"
        " unread in the server until one ends (granian only).",
    )
    long_poll_default_s: float = Field(
        60.0,
        gt=0,
        description="Wait of a device long-poll (attribute updates, RPC) sent without `timeout`.",
    )
    long_poll_max_s: float = Field(
        300.0,
        gt=0,
        description="Longest wait a device long-poll may ask for; longer `timeout`s are cut.",
    )
    metrics_auth: bool = Field(
        False,
        description="Require the admin bearer token on /metrics (off: Prometheus scrapes it"
        " without credentials; it shows counters only, no device ids or secrets).",
    )


class AclRule(_Section):
    """One MQTT access rule for topics outside a device's own `v1/devices/me/...`."""

    topic: str = Field(description="Topic filter the rule covers (`+` and `#` allowed).")
    action: Literal["publish", "subscribe", "all"] = "all"
    clients: Literal["any", "anonymous", "devices", "gateways"] = "any"
    allow: bool = True


class MqttSettings(_Section):
    """The MQTT server (device API over MQTT, and a broker between clients)."""

    port: int = Field(1883, ge=0, le=65535, description="TCP port; 0 picks a free port.")
    tls_port: int | None = Field(
        None, ge=0, le=65535, description="TLS port (8883 is usual); unset: no TLS listener."
    )
    certfile: Path | None = Field(None, description="Server certificate (PEM) for TLS.")
    keyfile: Path | None = Field(None, description="Private key (PEM) of the certificate.")
    cafile: Path | None = Field(
        None, description="CA bundle to verify client certificates (X.509 device login)."
    )
    allow_anonymous: bool = Field(
        False, description="Accept clients without credentials (for broker use and tests)."
    )
    acl: list[AclRule] = Field(
        default_factory=list,
        description="Rules for topics outside v1/devices/me/ and v1/gateway/; first match wins,"
        " no match denies.",
    )
    max_connections: int = Field(100_000, ge=1, description="Connections accepted at once.")
    max_packet_size: int = Field(
        256 * 1024, ge=64, le=268_435_455, description="Largest packet accepted, in bytes."
    )
    receive_maximum: int = Field(
        64, ge=1, le=65535, description="Unacknowledged QoS 1/2 messages a client may send."
    )
    max_inflight: int = Field(
        32, ge=1, le=65535, description="Unacknowledged QoS 1/2 messages sent to a client."
    )
    max_queued_messages: int = Field(
        1000, ge=0, description="Messages kept for an offline persistent session."
    )
    max_keep_alive_s: int = Field(
        300, ge=0, le=65535, description="Longest keep-alive granted (v5: server keep-alive)."
    )
    max_session_expiry_s: int = Field(
        7 * 24 * 3600, ge=0, description="Longest time a persistent session outlives its client."
    )
    topic_alias_maximum: int = Field(
        16, ge=0, le=65535, description="Topic aliases a v5 client may use towards us."
    )
    rate_limit: float = Field(
        0.0, ge=0, description="Messages per second a client may publish (0: no limit)."
    )
    rate_burst: int = Field(100, ge=1, description="Publishes a client may send in a burst.")
    socket_receive_buffer: int = Field(
        65536,
        ge=0,
        le=2**31 - 1,
        description="Kernel receive buffer of each MQTT socket (SO_RCVBUF; Linux doubles it),"
        " in bytes; bounds what waits unread under overload. 0: kernel default, autotuned.",
    )


class CoapSettings(_Section):
    """The CoAP server (ThingsBoard device API over CoAP/UDP, served with aiocoap)."""

    enabled: bool = Field(True, description="Serve CoAP at all.")
    port: int = Field(5683, ge=0, le=65535, description="UDP port; 0 picks a free one.")
    max_payload_bytes: int = Field(
        64 * 1024,
        ge=64,
        description="Largest request body, whole or reassembled from Block1 blocks;"
        " larger gets 4.13 with Size1.",
    )
    enqueue_timeout_s: float = Field(
        5.0,
        gt=0,
        description="How long an upload may wait for room in the pipeline before 5.03"
        " (with Max-Age).",
    )
    max_observations: int = Field(
        10_000, ge=1, description="Observations (attributes and RPC) held at once, in total."
    )
    max_observations_per_device: int = Field(
        4, ge=1, description="Observations one device may hold at once; more get 4.29."
    )
    dtls_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="UDP port of CoAP over DTLS (coaps; 5684 is usual; 0 picks a free one)"
        " with pre-shared keys: identity = device id, key = its access token. Unset: no"
        " DTLS. Needs the DTLSSocket package and a specific `host` (not 0.0.0.0).",
    )
    max_dtls_sessions: int = Field(
        1000, ge=1, description="DTLS sessions kept at once; the oldest is closed beyond."
    )
    max_blockwise_uploads: int = Field(
        1000,
        ge=1,
        description="Block1 uploads being reassembled at once (each up to max_payload_bytes);"
        " a new one beyond gets 5.03 with Max-Age.",
    )


class DeviceSettings(_Section):
    """Device state every transport shares: connectivity and server-side RPC."""

    inactivity_timeout_s: float = Field(
        600.0,
        gt=0,
        description="A device without a live session (MQTT connection, CoAP observation,"
        " HTTP long-poll) counts as online this long after its last upload or request.",
    )
    rpc_max_open: int = Field(
        100,
        ge=1,
        description="Unfinished RPC requests (queued, sent, awaiting a reply) a device may"
        " have; a new one beyond that is refused with 503.",
    )
    rpc_default_expiration_s: float = Field(
        86400.0,
        gt=0,
        description="How long a persistent RPC request waits for its device when the"
        " request sets no expiration; then it is EXPIRED.",
    )
    rpc_retention_s: float = Field(
        7 * 86400.0,
        gt=0,
        description="How long finished RPC requests stay listed before they are deleted.",
    )
    rpc_purge_interval_s: float = Field(
        3600.0,
        gt=0,
        description="How often the RPC housekeeping job deletes the finished requests past"
        " rpc_retention_s (in iotmesh serve: the elected state instance).",
    )
    rpc_sweep_interval_s: float = Field(
        5.0,
        gt=0,
        description="How often the RPC housekeeping job runs a pass: with several processes"
        " (iotmesh serve), requests past their expiration or reply timeout that no process"
        " holds (a device that never came back) are ended then (EXPIRED, TIMEOUT).",
    )


class BusSettings(_Section):
    """The message bus between transports and the pipeline."""

    backend: Literal["memory", "nats", "redis"] = Field(
        "memory",
        description=(
            "Bus implementation: in-process (memory), NATS JetStream (nats) or Redis Streams"
            " (redis)."
        ),
    )
    partitions: int = Field(
        8, ge=1, le=1024, description="Partitions per subject; a device always maps to one."
    )
    partition_queue: int = Field(
        1024,
        ge=1,
        description=(
            "Messages a partition holds before publishers wait: memory, per group queue;"
            " nats and redis, stored and not yet acknowledged by every group."
        ),
    )
    max_batch: int = Field(
        512,
        ge=1,
        description="Most messages handed to a consumer at once (and unsettled per partition).",
    )
    max_deliver: int = Field(
        5, ge=1, description="Deliveries of one message before it is given up (dead-lettered)."
    )
    nats_url: str = Field("nats://127.0.0.1:4222", description="NATS server (backend nats).")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis server (backend redis).")
    namespace: str = Field(
        "iotmesh",
        pattern=r"^[A-Za-z0-9_-]+$",
        description=(
            "Prefix of every stream, subject, consumer and key the bus makes in the engine,"
            " so several platforms can share one NATS or Redis."
        ),
    )
    ack_wait_s: float = Field(
        30.0,
        gt=0,
        description=(
            "nats/redis: how long a partition stays with a group member that stopped"
            " answering (its lease) before another member takes it over and its unsettled"
            " messages are redelivered."
        ),
    )
    dedup_window_s: float = Field(
        120.0,
        gt=0,
        description="nats/redis: a second publish with the same message id within it is dropped.",
    )
    dead_letter_subject: str = Field(
        "deadletter",
        pattern=r"^[A-Za-z0-9_-]+$",
        description=(
            "nats/redis: subject space of dead letters; a message a group gives up is"
            " published to `<this>.<group>.<subject>`."
        ),
    )
    dead_letter_max_age_s: float = Field(
        7 * 86400.0, gt=0, description="nats/redis: how long dead letters are kept."
    )
    request_timeout_s: float = Field(
        5.0, gt=0, description="nats/redis: longest wait for one answer from the engine."
    )


class ClusterSettings(_Section):
    """Several instances: service registry, failure detection, leader election."""

    backend: Literal["redis", "nats", "kubernetes"] = Field(
        "redis",
        description="Engine holding the registry, leader leases and fences: Redis, NATS"
        " JetStream KV, or the Kubernetes API (Lease objects). Unset: the bus's engine if"
        " `bus.backend` is nats or redis.",
    )
    redis_url: str | None = Field(None, description="Redis server; unset: `bus.redis_url`.")
    nats_url: str | None = Field(None, description="NATS server; unset: `bus.nats_url`.")
    k8s_api_url: str | None = Field(
        None,
        description="Kubernetes API server (backend kubernetes), e.g. `http://127.0.0.1:8001`"
        " behind `kubectl proxy`. Unset: in-cluster, `https://$KUBERNETES_SERVICE_HOST:"
        "$KUBERNETES_SERVICE_PORT` (Kubernetes sets both in every pod).",
    )
    k8s_namespace: str | None = Field(
        None,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="Kubernetes namespace of the Lease objects; unset: the pod's own, read"
        f" from `{SERVICE_ACCOUNT_DIR}/namespace`.",
    )
    k8s_token_file: Path | None = Field(
        Path(f"{SERVICE_ACCOUNT_DIR}/token"),
        description="Bearer token for the Kubernetes API, re-read every minute (projected"
        ' service-account tokens rotate); `""`: send no token (e.g. to `kubectl proxy`).',
    )
    k8s_ca_file: Path | None = Field(
        Path(f"{SERVICE_ACCOUNT_DIR}/ca.crt"),
        description="CA certificate the API server's (https) certificate must chain to;"
        ' `""`: the system\'s trust store.',
    )
    namespace: str = Field(
        "iotmesh",
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Prefix of the keys and buckets the cluster makes in the engine.",
    )
    heartbeat_interval_s: float = Field(
        1.0, gt=0, description="How often an instance rewrites its registry entry."
    )
    ttl_s: float = Field(
        10.0,
        gt=0,
        description="An entry not rewritten for this long is deleted by the engine (the"
        " failure detector drops a silent instance from rotation sooner).",
    )
    phi_threshold: float = Field(
        8.0,
        gt=0,
        description="Phi (-log10 of the chance that a heartbeat is merely late) from which"
        " an instance counts as failed.",
    )
    phi_window: int = Field(
        100, ge=2, description="Heartbeat intervals the failure detector remembers."
    )
    phi_min_std_dev_s: float = Field(
        0.2,
        gt=0,
        description="Smallest standard deviation of heartbeat intervals the detector"
        " assumes (very regular heartbeats would otherwise make it jumpy).",
    )
    acceptable_pause_s: float = Field(
        1.0,
        ge=0,
        description="Extra silence tolerated before suspicion grows (GC pauses, a busy loop).",
    )
    lease_s: float = Field(
        10.0,
        gt=0,
        description="Leader lease: a leader that stops renewing loses leadership after it;"
        " renewed every third of it.",
    )
    call_timeout_s: float = Field(
        5.0, gt=0, description="Service-to-service call: longest wait for one attempt."
    )
    call_retries: int = Field(
        2, ge=0, description="Service-to-service call: further attempts, each on another instance."
    )
    retry_backoff_s: float = Field(
        0.05,
        ge=0,
        description="Base of the jittered exponential pause before a retry.",
    )
    breaker_failures: int = Field(
        5, ge=1, description="Consecutive failed calls that open an instance's circuit breaker."
    )
    breaker_reset_s: float = Field(
        10.0,
        gt=0,
        description="How long an open breaker refuses calls before letting one trial through.",
    )

    @field_validator("k8s_token_file", "k8s_ca_file", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        """`""` turns a file off (TOML and the environment cannot say None)."""
        return None if value == "" else value

    @model_validator(mode="before")
    @classmethod
    def _in_cluster_api(cls, data: Any) -> Any:
        """Default `k8s_api_url` from the variables Kubernetes sets in a pod (this module
        is the one place that reads the environment)."""
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        if not isinstance(data, dict) or data.get("k8s_api_url") or not host:
            return data
        host = f"[{host}]" if ":" in host else host  # an IPv6 service address
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        return {**data, "k8s_api_url": f"https://{host}:{port}"}

    @model_validator(mode="after")
    def _ttl_covers_heartbeats(self) -> ClusterSettings:
        if self.ttl_s <= self.heartbeat_interval_s:
            raise ValueError("cluster.ttl_s must be longer than cluster.heartbeat_interval_s")
        return self


class SqliteSettings(_Section):
    """SQLite files in the data directory."""

    synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL",
        description="FULL survives power loss; NORMAL survives a process crash only.",
    )
    chunk_max_points: int = Field(
        4096,
        ge=16,
        description=(
            "Points per compacted chunk of one series. Pending batch rows are flushed"
            " into chunks once they hold 8 chunks' worth of points (or after 512 commits)."
        ),
    )
    compact_min_chunks: int = Field(
        8,
        ge=2,
        description=(
            "Small chunks of a series that trigger its compaction; a flush waits for at"
            " least 4x this many commits."
        ),
    )


class WriterSettings(_Section):
    """The single writer that group-commits telemetry."""

    max_batch_records: int = Field(
        50_000, ge=1, description="Most records committed in one transaction."
    )
    max_pending_records: int = Field(
        200_000, ge=1, description="Records waiting for commit before senders must wait."
    )
    delay_ms: float = Field(
        0.0,
        ge=0,
        description="Artificial pause before each commit (testing back-pressure only).",
    )
    retry_backoff_max_s: float = Field(
        5.0, gt=0, description="Longest pause between retries of a failed commit."
    )


class PipelineSettings(_Section):
    """The pipeline workers that decode and validate telemetry."""

    cpu_work_us: float = Field(
        0.0,
        ge=0,
        le=1_000_000,
        description="Artificial CPU work per record, in microseconds (benchmarks only:"
        " makes the pipeline the bottleneck, as heavy rules would).",
    )


class ServeSettings(_Section):
    """One service of `iotmesh serve` (a process of the distributed mode)."""

    instance_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Name of this instance, unique per service; unset: `<host name>-<pid>`."
        " Names its run-info file `instances/<service>-<id>.json` in the data dir.",
    )
    health_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Port of the /healthz listener of services without the HTTP API"
        " (0 picks a free port; the http service answers /healthz on `http.port`).",
    )


class InfluxSettings(_Section):
    """An InfluxDB server holding telemetry (`storage.timeseries = "influxdb"`)."""

    url: str = Field("http://127.0.0.1:8086", description="Base URL of the InfluxDB HTTP API.")
    version: Literal[1, 2] = Field(
        1,
        description="1: InfluxDB 1.x (database, user/password); 2: InfluxDB 2.x/3.x API"
        " (token, org, bucket; queries through its 1.x-compatible /query).",
    )
    database: str = Field(
        "iotmesh", min_length=1, description="1.x: the database (created if missing)."
    )
    username: str | None = Field(None, description="1.x: user name, when auth is enabled.")
    password: SecretStr | None = Field(None, description="1.x: password of `username`.")
    token: SecretStr | None = Field(None, description="2.x/3.x: API token.")
    org: str | None = Field(None, description="2.x: organization the bucket belongs to.")
    bucket: str = Field(
        "iotmesh",
        min_length=1,
        description="2.x/3.x: bucket (queried as the database of the same name).",
    )
    timeout_s: float = Field(10.0, gt=0, description="Timeout of one HTTP request to InfluxDB.")


class PostgresSettings(_Section):
    """A PostgreSQL server holding telemetry and/or state (`storage.timeseries` or
    `storage.state` = "postgres")."""

    url: str = Field(
        "postgresql://postgres@127.0.0.1:5432/iotmesh",
        description="libpq connection URL (postgresql://user@host:port/database); the"
        " database must exist.",
    )
    password: SecretStr | None = Field(
        None, description="Password, when not in the URL (keeps it off the command line)."
    )
    schema_name: str = Field(
        "iotmesh",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="Schema holding iotmesh's tables (created if missing).",
    )
    pool_size: int = Field(
        8, ge=1, le=1000, description="Most connections each store opens (two stores: twice)."
    )
    partition_interval_s: int = Field(
        7 * 86400,
        ge=3600,
        description="Time span of one partition (or TimescaleDB chunk) of the points table;"
        " read when the schema is created, later changes are ignored.",
    )
    timescaledb: Literal["auto", "off"] = Field(
        "auto",
        description="auto: make the points table a TimescaleDB hypertable when the extension"
        " is available at schema creation; off: always plain range partitions.",
    )
    timeout_s: float = Field(10.0, gt=0, description="Timeout of connecting and of one statement.")


class RollupLevel(_Section):
    """One rollup level: per-bucket min, max, sum and count of every series."""

    interval_ms: int = Field(
        gt=0,
        description="Bucket width; a query whose interval_ms is a multiple of it reads this level.",
    )
    ttl_s: float = Field(0.0, ge=0, description="How long its buckets are kept; 0: forever.")


class RetentionSettings(_Section):
    """How long telemetry is kept, and the rollups that outlive raw points."""

    raw_ttl_s: float = Field(0.0, ge=0, description="How long raw points are kept; 0: forever.")
    keys: dict[str, float] = Field(
        {},
        description="Raw TTL (s) per telemetry key, overriding raw_ttl_s (0: forever). When"
        " a key rule and a device-type rule both match, the longer TTL applies.",
    )
    device_types: dict[str, float] = Field(
        {},
        description="Raw TTL (s) per device type, overriding raw_ttl_s (0: forever).",
    )
    rollups: list[RollupLevel] = Field(
        default_factory=lambda: [
            RollupLevel(interval_ms=60_000),
            RollupLevel(interval_ms=3_600_000),
        ],
        description="Rollup levels (`[[storage.retention.rollups]]` tables), finest first;"
        " each interval a multiple of the one before. Default: 1 minute and 1 hour, kept"
        " forever. An empty list: no rollups.",
    )
    interval_s: float = Field(
        3600.0, gt=0, description="How often expired raw points and rollup buckets are deleted."
    )

    @model_validator(mode="after")
    def _levels_nest(self) -> RetentionSettings:
        sizes = [level.interval_ms for level in self.rollups]
        for finer, coarser in itertools.pairwise(sizes):
            if coarser <= finer or coarser % finer:
                raise ValueError(
                    f"rollup interval {coarser} ms is not a larger multiple of {finer} ms"
                )
        return self


class RedisSettings(_Section):
    """Redis for hot state shared by several processes (docs/storage.md): latest values
    (`storage.latest` = "redis"), connectivity, an attribute cache, RPC wake-ups, rate
    limits. A cache and a messenger only: what is durable stays in the stores."""

    url: str = Field("redis://127.0.0.1:6379/0", description="Redis server for hot state.")
    namespace: str = Field(
        "iotmesh",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Prefix of every key and channel, so several platforms can share a server.",
    )
    timeout_s: float = Field(
        1.0,
        gt=0,
        description="Longest wait for one Redis answer; past it the cache is skipped (reads"
        " go to the store) and the failure is counted.",
    )
    latest_ttl_s: float = Field(
        0.0,
        ge=0,
        description="Latest values of a device not updated for this long are dropped from"
        " Redis (read again from the store); 0 keeps them.",
    )
    connectivity: bool = Field(
        False,
        description="Mirror connectivity (sessions, last activity) to Redis so every process"
        " shows one truth.",
    )
    connectivity_flush_s: float = Field(
        1.0, gt=0, description="How often connectivity changes are written to Redis (batched)."
    )
    attribute_cache: bool = Field(
        False, description="Serve attribute reads from a Redis cache, written through on save."
    )
    attribute_cache_ttl_s: float = Field(
        3600.0, gt=0, description="How long a cached attribute set lives unless invalidated."
    )
    rpc_wakeups: bool = Field(
        False,
        description="Carry RPC wake-ups, completions and claims between processes on this"
        " Redis (a request stored where the device has no session is delivered by the"
        " process holding it). Unset, processes on a NATS or Redis bus use the bus's engine.",
    )


class StorageSettings(_Section):
    """Which storage backends hold data."""

    timeseries: Literal["sqlite", "influxdb", "postgres"] = Field(
        "sqlite", description="Time-series store backend."
    )
    state: Literal["sqlite", "postgres"] = Field(
        "sqlite", description="State store (devices, credentials, attributes, RPC)."
    )
    latest: Literal["memory", "redis"] = Field(
        "memory",
        description="Where the latest value of each device and key is cached: this process's"
        " memory, or Redis (shared by several processes; `storage.redis`).",
    )
    sqlite: SqliteSettings = SqliteSettings()
    redis: RedisSettings = RedisSettings()
    influxdb: InfluxSettings = InfluxSettings()
    postgres: PostgresSettings = PostgresSettings()
    retention: RetentionSettings = RetentionSettings()


class TracingSettings(_Section):
    """OpenTelemetry tracing of device messages (transport → bus → pipeline → writer)."""

    enabled: bool = Field(
        False,
        description="Make spans and carry W3C trace context across the bus. Off: no span"
        " is made and a message costs nothing more.",
    )
    sample_ratio: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="Share of device messages traced (a message carrying a sampled"
        " `traceparent`, e.g. an HTTP upload, is always traced).",
    )
    exporter: Literal["otlp", "console", "none"] = Field(
        "otlp",
        description="Where spans go: an OTLP/HTTP collector (needs `iotmesh[otel]`), stderr"
        " (console), or nowhere (none: trace ids still appear in the logs).",
    )
    endpoint: str = Field(
        "http://127.0.0.1:4318/v1/traces",
        description="OTLP/HTTP traces endpoint of the collector (exporter otlp).",
    )
    export_timeout_s: float = Field(
        5.0,
        gt=0,
        description="Longest one export to the collector may take, retries included; spans"
        " it could not send are dropped (never the device data). A stop waits at most this"
        " long for the spans still batched.",
    )


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "iotmesh"


class Settings(BaseSettings):
    """All settings of an iotmesh process."""

    model_config = SettingsConfigDict(
        env_prefix="IOTMESH_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    data_dir: Path = Field(
        default_factory=_default_data_dir, description="Where SQLite files and secrets live."
    )
    host: str = Field("127.0.0.1", description="Address the servers listen on.")
    admin_token: SecretStr | None = Field(
        None,
        description="Bearer token of the REST API; generated and stored in the data dir if unset.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Lowest level of log lines printed."
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="Log lines as text, or as JSON objects one per line (ts, level, logger,"
        " message, service, instance, trace_id/span_id, exc).",
    )
    shutdown_timeout_s: float = Field(
        10.0, gt=0, description="How long a clean shutdown may take to flush pending writes."
    )
    http: HttpSettings = HttpSettings()
    mqtt: MqttSettings = MqttSettings()
    coap: CoapSettings = CoapSettings()
    devices: DeviceSettings = DeviceSettings()
    bus: BusSettings = BusSettings()
    cluster: ClusterSettings = ClusterSettings()
    storage: StorageSettings = StorageSettings()
    writer: WriterSettings = WriterSettings()
    pipeline: PipelineSettings = PipelineSettings()
    serve: ServeSettings = ServeSettings()
    tracing: TracingSettings = TracingSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Order the sources: CLI (init) > environment > TOML file > defaults."""
        return (init_settings, env_settings, _TomlSource(settings_cls))


class _TomlSource(PydanticBaseSettingsSource):
    """Settings read from the TOML file chosen by `load_settings`."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        data = _toml_data.get({})
        return data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_toml_data.get({}))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def _nest(overrides: dict[str, Any]) -> dict[str, Any]:
    """Turn dotted keys (`"http.port"`) into nested dicts; drop None (flag not given)."""
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def load_settings(
    config_file: Path | None = None, overrides: dict[str, Any] | None = None
) -> Settings:
    """Build the process settings from file, environment and CLI overrides.

    Args:
        config_file: TOML file to read; when None, `iotmesh.toml` in the working
            directory is read if it exists.
        overrides: values from CLI flags, keyed by dotted path (`"http.port"`); None
            values mean "flag not given" and are skipped.

    Raises:
        ConfigError: the file is unreadable or a value is invalid (one-line message).
    """
    if config_file is not None:
        toml = _read_toml(config_file)
    elif DEFAULT_CONFIG_FILE.is_file():
        toml = _read_toml(DEFAULT_CONFIG_FILE)
    else:
        toml = {}
    token = _toml_data.set(toml)
    try:
        return Settings(**_nest(overrides or {}))
    except ValidationError as exc:
        raise ConfigError(f"invalid settings: {_one_line(exc)}") from exc
    finally:
        _toml_data.reset(token)
