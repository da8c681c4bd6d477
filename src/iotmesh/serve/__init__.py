"""`iotmesh serve SERVICE`: one service of the platform per process, joined by a durable bus.

`roles` says which services each role starts (built by `iotmesh.wiring`, the same code
as `iotmesh run`); `process` runs one as an OS process with its run-info file, /healthz
and a registration hook; `instance` holds what a process says about itself.
"""

from iotmesh.serve.instance import InstanceInfo, Registrar, no_registry
from iotmesh.serve.process import ServedProcess
from iotmesh.serve.roles import ROLES

__all__ = ["ROLES", "InstanceInfo", "Registrar", "ServedProcess", "no_registry"]
