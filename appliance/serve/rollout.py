"""Serving a rollout: which release answers a request, and the live judge of a canary.

The canary's share is sticky: a request's bucket comes from its session header (or its API
key), so a conversation stays on one release, and a bucket below the share at one step
stays below it at the next. The judge compares the candidate with stable over the current
step's window, on the statistics of the offline gate (appliance.evals.stats): the rate of
server errors and of failed online checks (a one-sided two-proportion test against the
spec's margin) and p95 latency (a bootstrap interval). Too few candidate requests is
"inconclusive": the step waits, it never passes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlite_utils import Database

from appliance.evals.spec import Online
from appliance.evals.stats import percentile, percentile_interval, rate_regression_p
from appliance.serve.runtime import ModelRuntime
from appliance.store.rollouts import Rollout

STABLE, CANARY, SHADOW = "stable", "canary", "shadow"
REPLAY = "replay"  # stable answering a mirrored copy itself: the shadow's noise floor
MIRRORED = (SHADOW, REPLAY)  # copies no client waits for
SESSION_HEADER = "x-appliance-session"


@dataclass(frozen=True)
class Route:
    runtime: ModelRuntime
    role: str  # stable | canary
    mirror: ModelRuntime | None = None  # a shadow that gets a copy of this request


def bucket(rollout_id: int, sticky: str) -> float:
    """Where a session falls in 0..100 for this rollout; the same at every step."""
    digest = hashlib.sha256(f"{rollout_id}:{sticky}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


def judge(db: Database, rollout: Rollout, online: Online, until: float) -> dict[str, Any]:
    """Look at the rollout's current step: a decision (proceed, abort, inconclusive; a
    shadow is only observed) with its figures, tests and window."""
    since = unix_time(rollout.step_started)
    rows = list(
        db.query(
            "SELECT role, status, latency_seconds, checks_run, checks_failed, agreement "
            "FROM requests WHERE time >= ? AND time <= ? AND role IS NOT NULL",
            [since, until],
        )
    )
    roles = (STABLE, rollout.mode, REPLAY) if rollout.mode == SHADOW else (STABLE, CANARY)
    sides = {role: _side([r for r in rows if r["role"] == role]) for role in roles}
    look: dict[str, Any] = {
        "window": {"since": rollout.step_started, "seconds": round(until - since, 1)},
        "step": rollout.step,
        "percent": rollout.percent,
        "sides": {role: side.summary() for role, side in sides.items()},
    }
    if rollout.mode == SHADOW:
        shadow, floor = sides[SHADOW].summary()["agreement"], sides[REPLAY].summary()["agreement"]
        look["noise_floor"] = floor  # stable's agreement with itself on the same prompts
        look["divergence"] = floor - shadow if shadow is not None and floor is not None else None
        return {**look, "decision": "observing", "why": "a shadow is compared, not judged"}
    stable, canary = sides[STABLE], sides[CANARY]
    tests = _tests(stable, canary, online)
    look["tests"] = tests
    regressions = [name for name, test in tests.items() if test["regression"]]
    if regressions:
        why = "; ".join(tests[name]["detail"] for name in regressions)
        return {**look, "decision": "abort", "why": why}
    if canary.n < rollout.min_requests:
        why = f"{canary.n} of {rollout.min_requests} canary requests so far"
        return {**look, "decision": "inconclusive", "why": why}
    return {**look, "decision": "proceed", "why": "no significant regression"}


@dataclass
class _Side:
    n: int  # finished requests (client errors and cancellations left out)
    errors: int  # 5xx: the service failed the request
    latencies: list[float]
    checked: int
    check_failures: int
    agreements: list[float]

    def summary(self) -> dict[str, Any]:
        p95 = percentile(self.latencies, 95)
        return {
            "n": self.n,
            "errors": self.errors,
            "error_rate": self.errors / self.n if self.n else 0.0,
            "p95_ms": p95 * 1000 if p95 is not None else 0.0,
            "checked": self.checked,
            "check_failures": self.check_failures,
            "check_pass_rate": 1 - self.check_failures / self.checked if self.checked else 1.0,
            "agreement": sum(self.agreements) / len(self.agreements) if self.agreements else None,
        }


def _side(rows: list[dict[str, Any]]) -> _Side:
    judged = [r for r in rows if r["status"] >= 500 or r["status"] == 200]
    ok = [r for r in judged if r["status"] == 200]
    checked = [r for r in ok if r["checks_run"]]
    return _Side(
        n=len(judged),
        errors=len(judged) - len(ok),
        latencies=[r["latency_seconds"] for r in ok],
        checked=len(checked),
        check_failures=sum(1 for r in checked if r["checks_failed"]),
        agreements=[r["agreement"] for r in rows if r["agreement"] is not None],
    )


def _tests(stable: _Side, canary: _Side, online: Online) -> dict[str, dict[str, Any]]:
    errors_p = rate_regression_p(
        canary.errors, canary.n, stable.errors, stable.n, online.error_margin
    )
    checks_p = rate_regression_p(
        canary.check_failures,
        canary.checked,
        stable.check_failures,
        stable.checked,
        online.check_margin,
    )
    tests = {
        "error_rate": {
            "test": "two-proportion z (one-sided, margin)",
            "p": errors_p,
            "regression": errors_p < online.alpha,
            "detail": f"canary errors {canary.errors}/{canary.n} vs stable "
            f"{stable.errors}/{stable.n} (p = {errors_p:.3g}, margin {online.error_margin:g})",
        },
        "online_checks": {
            "test": "two-proportion z (one-sided, margin)",
            "p": checks_p,
            "regression": checks_p < online.alpha,
            "detail": f"canary failed online checks {canary.check_failures}/{canary.checked} vs "
            f"stable {stable.check_failures}/{stable.checked} (p = {checks_p:.3g}, margin "
            f"{online.check_margin:g})",
        },
    }
    stable_p95 = percentile(stable.latencies, 95)
    low, high = percentile_interval(canary.latencies, 95)
    if stable_p95 is not None and low is not None:
        limit = stable_p95 * (1 + online.latency_margin)
        tests["p95_latency"] = {
            "test": "bootstrap 95% interval of the canary's p95",
            "interval_ms": [low * 1000, high * 1000],
            "regression": low > limit,
            "detail": f"canary p95 interval [{low * 1000:.0f}, {high * 1000:.0f}] ms vs stable "
            f"p95 {stable_p95 * 1000:.0f} ms (+{online.latency_margin:.0%} allowed)",
        }
    return tests


def unix_time(stamp: str) -> float:
    """A store timestamp (UTC, seconds) as unix time."""
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
