"""A leader-election candidate in its own process, for the test that kills the leader.

    python -m tests.integration.cluster_candidate '<Settings JSON>' NAME OWNER

Prints `ready`, then `leader <token>` when elected. While leading, its job writes
`<owner>` to the fenced resource `<name>-output` with its token (once), then prints
`wrote <token>` and waits to be killed. Prints `follower` when it steps down.
"""

from __future__ import annotations

import asyncio
import sys

from iotmesh.cluster import LeaderElection, make_backend
from iotmesh.core.settings import Settings


async def main(settings_json: str, name: str, owner: str) -> None:
    settings = Settings.model_validate_json(settings_json)
    backend = make_backend(settings)
    await backend.start()

    async def job(token: int) -> None:
        await backend.write(f"{name}-output", token, owner.encode())
        print(f"wrote {token}", flush=True)
        await asyncio.Event().wait()

    async def elected(token: int) -> None:
        print(f"leader {token}", flush=True)

    async def revoked() -> None:
        print("follower", flush=True)

    election = LeaderElection(
        backend,
        name,
        lease_s=settings.cluster.lease_s,
        owner=owner,
        job=job,
        on_elected=elected,
        on_revoked=revoked,
    )
    async with election:
        print("ready", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
