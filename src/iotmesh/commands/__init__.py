"""Commands to devices: server-side RPC (users → device) and client-side RPC."""

from iotmesh.commands.rpc import RpcRequest, RpcService, RpcSink

__all__ = ["RpcRequest", "RpcService", "RpcSink"]
