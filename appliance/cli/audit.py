"""`appliance audit`: read and verify the hash-chained audit log."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import click

from appliance.cli.common import emit_json, json_option, pass_store
from appliance.errors import AuditChainError
from appliance.store import audit as audit_log
from appliance.store import ledger
from appliance.store.releases import ReleaseStore
from appliance.trust.truststore import load_trust_store


@click.group()
def audit() -> None:
    """Read and verify the audit log of every state change."""


@audit.command(name="list")
@click.option("--limit", type=int, default=None, help="Show only the newest N rows.")
@json_option
@pass_store
def list_rows(store: ReleaseStore, limit: int | None, as_json: bool) -> None:
    """List audit rows, newest first."""
    with store.reading() as db:
        rows = audit_log.rows(db, limit)
    if as_json:
        emit_json({"rows": [{**r, "details": json.loads(r["details"])} for r in rows]})
        return
    for r in rows:
        reason = f"  reason: {r['reason']}" if r["reason"] else ""
        click.echo(
            f"{r['id']:>5}  {r['time']}  {r['user']:<10} {r['action']:<18} {r['target']}{reason}"
        )


@audit.command(name="verify")
@json_option
@pass_store
def verify_log(store: ReleaseStore, as_json: bool) -> None:
    """Check the hash chain, then replay the log and compare the state it implies with the
    live state (releases, active and previous good, freeze, sequence floors, eval
    reports, API keys, trust store). Names the first broken row or each difference."""
    with store.reading() as db:
        status = audit_log.verify_chain(db)
        if not status.ok:
            raise AuditChainError(
                f"audit log broken at row {status.first_bad_id}: {status.problem}"
            )
        found = ledger.check_state(db, load_trust_store(store.paths.trust_store))
    if found:
        raise AuditChainError("state changed outside the audit log: " + "; ".join(found))
    if as_json:
        emit_json({"ok": True, "rows": status.rows, "head": status.head, "state": "matches"})
    else:
        click.echo(
            f"audit chain intact: {status.rows} rows, head {status.head}; "
            "the live state matches the log"
        )


@audit.command(name="export")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for the copies (created; files are readable by their owner only).",
)
@json_option
@pass_store
def export(store: ReleaseStore, out: Path, as_json: bool) -> None:
    """Copy the state database (a consistent snapshot by SQLite's online backup, while the
    service keeps writing) and the trust store into OUT, with the chain's head: evidence to
    keep before anything is repaired."""
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    database, trust = out / f"state-{stamp}.db", out / f"trust-{stamp}.json"
    os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    with store.reading() as db, closing(sqlite3.connect(database)) as copy:
        db.conn.backup(copy)
        status = audit_log.verify_chain(db)
    os.close(os.open(trust, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    if store.paths.trust_store.exists():
        shutil.copyfile(store.paths.trust_store, trust)
    found = {"database": str(database), "trust_store": str(trust), "rows": status.rows,
             "head": status.head, "chain_ok": status.ok}  # fmt: skip
    if as_json:
        emit_json(found)
        return
    chain = "intact" if status.ok else f"broken at row {status.first_bad_id}"
    click.echo(f"exported {database} and {trust}: {status.rows} audit rows, chain {chain}")
