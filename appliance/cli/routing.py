"""`appliance route` (cold-path targets, the fallback switch) and `appliance incident`."""

from __future__ import annotations

from pathlib import Path

import click

from appliance.cli.common import (
    emit_json,
    json_option,
    pass_store,
    reason_option,
    report_done,
    required_reason_option,
)
from appliance.store import routing
from appliance.store.releases import ReleaseStore


@click.group()
def route() -> None:
    """Register cold-path targets and route to them (all audited)."""


@route.command("add")
@click.argument("name")
@click.option("--url", required=True, help="http(s)://IP:PORT[/path] of an OpenAI-compatible API.")
@click.option("--model", required=True, help="The model name that endpoint serves.")
@click.option(
    "--key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A file only its owner can read, holding the endpoint's API key.",
)
@click.option(
    "--cost-per-1k-tokens",
    type=float,
    default=0.0,
    show_default=True,
    help="What a thousand tokens there cost, for cost per successful task by route.",
)
@reason_option
@json_option
@pass_store
def add(
    store: ReleaseStore,
    name: str,
    url: str,
    model: str,
    key_file: Path | None,
    cost_per_1k_tokens: float,
    reason: str,
    as_json: bool,
) -> None:
    """Register NAME, a cold-path endpoint inside this network, after those registered
    before it (fallbacks are tried in that order)."""
    target = routing.add_target(store, name, url, model, key_file, cost_per_1k_tokens, reason)
    report_done(as_json, {"target": target.as_dict()}, f"registered {name}: {target.url} ({model})")


@route.command("remove")
@click.argument("name")
@reason_option
@json_option
@pass_store
def remove(store: ReleaseStore, name: str, reason: str, as_json: bool) -> None:
    """Unregister the cold-path target NAME."""
    routing.remove_target(store, name, reason)
    report_done(as_json, {"removed": name}, f"removed {name}")


@route.command("status")
@json_option
@pass_store
def status(store: ReleaseStore, as_json: bool) -> None:
    """The cold-path targets, in fallback order, and the routing switches."""
    with store.reading() as db:
        targets, state = routing.targets(db), routing.routing_state(db)
    if as_json:
        emit_json({"targets": [t.as_dict() for t in targets], **state.as_dict()})
        return
    for target in targets:
        key = f", key in {target.key_file}" if target.key_file else ""
        click.echo(f"{target.position}. {target.name}: {target.url} ({target.model}{key})")
    if not targets:
        click.echo("no cold-path target registered: everything is answered here")
    mode = f"everything to the fallback ({state.fallback_reason})" if state.fallback else "policy"
    click.echo(f"routing: {mode}")
    if state.incident:
        click.echo(f"incident open since {state.incident_started}: {state.incident}")


@route.command("fallback")
@click.argument("switch", type=click.Choice(["on", "off"]))
@reason_option
@json_option
@pass_store
def fallback(store: ReleaseStore, switch: str, reason: str, as_json: bool) -> None:
    """Send every request to the cold path (on), or route by the policy again (off)."""
    state = routing.set_fallback(store, switch == "on", reason)
    report_done(as_json, state.as_dict(), f"fallback {switch}")


@click.group()
def incident() -> None:
    """Incident mode: freeze releases, route to the fallback, optionally roll back."""


@incident.command("start")
@required_reason_option
@click.option("--rollback", is_flag=True, help="Also roll back to the previous good release.")
@json_option
@pass_store
def start(store: ReleaseStore, reason: str, rollback: bool, as_json: bool) -> None:
    """Freeze releases and route everything to the fallback (when one is registered), and
    roll back with --rollback: one audited step."""
    opened = routing.start_incident(store, reason, rollback)
    said = ["releases frozen"]
    said += ["everything routed to the fallback"] if opened["fallback"] else ["no fallback"]
    if opened["rolled_back_to"]:
        said.append(f"rolled back to {opened['rolled_back_to']}")
    report_done(as_json, opened, f"incident open: {', '.join(said)}")


@incident.command("end")
@reason_option
@json_option
@pass_store
def end(store: ReleaseStore, reason: str, as_json: bool) -> None:
    """Unfreeze releases and route by the policy again."""
    state = routing.end_incident(store, reason)
    report_done(as_json, state.as_dict(), "incident over: releases unfrozen, routing by policy")


@incident.command("status")
@json_option
@pass_store
def incident_status(store: ReleaseStore, as_json: bool) -> None:
    """Whether an incident is open, since when and why."""
    with store.reading() as db:
        state, frozen = routing.routing_state(db), store.state(db).frozen
    if as_json:
        emit_json({**state.as_dict(), "frozen": frozen})
    elif state.incident:
        click.echo(f"incident open since {state.incident_started}: {state.incident}")
    else:
        click.echo("no incident open")
