"""A bus group member in its own process, for the test that kills one.

    python -m tests.contract.bus_member '<BusSettings JSON>' PATTERN GROUP

Prints `ready` once subscribed and `got <msg id> <attempt>` per delivery, and never
settles anything: it holds what it gets until it is killed.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from iotmesh.bus import make_bus
from iotmesh.bus.interface import Delivery
from iotmesh.core.settings import BusSettings


async def main(settings_json: str, pattern: str, group: str) -> None:
    bus = make_bus(BusSettings.model_validate_json(settings_json))
    await bus.start()

    async def hold(deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            print(f"got {d.msg_id} {d.attempt}", flush=True)
        await asyncio.Event().wait()  # until killed

    await bus.subscribe(pattern, group, hold)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
