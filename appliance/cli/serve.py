"""`appliance serve`: the OpenAI-compatible inference service."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import click

from appliance.errors import HostError
from appliance.paths import appliance_paths
from appliance.serve.config import ServiceOptions
from appliance.serve.egress import Admitted, install_egress_guard
from appliance.trust.gguf_check import MAX_HEADER_BYTES, check_gguf_header

DEFAULTS = ServiceOptions()


@click.command()
@click.option(
    "--host",
    default=DEFAULTS.host,
    show_default=True,
    help="Address to listen on (loopback by default); unused under socket activation.",
)
@click.option(
    "--port",
    default=DEFAULTS.port,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="Port to listen on; unused under socket activation.",
)
@click.option(
    "--require-socket-activation",
    is_flag=True,
    help="Refuse to start unless systemd passed a listening socket (appliance.socket).",
)
@click.option(
    "--model",
    "model",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Serve this GGUF instead of the active release (development only).",
)
@click.option(
    "--slots",
    default=DEFAULTS.slots,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Requests generated together (continuous batching).",
)
@click.option(
    "--queue",
    "max_queue",
    default=DEFAULTS.max_queue,
    show_default=True,
    type=click.IntRange(0),
    help="Requests that may wait for a slot; beyond it the answer is 429.",
)
@click.option(
    "--timeout",
    default=DEFAULTS.request_timeout_seconds,
    show_default=True,
    type=click.FloatRange(1),
    help="Seconds a request may take, queueing included.",
)
@click.option(
    "--read-timeout",
    default=DEFAULTS.read_timeout_seconds,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    envvar="APPLIANCE_READ_TIMEOUT",
    show_envvar=True,
    help="Seconds a client has to send a whole request (head and body) from its first byte;"
    " slower clients are disconnected.",
)
@click.option(
    "--idle-timeout",
    default=DEFAULTS.idle_timeout_seconds,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    envvar="APPLIANCE_IDLE_TIMEOUT",
    show_envvar=True,
    help="Seconds a connection may stay open with no request under way.",
)
@click.option(
    "--openapi",
    is_flag=True,
    help="Serve /openapi.json (API key required), e.g. to fuzz the API; off by default.",
)
@click.option(
    "--insecure-no-auth",
    is_flag=True,
    help="Serve without API keys (development on a trusted host only).",
)
def serve(
    host: str,
    port: int,
    model: Path | None,
    slots: int,
    max_queue: int,
    timeout: float,
    require_socket_activation: bool,
    read_timeout: float,
    idle_timeout: float,
    openapi: bool,
    insecure_no_auth: bool,
) -> None:
    """Serve the active release (hot-swapping on activate and rollback) on HOST:PORT.

    Under systemd socket activation (LISTEN_PID is this process and LISTEN_FDS >= 1, as
    appliance.socket arranges) it serves on the listening socket passed as fd 3 instead,
    and HOST and PORT are unused: the service can then run with PrivateNetwork=yes.

    Endpoints: /v1/chat/completions, /v1/completions, /v1/models (API key required),
    /healthz, /readyz, /metrics. Outbound network access is blocked in this process.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    admitted = Admitted()  # the registered cold-path targets, set by the service
    install_egress_guard(admitted)
    if model is not None:  # our header check runs before llama.cpp sees the file
        with open(model, "rb") as f:
            check_gguf_header(f.read(MAX_HEADER_BYTES), model.stat().st_size)
    # Heavy imports only for this command.
    from appliance.serve.http import serve_forever, systemd_listen_socket
    from appliance.serve.service import Service

    # Before the service starts any child process: they must not inherit LISTEN_*.
    listener = systemd_listen_socket()
    if listener is None and require_socket_activation:
        raise HostError("systemd passed no listening socket; start appliance.socket")
    where = f"http://{host}:{port}" if listener is None else _describe(listener)
    if listener is None:  # bind before loading a model: a taken port fails at once
        listener = _listen(host, port)
    options = ServiceOptions(
        host=host,
        port=port,
        slots=slots,
        max_queue=max_queue,
        request_timeout_seconds=timeout,
        read_timeout_seconds=read_timeout,
        idle_timeout_seconds=idle_timeout,
        require_api_key=not insecure_no_auth,
        serve_openapi=openapi,
    )
    service = Service(appliance_paths(), options, dev_model=model, egress=admitted)
    service.start()

    def announce() -> None:  # once the server accepts connections, not before
        model_id = service.runtime().model_id if service.runtime() else "nothing yet"
        click.echo(f"serving {model_id} on {where}", err=True)

    try:
        serve_forever(service, listener, on_ready=announce)
    finally:
        service.close()


def _listen(host: str, port: int) -> socket.socket:
    try:
        address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(address[0], socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address[4])
        listener.listen(2048)
    except OSError as exc:
        raise HostError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return listener


def _describe(listener: socket.socket) -> str:
    host, port = listener.getsockname()[:2]
    return f"fd {listener.fileno()} from systemd (http://{host}:{port})"
