"""Run the real thingsboard-gateway, held to the loopback interface.

Runs under the gateway's own virtualenv (`.venv-tbgw/bin/python`), never under ours:

    .venv-tbgw/bin/python tests/integration/tb_gateway_main.py CONFIG_DIR/tb_gateway.json

It starts `TBGatewayService` as the package's `thingsboard-gateway` command does, after
three changes that keep a test run on this machine:

- the update check (a thread that POSTs to the vendor's update service at start and
  hourly) does nothing;
- `TBUtility.install_package` (a connector whose library is missing runs pip at run
  time) fails instead: every library the gateway needs is installed beforehand by
  scripts/_tb_gateway.sh;
- sockets may only reach loopback addresses, so anything else the gateway might try
  fails loudly instead of leaving the machine.

The gateway stops cleanly on SIGINT (its own handler) and dies on SIGTERM/SIGKILL.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from typing import Any

_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def _is_loopback(host: Any) -> bool:
    if host is None:  # getaddrinfo(None, port): the local wildcard, used to bind
        return True
    if isinstance(host, bytes):
        host = host.decode()
    if not isinstance(host, str):
        return False
    if host in _LOOPBACK_NAMES or host in ("", "0.0.0.0", "::"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _guard_sockets() -> None:
    """Refuse name lookups and connections that would leave the machine."""
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not _is_loopback(host):
            raise OSError(f"tb_gateway_main: lookup of {host!r} refused (loopback only)")
        return real_getaddrinfo(host, *args, **kwargs)

    def check(address: Any) -> None:
        if isinstance(address, tuple) and not _is_loopback(address[0]):
            raise OSError(f"tb_gateway_main: connection to {address!r} refused (loopback only)")

    def connect(self: socket.socket, address: Any) -> None:
        check(address)
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        check(address)
        return real_connect_ex(self, address)

    socket.getaddrinfo = getaddrinfo
    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]


def _no_install(package: str, *args: Any, **kwargs: Any) -> bool:
    raise RuntimeError(
        f"thingsboard-gateway wanted to pip install {package!r} at run time; "
        "add it to scripts/_tb_gateway.sh instead"
    )


def main(config_file: str) -> None:
    _guard_sockets()

    from thingsboard_gateway.gateway.tb_gateway_service import TBGatewayService
    from thingsboard_gateway.tb_utility.tb_updater import TBUpdater
    from thingsboard_gateway.tb_utility.tb_utility import TBUtility

    TBUpdater.check_for_new_version = lambda self: None  # type: ignore[method-assign]
    TBUtility.install_package = staticmethod(_no_install)  # type: ignore[assignment]
    TBGatewayService(config_file)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: tb_gateway_main.py CONFIG_DIR/tb_gateway.json")
    main(sys.argv[1])
