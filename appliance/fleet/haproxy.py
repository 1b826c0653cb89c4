"""HAProxy in front of a fleet of appliance nodes: its config, and its runtime API.

The runtime API is HAProxy's own admin socket (a UNIX socket, `stats socket ... level
admin`): one line in, text out, the connection closed after each command. It is how a
node is drained, put in maintenance, made ready again or given another weight without a
reload, and how `appliance fleet status` learns HAProxy's view of each node (`show stat`,
a CSV document).
"""

from __future__ import annotations

import csv
import ipaddress
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import FleetError, NodeNotSettled, UsageError

DEFAULT_SOCKET = Path("/run/haproxy/admin.sock")
DEFAULT_BACKEND = "appliance"
STATES = ("ready", "drain", "maint")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_REPLY_LIMIT = 4 << 20


@dataclass(frozen=True)
class Node:
    """One appliance node as HAProxy addresses it."""

    name: str
    host: str
    port: int
    weight: int = 100

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Node:
        """NAME=IP:PORT[@WEIGHT]; an IP address, never a host name (a lookup is a packet
        out, and HAProxy would resolve it once at start anyway)."""
        match = re.fullmatch(r"([^=]+)=\[?([0-9A-Fa-f.:]+?)\]?:(\d+)(?:@(\d+))?", text.strip())
        if not match or not _NAME.fullmatch(match[1]):
            raise UsageError(f"a node is NAME=IP:PORT[@WEIGHT], not {text!r}")
        try:
            ipaddress.ip_address(match[2])
        except ValueError as exc:
            raise UsageError(f"node {match[1]}: {match[2]!r} is not an IP address") from exc
        port, weight = int(match[3]), int(match[4] or 100)
        if not 1 <= port <= 65535 or not 0 <= weight <= 256:
            raise UsageError(f"node {match[1]}: port 1-65535 and weight 0-256, not {text!r}")
        return cls(match[1], match[2], port, weight)


@dataclass(frozen=True)
class BalancerSettings:
    """What the generated config says beyond the node list (the defaults suit a fleet of
    nodes that each serve 8 requests at once)."""

    bind: str = "127.0.0.1:8000"
    socket: Path = DEFAULT_SOCKET
    backend: str = DEFAULT_BACKEND
    inter_ms: int = 2000
    fall: int = 3
    rise: int = 2
    slowstart_s: int = 30
    maxconn_per_node: int = 8
    timeout_server_s: int = 300


def render_config(nodes: Sequence[Node], settings: BalancerSettings) -> str:
    """haproxy.cfg for these nodes: health-checked on /readyz, least connections, each node
    sent at most its slots at once (the rest wait in HAProxy's queue, where any node that
    frees a slot takes them), retried elsewhere when a node refuses or drops a request."""
    if not nodes:
        raise UsageError("a fleet needs at least one node")
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise UsageError(f"node names must be distinct: {names}")
    if not _NAME.fullmatch(settings.backend):
        raise UsageError(f"not a backend name: {settings.backend!r}")
    s = settings
    servers = "\n".join(
        f"    server {n.name} {n.url.removeprefix('http://')} weight {n.weight}" for n in nodes
    )
    return f"""\
# HAProxy in front of appliance nodes; written by `appliance fleet haproxy-config`.
# Each node is a whole appliance that verifies its own bundles: HAProxy only spreads
# requests and takes a node out when its /readyz is not 200. No resolvers section: the
# servers are IP addresses, so HAProxy never looks anything up.
global
    # The runtime API: drain, maintenance, ready and weight changes without a reload
    # (`appliance fleet server`), and HAProxy's view of each node (`appliance fleet status`).
    stats socket {s.socket} mode 600 level admin
    stats timeout 30s
    maxconn 4096
    log /dev/log local0

defaults
    mode http
    log global
    option httplog
    timeout connect 2s
    timeout client 60s
    timeout http-request 20s
    # A generation may take minutes; a stream sends its first byte in seconds.
    timeout server {s.timeout_server_s}s
    timeout queue 60s
    timeout http-keep-alive 15s
    # A node that refuses a connection or closes one without answering (killed, or
    # restarting) has the request sent to another node: generating is free of side
    # effects, and the body is buffered so it can be sent again.
    option http-buffer-request
    option redispatch 1
    retries 2
    retry-on conn-failure empty-response

frontend appliance_api
    bind {s.bind}
    option forwardfor
    default_backend {s.backend}

backend {s.backend}
    # Requests differ in length by orders of magnitude: send each to the node with the
    # fewest in flight, not the next in turn.
    balance leastconn
    option httpchk
    http-check send meth GET uri /readyz
    http-check expect status 200
    # Down after {s.fall} failed checks {s.inter_ms} ms apart; up after {s.rise}; a node
    # that comes back (or leaves maintenance) takes its full share over {s.slowstart_s} s.
    default-server check inter {s.inter_ms}ms fall {s.fall} rise {s.rise} \
        slowstart {s.slowstart_s}s maxconn {s.maxconn_per_node}
{servers}
"""


