"""`appliance route` (cold-path targets, the fallback switch) and `appliance incident`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from appliance.cli.common import (
    emit_json,
    json_option,
    pass_store,
    progress_bar,
    reason_option,
    report_done,
    required_reason_option,
)
from appliance.errors import UsageError
from appliance.serve.config import ServingConfig
from appliance.serve.policy import RoutingPolicy
from appliance.store import routing
from appliance.store.releases import ReleaseStore


@click.group()
def route() -> None:
    """Register cold-path targets and route to them (all audited)."""


@route.command("add")
@click.argument("name")
@click.option("--url", help="http(s)://IP:PORT[/path] of an OpenAI-compatible API.")
@click.option("--model", help="The model name that endpoint serves (with --url).")
@click.option(
    "--release",
    metavar="NAME@VERSION",
    help="Instead of --url: an installed release (gated here) that this service loads "
    "beside the active one and escalates to, with no network.",
)
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
    url: str | None,
    model: str | None,
    key_file: Path | None,
    cost_per_1k_tokens: float,
    release: str | None,
    reason: str,
    as_json: bool,
) -> None:
    """Register NAME, a cold-path target after those registered before it (fallbacks are
    tried in that order): an endpoint inside this network, or an installed release."""
    target = routing.add_target(
        store, name, url, model, key_file, cost_per_1k_tokens, reason, release
    )
    where = f"release {release}, served here" if release else f"{target.url} ({model})"
    report_done(as_json, {"target": target.as_dict()}, f"registered {name}: {where}")


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
        where = f"release {target.release}, served here" if target.release else target.url
        click.echo(f"{target.position}. {target.name}: {where} ({target.model}{key})")
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


@route.command("units")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write the drop-in into this directory (/etc/systemd/system/appliance.service.d).",
)
@json_option
@pass_store
def units(store: ReleaseStore, out: Path | None, as_json: bool) -> None:
    """The systemd drop-in that lets the service reach exactly the registered cold-path
    targets (the kernel's IP filter); printed, or written with --out."""
    with store.reading() as db:
        text = routing.systemd_dropin(routing.targets(db))
    written = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        written = out / routing.DROPIN_NAME
        written.write_text(text)
    if as_json:
        emit_json({"dropin": text, "written": str(written) if written else None})
    elif written:
        click.echo(f"wrote {written}; now: systemctl daemon-reload && systemctl restart appliance")
    else:
        click.echo(text, nl=False)


@route.group("policy", invoke_without_command=True)
@json_option
@click.pass_context
def policy(ctx: click.Context, as_json: bool) -> None:
    """The routing policy: the active release's signed one and an admin's overrides.

    Without a subcommand: show each key, its value and where it comes from."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(policy_show, as_json=as_json)


@policy.command("show")
@json_option
@pass_store
def policy_show(store: ReleaseStore, as_json: bool) -> None:
    """Each key of the policy in force, and whether the release or an admin set it."""
    signed, overrides, release = _policies(store)
    effective = signed.with_overrides(overrides).as_dict()
    if as_json:
        emit_json(
            {
                "release": release,
                "signed": signed.as_dict(),
                "overrides": overrides,
                "effective": effective,
            }  # fmt: skip
        )
        return
    click.echo(f"routing policy of {release or 'no active release (defaults)'}:")
    for key, value in effective.items():
        source = "override" if key in overrides else "signed"
        click.echo(f"  {key:<20} {json.dumps(value):<40} ({source})")


# a negative VALUE (-1.5) is a value, not an option
@policy.command("set", context_settings={"ignore_unknown_options": True})
@click.argument("key")
@click.argument("value")
@required_reason_option
@json_option
@pass_store
def policy_set(store: ReleaseStore, key: str, value: str, reason: str, as_json: bool) -> None:
    """Override KEY of the signed policy with VALUE (JSON: -1.5, true, '["(?i)cannot"]')."""
    overrides = routing.set_policy(store, key, value, reason)
    report_done(
        as_json, {"overrides": overrides}, f"{key} overridden: {json.dumps(overrides[key])}"
    )


@policy.command("unset")
@click.argument("key")
@required_reason_option
@json_option
@pass_store
def policy_unset(store: ReleaseStore, key: str, reason: str, as_json: bool) -> None:
    """Drop the override of KEY: the release's signed value holds again."""
    overrides = routing.unset_policy(store, key, reason)
    report_done(as_json, {"overrides": overrides}, f"{key}: the signed value holds again")


@route.command("calibrate")
@click.argument("ref", metavar="NAME@VERSION", required=False)
@click.option(
    "--rate",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.1,
    show_default=True,
    help="The share of requests to escalate for low confidence.",
)
@click.option("--apply", is_flag=True, help="Set min_mean_logprob to the threshold (audited).")
@reason_option
@json_option
@pass_store
def calibrate(
    store: ReleaseStore, ref: str | None, rate: float, apply: bool, reason: str, as_json: bool
) -> None:
    """Derive the confidence threshold (min_mean_logprob) that escalates --rate of the eval
    cases of NAME@VERSION (default: the active release), run here on its model; with
    --apply, set it as the policy's override."""
    if apply and not reason.strip():
        raise UsageError("--apply changes the routing policy: give a --reason")
    if ref is None:
        with store.reading() as db:
            active = store.release_by_id(db, store.state(db).active_id)
        if active is None:
            raise UsageError("no release is active: name one (NAME@VERSION)")
        ref = active.ref
    from appliance.evals.evaluate import calibrate_confidence, plan_evaluation  # llama.cpp

    plan = plan_evaluation(store, ref, None)  # verifies the release before reading its spec
    with progress_bar(plan.case_runs, "scoring confidence", enabled=not as_json) as update:
        found = calibrate_confidence(plan, rate, update)
    if apply:
        threshold = json.dumps(found["min_mean_logprob"])
        found["overrides"] = routing.set_policy(store, "min_mean_logprob", threshold, reason)
    if as_json:
        emit_json(found)
        return
    spread = found["mean_logprob"]
    click.echo(
        f"{found['release']}: {found['cases']} eval cases, mean token log-probability "
        f"{spread['min']:.3f} .. {spread['median']:.3f} (median) .. {spread['max']:.3f}"
    )
    click.echo(
        f"min_mean_logprob {found['min_mean_logprob']:.4f} escalates "
        f"{found['escalation_rate']:.0%} of them (asked: {rate:.0%}); they fail "
        f"{_share(found['failure_rate_escalated'])}, the rest {_share(found['failure_rate_kept'])}"
    )
    if apply:
        click.echo("set as the policy's override (audited)")
    else:
        click.echo("not applied: rerun with --apply --reason ... to set it")


def _share(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:.0%}"


def _policies(store: ReleaseStore) -> tuple[RoutingPolicy, dict[str, Any], str | None]:
    """The active release's signed policy, the overrides, and the release's ref."""
    with store.reading() as db:
        overrides = routing.routing_state(db).policy
        active = store.release_by_id(db, store.state(db).active_id)
    if active is None:
        return RoutingPolicy(), overrides, None
    serving = ServingConfig.from_release_dir(Path(active.path))
    return serving.routing_policy(), overrides, active.ref


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
