"""MQTT Basic credentials (client id, user name, password) against a real `iotmesh run`:
set over REST, used by paho-mqtt (v3.1.1 and v5) and mosquitto_pub, refused with the
right CONNACK codes when wrong, and dropped at once when changed."""

from __future__ import annotations

import itertools
import json
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest

from iotmesh.app import Platform
from iotmesh.core.settings import Settings
from tests.integration.mqtt_helpers import (
    T0,
    V5,
    V311,
    VERSION_IDS,
    VERSIONS,
    PahoClient,
    module_server,
    new_device,
    packet,
    points,
    raw_socket,
    read_packet,
)
from tests.integration.server import RunningServer

TELEMETRY = "v1/devices/me/telemetry"
BAD_USER_NAME_OR_PASSWORD = 0x86  # paho shows v3.1.1 return code 4 as this v5 reason
NOT_AUTHORIZED = 0x87  # ... and return code 5 as this one

_names = itertools.count()


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with module_server(tmp_path_factory, "mqtt-basic") as server:
        yield server


@pytest.fixture
def dev(rest: httpx.Client) -> dict[str, Any]:
    return new_device(rest, f"basic-device-{next(_names)}")


def _unique(prefix: str) -> str:
    return f"{prefix}-{next(_names)}"


def put_basic(rest: httpx.Client, device_id: str, **fields: str) -> httpx.Response:
    return rest.put(
        f"/api/v1/devices/{device_id}/credentials", json={"type": "MQTT_BASIC", **fields}
    )


def set_basic(rest: httpx.Client, device_id: str, **fields: str) -> list[dict[str, Any]]:
    r = put_basic(rest, device_id, **fields)
    assert r.status_code == 200, r.text
    body: list[dict[str, Any]] = r.json()
    return body


@contextmanager
def paho(
    srv: RunningServer,
    version: int,
    client_id: str = "",
    username: str | None = None,
    password: str | None = None,
) -> Iterator[PahoClient]:
    with PahoClient(srv.mqtt_port, version=version, client_id=client_id) as client:
        if username is not None:
            client.paho.username_pw_set(username, password)
        yield client


def connect_rc(srv: RunningServer, version: int, **login: Any) -> int:
    """Connect with paho; return the CONNACK reason code (as paho gives it)."""
    with paho(srv, version, **login) as client:
        rc = client.connect()
        if rc.value:
            client.wait_disconnected()
        value: int = rc.value
        return value


