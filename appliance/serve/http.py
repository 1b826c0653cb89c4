"""Run the API with uvicorn and tell systemd when it is ready (Type=notify)."""

from __future__ import annotations

import os
import socket

import uvicorn

from appliance.serve.api import create_app
from appliance.serve.service import Service


def notify_systemd(state: str) -> None:
    """sd_notify over $NOTIFY_SOCKET (a UNIX datagram socket), when systemd provides one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(state.encode(), address)


class _NotifyingServer(uvicorn.Server):
    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            notify_systemd("READY=1")


def serve_forever(service: Service, host: str, port: int) -> None:
    config = uvicorn.Config(
        create_app(service),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=10,
    )
    _NotifyingServer(config).run()
