"""Run the API with uvicorn: on the socket systemd passed (socket activation) or on one we
bind, with deadlines for slow clients, telling systemd when it is ready (Type=notify)."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from appliance.errors import HostError
from appliance.serve.api import create_app
from appliance.serve.service import Service

log = logging.getLogger("appliance.http")
SD_LISTEN_FDS_START = 3  # the first fd systemd passes (sd_listen_fds(3))


def notify_systemd(state: str) -> None:
    """sd_notify over $NOTIFY_SOCKET (a UNIX datagram socket), when systemd provides one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(state.encode(), address)


def systemd_listen_socket() -> socket.socket | None:
    """The listening socket systemd passed us (the sd_listen_fds protocol), or None.

    Only for us when LISTEN_PID is our pid. The LISTEN_* variables are removed in any case,
    so that no child process takes fd 3 for its own socket. The socket must be a listening
    TCP socket: anything else at fd 3 is a broken unit, and we refuse to start.
    """
    pid = os.environ.pop("LISTEN_PID", None)
    count = os.environ.pop("LISTEN_FDS", None)
    os.environ.pop("LISTEN_FDNAMES", None)
    if pid != str(os.getpid()) or count is None:
        return None
    if not count.isdigit():
        raise HostError(f"LISTEN_FDS={count!r} is not a number of file descriptors")
    if int(count) < 1:
        return None
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)  # ours alone, not the model probe's
    return _checked_listener(SD_LISTEN_FDS_START)


def _checked_listener(fd: int) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)  # family and type are read from the fd itself
    except OSError as exc:
        raise HostError(f"systemd passed fd {fd}, but it is not a socket: {exc}") from exc
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        raise HostError(f"systemd passed fd {fd}, but it is not a TCP socket: {sock!r}")
    if not listening:
        raise HostError(f"systemd passed fd {fd}, but it is not listening (Accept=no?)")
    return sock


class _SlowClientGuard(H11Protocol):
    """uvicorn's h11 protocol, with deadlines for clients that send too slowly.

    uvicorn closes a connection left idle after a response (timeout_keep_alive), but not
    one that never sends a byte, nor one that trickles a request's head or body
    (slowloris): either holds a connection and a file descriptor forever. Here a new
    connection gets the idle timeout too, and a request must arrive whole within
    read_timeout of its first byte; the deadline does not move as more bytes trickle in.
    """

    def __init__(self, *args: Any, read_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout = read_timeout
        self.read_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # uvicorn arms its idle timer only after a response; a silent new client needs it too.
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_request()  # a pipelined request may have started meanwhile

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read_deadline()
        super().connection_lost(exc)

    def _request_incomplete(self) -> bool:
        """Has the client started a request that we have not received whole yet?"""
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            return True
        return state is h11.IDLE and bool(self.conn.trailing_data[0])

    def _watch_request(self) -> None:
        if not self._request_incomplete():
            self._cancel_read_deadline()
        elif self.read_deadline is None:
            self.read_deadline = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def _cancel_read_deadline(self) -> None:
        if self.read_deadline is not None:
            self.read_deadline.cancel()
            self.read_deadline = None

    def _read_timed_out(self) -> None:
        self.read_deadline = None
        if self.transport.is_closing():
            return
        log.warning(
            "closing connection from %s: no whole request within %s s",
            self.client,
            self.read_timeout,
        )
        # abort, not close: close waits to flush what a client that stalled may never read.
        self.transport.abort()


class _NotifyingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_ready = on_ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            notify_systemd("READY=1")
            self.on_ready()


def serve_forever(
    service: Service,
    listener: socket.socket,
    on_ready: Callable[[], None] = lambda: None,
) -> None:
    """Serve on the listening socket `listener` until SIGTERM/SIGINT, with the service's
    read and idle timeouts; `on_ready` runs once connections are accepted."""
    options = service.options
    config = uvicorn.Config(
        create_app(service),
        # Our h11 subclass, whatever else is installed: the slow-client deadlines live there.
        http=functools.partial(_SlowClientGuard, read_timeout=options.read_timeout_seconds),  # type: ignore[arg-type]
        timeout_keep_alive=options.idle_timeout_seconds,  # type: ignore[arg-type]
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=10,
    )
    _NotifyingServer(config, on_ready).run(sockets=[listener])
