"""The admin console, driven by Pilot against a real store and a running service; and
snapshot tests of every screen with fixed data (pytest-textual-snapshot)."""

from __future__ import annotations

import asyncio
import json

from conftest import DEMO_BUNDLE
from serving import wait_for
from test_hotswap import serving, two_releases  # noqa: F401 - the fixture is used by name
from test_serve import appliance
from textual.widgets import Input

from appliance.console.app import ConfirmAction, ConsoleApp
from appliance.console.state import ConsoleActions, ServiceStatus, Snapshot, load_snapshot
from appliance.guard.policy import load_policy
from appliance.paths import appliance_paths
from appliance.store.releases import ReleaseStore
from appliance.store.routing import RoutingState, Target
from appliance.telemetry.queries import GuardStats, RouteStats, WindowStats


def active_ref() -> str | None:
    store = ReleaseStore(appliance_paths())
    db = store.open_db()
    try:
        release = store.release_by_id(db, store.state(db).active_id)
        return release.ref if release else None
    finally:
        db.close()


async def until(pilot, predicate, seconds: float = 15) -> bool:
    for _ in range(int(seconds * 10)):
        if predicate():
            return True
        await pilot.pause(0.1)
    return predicate()


async def confirm_with(pilot, reason: str) -> None:
    await until(pilot, lambda: len(pilot.app.screen.query("#reason")) == 1)
    pilot.app.screen.query_one("#reason", Input).value = reason
    await pilot.press("enter")


def console_for(server) -> ConsoleApp:
    paths = appliance_paths()
    return ConsoleApp(lambda: load_snapshot(paths, server.url), ConsoleActions(paths))


def test_rollback_from_the_console_switches_store_audit_and_service(two_releases):  # noqa: F811
    server, first, second = two_releases
    appliance(server.home, "release", "activate", second, "--force", "--reason", "upgrade")
    assert wait_for(lambda: serving(server) == second, seconds=20)

    async def drive() -> None:
        app = console_for(server)
        async with app.run_test(size=(80, 24)) as pilot:
            assert await until(pilot, lambda: app.snapshot is not None)
            await pilot.press("r")
            await confirm_with(pilot, "p95 regression")
            assert await until(pilot, lambda: active_ref() == first)
            assert await until(
                pilot, lambda: any("rolled back" in n.message for n in app._notifications)
            )

    asyncio.run(drive())
    rows = appliance(server.home, "audit", "list")["rows"]
    assert rows[0]["action"] == "rollback" and rows[0]["reason"] == "p95 regression"
    assert wait_for(lambda: serving(server) == first, seconds=20), "the service switched back"


def test_freeze_then_activation_is_refused_with_the_reason_shown(two_releases):  # noqa: F811
    """No dialog offers Confirm for an action the console already knows will be refused."""
    server, first, second = two_releases

    async def drive() -> None:
        app = console_for(server)
        async with app.run_test(size=(80, 24)) as pilot:
            assert await until(pilot, lambda: app.snapshot is not None)
            await pilot.press("r")  # nothing to roll back to yet
            assert await until(
                pilot, lambda: any("no previous good" in n.message for n in app._notifications)
            )
            assert not isinstance(app.screen, ConfirmAction)
            await pilot.press("f")
            await confirm_with(pilot, "incident 7")
            assert await until(pilot, lambda: app.snapshot.frozen)
            await pilot.press("l", "down")  # the releases screen, second row: demo@2.0.0
            await pilot.press("a")
            assert await until(
                pilot,
                lambda: any(
                    "incident 7" in n.message and "frozen" in n.message for n in app._notifications
                ),
            )
            assert not isinstance(app.screen, ConfirmAction)

    asyncio.run(drive())
    assert active_ref() == first
    assert appliance(server.home, "release", "list")["frozen"] is True


