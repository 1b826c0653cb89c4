"""What the console shows and does, as plain objects over the store and telemetry.

No textual here: `load_snapshot` reads everything in one go (run it in a worker, off the
UI thread), and `ConsoleActions` changes state through the same ReleaseStore functions
the CLI uses, so the console adds no second copy of any rule.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from appliance.errors import UsageError
from appliance.evals.report import verdict_word
from appliance.guard.policy import SafetyPolicy, load_policy
from appliance.paths import AppliancePaths
from appliance.store import audit, ledger
from appliance.store.db import open_state_db
from appliance.store.gate import GateDecision
from appliance.store.records import Release
from appliance.store.releases import ReleaseStore
from appliance.store.rollouts import (
    abort_rollout,
    latest_rollout,
    promote_rollout,
    rollout_history,
)
from appliance.store.routing import (
    RoutingState,
    Target,
    end_incident,
    routing_state,
    set_fallback,
    start_incident,
    targets,
)
from appliance.telemetry.queries import (
    GuardStats,
    RetrievalStats,
    RouteStats,
    WindowStats,
    guard_stats,
    percentile,
    retrieval_stats,
    route_stats,
    window_stats,
)
from appliance.trust.truststore import load_trust_store

SPARK_BUCKETS = 30
SPARK_SECONDS = 10


@dataclass(frozen=True)
class ReleaseRow:
    ref: str
    sequence: int
    state: str  # active, previous-good, installed
    verdict: str  # passed, failed, inconclusive, none
    signers: tuple[str, ...]
    installed_at: str
    quant_type: str


@dataclass(frozen=True)
class ServiceStatus:
    reachable: bool
    release: str = ""
    queue_depth: float = 0.0
    busy_slots: float = 0.0


@dataclass(frozen=True)
class Snapshot:
    taken_at: float
    active: str | None
    frozen: bool
    frozen_reason: str | None
    releases: tuple[ReleaseRow, ...]
    window: WindowStats
    requests_series: tuple[float, ...]  # requests per bucket, oldest first
    p95_series: tuple[float, ...]  # p95 latency (s) per bucket
    tokens_series: tuple[float, ...]  # completion tokens/s per bucket
    service: ServiceStatus
    cpu_percent: float
    memory_percent: float
    reports: tuple[dict[str, Any], ...]  # latest eval report per release, newest first
    audit_rows: tuple[dict[str, Any], ...]
    audit_ok: bool
    audit_problem: str
    keys: tuple[dict[str, Any], ...]
    threshold: int
    notes: tuple[str, ...] = field(default_factory=tuple)  # errors to show, never raise
    rollout: dict[str, Any] | None = None  # the running or latest rollout (Rollout.as_dict)
    rollout_history: tuple[dict[str, Any], ...] = ()  # its audited decisions, oldest first
    routing: RoutingState | None = None  # the fallback switch, an open incident, overrides
    targets: tuple[Target, ...] = ()  # cold-path targets, in fallback order
    routes: tuple[RouteStats, ...] = ()  # the last window's requests by the path that answered
    guard: GuardStats | None = None  # what the safety policy did in the last window
    safety: SafetyPolicy | None = None  # the active release's signed policy (None: it has none)
    retrieval: RetrievalStats | None = None  # the last window's retrievals


def load_snapshot(
    paths: AppliancePaths, service_url: str | None, window_seconds: float = 300
) -> Snapshot:
    store = ReleaseStore(paths)
    db = open_state_db(paths.state_db)
    try:
        state = store.state(db)
        releases = store.releases(db)
        by_id = {r.id: r for r in releases}
        active = by_id.get(state.active_id)
        rows = tuple(_release_row(r, state, store.gate(db, r)) for r in releases)
        now = time.time()
        stats = window_stats(db, window_seconds, active.ref if active else None, now)
        series = _series(db, now)
        reports = tuple(_latest_reports(db, releases))
        trust = load_trust_store(paths.trust_store)
        audit_problem = _audit_problem(db, trust)
        audit_rows = tuple(audit.rows(db, limit=200))
        rollout = latest_rollout(db)
        history = tuple(rollout_history(db, rollout.id)) if rollout else ()
        routing_now, registered = routing_state(db), tuple(targets(db))
        routes = tuple(route_stats(db, window_seconds, now))
        guard = guard_stats(db, window_seconds, now)
        retrievals = retrieval_stats(db, window_seconds, now)
    finally:
        db.close()
    keys = tuple(
        {
            "key_id": k.key_id,
            "name": k.name,
            "added": k.added,
            "revoked": k.revoked,
            "signed": [r.ref for r in releases if k.key_id in r.signers],
        }
        for k in trust.keys.values()
    )
    return Snapshot(
        taken_at=now,
        active=active.ref if active else None,
        frozen=state.frozen,
        frozen_reason=state.frozen_reason,
        releases=rows,
        window=stats,
        requests_series=series[0],
        p95_series=series[1],
        tokens_series=series[2],
        service=service_status(service_url),
        cpu_percent=psutil.cpu_percent(interval=None),
        memory_percent=psutil.virtual_memory().percent,
        reports=reports,
        audit_rows=audit_rows,
        audit_ok=not audit_problem,
        audit_problem=audit_problem,
        keys=keys,
        threshold=trust.threshold,
        rollout=rollout.as_dict() if rollout else None,
        rollout_history=history,
        routing=routing_now,
        targets=registered,
        routes=routes,
        guard=guard,
        safety=_safety_policy(active),
        retrieval=retrievals,
    )


def _safety_policy(active: Release | None) -> SafetyPolicy | None:
    """The active release's policy as installed (for display; the service verifies it)."""
    if active is None:
        return None
    try:
        return load_policy(Path(active.path))
    except (OSError, UsageError):
        return None


