"""Attributes over REST on a real `iotmesh run` (device-side access comes with MQTT/CoAP)."""

from __future__ import annotations

from typing import Any

import httpx


def test_scopes_versions_and_delete(admin: httpx.Client, device: dict[str, Any]) -> None:
    url = f"/api/v1/devices/{device['id']}/attributes"
    saved = admin.post(url, params={"scope": "SHARED"}, json={"target": 21, "mode": "eco"})
    assert saved.status_code == 200, saved.text
    assert {a["key"]: a["version"] for a in saved.json()} == {"target": 1, "mode": 1}
    again = admin.post(url, params={"scope": "SHARED"}, json={"target": 22.5})
    assert again.json()[0]["version"] == 2
    admin.post(url, params={"scope": "SERVER"}, json={"note": {"installed": "2026-01-01"}})

    shared = admin.get(url, params={"scope": "SHARED"}).json()
    assert [(a["key"], a["value"]) for a in shared] == [("mode", "eco"), ("target", 22.5)]
    server = admin.get(url, params={"scope": "SERVER", "keys": "note"}).json()
    assert server[0]["value"] == {"installed": "2026-01-01"}
    assert admin.get(url, params={"scope": "CLIENT"}).json() == []

    deleted = admin.delete(url, params={"scope": "SHARED", "keys": "mode,missing"})
    assert deleted.json() == {"deleted": 1}
    assert [a["key"] for a in admin.get(url, params={"scope": "SHARED"}).json()] == ["target"]


def test_attribute_errors(admin: httpx.Client, device: dict[str, Any]) -> None:
    url = f"/api/v1/devices/{device['id']}/attributes"
    assert admin.post(url, json={}).status_code == 400
    assert admin.post(url, json={"a": None}).status_code == 400
    assert admin.post(url, json=[1, 2]).status_code == 400
    assert admin.get(url, params={"scope": "PUBLIC"}).status_code == 400
    assert admin.get(url, params={"keys": ""}).status_code == 400  # not an SQL error
    missing = "/api/v1/devices/00000000-0000-0000-0000-000000000000/attributes"
    assert admin.get(missing).status_code == 404
