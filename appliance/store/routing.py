"""Cold-path targets, the fallback switch and incident mode, as store state.

A cold-path target is an OpenAI-compatible endpoint inside the customer's network (vLLM,
llama.cpp's server, a private LLM) that the service may escalate a request to. Registering
one opens a way out of the appliance, so, like activate, every change here runs under the
store's admin lock, in one transaction with its audit row, and the audit ledger replays
it (`audit verify` reports a target added behind the log's back).

An endpoint is named by an IP literal and a port, never by a host name: resolving a name
is itself a packet out, and the kernel's allow-list (IPAddressAllow in the systemd unit,
`appliance route units`) is by address. Its API key stays in a file only its owner can
read; the store keeps the file's path, never the key.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlite_utils import Database

from appliance.errors import StoreError, UsageError
from appliance.serve.policy import parse_override
from appliance.store import audit
from appliance.store.db import write_transaction
from appliance.store.faults import fault_point
from appliance.store.ledger import TARGET_FIELDS, policy_overrides
from appliance.store.records import now
from appliance.store.releases import ReleaseStore

TARGET_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


@dataclass(frozen=True)
class Target:
    name: str
    url: str  # scheme://IP:PORT[/prefix], e.g. http://10.0.0.7:8000/v1
    model: str  # the model name the endpoint serves
    key_file: str | None  # its API key, in a file only its owner can read
    cost_per_1k_tokens: float  # what a thousand tokens there cost, for cost per task
    position: int  # fallbacks are tried in this order
    registered: str
    release: str | None = None  # NAME@VERSION: an installed release, served here (no url)

    @property
    def address(self) -> tuple[str, int] | None:
        """Where the endpoint listens; None for a release served on this host."""
        if self.release:
            return None
        parts = urlsplit(self.url)
        return str(parts.hostname), int(parts.port or 0)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RoutingState:
    fallback: bool  # every request goes to the cold path
    fallback_reason: str | None
    incident: str | None  # the reason, while an incident is open
    incident_started: str | None
    policy: dict[str, Any] = field(default_factory=dict)  # an admin's policy overrides

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def targets(db: Database) -> list[Target]:
    rows = db.query("SELECT * FROM route_targets ORDER BY position, name")
    return [Target(**row) for row in rows]


def routing_state(db: Database) -> RoutingState:
    row = next(db.query("SELECT * FROM routing WHERE id = 1"))
    return RoutingState(
        bool(row["fallback"]),
        row["fallback_reason"],
        row["incident"],
        row["incident_started"],
        policy_overrides(row),
    )


def check_endpoint_url(url: str) -> str:
    """scheme://IP:PORT[/path] with an IP literal; returned without a trailing slash."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or parts.query or parts.fragment:
        raise UsageError(f"{url!r}: give http(s)://IP:PORT[/path], e.g. http://10.0.0.7:8000/v1")
    try:
        port = parts.port
        ipaddress.ip_address(parts.hostname or "")
    except ValueError as exc:
        raise UsageError(
            f"{url!r}: the host must be an IP address (a name would need a DNS lookup, "
            "and the kernel's allow-list is by address)"
        ) from exc
    if port is None or parts.username or parts.password:
        raise UsageError(f"{url!r}: give the port, and no credentials (use --key-file)")
    return url.rstrip("/")


