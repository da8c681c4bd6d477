"""The real thingsboard-gateway (PyPI `thingsboard-gateway`) with iotmesh as its platform.

The gateway runs as a subprocess from its own virtualenv, `.venv-tbgw` (scripts/test
installs it through scripts/_tb_gateway.sh, pinned), held to loopback by
tb_gateway_main.py. Its config directory is written here: `tb_gateway.json` points it
at our MQTT port with a gateway device's access token, and one REST connector
(`rest.json`) listens on a free port of 127.0.0.1. The tests POST sensor data to that
listener as a field device would; the gateway converts it and speaks the ThingsBoard
gateway API (`v1/gateway/connect`, `telemetry`, `attributes`, ...) to iotmesh. The way
back (shared attribute updates, RPC) ends in `HttpSink`, a small HTTP server standing
for the field devices the REST connector calls.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote

import httpx
import pytest

from tests.integration.mqtt_helpers import (
    HOST,
    T0,
    V311,
    attributes,
    device_client,
    module_server,
    new_device,
    points,
    rpc_call,
    set_shared,
    telemetry_keys,
    wait_until,
)
from tests.integration.server import RunningServer

ROOT = Path(__file__).resolve().parents[2]
TBGW_PYTHON = ROOT / ".venv-tbgw" / "bin" / "python"
LAUNCHER = Path(__file__).with_name("tb_gateway_main.py")
GATEWAY_WAIT_S = 30.0  # bound of every wait on the gateway: only reached when something hangs
STOP_TIMEOUT_S = 15.0
CONNECTOR = "REST Connector"

_names = itertools.count()


def _name(label: str) -> str:
    """Device names are global: each test's devices get their own."""
    return f"tbgw {label} {next(_names)}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


# -- the field side: what the REST connector calls ----------------------------------------


class HttpSink:
    """An HTTP server on 127.0.0.1 that records every request (path unquoted) and answers JSON."""

    REPLY: ClassVar[dict[str, Any]] = {"valve": 25, "ok": True}

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, bytes]] = []
        self._cond = threading.Condition()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with sink._cond:
                    sink.requests.append(("POST", unquote(self.path), body))
                    sink._cond.notify_all()
                reply = json.dumps(HttpSink.REPLY).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((HOST, 0), Handler)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="tbgw-sink", daemon=True
        )
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.port}{path}"

    def expect(self, path: str, timeout: float = GATEWAY_WAIT_S) -> Any:
        """The JSON body of the first request to `path` (bounded wait)."""
        with self._cond:
            found = self._cond.wait_for(
                lambda: any(p == path for _, p, _ in self.requests), timeout=timeout
            )
            if not found:
                raise AssertionError(f"no request to {path} in {timeout}s; got {self.requests}")
            body = next(b for _, p, b in self.requests if p == path)
        return json.loads(body)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


# -- the gateway ----------------------------------------------------------------------------