def mosquitto_pub(
    srv: RunningServer, payload: dict[str, Any], *args: str
) -> subprocess.CompletedProcess[str]:
    cmd = [
        "mosquitto_pub", "-h", "127.0.0.1", "-p", str(srv.mqtt_port), "-q", "1",
        "-t", TELEMETRY, "-m", json.dumps(payload), *args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


def _str(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def raw_connect(client_id: str, username: str, password: str, version: int = V311) -> bytes:
    """A CONNECT with user name and password (paho would hide the v3.1.1 return code)."""
    body = _str("MQTT") + bytes([version, 0xC2]) + struct.pack("!H", 60)
    if version == V5:
        body += b"\x00"  # no properties
    body += _str(client_id) + _str(username) + _str(password)
    return packet(0x10, body)


# -- REST -------------------------------------------------------------------------------------


def test_rest_set_and_get_never_shows_the_password(rest: httpx.Client, dev: dict[str, Any]) -> None:
    url = f"/api/v1/devices/{dev['id']}/credentials"
    before = rest.get(url)
    assert before.status_code == 200
    assert before.json() == [{"type": "ACCESS_TOKEN", "token": dev["access_token"]}]

    body = set_basic(rest, dev["id"], client_id="c-rest", username="u-rest", password="pw-rest")
    expected = {
        "type": "MQTT_BASIC",
        "client_id": "c-rest",
        "username": "u-rest",
        "password_set": True,
    }
    assert body == [{"type": "ACCESS_TOKEN", "token": dev["access_token"]}, expected]
    assert rest.get(url).json() == body
    assert "pw-rest" not in rest.get(url).text
    assert "pw-rest" not in rest.get(f"/api/v1/devices/{dev['id']}").text

    only_client = set_basic(rest, dev["id"], client_id="c-rest-2")
    assert only_client[1] == {
        "type": "MQTT_BASIC",
        "client_id": "c-rest-2",
        "username": None,
        "password_set": False,
    }
    assert rest.delete(f"{url}/MQTT_BASIC").status_code == 204
    assert rest.delete(f"{url}/MQTT_BASIC").status_code == 204  # already gone: still done
    assert [e["type"] for e in rest.get(url).json()] == ["ACCESS_TOKEN"]


def test_rest_token_through_put_and_old_post_still_work(
    srv: RunningServer, rest: httpx.Client, dev: dict[str, Any]
) -> None:
    url = f"/api/v1/devices/{dev['id']}/credentials"
    r = rest.put(url, json={"type": "ACCESS_TOKEN", "token": _unique("put-token")})
    assert r.status_code == 200, r.text
    token = r.json()[0]["token"]
    assert token.startswith("put-token-")
    generated = rest.put(url, json={"type": "ACCESS_TOKEN"}).json()[0]["token"]
    assert len(generated) == 20
    with srv.anonymous() as device_http:
        assert device_http.post(f"/api/v1/{token}/telemetry", json={"t": 1}).status_code == 401
        assert device_http.post(f"/api/v1/{generated}/telemetry", json={"t": 1}).status_code == 200
    rotated = rest.post(url, json={"access_token": _unique("post-token")})
    assert rotated.status_code == 200
    assert rotated.json()["access_token"].startswith("post-token-")


def test_rest_errors(rest: httpx.Client, dev: dict[str, Any]) -> None:
    other = new_device(rest, _unique("basic-other"))
    set_basic(rest, dev["id"], client_id="taken-client", username="taken-user")
    conflict = put_basic(rest, other["id"], client_id="taken-client", username="taken-user")
    assert conflict.status_code == 409
    assert conflict.headers["content-type"] == "application/problem+json"
    assert "client id and user name" in conflict.json()["detail"]

    url = f"/api/v1/devices/{other['id']}/credentials"
    for body in (
        {"type": "MQTT_BASIC"},
        {"type": "MQTT_BASIC", "password": "pw"},
        {"type": "MQTT_BASIC", "client_id": "c", "password": "pw"},
        {"type": "MQTT_BASIC", "username": ""},
        {"type": "MQTT_BASIC", "username": "u", "colour": "red"},
        {"type": "PSK", "key": "k"},
        {"client_id": "c"},
        {"type": "ACCESS_TOKEN", "token": "has space"},
        {"type": "X509_CERTIFICATE", "certificate_pem": "not a certificate"},
    ):
        r = rest.put(url, json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["detail"]
    assert rest.delete(f"{url}/ACCESS_TOKEN").status_code == 400
    assert rest.delete(f"{url}/NOPE").status_code == 400

    missing = "/api/v1/devices/5f0e6f6a-3c53-4a56-9d1c-7d1d2b5a0099/credentials"
    assert rest.get(missing).status_code == 404
    assert rest.put(missing, json={"type": "MQTT_BASIC", "client_id": "x"}).status_code == 404
    assert rest.delete(f"{missing}/MQTT_BASIC").status_code == 404


# -- MQTT -------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_paho_with_client_id_username_password(
    srv: RunningServer, rest: httpx.Client, dev: dict[str, Any], version: int
) -> None:
    login = {"client_id": _unique("paho-c"), "username": _unique("paho-u"), "password": "pw"}
    set_basic(rest, dev["id"], **login)
    with paho(srv, version, **login) as client:
        assert client.connect().value == 0
        assert client.publish(TELEMETRY, {"ts": T0, "values": {"basic": version}}).value == 0
    assert [p["value"] for p in points(rest, dev["id"], "basic")] == [version]

    # The client id is part of these credentials; the token keeps working alongside.
    other_client = {**login, "client_id": _unique("paho-other")}
    assert connect_rc(srv, version, **other_client) == NOT_AUTHORIZED
    assert connect_rc(srv, version, username=dev["access_token"]) == 0


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_paho_username_password_any_client_id(
    srv: RunningServer, rest: httpx.Client, dev: dict[str, Any], version: int
) -> None:
    username = _unique("any-client-u")
    set_basic(rest, dev["id"], username=username, password="pw")
    for client_id in ("", _unique("whatever")):
        with paho(srv, version, client_id=client_id, username=username, password="pw") as c:
            assert c.connect().value == 0
            value = {"ts": T0 + len(client_id), "values": {"any_client": len(client_id)}}
            assert c.publish(TELEMETRY, value).value == 0
    assert len(points(rest, dev["id"], "any_client")) == 2


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_wrong_password_and_unknown_logins_are_refused(
    srv: RunningServer, rest: httpx.Client, dev: dict[str, Any], version: int
) -> None:
    username = _unique("refuse-u")
    set_basic(rest, dev["id"], username=username, password="right")
    assert connect_rc(srv, version, username=username, password="wrong") == (
        BAD_USER_NAME_OR_PASSWORD
    )
    assert connect_rc(srv, version, username=username) == BAD_USER_NAME_OR_PASSWORD
    assert connect_rc(srv, version, username=_unique("nobody"), password="right") == (
        NOT_AUTHORIZED
    )
    assert connect_rc(srv, version, client_id=_unique("unknown-client")) == NOT_AUTHORIZED


def test_refusal_codes_on_the_wire(srv: RunningServer, rest: httpx.Client) -> None:
    """The exact CONNACK bytes: v3.1.1 return codes 4 and 5, v5 reasons 0x86 and 0x87."""
    dev = new_device(rest, _unique("wire"))
    username = _unique("wire-u")
    set_basic(rest, dev["id"], username=username, password="right")
    cases = [
        (V311, username, b"\x00\x04"),
        (V311, _unique("nobody"), b"\x00\x05"),
        (V5, username, b"\x00\x86"),
        (V5, _unique("nobody"), b"\x00\x87"),
    ]
    for version, user, expected in cases:
        with raw_socket(srv.mqtt_port) as sock:
            sock.sendall(raw_connect(_unique("wire-c"), user, "wrong", version))
            got = read_packet(sock)
            assert got is not None
            first_byte, body = got
            assert first_byte == 0x20
            assert body[:2] == expected, (version, user, body)
            assert read_packet(sock) is None  # then the server closes


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_client_id_only(
    srv: RunningServer, rest: httpx.Client, dev: dict[str, Any], version: int
) -> None:
    client_id = _unique("only-client")
    set_basic(rest, dev["id"], client_id=client_id)
    with paho(srv, version, client_id=client_id) as client:
        assert client.connect().value == 0
        assert client.publish(TELEMETRY, {"ts": T0, "values": {"cid": 1}}).value == 0
    # Any user name and password go with it, as in ThingsBoard.
    with paho(srv, version, client_id=client_id, username="x", password="y") as client:
        assert client.connect().value == 0
        assert client.publish(TELEMETRY, {"ts": T0 + 1, "values": {"cid": 2}}).value == 0
    assert [p["value"] for p in points(rest, dev["id"], "cid")] == [1, 2]


def test_mosquitto_pub_with_basic_credentials(
    srv: RunningServer, rest: httpx.Client, dev: dict[str, Any]
) -> None:
    client_id, username = _unique("mosq-c"), _unique("mosq-u")
    set_basic(rest, dev["id"], client_id=client_id, username=username, password="mosq-pw")
    login = ["-i", client_id, "-u", username, "-P", "mosq-pw"]
    for version, offset in (("mqttv311", 0), ("mqttv5", 1)):
        payload = {"ts": T0 + offset, "values": {"mosq": offset}}
        done = mosquitto_pub(srv, payload, "-V", version, *login)
        assert done.returncode == 0, done.stderr
    assert [p["value"] for p in points(rest, dev["id"], "mosq")] == [0, 1]

    wrong = mosquitto_pub(srv, {"mosq": 9}, "-i", client_id, "-u", username, "-P", "nope")
    assert wrong.returncode != 0
    assert "bad user name or password" in wrong.stderr.lower(), wrong.stderr

    only_client = _unique("mosq-only")
    set_basic(rest, dev["id"], client_id=only_client)
    done = mosquitto_pub(srv, {"ts": T0 + 5, "values": {"mosq": 5}}, "-i", only_client)
    assert done.returncode == 0, done.stderr
    unknown = mosquitto_pub(srv, {"mosq": 9}, "-i", _unique("mosq-unknown"))
    assert unknown.returncode != 0
    assert "not authori" in unknown.stderr.lower(), unknown.stderr
    assert [p["value"] for p in points(rest, dev["id"], "mosq")] == [0, 1, 5]


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_changed_credentials_replace_the_old_ones_at_once(
    srv: RunningServer, rest: httpx.Client, dev: dict[str, Any], version: int
) -> None:
    username = _unique("change-u")
    set_basic(rest, dev["id"], username=username, password="old")
    assert connect_rc(srv, version, username=username, password="old") == 0  # now cached

    set_basic(rest, dev["id"], username=username, password="new")
    assert connect_rc(srv, version, username=username, password="old") == (
        BAD_USER_NAME_OR_PASSWORD
    )
    assert connect_rc(srv, version, username=username, password="new") == 0

    renamed = _unique("change-renamed")
    set_basic(rest, dev["id"], username=renamed, password="new")
    assert connect_rc(srv, version, username=username, password="new") == NOT_AUTHORIZED
    assert connect_rc(srv, version, username=renamed, password="new") == 0

    url = f"/api/v1/devices/{dev['id']}/credentials/MQTT_BASIC"
    assert rest.delete(url).status_code == 204
    assert connect_rc(srv, version, username=renamed, password="new") == NOT_AUTHORIZED

    set_basic(rest, dev["id"], username=renamed, password="again")
    assert rest.delete(f"/api/v1/devices/{dev['id']}").status_code == 204
    assert connect_rc(srv, version, username=renamed, password="again") == NOT_AUTHORIZED


async def test_refusals_count_as_auth_failures(tmp_path: Path) -> None:
    """In process, to read the server's counters: every refused login is counted."""
    settings = Settings(data_dir=tmp_path, http={"port": 0}, mqtt={"port": 0}, coap={"port": 0})
    async with Platform(settings) as platform:
        assert platform.http is not None
        assert platform.mqtt is not None
        assert platform.mqtt.ctx is not None
        stats = platform.mqtt.ctx.stats
        headers = {"Authorization": f"Bearer {platform.admin_token}"}
        url = f"http://127.0.0.1:{platform.http.port}"
        async with httpx.AsyncClient(base_url=url, headers=headers) as rest:
            dev = (await rest.post("/api/v1/devices", json={"name": "counted"})).json()
            r = await rest.put(
                f"/api/v1/devices/{dev['id']}/credentials",
                json={"type": "MQTT_BASIC", "username": "counted-u", "password": "pw"},
            )
            assert r.status_code == 200, r.text

        async def connect(username: str, password: str) -> int:
            client = aiomqtt.Client(
                "127.0.0.1", platform.mqtt.port, username=username, password=password
            )
            try:
                async with client:
                    return 0
            except aiomqtt.MqttCodeError as exc:
                return int(exc.rc) if isinstance(exc.rc, int) else exc.rc.value

        before = stats.auth_failures
        assert await connect("counted-u", "wrong") == BAD_USER_NAME_OR_PASSWORD
        assert await connect("nobody", "pw") == NOT_AUTHORIZED
        assert await connect("counted-u", "pw") == 0
        assert stats.auth_failures == before + 2