def service_status(url: str | None) -> ServiceStatus:
    """Queue depth, busy slots and the serving release from the service's /metrics."""
    if not url:
        return ServiceStatus(False)
    try:
        text = httpx.get(url.rstrip("/") + "/metrics", timeout=1.0).text
    except httpx.HTTPError:
        return ServiceStatus(False)

    def gauge(name: str) -> float:
        match = re.search(rf"^{name} (\S+)$", text, re.M)
        return float(match[1]) if match else 0.0

    release = re.search(r'^appliance_active_release\{release="([^"]+)"\} 1\.0$', text, re.M)
    return ServiceStatus(
        True,
        release[1] if release else "",
        gauge("appliance_queue_depth"),
        gauge("appliance_busy_slots"),
    )


def _release_row(release: Release, state, gate: GateDecision) -> ReleaseRow:
    if release.id == state.active_id:
        where = "active"
    elif release.id == state.previous_good_id:
        where = "previous-good"
    else:
        where = "installed"
    shown = "none"
    if gate.report is not None:
        shown = verdict_word(json.loads(gate.report["report"])["gate"]).lower()
    return ReleaseRow(
        release.ref,
        release.sequence,
        where,
        shown,
        tuple(release.signers),
        release.installed_at,
        release.quant_type,
    )


def _latest_reports(db, releases: list[Release]):
    installed, seen = {r.manifest_sha256 for r in releases}, set()
    for row in db.query("SELECT manifest_sha256, report FROM eval_reports ORDER BY id DESC"):
        if row["manifest_sha256"] in seen or row["manifest_sha256"] not in installed:
            continue
        seen.add(row["manifest_sha256"])
        yield json.loads(row["report"])


def _audit_problem(db, trust) -> str:
    """Empty when the hash chain holds and the live state matches what the log records."""
    chain = audit.verify_chain(db)
    if not chain.ok:
        return f"hash chain broken at row {chain.first_bad_id}: {chain.problem}"
    found = ledger.check_state(db, trust)
    return f"state changed outside the audit log: {'; '.join(found)}" if found else ""


def _series(db, now: float) -> tuple[tuple[float, ...], ...]:
    start = now - SPARK_BUCKETS * SPARK_SECONDS
    buckets: list[list[dict]] = [[] for _ in range(SPARK_BUCKETS)]
    for row in db.query(
        "SELECT time, status, latency_seconds, completion_tokens FROM requests WHERE time >= ? "
        "AND (role IS NULL OR role IN ('stable', 'canary'))",
        [start],
    ):
        index = min(SPARK_BUCKETS - 1, int((row["time"] - start) // SPARK_SECONDS))
        buckets[index].append(row)
    requests = tuple(float(len(b)) for b in buckets)
    p95 = tuple(
        percentile([r["latency_seconds"] for r in b if r["status"] == 200], 95) or 0.0
        for b in buckets
    )
    tokens = tuple(sum(r["completion_tokens"] or 0 for r in b) / SPARK_SECONDS for b in buckets)
    return requests, p95, tokens


class ConsoleActions:
    """State changes from the console: the CLI's own store functions, audited the same way."""

    def __init__(self, paths: AppliancePaths) -> None:
        self.store = ReleaseStore(paths)

    def activate(self, ref: str, reason: str) -> str:
        release, changed = self.store.activate(ref, reason=reason)
        return f"{release.ref} is {'now' if changed else 'already'} active"

    def rollback(self, reason: str) -> str:
        target, previous = self.store.rollback(reason)
        return f"rolled back from {previous.ref if previous else '-'} to {target.ref}"

    def freeze(self, reason: str) -> str:
        self.store.freeze(reason)
        return f"releases frozen: {reason}"

    def unfreeze(self, reason: str) -> str:
        self.store.unfreeze(reason)
        return "releases unfrozen"

    def promote_rollout(self, reason: str) -> str:
        done = promote_rollout(self.store, reason)
        return f"promoted {done.candidate}: it is the active release"

    def abort_rollout(self, reason: str) -> str:
        done = abort_rollout(self.store, reason)
        return f"aborted the {done.mode} of {done.candidate}"

    def fallback(self, on: bool, reason: str) -> str:
        set_fallback(self.store, on, reason)
        return "every request goes to the fallback" if on else "routing by the policy again"

    def start_incident(self, reason: str) -> str:
        opened = start_incident(self.store, reason)
        routed = "everything to the fallback" if opened["fallback"] else "no fallback registered"
        return f"incident open: releases frozen, {routed}"

    def end_incident(self, reason: str) -> str:
        end_incident(self.store, reason)
        return "incident over: releases unfrozen, routing by the policy"