def test_the_fallback_and_an_incident_from_the_console(run_cli):
    """One key each: b turns the fallback on (with a reason), i opens an incident (frozen,
    shown on the dashboard) and ends it; all through the store, audited."""
    url = "http://10.0.0.7:8000/v1"
    assert run_cli("route", "add", "big", "--url", url, "--model", "m").exit_code == 0
    paths = appliance_paths()

    async def drive() -> None:
        app = ConsoleApp(lambda: load_snapshot(paths, None), ConsoleActions(paths), 0.5)
        async with app.run_test(size=(80, 24)) as pilot:
            assert await until(pilot, lambda: app.snapshot is not None)
            await pilot.press("b")
            await confirm_with(pilot, "release weak on contracts")
            assert await until(pilot, lambda: app.snapshot.routing.fallback)
            await pilot.press("i")
            await confirm_with(pilot, "INC-7")
            assert await until(pilot, lambda: app.snapshot.routing.incident == "INC-7")
            assert app.snapshot.frozen
            await pilot.press("d")
            summary = str(app.query_one("#summary").render())
            assert "INCIDENT" in summary and "INC-7" in summary
            await pilot.press("i")  # ends it
            await confirm_with(pilot, "INC-7 resolved")
            assert await until(pilot, lambda: app.snapshot.routing.incident is None)
            assert not app.snapshot.frozen and not app.snapshot.routing.fallback

    asyncio.run(drive())
    rows = json.loads(run_cli("audit", "list", "--json").stdout)["rows"]
    assert [r["action"] for r in reversed(rows)][-7:] == [
        "route fallback on", "freeze", "route fallback on", "incident start",
        "unfreeze", "route fallback off", "incident end",
    ]  # fmt: skip


# -- snapshots with fixed data ------------------------------------------------------------


