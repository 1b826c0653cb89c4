"""API keys for the inference service: random 256-bit tokens, stored only as sha256.

A token is shown once, at creation. The service compares a presented token's hash with
every active hash in constant time. Creation and revocation are audited admin operations.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

from sqlite_utils import Database

from appliance.errors import StoreError, UsageError
from appliance.store import audit
from appliance.store.records import now
from appliance.store.releases import ReleaseStore

TOKEN_PREFIX = "sk-appl-"


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
    with store.admin() as db, db.atomic():
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
            with db.atomic():
                db["api_keys"].update(row["id"], {"revoked": row["revoked"]})
                audit.append(
                    db,
                    "apikey revoke",
                    row["prefix"],
                    reason,
                    {"name": row["name"], "key_sha256": row["sha256"]},
                )
        return _public(row)


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
