"""The CoAP device API spoken by libcoap's command-line client (`coap-client-notls`,
Debian libcoap3-bin) to a real `iotmesh run`: what a ThingsBoard user types."""

from __future__ import annotations

import itertools
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.coap_helpers import COAP_CLIENT, coap_url, libcoap, requires_libcoap
from tests.integration.mqtt_helpers import (
    attributes,
    module_server,
    new_device,
    points,
    rpc_call,
    set_shared,
    wait_until,
)
from tests.integration.server import RunningServer

pytestmark = requires_libcoap

_names = itertools.count()


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with module_server(tmp_path_factory, "coap-libcoap") as server:
        yield server


@pytest.fixture
def dev(rest: httpx.Client) -> dict[str, Any]:
    return new_device(rest, f"coap-libcoap-{next(_names)}")


def test_post_telemetry_is_stored(srv: RunningServer, rest: httpx.Client, dev: Any) -> None:
    url = coap_url(srv, dev["access_token"], "telemetry")
    result = libcoap("-m", "post", "-t", "json", "-e", '{"temperature": 21.5}', url)
    assert result.returncode == 0, result.stderr
    assert result.error_code is None, result.stderr
    # 2.04 came back, so the point is committed: no waiting needed.
    assert [p["value"] for p in points(rest, dev["id"], "temperature")] == [21.5]


def test_post_with_device_time_and_array(srv: RunningServer, rest: httpx.Client, dev: Any) -> None:
    body = [
        {"ts": 1_700_000_000_000, "values": {"t": 1}},
        {"ts": 1_700_000_000_001, "values": {"t": 2}},
    ]
    result = libcoap(
        "-m", "post", "-e", json.dumps(body), coap_url(srv, dev["access_token"], "telemetry")
    )
    assert result.error_code is None, result.stderr
    stored = points(rest, dev["id"], "t")
    assert [(p["ts"], p["value"]) for p in stored] == [
        (1_700_000_000_000, 1),
        (1_700_000_000_001, 2),
    ]


def test_wrong_token_is_401_and_bad_json_is_400(srv: RunningServer, dev: Any) -> None:
    wrong = libcoap("-m", "post", "-e", '{"t": 1}', coap_url(srv, "no-such-token", "telemetry"))
    assert wrong.error_code == "4.01", wrong.stderr
    bad = libcoap("-m", "post", "-e", '{"t": ', coap_url(srv, dev["access_token"], "telemetry"))
    assert bad.error_code == "4.00", bad.stderr
    assert "JSON" in bad.stderr
    missing = libcoap("-m", "get", coap_url(srv, dev["access_token"], "nothing-here"))
    assert missing.error_code == "4.04", missing.stderr


def test_attributes_post_and_get(srv: RunningServer, rest: httpx.Client, dev: Any) -> None:
    token = dev["access_token"]
    posted = libcoap(
        "-m", "post", "-e", '{"fw": "1.0", "mode": 2}', coap_url(srv, token, "attributes")
    )
    assert posted.error_code is None, posted.stderr
    assert attributes(rest, dev["id"], "CLIENT") == {"fw": "1.0", "mode": 2}
    set_shared(rest, dev["id"], {"target": 20, "other": True})
    got = libcoap("-m", "get", coap_url(srv, token, "attributes?clientKeys=fw&sharedKeys=target"))
    assert got.error_code is None, got.stderr
    assert json.loads(got.stdout) == {"client": {"fw": "1.0"}, "shared": {"target": 20}}
    everything = libcoap("-m", "get", coap_url(srv, token, "attributes"))
    assert json.loads(everything.stdout) == {
        "client": {"fw": "1.0", "mode": 2},
        "shared": {"target": 20, "other": True},
    }


def _observe(url: str, seconds: int, log: Path) -> subprocess.Popen[bytes]:
    """coap-client observing `url` for `seconds`, printing each notification on a line."""
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [COAP_CLIENT, "-m", "get", "-s", str(seconds), "-w", url], stdout=out, stderr=out
        )