def check_key_file(path: Path) -> str:
    """A regular file that only its owner can read: the cold path's API key."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise UsageError(f"cannot read key file {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"key file {path} is not a regular file")
    if info.st_mode & 0o077:
        raise UsageError(f"key file {path} is readable by others: chmod 600 it")
    return str(path.resolve())


def add_target(
    store: ReleaseStore,
    name: str,
    url: str | None,
    model: str | None,
    key_file: Path | None = None,
    cost_per_1k_tokens: float = 0.0,
    reason: str = "",
    release: str | None = None,
) -> Target:
    """Register a cold-path target, tried after those registered before it: an endpoint
    (`url`, serving `model`), or an installed `release` that this host serves beside the
    active one (it must have passed its eval gate here, as for activation)."""
    if not TARGET_NAME.match(name):
        raise UsageError(f"target name {name!r}: lowercase letters, digits, - and _ only")
    if (url is None) == (release is None):
        raise UsageError("give exactly one of --url (an endpoint) or --release (NAME@VERSION)")
    if url is not None and not (model or "").strip():
        raise UsageError("give the model name the endpoint serves (--model)")
    if cost_per_1k_tokens < 0:
        raise UsageError("--cost-per-1k-tokens cannot be negative")
    row = {
        "name": name,
        "url": check_endpoint_url(url) if url is not None else "",
        "model": model if url is not None else release,
        "key_file": check_key_file(key_file) if key_file and url is not None else None,
        "cost_per_1k_tokens": cost_per_1k_tokens,
        "release": release,
    }
    with store.admin() as db:
        if db["route_targets"].count_where("name = ?", [name]):
            raise StoreError(f"a cold-path target named {name} is registered already")
        if release is not None:
            store.check_activatable(db, store.release(db, release))
        last = db.execute("SELECT MAX(position) FROM route_targets").fetchone()[0]
        row |= {"position": (last or 0) + 1, "registered": now()}
        with write_transaction(db):
            db["route_targets"].insert(row)
            audit.append(db, "route target add", name, reason, _fingerprint(row))
            fault_point("routing.in_transaction")
        return Target(**row)


def remove_target(store: ReleaseStore, name: str, reason: str = "") -> Target:
    with store.admin() as db:
        found = [t for t in targets(db) if t.name == name]
        if not found:
            raise StoreError(f"no cold-path target named {name}")
        with write_transaction(db):
            db["route_targets"].delete(name)
            audit.append(db, "route target remove", name, reason)
            fault_point("routing.in_transaction")
        return found[0]


def set_fallback(store: ReleaseStore, on: bool, reason: str) -> RoutingState:
    """Send every request to the cold path (on), or back to the usual policy (off)."""
    if on and not reason.strip():
        raise UsageError("routing everything to the fallback needs a reason")
    with store.admin() as db:
        if on and not targets(db):
            raise StoreError("no cold-path target is registered: `appliance route add` first")
        with write_transaction(db):
            _set_fallback(db, on, reason)
        return routing_state(db)


def start_incident(store: ReleaseStore, reason: str, rollback: bool = False) -> dict[str, Any]:
    """Freeze releases, route everything to the fallback when one is registered, and roll
    back to the previous good release if asked: one transaction, one audit row."""
    if not reason.strip():
        raise UsageError("an incident needs a reason")
    with store.admin() as db:
        already = routing_state(db).incident
        if already is not None:
            raise StoreError(f"an incident is open already ({already})")
        with write_transaction(db):
            rolled_back = store.rollback_in(db, f"incident: {reason}").ref if rollback else None
            store.freeze_in(db, f"incident: {reason}")
            fallback = bool(targets(db))
            if fallback:
                _set_fallback(db, True, f"incident: {reason}")
            stamp = now()
            db["routing"].update(1, {"incident": reason, "incident_started": stamp})
            details = {"fallback": fallback, "rolled_back_to": rolled_back}
            audit.append(db, "incident start", "appliance", reason, details)
            fault_point("routing.in_transaction")
        fault_point("routing.after_commit")
        return {"reason": reason, "started": stamp, **details}


def end_incident(store: ReleaseStore, reason: str = "") -> RoutingState:
    """Unfreeze and route by the usual policy again."""
    with store.admin() as db:
        if routing_state(db).incident is None:
            raise StoreError("no incident is open")
        with write_transaction(db):
            store.unfreeze_in(db, f"incident over: {reason}".rstrip(": "))
            _set_fallback(db, False, "incident over")
            db["routing"].update(1, {"incident": None, "incident_started": None})
            audit.append(db, "incident end", "appliance", reason)
            fault_point("routing.in_transaction")
        return routing_state(db)


DROPIN_NAME = "cold-paths.conf"  # in /etc/systemd/system/appliance.service.d/


def systemd_dropin(registered: list[Target]) -> str:
    """The drop-in that opens the kernel's boundary to exactly the registered targets.

    Without a target, appliance.service runs with PrivateNetwork=yes: no route anywhere,
    so no cold path is reachable either. With targets, it leaves that namespace
    (PrivateNetwork=no) and the kernel's IP filter (IPAddressDeny=any) admits the loopback
    (clients and the socket systemd passes) and each registered address; the in-process
    guard also holds each to its port. localhost as a whole is not admitted: 127.0.0.53
    would reach a resolver, and a name lookup is a packet out."""
    registered = [t for t in registered if t.address]  # a local release needs no network
    if not registered:
        return (
            "# No cold-path endpoint is registered: appliance.service keeps PrivateNetwork=yes.\n"
            "# Delete this file, then: systemctl daemon-reload && systemctl restart appliance\n"
        )
    addresses = sorted({t.address[0] for t in registered if t.address} - {"127.0.0.1", "::1"})
    names = ", ".join(f"{t.name} ({t.url})" for t in registered)
    return (
        "# Written by `appliance route units` for the cold-path targets: " + names + ".\n"
        "# Rewrite it after every `appliance route add` or `remove`, then:\n"
        "#   systemctl daemon-reload && systemctl restart appliance\n"
        "[Service]\n"
        "PrivateNetwork=no\n"
        "IPAddressDeny=any\n"
        "IPAddressAllow=\n"
        f"IPAddressAllow={' '.join(['127.0.0.1', '::1', *addresses])}\n"
    )


def set_policy(store: ReleaseStore, key: str, value: str, reason: str) -> dict[str, Any]:
    """Override one key of the release's signed routing policy (VALUE is JSON)."""
    change = parse_override(key, value)
    return _change_policy(store, "route policy set", key, reason, change)


def unset_policy(store: ReleaseStore, key: str, reason: str) -> dict[str, Any]:
    """Drop an override: the release's signed value holds again."""
    return _change_policy(store, "route policy unset", key, reason, None)


def _change_policy(
    store: ReleaseStore, action: str, key: str, reason: str, change: dict[str, Any] | None
) -> dict[str, Any]:
    if not reason.strip():
        raise UsageError("changing the routing policy needs a reason")
    with store.admin() as db:
        overrides = routing_state(db).policy
        if change is None and key not in overrides:
            raise StoreError(f"the routing policy has no override of {key}")
        overrides = {**overrides, **change} if change else _without(overrides, key)
        with write_transaction(db):
            db["routing"].update(1, {"policy": json.dumps(overrides, sort_keys=True)})
            audit.append(db, action, key, reason, {"policy": overrides})
            fault_point("routing.in_transaction")
        return overrides


def _without(overrides: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in overrides.items() if k != key}


def _set_fallback(db: Database, on: bool, reason: str) -> None:
    db["routing"].update(1, {"fallback": int(on), "fallback_reason": reason if on else None})
    audit.append(db, "route fallback on" if on else "route fallback off", "routing", reason)


def _fingerprint(row: dict[str, Any]) -> dict[str, Any]:
    """What the audit row records of a target (the ledger replays it): all but its time."""
    return {k: row[k] for k in TARGET_FIELDS}
