"""`appliance fleet`: nodes behind HAProxy (config, status, drain and ready, canary watch).

The rollout itself is Ansible's (deploy/ansible); these are the steps it calls on the
controller, and what an operator reads.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import click

from appliance.cli.common import emit_json, json_option
from appliance.fleet.haproxy import (
    DEFAULT_BACKEND,
    DEFAULT_SOCKET,
    STATES,
    BalancerSettings,
    Node,
    RuntimeAPI,
    render_config,
)
from appliance.fleet.nodes import read_node, wait_ready, watch_canary

SOCKET_ENV = "APPLIANCE_HAPROXY_SOCKET"
F = TypeVar("F", bound=Callable[..., Any])


def _runtime_options(command: F) -> F:
    command = click.option(
        "--backend",
        default=DEFAULT_BACKEND,
        show_default=True,
        help="The HAProxy backend that holds the nodes.",
    )(command)
    return click.option(
        "--haproxy",
        "socket_path",
        default=DEFAULT_SOCKET,
        show_default=True,
        envvar=SOCKET_ENV,
        show_envvar=True,
        type=click.Path(dir_okay=False, path_type=Path),
        help="HAProxy's admin socket (its runtime API).",
    )(command)


@click.group()
def fleet() -> None:
    """Nodes behind HAProxy: write its config, read each node's state, drain and re-enable."""


@fleet.command(name="haproxy-config")
@click.option(
    "--node",
    "nodes",
    multiple=True,
    required=True,
    help="NAME=IP:PORT[@WEIGHT], once per node (weight 100 unless given).",
)
@click.option(
    "--bind", default=BalancerSettings.bind, show_default=True, help="Where clients connect."
)
@click.option(
    "--socket",
    "socket_path",
    default=DEFAULT_SOCKET,
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where HAProxy's admin socket (runtime API) listens.",
)
@click.option("--backend", default=DEFAULT_BACKEND, show_default=True)
@click.option(
    "--inter-ms", default=BalancerSettings.inter_ms, show_default=True, type=click.IntRange(100)
)
@click.option("--fall", default=BalancerSettings.fall, show_default=True, type=click.IntRange(1))
@click.option("--rise", default=BalancerSettings.rise, show_default=True, type=click.IntRange(1))
@click.option(
    "--slowstart-s", default=BalancerSettings.slowstart_s, show_default=True, type=click.IntRange(0)
)
@click.option(
    "--maxconn",
    default=BalancerSettings.maxconn_per_node,
    show_default=True,
    type=click.IntRange(1),
    help="Requests sent to one node at once: its --slots (more wait in HAProxy's queue).",
)
@click.option(
    "--out",
    "out_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write here instead of printing.",
)
@json_option
def haproxy_config(
    nodes: tuple[str, ...],
    bind: str,
    socket_path: Path,
    backend: str,
    inter_ms: int,
    fall: int,
    rise: int,
    slowstart_s: int,
    maxconn: int,
    out_file: Path | None,
    as_json: bool,
) -> None:
    """Write an HAProxy config for these nodes: /readyz health checks, least connections,
    slow start, retries elsewhere, and the runtime API for drain and weights."""
    settings = BalancerSettings(
        bind, socket_path, backend, inter_ms, fall, rise, slowstart_s, maxconn
    )
    text = render_config([Node.parse(n) for n in nodes], settings)
    if out_file is not None:
        out_file.write_text(text)
    if as_json:
        emit_json({"ok": True, "nodes": len(nodes), "file": str(out_file) if out_file else None})
    elif out_file is None:
        click.echo(text, nl=False)
    else:
        click.echo(f"wrote {out_file} ({len(nodes)} nodes); check it with haproxy -c -f {out_file}")