def gateway_config(mqtt_port: int, token: str, rest_port: int, sink: HttpSink) -> dict[str, Any]:
    """`tb_gateway.json` and the connector's `rest.json`, by file name."""
    main = {
        "thingsboard": {
            "host": HOST,
            "port": mqtt_port,
            "security": {"type": "accessToken", "accessToken": token},
            "qos": 1,
            "remoteShell": False,
            "remoteConfiguration": True,
            "statistics": {"enable": True, "statsSendPeriodInSeconds": 60},
            "checkingDeviceActivity": {"checkDeviceInactivity": False},
        },
        "storage": {"type": "memory", "read_records_count": 100, "max_records_count": 10_000},
        "grpc": {"enabled": False},
        "connectors": [{"type": "rest", "name": CONNECTOR, "configuration": "rest.json"}],
    }
    anonymous = {"type": "anonymous"}
    json_headers = {"Content-Type": "application/json"}
    rest = {
        "server": {"host": HOST, "port": rest_port, "SSL": False},
        "mapping": [
            {
                "endpoint": "/sensors",
                "HTTPMethods": ["POST"],
                "security": anonymous,
                "converter": {
                    "type": "json",
                    "deviceInfo": {
                        "deviceNameExpressionSource": "request",
                        "deviceNameExpression": "${name}",
                        "deviceProfileExpressionSource": "constant",
                        "deviceProfileExpression": "thermometer",
                    },
                    "attributes": [{"type": "string", "key": "model", "value": "${model}"}],
                    "timeseries": [{"type": "double", "key": "temperature", "value": "${temp}"}],
                },
            }
        ],
        "requestsMapping": {
            "attributeRequests": [
                {
                    "endpoint": "/shared",
                    "type": "shared",
                    "HTTPMethods": ["POST"],
                    "security": anonymous,
                    "timeout": 10,
                    "deviceNameExpression": "${name}",
                    "attributeNameExpression": "${attribute}",
                }
            ],
            "attributeUpdates": [
                {
                    "deviceNameFilter": ".*",
                    "attributeFilter": ".*",
                    "HTTPMethod": "POST",
                    "requestUrlExpression": sink.url("/attributes/${deviceName}"),
                    "valueExpression": '{"${attributeKey}": "${attributeValue}"}',
                    "httpHeaders": json_headers,
                    "security": anonymous,
                    "timeout": 10,
                    "tries": 1,
                    "allowRedirects": False,
                    "SSLVerify": False,
                }
            ],
            "serverSideRpc": [
                {
                    "deviceNameFilter": ".*",
                    "methodFilter": "setValve",
                    "HTTPMethod": "POST",
                    "requestUrlExpression": sink.url("/rpc/${deviceName}/${methodName}"),
                    "valueExpression": "${params}",
                    "httpHeaders": json_headers,
                    "security": anonymous,
                    "responseTimeout": 10,
                    "timeout": 10,
                    "tries": 1,
                }
            ],
        },
    }
    return {"tb_gateway.json": main, "rest.json": rest}


# The gateway's loggers, to its stdout (no log files in the config or working directory).
LOGS_JSON = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "stream": "ext://sys.stdout",
        }
    },
    "loggers": {
        name: {"handlers": ["console"], "level": "INFO", "propagate": False}
        for name in ("service", "connector", "converter", "tb_connection", "storage", "extension")
    },
    "root": {"level": "INFO", "handlers": ["console"]},
}


