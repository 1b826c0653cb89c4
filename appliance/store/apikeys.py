"""API keys for the inference service: random 256-bit tokens, stored only as sha256.

A token is shown once, at creation. The service compares a presented token's hash with
every active hash in constant time. Creation and revocation are audited admin operations.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from typing import Any

from sqlite_utils import Database

from appliance.errors import StoreError, UsageError
from appliance.store import audit
from appliance.store.db import write_transaction
from appliance.store.records import now
from appliance.store.releases import ReleaseStore

TOKEN_PREFIX = "sk-appl-"
KEY_SET_FORMAT = "appliance-api-keys/1"


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_api_key(store: ReleaseStore, name: str) -> tuple[dict[str, Any], str]:
    if not name.strip():
        raise UsageError("an API key needs a name (who or what uses it)")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = {
        "name": name,
        "prefix": token[: len(TOKEN_PREFIX) + 6],
        "sha256": token_sha256(token),
        "created": now(),
        "revoked": None,
    }
    with store.admin() as db, write_transaction(db):
        row["id"] = db["api_keys"].insert(row).last_pk
        audit.append(
            db, "apikey create", row["prefix"], details={"name": name, "key_sha256": row["sha256"]}
        )
    return _public(row), token


def list_api_keys(db: Database) -> list[dict[str, Any]]:
    return [_public(r) for r in db.query("SELECT * FROM api_keys ORDER BY id")]


def revoke_api_key(store: ReleaseStore, key: str, reason: str = "") -> dict[str, Any]:
    """Revoke by id, by the key's shown prefix, or by the key itself (matched by its hash;
    a key is never repeated in an error or a log)."""
    presented = token_sha256(key)
    with store.admin() as db:
        rows = [
            r
            for r in db.query("SELECT * FROM api_keys")
            if str(r["id"]) == key or r["prefix"] == key or r["sha256"] == presented
        ]
        if len(rows) != 1:
            shown = key if len(key) <= len(TOKEN_PREFIX) + 6 else key[: len(TOKEN_PREFIX) + 6]
            raise StoreError(f"no single API key matches {shown!r}... (give its id or prefix)")
        row = rows[0]
        if row["revoked"] is None:
            row["revoked"] = now()
            with write_transaction(db):
                db["api_keys"].update(row["id"], {"revoked": row["revoked"]})
                audit.append(
                    db,
                    "apikey revoke",
                    row["prefix"],
                    reason,
                    {"name": row["name"], "key_sha256": row["sha256"]},
                )
        return _public(row)


def export_api_keys(db: Database) -> dict[str, Any]:
    """The key set as hashes (never a key): what `import_api_keys` takes on another node."""
    rows = db.query("SELECT name, prefix, sha256, created, revoked FROM api_keys ORDER BY id")
    return {"format": KEY_SET_FORMAT, "keys": list(rows)}


def import_api_keys(store: ReleaseStore, key_set: dict[str, Any], reason: str) -> dict[str, Any]:
    """Merge a key set exported elsewhere: add the keys this node lacks, revoke those the set
    says are revoked. A key revoked here stays revoked. Each change is audited as a creation
    or a revocation is; importing the same set again changes nothing."""
    incoming = _key_set_rows(key_set)
    added: list[str] = []
    revoked: list[str] = []
    with store.admin() as db, write_transaction(db):
        known = {r["sha256"]: r for r in db.query("SELECT * FROM api_keys")}
        for row in incoming:
            mine = known.get(row["sha256"])
            details = {"name": row["name"], "key_sha256": row["sha256"], "imported": True}
            if mine is None:
                mine = {**row, "revoked": None}
                mine["id"] = db["api_keys"].insert(mine).last_pk
                known[row["sha256"]] = mine  # a set that lists a key twice adds it once
                audit.append(db, "apikey create", row["prefix"], reason, details)
                added.append(row["prefix"])
            if row["revoked"] and mine["revoked"] is None:
                db["api_keys"].update(mine["id"], {"revoked": now()})
                audit.append(db, "apikey revoke", row["prefix"], reason, details)
                revoked.append(row["prefix"])
    return {"added": added, "revoked": revoked, "changed": bool(added or revoked)}


def _key_set_rows(key_set: dict[str, Any]) -> list[dict[str, Any]]:
    if not isinstance(key_set, dict) or key_set.get("format") != KEY_SET_FORMAT:
        raise UsageError(f"not an API key set (format {KEY_SET_FORMAT!r})")
    rows = key_set.get("keys")
    if not isinstance(rows, list):
        raise UsageError("an API key set lists its keys under 'keys'")
    checked = []
    for row in rows:
        if not (
            isinstance(row, dict)
            and isinstance(row.get("name"), str)
            and row["name"].strip()
            and isinstance(row.get("prefix"), str)
            and re.fullmatch(re.escape(TOKEN_PREFIX) + r"[A-Za-z0-9_-]{6}", row["prefix"])
            and isinstance(row.get("sha256"), str)
            and re.fullmatch(r"[0-9a-f]{64}", row["sha256"])
            and isinstance(row.get("created"), str)
            and (row.get("revoked") is None or isinstance(row["revoked"], str))
        ):
            raise UsageError(f"a malformed key in the set: {str(row)[:80]!r}")
        checked.append({k: row.get(k) for k in ("name", "prefix", "sha256", "created", "revoked")})
    return checked


def active_key_hashes(db: Database) -> tuple[str, ...]:
    return tuple(r["sha256"] for r in db.query("SELECT sha256 FROM api_keys WHERE revoked IS NULL"))


def token_matches(token: str, hashes: tuple[str, ...]) -> bool:
    """Constant-time check against every active key (no early exit on a match)."""
    presented = token_sha256(token)
    found = False
    for stored in hashes:
        found |= hmac.compare_digest(presented, stored)
    return found


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("id", "name", "prefix", "created", "revoked")}
