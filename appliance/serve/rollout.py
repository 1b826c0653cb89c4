"""Serving a rollout: which release answers a request, and the live judge of a canary.

The canary's share is sticky: a request's bucket comes from its session header (or its API
key), so a conversation stays on one release, and a bucket below the share at one step
stays below it at the next. The judge compares the candidate with stable over the current
step's window, on the statistics of the offline gate (appliance.evals.stats): the rate of
server errors and of failed online checks (a one-sided two-proportion test against the
spec's margin) and p95 latency (a bootstrap interval of the canary's p95 less stable's
with the margin, both sides resampled, once each has MIN_LATENCY_SAMPLES answers). Too few
candidate requests is "inconclusive": the step waits, it never passes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlite_utils import Database

from appliance.evals.spec import Online
from appliance.evals.stats import (
    mcnemar_exact,
    percentile,
    percentile_excess_interval,
    rate_regression_p,
)
from appliance.serve.runtime import ModelRuntime
from appliance.store.rollouts import Rollout

STABLE, CANARY, SHADOW = "stable", "canary", "shadow"
REPLAY = "replay"  # stable answering a mirrored copy itself: the shadow's noise floor
MIRRORED = (SHADOW, REPLAY)  # copies no client waits for
SESSION_HEADER = "x-appliance-session"
# The p95 of fewer answers is one of their few slowest, so a canary's first requests (a
# model just loaded, its caches cold) would decide it alone: seen as false aborts of a
# candidate identical to stable, on 16 answers.
MIN_LATENCY_SAMPLES = 40


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
            f"SELECT {_COLUMNS} FROM requests WHERE time >= ? AND time <= ? AND role IS NOT NULL",
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
        return _look_at_shadow(look, sides[SHADOW], sides[REPLAY], online, rollout.min_requests)
    stable, canary = sides[STABLE], sides[CANARY]
    tests = _tests(stable, canary, online)
    shadowed = _side(_earlier_shadow_rows(db, rollout))
    if shadowed.pairs:  # a shadow of this candidate answered beside stable before: its pairs
        tests["shadow_pairs"] = _paired_test(shadowed, online)
    look["tests"] = tests
    regressions = [name for name, test in tests.items() if test["regression"]]
    if regressions:
        why = "; ".join(tests[name]["detail"] for name in regressions)
        return {**look, "decision": "abort", "why": why}
    if canary.n < rollout.min_requests:
        why = f"{canary.n} of {rollout.min_requests} canary requests so far"
        return {**look, "decision": "inconclusive", "why": why}
    return {**look, "decision": "proceed", "why": "no significant regression"}


_COLUMNS = (
    "role, status, latency_seconds, checks_run, checks_failed, agreement, stable_checks_failed"
)


def _look_at_shadow(
    look: dict[str, Any], shadow: _Side, replay: _Side, online: Online, min_pairs: int
) -> dict[str, Any]:
    """A shadow serves no client, so it is observed, never aborted: its verdict says whether
    it fails the online checks where stable passes (McNemar on the pairs) and whether its
    answers differ from stable's more than stable's differ from themselves (the noise
    floor: exact matches at temperature 0, Diffy's comparison)."""
    shadow_agreement, floor = shadow.summary()["agreement"], replay.summary()["agreement"]
    look["noise_floor"] = floor  # stable's agreement with itself on the same prompts
    look["divergence"] = (
        floor - shadow_agreement if shadow_agreement is not None and floor is not None else None
    )
    paired, diverging = _paired_test(shadow, online), _divergence_test(shadow, replay, online)
    look["tests"] = {"paired_checks": paired, "divergence": diverging}
    if shadow.pairs < min_pairs or not replay.pairs:
        verdict = "inconclusive"
        why = f"{shadow.pairs} of {min_pairs} pairs, {replay.pairs} replays of stable so far"
    elif paired["regression"]:
        verdict, why = "regresses", paired["detail"]
    elif diverging["regression"]:
        verdict, why = "diverges", diverging["detail"]
    else:
        verdict, why = "matches", "no significant regression or divergence"
    return {**look, "decision": "observing", "verdict": verdict, "why": why}


def _paired_test(candidate: _Side, online: Online) -> dict[str, Any]:
    """McNemar's exact test on pairs (stable's answer, the candidate's to the same request):
    a regression is significant at `alpha` and loses more than `check_margin` in pass rate,
    as in the offline gate's comparison with its baseline."""
    n, to_fail, to_pass = candidate.pairs, candidate.flipped_to_fail, candidate.flipped_to_pass
    p_value = mcnemar_exact(to_fail, to_pass)
    difference = (to_pass - to_fail) / n if n else 0.0
    return {
        "test": "McNemar exact (paired with stable's answer)",
        "p": p_value,
        "pairs": n,
        "regression": p_value < online.alpha and difference < -online.check_margin,
        "detail": f"on {n} paired requests the candidate failed checks stable passed "
        f"{to_fail} times and passed checks stable failed {to_pass} times "
        f"(p = {p_value:.3g}, margin {online.check_margin:g})",
    }


def _divergence_test(shadow: _Side, replay: _Side, online: Online) -> dict[str, Any]:
    p_value = rate_regression_p(
        shadow.pairs - shadow.exact,
        shadow.pairs,
        replay.pairs - replay.exact,
        replay.pairs,
        online.divergence_margin,
    )
    return {
        "test": "two-proportion z (one-sided, margin) on answers unlike stable's",
        "p": p_value,
        "regression": p_value < online.alpha,
        "detail": f"the shadow answered unlike stable {shadow.pairs - shadow.exact}/"
        f"{shadow.pairs} times, stable unlike itself {replay.pairs - replay.exact}/"
        f"{replay.pairs} (p = {p_value:.3g}, margin {online.divergence_margin:g})",
    }


def _earlier_shadow_rows(db: Database, rollout: Rollout) -> list[dict[str, Any]]:
    """The pairs a shadow of this very release recorded (since it was installed)."""
    return list(
        db.query(
            f"SELECT {_COLUMNS} FROM requests WHERE role = ? AND release = ? AND time >= "
            "(SELECT CAST(strftime('%s', installed_at) AS REAL) FROM releases WHERE id = ?)",
            [SHADOW, rollout.candidate, rollout.release_id],
        )
    )


@dataclass
class _Side:
    n: int  # finished requests (client errors and cancellations left out)
    errors: int  # 5xx: the service failed the request
    latencies: list[float]
    checked: int
    check_failures: int
    agreements: list[float]
    pairs: int = 0  # mirrored answers checked beside stable's answer to the same request
    exact: int = 0  # ... that matched stable's answer exactly
    flipped_to_fail: int = 0  # ... that failed a check where stable's answer passed
    flipped_to_pass: int = 0  # ... that passed where stable's failed

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
    paired = [r for r in ok if r["stable_checks_failed"] is not None]
    return _Side(
        n=len(judged),
        errors=len(judged) - len(ok),
        latencies=[r["latency_seconds"] for r in ok],
        checked=len(checked),
        check_failures=sum(1 for r in checked if r["checks_failed"]),
        agreements=[r["agreement"] for r in rows if r["agreement"] is not None],
        pairs=len(paired),
        exact=sum(1 for r in paired if r["agreement"] == 1.0),
        flipped_to_fail=sum(
            1 for r in paired if r["checks_failed"] and not r["stable_checks_failed"]
        ),
        flipped_to_pass=sum(
            1 for r in paired if not r["checks_failed"] and r["stable_checks_failed"]
        ),
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
    if min(len(canary.latencies), len(stable.latencies)) < MIN_LATENCY_SAMPLES:
        tests["p95_latency"] = {
            "test": "bootstrap 95% interval of canary p95 - stable p95 x (1 + margin)",
            "regression": False,
            "detail": f"p95 not judged yet: {len(canary.latencies)} canary and "
            f"{len(stable.latencies)} stable answers, {MIN_LATENCY_SAMPLES} each needed",
        }
        return tests
    factor = 1 + online.latency_margin
    low, high = percentile_excess_interval(canary.latencies, stable.latencies, 95, factor)
    canary_p95, stable_p95 = percentile(canary.latencies, 95), percentile(stable.latencies, 95)
    tests["p95_latency"] = {
        "test": "bootstrap 95% interval of canary p95 - stable p95 x (1 + margin)",
        "excess_interval_ms": [low * 1000, high * 1000],
        "regression": low > 0,
        "detail": f"canary p95 {canary_p95 * 1000:.0f} ms vs stable p95 {stable_p95 * 1000:.0f} "
        f"ms (+{online.latency_margin:.0%} allowed): excess interval [{low * 1000:.0f}, "
        f"{high * 1000:.0f}] ms",
    }
    return tests


def unix_time(stamp: str) -> float:
    """A store timestamp (UTC, seconds) as unix time."""
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
