"""A process-wide guard against outbound connections (no egress, ever).

A sys.addaudithook hook sees every socket connect/sendto in this process; any target
that is not a loopback address (or a UNIX socket) is logged and refused with
PermissionError before a packet leaves. Audit hooks cannot be removed, so the guard is
installed once, by `appliance serve`, for the life of the process.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys

log = logging.getLogger("appliance.egress")
_SENDS = {"socket.connect", "socket.sendto", "socket.sendmsg"}
_LOOKUPS = {"socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex"}


def is_loopback(address: object) -> bool:
    host = address[0] if isinstance(address, tuple) and address else address
    if not isinstance(host, str):
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False  # a host name: resolving it would itself be egress


def _is_ip_literal(host: object) -> bool:
    try:
        ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return False
    return True


def _hook(event: str, args: tuple) -> None:
    if event in _LOOKUPS:  # a name lookup may query a DNS server: only local names pass
        host = args[0] if args else None
        if host is None or is_loopback(host) or _is_ip_literal(host):
            return
        _refuse(event, host)
    if event not in _SENDS or len(args) < 2:
        return
    if getattr(args[0], "family", None) not in (socket.AF_INET, socket.AF_INET6):
        return
    if args[1] is not None and not is_loopback(args[1]):
        _refuse(event, args[1])


def _refuse(event: str, target: object) -> None:
    log.error("blocked outbound network access to %r (%s)", target, event)
    raise PermissionError(f"outbound network access is disabled: {target!r}")


def install_egress_guard() -> None:
    sys.addaudithook(_hook)
