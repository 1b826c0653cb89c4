"""The telemetry tables, in the state database, as their own sqlite-utils migration set."""

from __future__ import annotations

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations


def telemetry_migrations() -> Migrations:
    migrations = Migrations("telemetry")

    @migrations(name="0001_requests")
    def create_requests(db: Database) -> None:
        db["requests"].create(
            {
                "id": int,
                "time": float,  # unix time when the request arrived
                "release": str,
                "endpoint": str,
                "status": int,  # HTTP status
                "prompt_tokens": int,
                "completion_tokens": int,
                "queue_seconds": float,
                "ttft_seconds": float,  # time to first token (None when no token came)
                "latency_seconds": float,
                "error_class": str,  # None, or e.g. "bad_request", "queue_full", "cancelled"
            },
            pk="id",
        )
        db["requests"].create_index(["release", "time"])
        db["requests"].create_index(["time"])

    @migrations(name="0002_roles_and_checks")
    def add_roles_and_checks(db: Database) -> None:
        # During a rollout two releases serve: each request says which answered and in what
        # role, and how its text fared on the candidate's online checks.
        db["requests"].add_column("role", str)  # stable | canary | shadow (None: before)
        db["requests"].add_column("checks_run", int)  # online checks run on the output
        db["requests"].add_column("checks_failed", int)
        db["requests"].add_column("agreement", float)  # shadow: similarity to stable's answer

    @migrations(name="0003_paired_checks")
    def add_paired_checks(db: Database) -> None:
        # A mirrored answer and stable's answer to the same request form a pair: with both
        # outcomes on the online checks, McNemar's test compares the two releases.
        db["requests"].add_column("stable_checks_failed", int)

    @migrations(name="0004_routes")
    def add_routes(db: Database) -> None:
        # Which path answered (hot, cold:NAME), why it escalated, what the cold path cost.
        db["requests"].add_column("route", str)
        db["requests"].add_column("escalation", str)
        db["requests"].add_column("cold_tokens", int)

    @migrations(name="0005_guard")
    def add_guard(db: Database) -> None:
        # What the safety policy found and did: [{direction, detector, action, count}] as
        # JSON. Counts and names only: the matched text is never stored.
        db["requests"].add_column("guard", str)

    @migrations(name="0006_retrievals")
    def create_retrievals(db: Database) -> None:
        # Every retrieval on its own, so an operator can tell a retrieval fault from a
        # generation fault. The query is kept with PII and secret shapes redacted.
        db["retrievals"].create(
            {
                "id": int,
                "time": float,
                "release": str,
                "role": str,
                "endpoint": str,
                "query": str,
                "k": int,
                "ids": str,  # JSON list of passage ids, best first (those that entered the prompt)
                "scores": str,  # JSON list, fused reciprocal-rank scores, same order
                "seconds": float,  # the search, and the budget's tokenizing
                "corpus_sha256": str,
            },
            pk="id",
        )
        db["retrievals"].create_index(["time"])

    return migrations
