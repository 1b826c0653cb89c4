"""The state database: one SQLite file (WAL), schema managed by sqlite-utils migrations.

It is the single source of truth for releases, the active / previous-good / frozen state,
the audit log and eval reports (telemetry joins it in a later migration).
"""

from __future__ import annotations

import fcntl
import sqlite3
from pathlib import Path

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from appliance.telemetry.schema import telemetry_migrations


def open_state_db(path: Path) -> Database:
    """Open (creating and migrating as needed) the state database."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # an acknowledged admin change survives power loss
    db = Database(conn)
    # Two processes opening a fresh database must not both create its tables.
    with open(path.with_name(path.name + ".migrate-lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        schema_migrations().apply(db)
        telemetry_migrations().apply(db)
    return db


def schema_migrations() -> Migrations:
    migrations = Migrations("appliance")

    @migrations(name="0001_releases_state_audit")
    def create_core_tables(db: Database) -> None:
        db["releases"].create(
            {
                "id": int,
                "name": str,
                "version": str,
                "sequence": int,
                "min_sequence": int,
                "created": str,
                "installed_at": str,
                "manifest_sha256": str,  # identifies the bundle's signed content
                "model_sha256": str,
                "source_model_sha256": str,
                "quant_type": str,
                "spec_hash": str,
                "signers": str,  # JSON list of key ids
                "gguf": str,  # JSON summary from our header check
                "path": str,
            },
            pk="id",
            not_null={"name", "version", "sequence", "manifest_sha256", "path"},
        )
        db["releases"].create_index(["name", "version"], unique=True)
        # Per name: the highest sequence ever installed (replay/downgrade protection) and
        # the highest min_sequence (the oldest sequence still allowed to run). Both survive
        # `release remove`.
        db["sequences"].create({"name": str, "highest": int, "floor": int}, pk="name")
        db["state"].create(
            {
                "id": int,
                "active_id": int,
                "previous_good_id": int,
                "frozen": int,
                "frozen_reason": str,
                "frozen_at": str,
                "updated_at": str,
            },
            pk="id",
        )
        db["state"].insert({"id": 1, "frozen": 0})
        db["audit"].create(
            {
                "id": int,
                "time": str,
                "user": str,
                "action": str,
                "target": str,
                "reason": str,
                "details": str,
                "prev_hash": str,
                "hash": str,
            },
            pk="id",
        )
        db["eval_reports"].create(
            {
                "id": int,
                "release_id": int,
                "spec_hash": str,
                "host": str,
                "passed": int,
                "created": str,
                "report": str,
            },
            pk="id",
        )

    @migrations(name="0002_api_keys")
    def create_api_keys(db: Database) -> None:
        db["api_keys"].create(
            {
                "id": int,
                "name": str,
                "prefix": str,  # the first characters of the key, to recognise it
                "sha256": str,  # keys are 256-bit random tokens: a plain hash is enough
                "created": str,
                "revoked": str,
            },
            pk="id",
            not_null={"name", "prefix", "sha256", "created"},
        )
        db["api_keys"].create_index(["sha256"], unique=True)

    return migrations