@fleet.command()
@_runtime_options
@json_option
def status(socket_path: Path, backend: str, as_json: bool) -> None:
    """Each node: HAProxy's view (state, weight, requests in flight, last check) and the
    node's own (/readyz: ready, release, rollout; /metrics: requests, 5xx, busy slots)."""
    servers = RuntimeAPI(socket_path, backend).servers()
    with ThreadPoolExecutor(8) as pool:
        views = list(pool.map(lambda s: read_node(f"http://{s.address}"), servers))
    rows = [
        {"name": s.name, "haproxy": s.to_dict(), "node": v.to_dict()}
        for s, v in zip(servers, views, strict=True)
    ]
    if as_json:
        emit_json({"backend": backend, "nodes": rows})
        return
    click.echo(f"{'node':<12} {'haproxy':<10} {'weight':>6} {'inflight':>8}  {'ready':<5} release")
    for s, v in zip(servers, views, strict=True):
        figures = ""
        if v.counts is not None:
            c = v.counts
            figures = (
                f"  requests {c.requests:.0f}, 5xx {c.server_errors:.0f}, busy {c.busy_slots:.0f}"
            )
        rollout = f" (rollout {v.rollout['mode']} {v.rollout['candidate']})" if v.rollout else ""
        note = "" if v.ready else f"  {v.reason}"
        click.echo(
            f"{s.name:<12} {s.status:<10} {s.weight:>6} {s.sessions:>8}  "
            f"{'yes' if v.ready else 'no':<5} {v.release or '-'}{rollout}{figures}{note}"
        )


@fleet.command()
@click.argument("name")
@click.option("--state", type=click.Choice(STATES), help="ready, drain or maint.")
@click.option("--weight", type=click.IntRange(0, 256), help="A new weight (0-256).")
@click.option(
    "--wait-idle",
    type=click.FloatRange(0),
    help="After the change, wait up to this many seconds until NAME has no request in flight.",
)
@_runtime_options
@json_option
def server(
    name: str,
    state: str | None,
    weight: int | None,
    wait_idle: float | None,
    socket_path: Path,
    backend: str,
    as_json: bool,
) -> None:
    """Change node NAME in HAProxy: `--state drain` sends it no new requests (those in
    flight finish), `maint` takes it out, `ready` puts it back (with slow start after
    maint); `--weight` changes its share. Prints whether anything changed."""
    api = RuntimeAPI(socket_path, backend)
    before = api.server(name)
    if state is not None:
        api.set_state(name, state)
    if weight is not None:
        api.set_weight(name, weight)
    after = api.wait_idle(name, wait_idle) if wait_idle is not None else api.server(name)
    changed = (before.status, before.weight) != (after.status, after.weight)
    if as_json:
        emit_json(
            {"ok": True, "changed": changed, "before": before.to_dict(), "after": after.to_dict()}
        )
    else:
        click.echo(
            f"{name}: {before.status} weight {before.weight} -> "
            f"{after.status} weight {after.weight}"
        )


@fleet.command(name="wait-ready")
@click.argument("url")
@click.option("--release", "ref", required=True, help="NAME@VERSION the node must serve.")
@click.option("--timeout", default=300.0, show_default=True, type=click.FloatRange(0))
@json_option
def wait_ready_command(url: str, ref: str, timeout: float, as_json: bool) -> None:
    """Wait until the node at URL is ready and serves RELEASE (exit 51 if it does not in time)."""
    view = wait_ready(url, ref, timeout)
    if as_json:
        emit_json({"ok": True, "node": view.to_dict()})
    else:
        click.echo(f"{url} is ready with {view.release}")


@fleet.command()
@click.argument("url")
@click.option("--seconds", default=60.0, show_default=True, type=click.FloatRange(0))
@click.option(
    "--max-error-rate",
    default=0.01,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Share of the node's requests that may fail (5xx) during the watch.",
)
@click.option(
    "--min-requests",
    default=20,
    show_default=True,
    type=click.IntRange(0),
    help="Fewer requests than this is inconclusive (exit 53), never a pass.",
)
@json_option
def watch(
    url: str, seconds: float, max_error_rate: float, min_requests: int, as_json: bool
) -> None:
    """Watch a canary node at URL: it must stay ready and answer its requests (exit 52 if
    it fails more than allowed or loses readiness, 53 if too few requests came)."""
    result = watch_canary(url, seconds, max_error_rate, min_requests)
    document: dict[str, Any] = {"ok": True, **result.to_dict()}
    if as_json:
        emit_json(document)
    else:
        click.echo(
            f"{url}: {result.requests} requests in {seconds:g} s, "
            f"{result.server_errors} failed ({result.error_rate:.1%})"
        )
