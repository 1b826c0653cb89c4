"""The audit log: append-only rows in the state database, chained by sha256.

Each row's hash covers its own fields and the previous row's hash, so editing a row,
deleting one from the middle or reordering rows breaks the chain at a row that
`verify_chain` names. Rows are appended inside the same transaction as the change they
record, so a change and its audit row commit together or not at all.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlite_utils import Database

GENESIS = "0" * 64


@dataclass(frozen=True)
class ChainStatus:
    ok: bool
    rows: int
    head: str  # the last row's hash: record it elsewhere to detect a truncated tail
    first_bad_id: int | None = None
    problem: str = ""


def append(
    db: Database, action: str, target: str, reason: str = "", details: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Append one row; call inside the transaction that makes the change."""
    last = list(db.query("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1"))
    prev_hash = last[0]["hash"] if last else GENESIS
    row = {
        "id": (last[0]["id"] + 1) if last else 1,
        "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "user": _os_user(),
        "action": action,
        "target": target,
        "reason": reason,
        "details": json.dumps(details or {}, sort_keys=True),
        "prev_hash": prev_hash,
    }
    row["hash"] = row_hash(row, prev_hash)
    db["audit"].insert(row)
    return row


def rows(db: Database, limit: int | None = None) -> list[dict[str, Any]]:
    """Newest first."""
    sql = "SELECT * FROM audit ORDER BY id DESC" + (f" LIMIT {int(limit)}" if limit else "")
    return list(db.query(sql))


def verify_chain(db: Database) -> ChainStatus:
    expected_prev, expected_id, count = GENESIS, 1, 0
    for row in db.query("SELECT * FROM audit ORDER BY rowid"):
        count += 1
        if row["hash"] != row_hash(row, row["prev_hash"]):
            return ChainStatus(
                False,
                count,
                "",
                row["id"],
                "edited or reordered: its hash does not match its content",
            )
        if row["id"] != expected_id or row["prev_hash"] != expected_prev:
            return ChainStatus(
                False, count, "", row["id"], "chain broken: a row before it was deleted or moved"
            )
        expected_prev, expected_id = row["hash"], row["id"] + 1
    return ChainStatus(True, count, expected_prev)


def row_hash(row: dict[str, Any], prev_hash: str) -> str:
    fields = {k: row[k] for k in ("id", "time", "user", "action", "target", "reason", "details")}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{prev_hash}\n{canonical}".encode()).hexdigest()


def _os_user() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    sudo = os.environ.get("SUDO_USER")
    return f"{user} (sudo by {sudo})" if sudo and sudo != user else user
