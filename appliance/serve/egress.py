"""A process-wide guard against outbound network access (no egress, ever).

This is the second layer. The first is the kernel's: under systemd the service runs with
PrivateNetwork=yes on a socket that appliance.socket hands over, so it has no route
anywhere. The guard makes a slip in Python code fail loudly (PermissionError, and a log
line) instead of sending a packet, also where the service runs without systemd.

CPython resolves a host name inside connect(), connect_ex(), sendto(), sendmsg() and
bind() before it raises the socket.connect / socket.sendto audit events, so an audit hook
alone lets the DNS query out. Hence two parts:

1. socket.socket's address-taking methods check an AF_INET/AF_INET6 address before the C
   code sees it: a connect or send must target a loopback IP literal (or "localhost"),
   and a bind must name nothing that needs resolving.
2. An audit hook refuses forward lookups of anything but local names, every reverse
   lookup (gethostbyaddr, getnameinfo: a PTR query tells a resolver whom we talk to), and
   connects and sends to non-loopback addresses from code that bypasses socket.socket.

socket.getfqdn is replaced as well: it swallows OSError, so a refused lookup would pass
silently. Native code (llama.cpp, libc through ctypes) is beyond all of this, and so is
Python code that resolves names through _socket directly: PrivateNetwork covers those.
Audit hooks cannot be removed, so the guard is installed once, for the life of the process.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import socket
import sys
from collections.abc import Callable
from typing import NoReturn

log = logging.getLogger("appliance.egress")
_INTERNET = (socket.AF_INET, socket.AF_INET6)
_SENDS = frozenset({"socket.connect", "socket.sendto", "socket.sendmsg"})
_LOOKUPS = frozenset({"socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex"})
_REVERSE_LOOKUPS = frozenset({"socket.gethostbyaddr", "socket.getnameinfo"})


def _host_text(host: object) -> str | None:
    """The host part as text (CPython accepts str, bytes and bytearray), else None."""
    if isinstance(host, str):
        return host
    if isinstance(host, bytes | bytearray):
        return bytes(host).decode("ascii", errors="replace")
    return None


def _is_ip_literal(host: object) -> bool:
    text = _host_text(host)
    if text is None:
        return False
    try:
        ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    return True


def is_loopback(address: object) -> bool:
    """True for a loopback IP literal or "localhost" (alone or as an address tuple)."""
    host = _host_text(address[0] if isinstance(address, tuple) and address else address)
    if host is None:
        return False
    if host == "localhost":  # answered by /etc/hosts, never by a DNS server
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False  # a host name: resolving it would itself be egress


def _needs_no_lookup(address: object) -> bool:
    """For bind(): any IP literal, "" (any) or "localhost", but never a name to resolve."""
    host = _host_text(address[0] if isinstance(address, tuple) and address else address)
    return host is not None and (host in ("", "localhost") or _is_ip_literal(host))


def _address_argument(method: str, args: tuple) -> object:
    """The address among a socket method's positional arguments, or None when absent."""
    if method == "sendto":  # sendto(data, address) or sendto(data, flags, address)
        return args[-1] if len(args) >= 2 else None
    if method == "sendmsg":  # sendmsg(buffers, ancdata, flags, address)
        return args[3] if len(args) >= 4 else None
    return args[0] if args else None


class Admitted:
    """The addresses beyond loopback that this process may reach: the registered cold-path
    targets, as (IP, port), set by the service from the store. Empty by default."""

    def __init__(self) -> None:
        self._addresses: frozenset[tuple[str, int]] = frozenset()

    def set(self, addresses: set[tuple[str, int]]) -> None:
        self._addresses = frozenset(
            (str(ipaddress.ip_address(host)), port) for host, port in addresses
        )

    def admits(self, address: object) -> bool:
        if not isinstance(address, tuple) or len(address) < 2 or not self._addresses:
            return False
        host = _host_text(address[0])
        try:
            ip = str(ipaddress.ip_address((host or "").split("%", 1)[0]))
        except ValueError:
            return False  # a name: resolving it would itself be egress
        return (ip, address[1]) in self._addresses


def _guard_method(method: str, allowed: Callable[[object], bool]) -> None:
    """Wrap socket.socket.<method> so a disallowed address is refused before resolution."""
    original = getattr(socket.socket, method)

    @functools.wraps(original)
    def guarded(self: socket.socket, *args: object) -> object:
        if self.family in _INTERNET:
            address = _address_argument(method, args)
            # Leave malformed addresses to CPython, which rejects them without a lookup.
            if isinstance(address, tuple) and address and not allowed(address):
                _refuse(f"socket.{method}", address)
        return original(self, *args)

    setattr(socket.socket, method, guarded)


def _hook(admitted: Admitted, event: str, args: tuple) -> None:
    if event in _REVERSE_LOOKUPS:
        _refuse(event, args[0] if args else None)
    if event in _LOOKUPS:  # a name lookup may query a DNS server: only local names pass
        host = args[0] if args else None
        if host is None or is_loopback(host) or _is_ip_literal(host):
            return
        _refuse(event, host)
    if event not in _SENDS or len(args) < 2:
        return
    if getattr(args[0], "family", None) not in _INTERNET:
        return
    if args[1] is not None and not is_loopback(args[1]) and not admitted.admits(args[1]):
        _refuse(event, args[1])


def _refuse(event: str, target: object) -> NoReturn:
    log.error("blocked outbound network access to %r (%s)", target, event)
    raise PermissionError(f"outbound network access is disabled: {target!r}")


def _refused_getfqdn(name: str = "") -> NoReturn:
    _refuse("socket.getfqdn", name)


def install_egress_guard(admitted: Admitted | None = None) -> None:
    """Install the guard in this process, once (a second call changes nothing). Loopback
    and what `admitted` holds (nothing unless the service registers a cold path) pass."""
    if socket.getfqdn is _refused_getfqdn:
        return
    admitted = admitted or Admitted()
    for method in ("connect", "connect_ex", "sendto", "sendmsg"):
        _guard_method(method, lambda address: is_loopback(address) or admitted.admits(address))
    _guard_method("bind", _needs_no_lookup)
    socket.getfqdn = _refused_getfqdn
    sys.addaudithook(functools.partial(_hook, admitted))
