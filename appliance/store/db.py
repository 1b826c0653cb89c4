"""The state database: one SQLite file (WAL), schema managed by sqlite-utils migrations.

It is the single source of truth for releases, the active / previous-good / frozen state,
the audit log and eval reports (telemetry joins it in a later migration).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from appliance.errors import ApplianceError
from appliance.store import audit, ledger
from appliance.store.gate import spec_hash
from appliance.telemetry.schema import telemetry_migrations
from appliance.trust.manifest import parse_statement
from appliance.trust.signature import parse_signature_file
from appliance.trust.truststore import TrustStore


def open_state_db(path: Path) -> Database:
    """Open (creating and migrating as needed) the state database."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Owner only (it holds API key hashes and the audit log); SQLite gives the -wal and
    # -shm files the database file's mode. Only when creating it: closing another
    # descriptor of an open database drops this process's POSIX locks on it.
    if not path.exists():
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
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


@contextlib.contextmanager
def write_transaction(db: Database) -> Iterator[Database]:
    """A transaction that takes the write lock when it begins (BEGIN IMMEDIATE), waiting up
    to the busy timeout for it. A deferred one that reads first (sqlite-utils' update reads
    the row before it writes) fails at once with "database is locked" in WAL mode when
    another connection, such as the service's telemetry writer, committed meanwhile.
    Nested, it is a savepoint of the outer transaction."""
    if db.conn.in_transaction:
        with db.atomic():
            yield db
        return
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.conn.rollback()
        raise
    db.conn.commit()


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

    @migrations(name="0003_reports_by_manifest")
    def key_reports_by_manifest(db: Database) -> None:
        # A report names the signed content it judged; reports from before carry only a row
        # id that SQLite may have reused, so they stay for the record and never gate again.
        db["eval_reports"].add_column("manifest_sha256", str)
        db["eval_reports"].create_index(["manifest_sha256", "host"])
        # The spec hash now covers serving.json (and every other non-card file) too.
        for row in list(db.query("SELECT id, path FROM releases")):
            db["releases"].update(row["id"], {"spec_hash": _installed_spec_hash(Path(row["path"]))})

    @migrations(name="0004_audit_snapshot")
    def snapshot_state(db: Database) -> None:
        # `audit verify` replays the log into the state it implies; rows written before they
        # recorded every detail are summed up by one snapshot of the state as it is now.
        if db["audit"].count:
            live = ledger.live_state(db, TrustStore())
            audit.append(
                db,
                ledger.SNAPSHOT_ACTION,
                "state",
                "the state when the audit log began to record it in full",
                live.database_part(),
            )

    @migrations(name="0005_rollouts")
    def create_rollouts(db: Database) -> None:
        # A candidate served beside the active release (appliance.store.rollouts); at most
        # one is running, which the store checks under its admin lock.
        db["rollouts"].create(
            {
                "id": int,
                "release_id": int,
                "candidate": str,  # NAME@VERSION
                "manifest_sha256": str,
                "mode": str,  # canary | shadow
                "steps": str,  # JSON list of percentages
                "step": int,
                "interval_seconds": float,
                "min_requests": int,
                "state": str,  # running | promoted | aborted
                "started": str,
                "step_started": str,
                "ended": str,
                "reason": str,
                "last_check": str,  # JSON: the judge's latest look, not audited
            },
            pk="id",
            not_null={"release_id", "candidate", "manifest_sha256", "mode", "steps", "state"},
        )
        db["rollouts"].create_index(["state"])

    @migrations(name="0006_routing")
    def create_routing(db: Database) -> None:
        # Cold-path targets and the routing switches (appliance.store.routing).
        db["route_targets"].create(
            {
                "name": str,
                "url": str,
                "model": str,
                "key_file": str,
                "cost_per_1k_tokens": float,
                "position": int,
                "registered": str,
            },
            pk="name",
            not_null={"url", "model", "position"},
        )
        db["routing"].create(
            {
                "id": int,
                "fallback": int,
                "fallback_reason": str,
                "incident": str,
                "incident_started": str,
            },
            pk="id",
        )
        db["routing"].insert({"id": 1, "fallback": 0})

    @migrations(name="0007_routing_policy_and_release_targets")
    def add_routing_policy(db: Database) -> None:
        # An admin's overrides of the release's signed routing policy: a JSON object.
        db["routing"].add_column("policy", str)
        # A cold path that is another installed release on this host (NAME@VERSION; its
        # url is then empty), served by this service beside the active one.
        db["route_targets"].add_column("release", str)

    return migrations


def _installed_spec_hash(release_dir: Path) -> str:
    """The spec hash of an installed release, from its signed Statement ("" if unreadable:
    then no report matches it until the release is installed again)."""
    try:
        first = sorted((release_dir / "signatures").glob("*.sig"))[0]
        return spec_hash(parse_statement(parse_signature_file(first.read_bytes()).payload))
    except (OSError, IndexError, ApplianceError):
        return ""