def _finish(proc: subprocess.Popen[bytes]) -> None:
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def test_observe_shared_attribute_set_over_rest(
    srv: RunningServer, rest: httpx.Client, dev: Any, tmp_path: Path
) -> None:
    set_shared(rest, dev["id"], {"before": 1})
    log = tmp_path / "observe.log"
    proc = _observe(coap_url(srv, dev["access_token"], "attributes"), 8, log)
    try:
        wait_until(lambda: '{"before":1}' in log.read_text(), "the first observe answer")
        set_shared(rest, dev["id"], {"setpoint": 22.5})
        wait_until(lambda: '{"setpoint":22.5}' in log.read_text(), "the shared attribute push")
    finally:
        _finish(proc)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert lines[:2] == ['{"before":1}', '{"setpoint":22.5}']


def test_observe_rpc_and_reply(srv: RunningServer, dev: Any, tmp_path: Path) -> None:
    token = dev["access_token"]
    log = tmp_path / "rpc.log"
    proc = _observe(coap_url(srv, token, "rpc"), 10, log)
    try:
        call = {"method": "setGpio", "params": {"pin": 23}, "timeout_ms": 8000}
        with rpc_call(srv, dev["id"], call) as future:
            text = wait_until(
                lambda: next(
                    (line for line in log.read_text().splitlines() if "setGpio" in line), None
                ),
                "the RPC request notification",
            )
            request = json.loads(text)
            assert request["method"] == "setGpio"
            assert request["params"] == {"pin": 23}
            reply = libcoap(
                "-m", "post", "-e", '{"result": "ok"}', coap_url(srv, token, f"rpc/{request['id']}")
            )
            assert reply.error_code is None, reply.stderr
            response = future.result(timeout=20)
        assert response.status_code == 200, response.text
        assert response.json() == {"result": "ok"}
    finally:
        _finish(proc)


def test_blockwise_upload_of_3_kb(
    srv: RunningServer, rest: httpx.Client, dev: Any, tmp_path: Path
) -> None:
    big = "x" * 3000
    body = tmp_path / "big.json"
    body.write_text(json.dumps({"blob": big, "n": 7}))
    url = coap_url(srv, dev["access_token"], "telemetry")
    # 64-byte blocks: some 50 Block1 exchanges (2.31 Continue each, 2.04 at the end).
    result = libcoap("-m", "post", "-b", "64", "-f", str(body), url)
    assert result.error_code is None, result.stderr
    assert [p["value"] for p in points(rest, dev["id"], "blob")] == [big]
    assert [p["value"] for p in points(rest, dev["id"], "n")] == [7]


def test_blockwise_download_of_attributes(srv: RunningServer, rest: httpx.Client, dev: Any) -> None:
    # ~3.6 kB of JSON. Few keys: coap-client drops a long query from its URI.
    big = {f"key{i}": "v" * 1200 for i in range(3)}
    set_shared(rest, dev["id"], big)
    result = libcoap(
        "-m",
        "get",
        "-b",
        "64",
        coap_url(srv, dev["access_token"], "attributes?sharedKeys=" + ",".join(big)),
    )
    assert result.error_code is None, result.stderr
    assert json.loads(result.stdout) == {"shared": big}


def test_client_side_rpc_and_non(srv: RunningServer, rest: httpx.Client, dev: Any) -> None:
    token = dev["access_token"]
    answer = libcoap(
        "-m",
        "post",
        "-e",
        '{"method": "getCurrentTime", "params": {}}',
        coap_url(srv, token, "rpc"),
    )
    assert answer.error_code is None, answer.stderr
    assert abs(json.loads(answer.stdout)["time"] - time.time() * 1000) < 60_000
    # NON: the 2.04 comes back as NON after the commit, the point is stored.
    non = libcoap("-N", "-m", "post", "-e", '{"non": 1}', coap_url(srv, token, "telemetry"))
    assert non.error_code is None, non.stderr
    assert [p["value"] for p in points(rest, dev["id"], "non")] == [1]
