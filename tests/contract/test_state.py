"""The contract of `StateStore`: every backend (SQLite, PostgreSQL) must pass this suite.

The rules tested are the docstrings of `iotmesh.storage.state.StateStore`: devices and
their unique name, token, certificate and MQTT Basic login (`Conflict` naming the field,
`NotFound` for a missing device), attributes with versions, RPC requests with ids that
are never given twice, device activity, and that everything survives a reopen.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from iotmesh.core.errors import Conflict, IotmeshError, NotFound
from iotmesh.core.types import (
    AttributeScope,
    BasicCredentials,
    Device,
    DeviceActivity,
    RpcRecord,
    RpcStatus,
)
from iotmesh.storage.state import StateStore
from tests.contract.conftest import StateBackend

CLIENT = AttributeScope.CLIENT
SHARED = AttributeScope.SHARED


def device(n: int, **changes: object) -> Device:
    fields: dict[str, object] = {
        "id": f"00000000-0000-4000-8000-{n:012d}",
        "name": f"device-{n}",
        "type": "default",
        "label": None,
        "created_ts": 1000 + n,
        "access_token": f"token-{n}",
    }
    return Device(**(fields | changes))  # type: ignore[arg-type]


def rpc(device_id: str, **changes: object) -> RpcRecord:
    draft = RpcRecord(device_id, 0, "setGpio", {"pin": 7}, False, True, RpcStatus.QUEUED, 10, 1, 2)
    return msgspec.structs.replace(draft, **changes)


async def added(state: StateStore, *numbers: int) -> list[Device]:
    devices = [device(n) for n in numbers]
    for d in devices:
        await state.create_device(d)
    return devices


# -- devices ------------------------------------------------------------------------


async def test_device_round_trips_and_is_found_by_id_name_and_token(state: StateStore) -> None:
    gw = device(1, gateway=True, label="roof")
    child = device(2, gateway_id=gw.id)
    await state.create_device(gw)
    await state.create_device(child)
    assert await state.get_device(gw.id) == gw
    assert await state.get_device(child.id) == child
    assert await state.device_by_name("device-2") == child
    assert await state.device_by_token("token-1") == gw
    assert await state.get_device("nope") is None
    assert await state.device_by_name("Device-2") is None  # names are case-sensitive
    assert await state.device_by_token("nope") is None


async def test_name_and_token_are_unique(state: StateStore) -> None:
    await added(state, 1)
    with pytest.raises(Conflict, match="name"):
        await state.create_device(device(2, name="device-1"))
    with pytest.raises(Conflict, match="access token"):
        await state.create_device(device(2, access_token="token-1"))
    # Neither failed attempt left anything behind.
    assert await state.get_device(device(2).id) is None
    await state.create_device(device(2))


async def test_list_devices_pages_in_creation_order_and_searches_names(
    state: StateStore,
) -> None:
    await state.create_device(device(3, created_ts=5))
    await state.create_device(device(1, created_ts=5))  # same time: by id
    await state.create_device(device(2, created_ts=1, name="Kitchen_50%"))
    page, total = await state.list_devices(0, 2)
    assert total == 3
    assert [d.name for d in page] == ["Kitchen_50%", "device-1"]
    page, total = await state.list_devices(2, 2)
    assert ([d.name for d in page], total) == (["device-3"], 3)
    assert await state.list_devices(5, 2) == ([], 3)
    page, total = await state.list_devices(0, 10, "kitchen")  # case-insensitive
    assert ([d.name for d in page], total) == (["Kitchen_50%"], 1)
    page, total = await state.list_devices(0, 10, "_50%")  # % and _ are literal
    assert total == 1
    assert await state.list_devices(0, 10, "e_1") == ([], 0)
    page, total = await state.list_devices(0, 10, "DEVICE")
    assert ([d.name for d in page], total) == (["device-1", "device-3"], 2)


async def test_update_device(state: StateStore) -> None:
    d1, _ = await added(state, 1, 2)
    changed = msgspec.structs.replace(d1, name="renamed", type="sensor", label="x", gateway=True)
    await state.update_device(changed)
    assert await state.get_device(d1.id) == changed
    with pytest.raises(Conflict, match="name"):
        await state.update_device(msgspec.structs.replace(changed, name="device-2"))
    with pytest.raises(NotFound):
        await state.update_device(device(9))


async def test_access_token_and_certificate(state: StateStore) -> None:
    d1, d2 = await added(state, 1, 2)
    await state.set_access_token(d1.id, "new-token")
    assert await state.device_by_token("token-1") is None
    assert (await state.device_by_token("new-token")) == msgspec.structs.replace(
        d1, access_token="new-token"
    )
    with pytest.raises(Conflict, match="access token"):
        await state.set_access_token(d2.id, "new-token")
    with pytest.raises(NotFound):
        await state.set_access_token("nope", "t")

    await state.set_certificate(d1.id, "ab" * 32)
    found = await state.device_by_certificate("ab" * 32)
    assert found is not None
    assert (found.id, found.cert_fingerprint) == (d1.id, "ab" * 32)
    with pytest.raises(Conflict, match="certificate"):
        await state.set_certificate(d2.id, "ab" * 32)
    await state.set_certificate(d2.id, "cd" * 32)  # several devices, each its own
    await state.set_certificate(d1.id, None)
    assert await state.device_by_certificate("ab" * 32) is None
    assert (await state.get_device(d1.id)) == msgspec.structs.replace(d1, access_token="new-token")
    with pytest.raises(NotFound):
        await state.set_certificate("nope", "ef")


async def test_basic_credentials(state: StateStore) -> None:
    d1, d2 = await added(state, 1, 2)
    assert await state.get_basic_credentials(d1.id) is None
    assert await state.get_basic_credentials("nope") is None
    both = BasicCredentials(client_id="c1", username="u", password_hash="$scrypt$x")
    await state.set_basic_credentials(d1.id, both)
    assert await state.get_basic_credentials(d1.id) == both
    assert await state.device_by_basic("c1", "u") == (d1, both)
    assert await state.device_by_basic(None, "u") is None  # exactly this pair
    # The same user name with another client id (or none) is another login.
    user_only = BasicCredentials(client_id=None, username="u")
    await state.set_basic_credentials(d2.id, user_only)
    assert await state.device_by_basic(None, "u") == (d2, user_only)
    with pytest.raises(Conflict, match="client id and user name"):
        await state.set_basic_credentials(d2.id, BasicCredentials("c1", "u"))
    assert await state.get_basic_credentials(d2.id) == user_only  # unchanged by the failure
    client_only = BasicCredentials(client_id="c2", username=None)
    await state.set_basic_credentials(d2.id, client_only)  # replaces
    assert await state.device_by_basic(None, "u") is None
    assert await state.device_by_basic("c2", None) == (d2, client_only)
    await state.set_basic_credentials(d1.id, None)
    assert await state.device_by_basic("c1", "u") is None
    assert await state.get_basic_credentials(d1.id) is None
    with pytest.raises(NotFound):
        await state.set_basic_credentials("nope", both)


async def test_basic_credentials_need_a_client_id_or_user_name(state: StateStore) -> None:
    (d1,) = await added(state, 1)
    with pytest.raises(Conflict):
        await state.set_basic_credentials(d1.id, BasicCredentials(None, None))
    with pytest.raises(Conflict):  # a password needs a user name
        await state.set_basic_credentials(d1.id, BasicCredentials("c", None, "$scrypt$x"))
    assert await state.get_basic_credentials(d1.id) is None


async def test_delete_device_takes_everything_of_it(state: StateStore) -> None:
    gw, child, other = await added(state, 1, 2, 3)
    await state.update_device(msgspec.structs.replace(child, gateway=False))
    await state.delete_device(child.id)
    await state.create_device(device(2, gateway_id=gw.id))
    await state.set_certificate(gw.id, "ff")
    await state.set_basic_credentials(gw.id, BasicCredentials("c", "u"))
    await state.save_attributes(gw.id, CLIENT, {"a": 1}, 5)
    await state.create_rpc(rpc(gw.id))
    await state.save_activity([DeviceActivity(gw.id, "mqtt", 3, 2, 1)])
    assert await state.delete_device(gw.id) is True
    assert await state.delete_device(gw.id) is False
    assert await state.get_device(gw.id) is None
    assert await state.device_by_token("token-1") is None
    assert await state.device_by_certificate("ff") is None
    assert await state.device_by_basic("c", "u") is None
    assert await state.get_attributes(gw.id, CLIENT) == []
    assert await state.open_rpcs() == []
    assert await state.load_activity() == []
    orphan = await state.get_device(child.id)
    assert orphan is not None
    assert orphan.gateway_id is None  # its gateway is gone
    assert await state.get_device(other.id) == other
    # Name, token and certificate are free again.
    await state.create_device(device(1))
    await state.set_certificate(device(1).id, "ff")


# -- attributes ---------------------------------------------------------------------


async def test_attributes_versions_scopes_and_order(state: StateStore) -> None:
    (d1,) = await added(state, 1)
    values = {
        "zeta": 1,
        "alpha": {"nested": [1, 2.5, None, "x"], "b": False},
        "Mid": "text with \x00 inside",
        "é": 1.0,
        "list": [],
    }
    saved = await state.save_attributes(d1.id, CLIENT, values, 10)
    assert {(a.key, a.version, a.last_update_ts) for a in saved} == {(k, 1, 10) for k in values}
    got = await state.get_attributes(d1.id, CLIENT)
    assert [a.key for a in got] == ["Mid", "alpha", "list", "zeta", "é"]  # by code point
    assert {a.key: a.value for a in got} == values
    assert type(next(a for a in got if a.key == "é").value) is float
    again = await state.save_attributes(d1.id, CLIENT, {"zeta": 2, "new": True}, 20)
    assert sorted((a.key, a.value, a.version) for a in again) == [
        ("new", True, 1),
        ("zeta", 2, 2),
    ]
    got = await state.get_attributes(d1.id, CLIENT, ["zeta", "missing", "new"])
    assert [(a.key, a.value, a.last_update_ts, a.version) for a in got] == [
        ("new", True, 20, 1),
        ("zeta", 2, 20, 2),
    ]
    assert await state.get_attributes(d1.id, SHARED) == []
    await state.save_attributes(d1.id, SHARED, {"zeta": "shared"}, 30)
    assert [a.value for a in await state.get_attributes(d1.id, SHARED)] == ["shared"]
    assert await state.get_attributes(d1.id, CLIENT, []) == []
    assert await state.delete_attributes(d1.id, CLIENT, ["zeta", "missing"]) == 1
    assert await state.delete_attributes(d1.id, CLIENT, ["zeta"]) == 0
    assert [a.value for a in await state.get_attributes(d1.id, SHARED)] == ["shared"]
    # A deleted attribute saved again starts over at version 1.
    (back,) = await state.save_attributes(d1.id, CLIENT, {"zeta": 3}, 40)
    assert back.version == 1


# -- RPC requests -------------------------------------------------------------------


async def test_rpc_ids_grow_per_device_and_are_never_reused(state: StateStore) -> None:
    d1, d2 = await added(state, 1, 2)
    first = await state.create_rpc(rpc(d1.id, id=99))  # the given id is ignored
    second = await state.create_rpc(rpc(d1.id))
    other = await state.create_rpc(rpc(d2.id))
    assert (first.id, second.id, other.id) == (1, 2, 1)
    assert first == rpc(d1.id, id=1)
    assert await state.delete_rpc(d1.id, 2) is True
    assert await state.delete_rpc(d1.id, 2) is False
    third = await state.create_rpc(rpc(d1.id))
    assert third.id == 3
    with pytest.raises(NotFound):
        await state.create_rpc(rpc("nope"))


async def test_rpc_updates_lists_and_open_requests(state: StateStore) -> None:
    d1, d2 = await added(state, 1, 2)
    a = await state.create_rpc(rpc(d1.id))
    b = await state.create_rpc(rpc(d1.id, oneway=True, persistent=False, params=None))
    c = await state.create_rpc(rpc(d2.id, params=["x", {"y": 1}]))
    sent = msgspec.structs.replace(b, status=RpcStatus.SENT, sent_ts=3)
    done = msgspec.structs.replace(
        a,
        status=RpcStatus.SUCCESSFUL,
        sent_ts=3,
        delivered_ts=4,
        finished_ts=5,
        response={"ok": [1, 2.5]},
    )
    failed = msgspec.structs.replace(c, status=RpcStatus.FAILED, finished_ts=9, error="boom")
    gone = rpc(d1.id, id=77, status=RpcStatus.FAILED)  # no such request: skipped
    await state.update_rpcs([sent, done, failed, gone])
    assert await state.get_rpc(d1.id, a.id) == done
    assert await state.get_rpc(d1.id, b.id) == sent
    assert await state.get_rpc(d2.id, c.id) == failed
    assert await state.get_rpc(d1.id, 77) is None
    assert await state.open_rpcs() == [sent]
    assert await state.list_rpcs(d1.id, None, 0, 10) == ([sent, done], 2)  # newest first
    assert await state.list_rpcs(d1.id, None, 1, 10) == ([done], 2)
    assert await state.list_rpcs(d1.id, None, 0, 1) == ([sent], 2)
    assert await state.list_rpcs(d1.id, [RpcStatus.SUCCESSFUL], 0, 10) == ([done], 1)
    both = [RpcStatus.SENT, RpcStatus.QUEUED]
    assert await state.list_rpcs(d1.id, both, 0, 10) == ([sent], 1)
    assert await state.list_rpcs("nope", None, 0, 10) == ([], 0)


async def test_purge_deletes_finished_requests_only_up_to_the_limit(state: StateStore) -> None:
    (d1,) = await added(state, 1)
    records = [await state.create_rpc(rpc(d1.id)) for _ in range(5)]
    await state.update_rpcs(
        [
            msgspec.structs.replace(r, status=RpcStatus.SUCCESSFUL, finished_ts=10 * (i + 1))
            for i, r in enumerate(records[:4])
        ]
    )
    assert await state.purge_rpcs(35, 2) == 2  # three qualify (10, 20, 30), limit 2
    assert await state.purge_rpcs(35, 100) == 1
    assert await state.purge_rpcs(35, 100) == 0
    remaining, total = await state.list_rpcs(d1.id, None, 0, 10)
    assert ([r.id for r in remaining], total) == ([5, 4], 2)
    assert (await state.create_rpc(rpc(d1.id))).id == 6


async def test_open_requests_are_by_device_and_id(state: StateStore) -> None:
    d1, d2 = await added(state, 2, 1)  # device 1 created second, sorts first by id
    for d in (d1, d2, d1):
        await state.create_rpc(rpc(d.id))
    opened = await state.open_rpcs()
    assert [(r.device_id, r.id) for r in opened] == [(d2.id, 1), (d1.id, 1), (d1.id, 2)]


# -- device activity ----------------------------------------------------------------


async def test_activity_is_saved_replaced_and_skips_unknown_devices(state: StateStore) -> None:
    d1, d2 = await added(state, 1, 2)
    first = DeviceActivity(d1.id, "mqtt", 3, 2, 1)
    await state.save_activity([first, DeviceActivity("gone", None, 1, 0, 0)])
    assert await state.load_activity() == [first]
    newer = DeviceActivity(d1.id, None, 30, 20, 10)
    other = DeviceActivity(d2.id, "http", 5, 0, 0)
    await state.save_activity([DeviceActivity(d2.id, "coap", 1, 1, 1), other, newer])
    assert sorted(await state.load_activity(), key=lambda a: a.device_id) == [newer, other]
    await state.save_activity([])


# -- durability ---------------------------------------------------------------------


async def test_state_survives_close_and_reopen(state_backend: StateBackend, tmp_path: Path) -> None:
    store = state_backend.make(tmp_path)
    await store.open()
    d1 = device(1)
    await store.create_device(d1)
    await store.save_attributes(d1.id, SHARED, {"fw": "1.2"}, 7)
    await store.create_rpc(rpc(d1.id))
    await store.save_activity([DeviceActivity(d1.id, "mqtt", 3, 2, 1)])
    await store.close()
    reopened = state_backend.make(tmp_path)
    await reopened.open()
    try:
        assert await reopened.device_by_token("token-1") == d1
        (attr,) = await reopened.get_attributes(d1.id, SHARED)
        assert (attr.value, attr.version) == ("1.2", 1)
        assert [r.id for r in await reopened.open_rpcs()] == [1]
        assert (await reopened.create_rpc(rpc(d1.id))).id == 2
        assert await reopened.load_activity() == [DeviceActivity(d1.id, "mqtt", 3, 2, 1)]
    finally:
        await reopened.close()


async def test_due_requests_are_open_ones_past_their_deadline_paged_by_deadline(
    state: StateStore,
) -> None:
    d1, d2 = await added(state, 1, 2)
    # rpc(): created 1, expiration 2, timeout 10; persistent unless told.
    queued = await state.create_rpc(rpc(d2.id))
    call = await state.create_rpc(rpc(d1.id, persistent=False))
    sent = await state.create_rpc(rpc(d1.id))  # persistent, sent at 5: due at 15
    later = await state.create_rpc(rpc(d1.id, expiration_ts=50))
    done = await state.create_rpc(rpc(d1.id))
    sent_call = await state.create_rpc(rpc(d2.id, persistent=False))  # due at 2, sent or not
    await state.update_rpcs(
        [
            msgspec.structs.replace(sent, status=RpcStatus.DELIVERED, sent_ts=5, delivered_ts=6),
            msgspec.structs.replace(sent_call, status=RpcStatus.SENT, sent_ts=5),
            msgspec.structs.replace(done, status=RpcStatus.SUCCESSFUL, finished_ts=7),
        ]
    )

    def keys(records: list[RpcRecord]) -> list[tuple[str, int]]:
        return [(r.device_id, r.id) for r in records]

    assert keys(await state.due_rpcs(1, None, 10)) == []
    at_2 = [(d1.id, call.id), (d2.id, queued.id), (d2.id, sent_call.id)]  # by device, id
    assert keys(await state.due_rpcs(2, None, 10)) == at_2
    at_15 = [*at_2, (d1.id, sent.id)]  # deadline 15 after those of 2
    assert keys(await state.due_rpcs(15, None, 10)) == at_15
    assert keys(await state.due_rpcs(15, None, 2)) == at_15[:2]
    assert keys(await state.due_rpcs(15, (2, d2.id, queued.id), 10)) == at_15[2:]
    assert keys(await state.due_rpcs(15, (2, d2.id, sent_call.id), 10)) == at_15[3:]
    assert keys(await state.due_rpcs(50, (15, d1.id, sent.id), 10)) == [(d1.id, later.id)]


async def test_expire_ends_only_requests_still_open_and_due(state: StateStore) -> None:
    d1, d2 = await added(state, 1, 2)
    queued = await state.create_rpc(rpc(d1.id))
    delivered = await state.create_rpc(rpc(d1.id))
    not_due = await state.create_rpc(rpc(d1.id, expiration_ts=50))
    done = await state.create_rpc(rpc(d2.id))
    finished = msgspec.structs.replace(done, status=RpcStatus.FAILED, finished_ts=3, error="x")
    await state.update_rpcs(
        [
            msgspec.structs.replace(delivered, status=RpcStatus.DELIVERED, sent_ts=2),
            finished,
        ]
    )
    wanted = [(r.device_id, r.id) for r in (queued, delivered, not_due, done)] + [(d2.id, 77)]
    ended = await state.expire_rpcs(wanted, 20)
    assert ended == [
        msgspec.structs.replace(queued, status=RpcStatus.EXPIRED, finished_ts=20),
        msgspec.structs.replace(delivered, status=RpcStatus.TIMEOUT, sent_ts=2, finished_ts=20),
    ]
    assert await state.get_rpc(d1.id, not_due.id) == not_due
    assert await state.get_rpc(d2.id, done.id) == finished
    assert await state.expire_rpcs(wanted, 20) == []  # ended already
    assert await state.expire_rpcs([], 20) == []


async def test_housekeeping_writes_with_a_stale_fencing_token_are_refused(
    state: StateStore,
) -> None:
    (d1,) = await added(state, 1)
    first = await state.create_rpc(rpc(d1.id))
    second = await state.create_rpc(rpc(d1.id))
    assert [r.id for r in await state.expire_rpcs([(d1.id, first.id)], 20, 5)] == [first.id]
    with pytest.raises(IotmeshError):
        await state.expire_rpcs([(d1.id, second.id)], 20, 4)  # a deposed leader
    assert await state.get_rpc(d1.id, second.id) == second  # rolled back
    with pytest.raises(IotmeshError):
        await state.purge_rpcs(100, 10, 4)
    assert await state.purge_rpcs(100, 10, 5) == 1  # the current term's token
    assert await state.purge_rpcs(100, 10, 6) == 0  # a newer one
    with pytest.raises(IotmeshError):
        await state.purge_rpcs(100, 10, 5)