def fixed_snapshot() -> Snapshot:
    from appliance.console.state import ReleaseRow

    report = {
        "release": "demo@2.0.0",
        "spec_hash": "ab" * 32,
        "cost_per_success": 7.6e-06,
        "gate": {
            "passed": False,
            "failures": [
                {"criterion": "regression", "detail": "-0.40 vs demo@1.0.0 (McNemar p = 0.0001)"}
            ],
        },
        "overall": {"passed": 16, "n": 30},
        "retrieval": {"k": 3, "precision_at_k": 0.62, "recall_at_k": 0.69, "mrr": 0.94},
        "latency_ms": {"p95": 7683.0},
        "suites": {
            "facts": {"pass_rate": 0.5, "wilson_95": [0.24, 0.76]},
            "safety": {"pass_rate": 1.0, "wilson_95": [0.61, 1.0]},
        },
        "regression": {
            "baseline": "demo@1.0.0",
            "difference": -0.4,
            "mcnemar_p": 0.0001,
            "flipped_to_fail": ["facts-001", "facts-003", "arith-002"],
        },
    }
    return Snapshot(
        taken_at=0.0,
        active="demo@1.0.0",
        frozen=True,
        frozen_reason="incident 7",
        releases=(
            ReleaseRow(
                "demo@1.0.0",
                1,
                "active",
                "passed",
                ("898e5a66ad2a6740",),
                "2026-11-30T03:59:36Z",
                "Q4_K_M",
            ),
            ReleaseRow(
                "demo@2.0.0",
                2,
                "installed",
                "failed",
                ("898e5a66ad2a6740",),
                "2026-11-30T04:10:02Z",
                "Q2_K",
            ),
        ),
        window=WindowStats("demo@1.0.0", 300, 120, 2, 0.4, 38.5, 1.21, 2.9, 3.4, 0.11, 0.35),
        requests_series=tuple(float(v % 7 + 2) for v in range(30)),
        p95_series=tuple(1.5 + (v % 5) / 4 for v in range(30)),
        tokens_series=tuple(30.0 + (v * 7) % 20 for v in range(30)),
        service=ServiceStatus(True, "demo@1.0.0", 1.0, 3.0),
        cpu_percent=63.0,
        memory_percent=21.0,
        reports=(report,),
        audit_rows=tuple(
            {
                "id": i,
                "time": f"2026-11-30T04:{i:02d}:00.000000Z",
                "user": "ops",
                "action": a,
                "target": "demo@1.0.0",
                "reason": r,
            }
            for i, (a, r) in reversed(
                list(
                    enumerate(
                        [("install", ""), ("eval", ""), ("activate", ""), ("freeze", "incident 7")],
                        start=1,
                    )
                )
            )
        ),
        audit_ok=True,
        audit_problem="",
        keys=(
            {
                "key_id": "898e5a66ad2a6740" + "0" * 48,
                "name": "release",
                "added": "",
                "revoked": None,
                "signed": ["demo@1.0.0", "demo@2.0.0"],
            },
            {
                "key_id": "1f0e" * 16,
                "name": "old-release",
                "added": "",
                "revoked": "2026-10-01T00:00:00Z",
                "signed": [],
            },
        ),
        threshold=1,
        rollout={
            "candidate": "demo@2.0.0",
            "mode": "canary",
            "state": "running",
            "step": 1,
            "steps": [5.0, 25.0, 50.0],
            "percent": 25.0,
            "last_check": {
                "decision": "inconclusive",
                "why": "31 of 50 canary requests so far",
                "sides": {
                    "stable": {
                        "n": 140,
                        "error_rate": 0.0,
                        "p95_ms": 2900.0,
                        "checked": 140,
                        "check_failures": 1,
                        "check_pass_rate": 0.993,
                        "agreement": None,
                    },
                    "canary": {
                        "n": 31,
                        "error_rate": 0.032,
                        "p95_ms": 3100.0,
                        "checked": 30,
                        "check_failures": 0,
                        "check_pass_rate": 1.0,
                        "agreement": None,
                    },
                },
            },
        },
        rollout_history=(
            {"time": "2026-11-30T04:20:00.000000Z", "action": "rollout start", "reason": "r7"},
            {"time": "2026-11-30T04:21:00.000000Z", "action": "rollout advance", "reason": ""},
        ),
        routing=RoutingState(
            True, "incident: incident 7", "incident 7", "2026-11-30T04:22:00Z", {}
        ),
        targets=(
            Target("big", "http://10.0.0.7:8000/v1", "llama-70b", None, 0.5, 1, ""),
            Target("vllm", "http://10.0.0.8:8000/v1", "qwen-32b", None, 0.2, 2, ""),
        ),
        routes=(
            RouteStats("cold:big", 96, 0, 4.1, {"category:legal": 12, "incident": 84}, 41200),
            RouteStats("hot", 24, 2, 2.9, {"incident": 3}, 0),
        ),
        guard=GuardStats(
            120,
            3,
            1,
            {
                ("input", "email", "redact"): 7,
                ("input", "injection", "deny"): 3,
                ("output", "card", "mask"): 2,
                ("output", "deny", "stop"): 1,
            },
        ),
        safety=load_policy(DEMO_BUNDLE),
    )


def fixed_app() -> ConsoleApp:
    snapshot = fixed_snapshot()
    return ConsoleApp(lambda: snapshot, actions=None, refresh_seconds=3600)


async def loaded(pilot) -> None:
    """Snapshots are taken only after the (thread-worker) refresh has filled the screens."""
    assert await until(pilot, lambda: pilot.app.snapshot is not None)
    await pilot.pause()


def test_snapshot_dashboard(snap_compare):
    assert snap_compare(fixed_app(), run_before=loaded)


def test_snapshot_releases(snap_compare):
    assert snap_compare(fixed_app(), press=["l", "_"], run_before=loaded)


def test_snapshot_evals(snap_compare):
    assert snap_compare(fixed_app(), press=["e", "_"], run_before=loaded)


def test_snapshot_audit(snap_compare):
    assert snap_compare(fixed_app(), press=["g", "_"], run_before=loaded)


def test_snapshot_keys(snap_compare):
    assert snap_compare(fixed_app(), press=["k", "_"], run_before=loaded)


def test_snapshot_rollout(snap_compare):
    assert snap_compare(fixed_app(), press=["o", "_"], run_before=loaded)


def test_snapshot_routing(snap_compare):
    assert snap_compare(fixed_app(), press=["t", "_"], run_before=loaded)


def test_snapshot_safety(snap_compare):
    assert snap_compare(fixed_app(), press=["s", "_"], run_before=loaded)
