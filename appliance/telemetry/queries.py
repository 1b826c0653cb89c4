"""Telemetry queries for the console and reports: latency percentiles, rates, errors."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

from sqlite_utils import Database


@dataclass(frozen=True)
class WindowStats:
    release: str | None
    window_seconds: float
    requests: int
    errors: int
    requests_per_second: float
    completion_tokens_per_second: float
    latency_p50: float | None
    latency_p95: float | None
    latency_p99: float | None
    ttft_p50: float | None
    ttft_p95: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of unsorted values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def window_stats(
    db: Database, window_seconds: float, release: str | None = None, now: float | None = None
) -> WindowStats:
    """Statistics over the last `window_seconds`, for one release or all of them."""
    now = time.time() if now is None else now
    # mirrored copies (a shadow's, stable's replays) answered no client: not the service's figures
    where, params = (
        "time >= ? AND (role IS NULL OR role IN ('stable', 'canary'))",
        [now - window_seconds],
    )
    if release is not None:
        where, params = where + " AND release = ?", [*params, release]
    rows = list(
        db.query(
            f"SELECT status, completion_tokens, latency_seconds, ttft_seconds FROM requests "
            f"WHERE {where}",
            params,
        )
    )
    ok = [r for r in rows if r["status"] == 200]
    latencies = [r["latency_seconds"] for r in ok]
    ttfts = [r["ttft_seconds"] for r in ok if r["ttft_seconds"] is not None]
    return WindowStats(
        release=release,
        window_seconds=window_seconds,
        requests=len(rows),
        errors=len(rows) - len(ok),
        requests_per_second=len(rows) / window_seconds,
        completion_tokens_per_second=sum(r["completion_tokens"] or 0 for r in ok) / window_seconds,
        latency_p50=percentile(latencies, 50),
        latency_p95=percentile(latencies, 95),
        latency_p99=percentile(latencies, 99),
        ttft_p50=percentile(ttfts, 50),
        ttft_p95=percentile(ttfts, 95),
    )


@dataclass(frozen=True)
class RouteStats:
    route: str  # "hot" (the release) or "cold:NAME"
    requests: int
    errors: int
    latency_p95: float | None
    escalations: dict[str, int]  # reason -> requests (route "hot": the cold path failed)
    cold_tokens: int


def route_stats(db: Database, window_seconds: float, now: float | None = None) -> list[RouteStats]:
    """Client requests of the last `window_seconds` by the path that answered them."""
    now = time.time() if now is None else now
    rows = list(
        db.query(
            "SELECT COALESCE(route, 'hot') AS route, escalation, status, latency_seconds, "
            "cold_tokens FROM requests WHERE time >= ? "
            "AND (role IS NULL OR role IN ('stable', 'canary'))",
            [now - window_seconds],
        )
    )
    found = []
    for route in sorted({"hot", *(r["route"] for r in rows)}):
        mine = [r for r in rows if r["route"] == route]
        reasons: dict[str, int] = {}
        for r in mine:
            if r["escalation"]:
                reasons[r["escalation"]] = reasons.get(r["escalation"], 0) + 1
        found.append(
            RouteStats(
                route=route,
                requests=len(mine),
                errors=sum(1 for r in mine if r["status"] != 200),
                latency_p95=percentile(
                    [r["latency_seconds"] for r in mine if r["status"] == 200], 95
                ),
                escalations=reasons,
                cold_tokens=sum(r["cold_tokens"] or 0 for r in mine),
            )
        )
    return found


@dataclass(frozen=True)
class GuardStats:
    """What the safety policy did to the last window's client requests."""

    requests: int
    refused: int  # denied by the input side (400 content_filter)
    stopped: int  # answers the output side stopped
    findings: dict[tuple[str, str, str], int]  # (direction, detector, action) -> findings


def _clients_rows(
    db: Database, table: str, columns: str, window_seconds: float, now: float | None
) -> list[dict]:
    """The window's rows of `table` that clients caused (a shadow's or a replay's are not)."""
    since = (time.time() if now is None else now) - window_seconds
    return list(
        db.query(
            f"SELECT {columns} FROM {table} WHERE time >= ? "
            "AND (role IS NULL OR role IN ('stable', 'canary'))",
            [since],
        )
    )


def guard_stats(db: Database, window_seconds: float, now: float | None = None) -> GuardStats:
    rows = _clients_rows(db, "requests", "guard", window_seconds, now)
    findings: dict[tuple[str, str, str], int] = {}
    refused = stopped = 0
    for row in rows:
        applied = json.loads(row["guard"]) if row["guard"] else []
        refused += any(a["action"] == "deny" for a in applied)
        stopped += any(a["action"] == "stop" for a in applied)
        for a in applied:
            key = (a["direction"], a["detector"], a["action"])
            findings[key] = findings.get(key, 0) + a["count"]
    return GuardStats(len(rows), refused, stopped, dict(sorted(findings.items())))


@dataclass(frozen=True)
class RetrievalStats:
    """The last window's retrievals, apart from the answers they fed."""

    searches: int
    empty: int  # found no passage
    latency_p50: float | None  # seconds
    latency_p95: float | None
    top_passages: tuple[tuple[str, int], ...]  # the most retrieved passage ids, with counts


def retrieval_stats(
    db: Database, window_seconds: float, now: float | None = None
) -> RetrievalStats:
    rows = _clients_rows(db, "retrievals", "ids, seconds", window_seconds, now)
    counted: dict[str, int] = {}
    empty = 0
    for row in rows:
        ids = json.loads(row["ids"]) if row["ids"] else []
        empty += not ids
        for passage in ids:
            counted[passage] = counted.get(passage, 0) + 1
    seconds = [row["seconds"] for row in rows]
    top = sorted(counted.items(), key=lambda item: (-item[1], item[0]))[:5]
    return RetrievalStats(
        len(rows), empty, percentile(seconds, 50), percentile(seconds, 95), tuple(top)
    )