class TbGateway:
    """A running thingsboard-gateway process, stopped by its PID."""

    def __init__(self, workdir: Path, files: dict[str, dict[str, Any]], rest_port: int) -> None:
        config_dir = workdir / "config"
        config_dir.mkdir(parents=True)
        for name, content in {**files, "logs.json": LOGS_JSON}.items():
            (config_dir / name).write_text(json.dumps(content, indent=2))
        self.log = workdir / "gateway.log"
        self.rest_url = f"http://{HOST}:{rest_port}"
        # A bare environment: the gateway reads `host`, `port`, `accessToken`, `username`,
        # TB_GW_* and more from it, over its config file.
        env = {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8"}
        env.update(HOME=str(workdir), PYTHONUNBUFFERED="1")
        cmd = [str(TBGW_PYTHON), str(LAUNCHER), str(config_dir / "tb_gateway.json")]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def post(self, path: str, body: dict[str, Any], timeout: float = GATEWAY_WAIT_S) -> Any:
        """POST JSON to the REST connector; retried while its listener is not up yet."""

        def attempt() -> httpx.Response | None:
            if self.exited():
                code = self.proc.returncode
                raise AssertionError(f"the gateway exited with {code}:\n" + self.tail())
            try:
                return httpx.post(self.rest_url + path, json=body, timeout=timeout)
            except httpx.TransportError:
                return None

        response = wait_until(attempt, f"the gateway's REST connector at {self.rest_url}", timeout)
        assert response.status_code == 200, f"{response.text}\n" + self.tail()
        return response

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def stop(self) -> int:
        """SIGINT (the gateway's own clean stop), then SIGKILL if it is not gone in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def _tbgw_version() -> str:
    if not TBGW_PYTHON.exists():
        pytest.fail(
            f"{TBGW_PYTHON} is missing: the thingsboard-gateway virtualenv is installed by "
            "scripts/test (or run `bash scripts/_tb_gateway.sh` from the project root)",
            pytrace=False,
        )
    probe = "from importlib.metadata import version; print(version('thingsboard-gateway'))"
    done = subprocess.run(
        [str(TBGW_PYTHON), "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"thingsboard-gateway is not importable:\n{done.stderr}"
    return done.stdout.strip()


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with module_server(tmp_path_factory, "tb-gateway") as server:
        yield server


@pytest.fixture(scope="module")
def sink() -> Iterator[HttpSink]:
    server = HttpSink()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def gw_device(srv: RunningServer) -> dict[str, Any]:
    with srv.admin() as admin:
        return new_device(admin, _name("gateway"), gateway=True)


@pytest.fixture(scope="module")
def gateway(
    srv: RunningServer,
    gw_device: dict[str, Any],
    sink: HttpSink,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TbGateway]:
    """thingsboard-gateway connected to `srv` as `gw_device`, with one REST connector."""
    _tbgw_version()
    rest_port = _free_port()
    files = gateway_config(srv.mqtt_port, gw_device["access_token"], rest_port, sink)
    gw = TbGateway(tmp_path_factory.mktemp("tbgw"), files, rest_port)
    try:
        # Connected and started: its connectors only register field devices with the
        # platform once its MQTT session is up, and it reports its version after that.
        with srv.admin() as admin:
            try:
                wait_until(
                    lambda: _gateway_version(admin, gw_device) or gw.exited(),
                    "thingsboard-gateway to connect and report its version",
                    GATEWAY_WAIT_S,
                )
            except AssertionError as exc:
                raise AssertionError(f"{exc}; its log ends:\n{gw.tail()}") from None
        assert not gw.exited(), f"thingsboard-gateway (pid {gw.pid}) exited:\n{gw.tail()}"
        yield gw
    finally:
        gw.stop()
    # Everything iotmesh sent it was understood: the gateway logged no error.
    bad = [line for line in gw.output().splitlines() if " ERROR " in line or "Traceback" in line]
    assert not bad, "thingsboard-gateway logged errors:\n" + "\n".join(bad[:20])


def _gateway_version(rest: httpx.Client, gw_device: dict[str, Any]) -> Any:
    """The `Version` client attribute the gateway reports about itself (None before)."""
    return attributes(rest, gw_device["id"], "CLIENT").get("Version")


def _device(rest: httpx.Client, name: str) -> dict[str, Any] | None:
    r = rest.get("/api/v1/devices", params={"text_search": name, "page_size": 100})
    assert r.status_code == 200, r.text
    found = [d for d in r.json()["data"] if d["name"] == name]
    return found[0] if found else None


def _sensor(gateway: TbGateway, rest: httpx.Client, label: str) -> dict[str, Any]:
    """A field device that reported once through the gateway, as iotmesh registered it."""
    name = _name(label)
    gateway.post("/sensors", {"name": name, "model": "T1000", "temp": 20.5, "ts": T0})
    child = wait_until(lambda: _device(rest, name), f"device {name!r}", GATEWAY_WAIT_S)
    return child


# -- tests ----------------------------------------------------------------------------------


def test_telemetry_of_a_rest_connector_device_arrives(
    gateway: TbGateway, rest: httpx.Client, gw_device: dict[str, Any]
) -> None:
    name = _name("thermometer")
    gateway.post("/sensors", {"name": name, "model": "T1000", "temp": 21.5, "ts": T0})
    gateway.post("/sensors", {"name": name, "model": "T1000", "temp": 22, "ts": T0 + 1000})

    child = wait_until(lambda: _device(rest, name), f"device {name!r}", GATEWAY_WAIT_S)
    assert child["gateway_id"] == gw_device["id"]
    assert child["gateway"] is False
    assert child["type"] == "thermometer"  # the connector's deviceProfileExpression

    def both_points() -> list[dict[str, Any]] | None:
        found = points(rest, child["id"], "temperature")
        return found if len(found) == 2 else None

    # The REST connector's converter sends every value as a JSON string, and iotmesh
    # keeps JSON types (ThingsBoard casts numeric strings by default; see device-api.md).
    assert wait_until(both_points, "two temperature points", GATEWAY_WAIT_S) == [
        {"ts": T0, "value": "21.5"},
        {"ts": T0 + 1000, "value": "22"},
    ]

    def client_attributes() -> dict[str, Any] | None:
        found = attributes(rest, child["id"], "CLIENT")
        return found if "model" in found and "connectorName" in found else None

    assert wait_until(client_attributes, "client attributes", GATEWAY_WAIT_S) == {
        "model": "T1000",
        "connectorName": CONNECTOR,
        "connectorType": "rest",
    }


def test_the_gateway_reports_about_itself_over_the_device_api(
    gateway: TbGateway, rest: httpx.Client, gw_device: dict[str, Any]
) -> None:
    """Beside the gateway API, the same connection carries the gateway's own data."""
    assert _gateway_version(rest, gw_device) == _tbgw_version()
    keys = wait_until(
        lambda: telemetry_keys(rest, gw_device["id"]), "the gateway's statistics", GATEWAY_WAIT_S
    )
    assert {"machineStats", "serviceStats"} <= set(keys)


def test_a_shared_attribute_update_reaches_the_field_device(
    gateway: TbGateway, rest: httpx.Client, sink: HttpSink
) -> None:
    child = _sensor(gateway, rest, "valve")
    set_shared(rest, child["id"], {"setpoint": 19})
    # The connector's valueExpression quotes the value: it arrives as a string.
    assert sink.expect(f"/attributes/{child['name']}") == {"setpoint": "19"}


def test_an_attribute_request_through_the_gateway(gateway: TbGateway, rest: httpx.Client) -> None:
    child = _sensor(gateway, rest, "heater")
    set_shared(rest, child["id"], {"mode": "eco", "limit": 30})
    response = gateway.post("/shared", {"name": child["name"], "attribute": "mode"})
    answer = response.json()
    assert isinstance(answer.pop("id"), int)
    assert answer == {"device": child["name"], "values": {"mode": "eco"}}


def test_rpc_to_a_device_behind_the_gateway(
    gateway: TbGateway, srv: RunningServer, rest: httpx.Client, sink: HttpSink
) -> None:
    child = _sensor(gateway, rest, "pump")
    body = {"method": "setValve", "params": {"open": 25}, "timeout_ms": 20_000}
    with rpc_call(srv, child["id"], body) as call:
        assert sink.expect(f"/rpc/{child['name']}/setValve") == {"open": 25}
        response = call.result(timeout=GATEWAY_WAIT_S)
    assert response.status_code == 200, response.text
    assert response.json() == {"result": HttpSink.REPLY}


def test_an_empty_keys_list_asks_for_every_shared_attribute(
    srv: RunningServer, rest: httpx.Client
) -> None:
    """Replayed, since no built-in connector without hardware sends it: on a device's
    connect, thingsboard-gateway syncs its shared attributes, and for a connector that
    lists none (`'*'`) it sends `gw_request_shared_attributes(name, [])`, which is this
    payload; ThingsBoard answers every shared attribute."""
    gw = new_device(rest, _name("replaying gateway"), gateway=True)
    name = _name("modbus meter")
    with device_client(srv.mqtt_port, gw["access_token"], V311) as client:
        client.subscribed("v1/gateway/attributes/response")
        client.publish("v1/gateway/connect", {"device": name, "type": "default"})
        child = _device(rest, name)
        assert child is not None
        set_shared(rest, child["id"], {"scale": 10, "unit": "kWh"})
        request = {"keys": [], "device": name, "client": False, "id": 1}
        client.publish("v1/gateway/attributes/request", request)
        assert client.expect_json("v1/gateway/attributes/response") == {
            "id": 1,
            "device": name,
            "values": {"scale": 10, "unit": "kWh"},
        }
