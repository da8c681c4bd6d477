"""Device registry through the REST API of a real `iotmesh run`."""

from __future__ import annotations

import httpx

from tests.integration.server import RunningServer


def test_healthz_and_openapi_need_no_auth(server: RunningServer) -> None:
    with server.anonymous() as client:
        health = client.get("/healthz")
        assert health.status_code == 200
        assert health.json()["status"] == "ok"
        spec = client.get("/api/openapi.json").json()
        assert "/api/v1/devices" in spec["paths"]
        assert "/api/v1/{access_token}/telemetry" in spec["paths"]
        assert client.get("/api/docs").status_code == 200


def test_create_get_list_patch_delete(admin: httpx.Client) -> None:
    r = admin.post(
        "/api/v1/devices", json={"name": "boiler-1", "type": "boiler", "label": "cellar"}
    )
    assert r.status_code == 201
    device = r.json()
    assert {"id", "name", "access_token"} <= device.keys()
    assert device["name"] == "boiler-1"
    assert device["type"] == "boiler"
    assert len(device["access_token"]) == 20

    got = admin.get(f"/api/v1/devices/{device['id']}").json()
    assert got.pop("connectivity") == {
        "online": False,
        "transport": None,
        "last_activity_ts": 0,
        "last_connect_ts": 0,
        "last_disconnect_ts": 0,
        "sessions": 0,
    }
    assert got == device

    admin.post("/api/v1/devices", json={"name": "boiler-2", "access_token": "my-token-2"})
    page = admin.get("/api/v1/devices", params={"page_size": 1}).json()
    assert page["total"] == 2
    assert page["has_next"] is True
    assert [d["name"] for d in page["data"]] == ["boiler-1"]
    found = admin.get("/api/v1/devices", params={"text_search": "ler-2"}).json()
    assert [d["access_token"] for d in found["data"]] == ["my-token-2"]

    patched = admin.patch(f"/api/v1/devices/{device['id']}", json={"label": "attic"}).json()
    assert patched["label"] == "attic"
    assert patched["name"] == "boiler-1"

    assert admin.delete(f"/api/v1/devices/{device['id']}").status_code == 204
    gone = admin.get(f"/api/v1/devices/{device['id']}")
    assert gone.status_code == 404
    assert gone.headers["content-type"] == "application/problem+json"


def test_duplicate_name_and_token_conflict(admin: httpx.Client) -> None:
    assert (
        admin.post("/api/v1/devices", json={"name": "a", "access_token": "tok-a"}).status_code
        == 201
    )
    dup_name = admin.post("/api/v1/devices", json={"name": "a"})
    assert dup_name.status_code == 409
    assert "name" in dup_name.json()["detail"]
    dup_token = admin.post("/api/v1/devices", json={"name": "b", "access_token": "tok-a"})
    assert dup_token.status_code == 409
    assert "token" in dup_token.json()["detail"]


def test_rotate_credentials_revokes_old_token(server: RunningServer, admin: httpx.Client) -> None:
    device = admin.post("/api/v1/devices", json={"name": "rot"}).json()
    old = device["access_token"]
    with server.anonymous() as dev:
        assert dev.post(f"/api/v1/{old}/telemetry", json={"t": 1}).status_code == 200
        rotated = admin.post(f"/api/v1/devices/{device['id']}/credentials").json()
        assert rotated["access_token"] != old
        assert dev.post(f"/api/v1/{old}/telemetry", json={"t": 2}).status_code == 401
        new = rotated["access_token"]
        assert dev.post(f"/api/v1/{new}/telemetry", json={"t": 3}).status_code == 200
    chosen = admin.post(
        f"/api/v1/devices/{device['id']}/credentials", json={"access_token": "mine"}
    )
    assert chosen.json()["access_token"] == "mine"


def test_admin_auth_required(server: RunningServer) -> None:
    with server.anonymous() as client:
        missing = client.get("/api/v1/devices")
        assert missing.status_code == 401
        assert missing.headers["content-type"] == "application/problem+json"
        assert "Bearer" in missing.json()["detail"]
        wrong = client.get("/api/v1/devices", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401


def test_bad_requests_are_problem_json(admin: httpx.Client) -> None:
    for response in (
        admin.post("/api/v1/devices", json={"type": "x"}),
        admin.post("/api/v1/devices", json={"name": "x", "colour": "red"}),
        admin.post(
            "/api/v1/devices", content=b"{nope", headers={"content-type": "application/json"}
        ),
        admin.post("/api/v1/devices", json={"name": "x", "access_token": "has space"}),
        admin.get("/api/v1/devices", params={"page": -1}),
    ):
        assert response.status_code == 400, response.text
        problem = response.json()
        assert response.headers["content-type"] == "application/problem+json"
        assert problem["status"] == 400
        assert problem["detail"]
    assert admin.get("/api/v1/devices/not-a-uuid").status_code == 404
