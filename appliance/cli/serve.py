"""`appliance serve`: the OpenAI-compatible inference service."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from appliance.paths import appliance_paths
from appliance.serve.egress import install_egress_guard
from appliance.serve.runtime import ServiceOptions
from appliance.trust.gguf_check import MAX_HEADER_BYTES, check_gguf_header


@click.command()
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (loopback by default).",
)
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--model",
    "model",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Serve this GGUF instead of the active release (development only).",
)
@click.option(
    "--slots",
    default=8,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Requests generated together (continuous batching).",
)
@click.option(
    "--queue",
    "max_queue",
    default=64,
    show_default=True,
    type=click.IntRange(0),
    help="Requests that may wait for a slot; beyond it the answer is 429.",
)
@click.option(
    "--timeout",
    default=300.0,
    show_default=True,
    type=click.FloatRange(1),
    help="Seconds a request may take, queueing included.",
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
    insecure_no_auth: bool,
) -> None:
    """Serve the active release (hot-swapping on activate and rollback) on HOST:PORT.

    Endpoints: /v1/chat/completions, /v1/completions, /v1/models (API key required),
    /healthz, /readyz, /metrics. Outbound network access is blocked in this process.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    install_egress_guard()
    if model is not None:  # our header check runs before llama.cpp sees the file
        with open(model, "rb") as f:
            check_gguf_header(f.read(MAX_HEADER_BYTES), model.stat().st_size)
    from appliance.serve.http import serve_forever  # heavy imports only for this command
    from appliance.serve.service import Service

    options = ServiceOptions(
        slots=slots,
        max_queue=max_queue,
        request_timeout_seconds=timeout,
        require_api_key=not insecure_no_auth,
    )
    service = Service(appliance_paths(), options, dev_model=model)
    service.start()
    click.echo(
        f"serving {service.runtime().model_id if service.runtime() else 'nothing yet'}"
        f" on http://{host}:{port}",
        err=True,
    )
    try:
        serve_forever(service, host, port)
    finally:
        service.close()