@dataclass(frozen=True)
class ServerView:
    """HAProxy's view of one node (a row of `show stat`)."""

    name: str
    address: str
    status: str  # UP, DOWN, DRAIN, MAINT, "UP 1/2" (going down), "no check", ...
    weight: int
    sessions: int  # requests it has in flight now
    queued: int
    total: int  # sessions since HAProxy started
    check: str  # the last health check's result, e.g. L7OK, L4CON

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


class RuntimeAPI:
    """HAProxy's runtime API on its admin socket."""

    def __init__(self, socket_path: Path, backend: str = DEFAULT_BACKEND) -> None:
        self.socket_path = socket_path
        self.backend = backend

    def command(self, line: str) -> str:
        if "\n" in line or ";" in line:
            raise UsageError(f"one runtime command at a time, not {line!r}")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.connect(str(self.socket_path))
                sock.sendall(line.encode() + b"\n")
                reply = bytearray()
                while chunk := sock.recv(65536):
                    reply += chunk
                    if len(reply) > _REPLY_LIMIT:
                        raise FleetError(f"HAProxy's reply to {line!r} is too long")
        except OSError as exc:
            raise FleetError(
                f"cannot reach HAProxy's runtime API at {self.socket_path}: {exc.strerror or exc}"
            ) from exc
        return reply.decode(errors="replace")

    def servers(self) -> list[ServerView]:
        text = self.command("show stat").removeprefix("# ")
        rows = [r for r in csv.DictReader(text.splitlines()) if r.get("pxname") == self.backend]
        servers = [_server_view(r) for r in rows if r["svname"] not in ("FRONTEND", "BACKEND")]
        if not servers:
            raise FleetError(f"HAProxy has no backend {self.backend!r} with servers")
        return servers

    def server(self, name: str) -> ServerView:
        for view in self.servers():
            if view.name == name:
                return view
        raise FleetError(f"HAProxy's backend {self.backend!r} has no server {name!r}")

    def set_state(self, name: str, state: str) -> None:
        if state not in STATES:
            raise UsageError(f"a server's state is one of {', '.join(STATES)}, not {state!r}")
        self._change(name, f"state {state}")

    def set_weight(self, name: str, weight: int) -> None:
        if not 0 <= weight <= 256:
            raise UsageError(f"a weight is 0-256, not {weight}")
        self._change(name, f"weight {weight}")

    def wait_idle(self, name: str, seconds: float) -> ServerView:
        """Wait until the server has no request in flight or queued for it."""
        deadline = time.monotonic() + seconds
        while True:
            view = self.server(name)
            if view.sessions == 0 and view.queued == 0:
                return view
            if time.monotonic() >= deadline:
                raise NodeNotSettled(
                    f"{name} still has {view.sessions} requests in flight after {seconds:g} s"
                )
            time.sleep(0.2)

    def _change(self, name: str, change: str) -> None:
        self.server(name)  # a clear error for an unknown name
        reply = self.command(f"set server {self.backend}/{name} {change}").strip()
        if reply:  # HAProxy says nothing when a change went through
            raise FleetError(f"HAProxy refused 'set server {name} {change}': {reply}")


def _server_view(row: dict[str, str]) -> ServerView:
    def number(key: str) -> int:
        return int(row.get(key) or 0)

    return ServerView(
        name=row["svname"],
        address=row.get("addr", ""),
        status=row.get("status", ""),
        weight=number("weight"),
        sessions=number("scur"),
        queued=number("qcur"),
        total=number("stot"),
        check=row.get("check_status", "").removeprefix("* "),  # "* ": a check is running
    )
