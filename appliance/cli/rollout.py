"""`appliance rollout`: serve a candidate beside the active release, as a canary judged
live against it or as a shadow; promote or abort it (all audited)."""

from __future__ import annotations

import re
from typing import Any

import click

from appliance.cli.common import (
    emit_json,
    json_option,
    pass_store,
    reason_option,
    required_reason_option,
)
from appliance.errors import UsageError
from appliance.store.releases import ReleaseStore
from appliance.store.rollouts import (
    DEFAULT_STEPS,
    Rollout,
    abort_rollout,
    latest_rollout,
    promote_rollout,
    rollout_history,
    start_rollout,
)


@click.group()
def rollout() -> None:
    """Canary or shadow a candidate release beside the active one; promote or abort it."""


@rollout.command()
@click.argument("ref", metavar="NAME@VERSION")
@click.option("--canary", "mode", flag_value="canary", help="Send it a growing share of traffic.")
@click.option("--shadow", "mode", flag_value="shadow", help="Mirror traffic to it; never answer.")
@click.option(
    "--steps",
    default=",".join(f"{s:g}" for s in DEFAULT_STEPS),
    show_default=True,
    help="Canary: the candidate's percent of traffic, step by step; promoted after the last.",
)
@click.option(
    "--percent",
    type=click.FloatRange(0, 100, min_open=True),
    default=100.0,
    show_default=True,
    help="Shadow: the percent of stable's requests mirrored to it.",
)
@click.option(
    "--interval",
    default="60s",
    show_default=True,
    help="How long each step lasts before it is judged (30s, 5m, 1h).",
)
@click.option(
    "--min-requests",
    type=click.IntRange(1),
    default=50,
    show_default=True,
    help="Candidate requests a step needs before it can be judged good (fewer: wait).",
)
@reason_option
@json_option
@pass_store
def start(
    store: ReleaseStore,
    ref: str,
    mode: str | None,
    steps: str,
    percent: float,
    interval: str,
    min_requests: int,
    reason: str,
    as_json: bool,
) -> None:
    """Load NAME@VERSION beside the active release as a canary or a shadow.

    It must have passed its eval gate on this host, as for activate; a freeze blocks it.
    The service judges each canary step against the active release on errors, p95
    latency and the release's online checks, and advances, waits (too few requests:
    inconclusive) or aborts by itself; every decision is audited.
    """
    if mode is None:
        raise UsageError("say --canary or --shadow")
    plan = _steps(steps) if mode == "canary" else (percent,)
    started = start_rollout(store, ref, mode, plan, _seconds(interval), min_requests, reason)
    _print(started, as_json, f"{mode} of {started.candidate} started at {started.percent:g}%")


@rollout.command()
@json_option
@pass_store
def status(store: ReleaseStore, as_json: bool) -> None:
    """The running (or latest) rollout: its step, the judge's latest look and every
    decision so far."""
    with store.reading() as db:
        latest = latest_rollout(db)
        history = rollout_history(db, latest.id) if latest else []
    if as_json:
        emit_json({"rollout": latest.as_dict() if latest else None, "history": history})
        return
    if latest is None:
        click.echo("no rollout yet (appliance rollout start NAME@VERSION --canary)")
        return
    click.echo(
        f"{latest.mode} of {latest.candidate}: {latest.state}, step {latest.step + 1}/"
        f"{len(latest.steps)} at {latest.percent:g}%, interval {latest.interval_seconds:g} s, "
        f"min {latest.min_requests} requests"
    )
    if latest.last_check:
        click.echo(f"  latest check: {_check_line(latest.last_check)}")
    for row in history:
        reason = f" ({row['reason']})" if row["reason"] else ""
        click.echo(f"  {row['time'][:19]}  {row['action']}{reason}")


@rollout.command()
@reason_option
@json_option
@pass_store
def promote(store: ReleaseStore, reason: str, as_json: bool) -> None:
    """Make the candidate the active release now (the old one stays as previous good)."""
    done = promote_rollout(store, reason)
    _print(done, as_json, f"promoted {done.candidate}: it is the active release")


@rollout.command()
@required_reason_option
@json_option
@pass_store
def abort(store: ReleaseStore, reason: str, as_json: bool) -> None:
    """Stop the rollout: the candidate gets no more traffic and is unloaded."""
    done = abort_rollout(store, reason)
    _print(done, as_json, f"aborted the {done.mode} of {done.candidate}")


def _print(done: Rollout, as_json: bool, message: str) -> None:
    if as_json:
        emit_json({"ok": True, "rollout": done.as_dict()})
    else:
        click.echo(message)


def _steps(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError as exc:
        raise UsageError(f"--steps takes percentages like 5,25,50, not {text!r}") from exc


def _seconds(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match:
        raise UsageError(f"--interval takes a duration like 30s, 5m or 1h, not {text!r}")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


def _check_line(check: dict[str, Any]) -> str:
    sides = check.get("sides", {})
    figures = "; ".join(
        f"{role} n={side['n']} errors {side['error_rate']:.1%} p95 {side['p95_ms']:.0f} ms "
        f"checks {side['check_pass_rate']:.1%}"
        for role, side in sides.items()
        if side.get("n")
    )
    noise = ""
    if check.get("divergence") is not None:
        noise = f"; noise floor {check['noise_floor']:.2f}, divergence {check['divergence']:+.2f}"
    decision = check.get("decision", "?")
    if check.get("verdict"):
        decision += f" ({check['verdict']})"
    return f"{decision}: {check.get('why', '')}{noise}" + (f" [{figures}]" if figures else "")
