"""The state the audit log implies, and how it compares with the live state.

The hash chain proves that no audit row was edited, deleted or reordered; it cannot see a
state row that was changed behind it (an `active_id` set by hand, a sequence floor lowered,
a passing eval report or an API key inserted). So every audited change records what it
changed, `replay` rebuilds the state from the rows, and `differences` compares that with
the database and the trust store: anything changed without an audit row shows up.

A database that predates these details gets one "audit snapshot" row when it is migrated:
the state at that moment, from which the replay continues.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlite_utils import Database

from appliance.trust.truststore import TrustStore

SNAPSHOT_ACTION = "audit snapshot"
REPORT_FIELDS = ("manifest_sha256", "spec_hash", "host", "passed", "report_sha256")
TARGET_FIELDS = ("url", "model", "key_file", "cost_per_1k_tokens", "position", "release")


@dataclass
class LedgerState:
    """Releases, store state, reports and keys, each named by content, not by row id."""

    releases: dict[str, str] = field(default_factory=dict)  # ref -> manifest sha256
    sequences: dict[str, list[int]] = field(default_factory=dict)  # name -> [highest, floor]
    active: str | None = None  # manifest sha256
    previous_good: str | None = None
    frozen: bool = False
    rollout: dict[str, Any] | None = None  # the running rollout: candidate, mode, step
    eval_reports: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> fingerprint
    api_keys: dict[str, bool] = field(default_factory=dict)  # key sha256 -> revoked
    route_targets: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> endpoint
    fallback: bool = False  # every request to the cold path
    incident: bool = False
    route_policy: dict[str, Any] = field(default_factory=dict)  # an admin's overrides
    trusted: list[str] = field(default_factory=list)  # key ids, unrevoked
    revoked: list[str] = field(default_factory=list)
    threshold: int = 1

    def database_part(self) -> dict[str, Any]:
        """What a snapshot records: everything but the trust store (its own file)."""
        whole = asdict(self)
        return {k: whole[k] for k in whole if k not in ("trusted", "revoked", "threshold")}


def report_fingerprint(row: dict[str, Any]) -> dict[str, Any]:
    """What an eval report row says, as its audit row records it."""
    return {
        "manifest_sha256": row["manifest_sha256"],
        "spec_hash": row["spec_hash"],
        "host": row["host"],
        "passed": bool(row["passed"]),
        "report_sha256": hashlib.sha256((row["report"] or "").encode()).hexdigest(),
    }


def live_state(db: Database, trust: TrustStore) -> LedgerState:
    """The state as the database and the trust store hold it now."""
    manifests = {r["id"]: r["manifest_sha256"] for r in db.query("SELECT * FROM releases")}
    state = next(db.query("SELECT * FROM state WHERE id = 1"))
    return LedgerState(
        releases={
            f"{r['name']}@{r['version']}": r["manifest_sha256"]
            for r in db.query("SELECT name, version, manifest_sha256 FROM releases")
        },
        sequences={
            r["name"]: [r["highest"], r["floor"]] for r in db.query("SELECT * FROM sequences")
        },
        active=manifests.get(state["active_id"]),
        previous_good=manifests.get(state["previous_good_id"]),
        frozen=bool(state["frozen"]),
        rollout=_running_rollout(db),
        eval_reports={
            str(r["id"]): report_fingerprint(r) for r in db.query("SELECT * FROM eval_reports")
        },
        api_keys={
            r["sha256"]: r["revoked"] is not None for r in db.query("SELECT * FROM api_keys")
        },
        **_routing(db),
        trusted=sorted(k.key_id for k in trust.keys.values() if k.revoked is None),
        revoked=sorted(k.key_id for k in trust.keys.values() if k.revoked is not None),
        threshold=trust.threshold,
    )


def check_state(db: Database, trust: TrustStore) -> list[str]:
    """Replay the whole audit log and compare it with the live state."""
    rows = list(db.query("SELECT action, target, details FROM audit ORDER BY id"))
    return differences(replay(rows), live_state(db, trust))


def replay(rows: list[dict[str, Any]]) -> LedgerState:
    """Apply audit rows (oldest first) to an empty state."""
    state = LedgerState()
    for row in rows:
        _apply(state, row["action"], row["target"], json.loads(row["details"] or "{}"))
    state.trusted.sort()
    state.revoked.sort()
    return state


def differences(replayed: LedgerState, live: LedgerState) -> list[str]:
    """One line per part of the live state that the audit log does not account for."""
    found = []
    names = {v: k for k, v in {**replayed.releases, **live.releases}.items()}
    for part, logged in asdict(replayed).items():
        held = getattr(live, part)
        if logged == held:
            continue
        label = part.replace("_", " ")
        if isinstance(logged, dict):
            keys = sorted(k for k in {*logged, *held} if logged.get(k) != held.get(k))
            found.append(f"{label} differ from the audit log at {', '.join(keys)[:200]}")
        else:
            found.append(
                f"{label}: now {_show(held, names)}, the audit log says {_show(logged, names)}"
            )
    return found


def _apply(state: LedgerState, action: str, target: str, details: dict[str, Any]) -> None:
    manifest = details.get("manifest_sha256")
    if action == SNAPSHOT_ACTION:
        for key, value in details.items():
            setattr(state, key, value)
    elif action == "install":
        state.releases[target] = manifest
        name = target.partition("@")[0]
        highest, floor = state.sequences.get(name, [0, 0])
        state.sequences[name] = [
            max(highest, details.get("sequence", 0)),
            max(floor, details.get("min_sequence", 0)),
        ]
    elif action in ("activate", "activate --force"):
        state.previous_good, state.active = state.active, manifest
    elif action == "rollback":
        state.active, state.previous_good = manifest, None
    elif action == "rollout start":
        state.rollout = {"candidate": manifest, "mode": details.get("mode"), "step": 0}
    elif action == "rollout advance" and state.rollout is not None:
        state.rollout = {**state.rollout, "step": details.get("step")}
    elif action == "rollout promote":
        state.previous_good, state.active, state.rollout = state.active, manifest, None
    elif action == "rollout abort":
        state.rollout = None
    elif action in ("freeze", "unfreeze"):
        state.frozen = action == "freeze"
    elif action == "remove":
        state.releases.pop(target, None)
        state.eval_reports = {
            k: v for k, v in state.eval_reports.items() if v["manifest_sha256"] != manifest
        }
    elif action == "eval":
        state.eval_reports[str(details.get("report"))] = {k: details.get(k) for k in REPORT_FIELDS}
    elif action in ("apikey create", "apikey revoke"):
        state.api_keys[details.get("key_sha256", "")] = action == "apikey revoke"
    elif action == "key trust" and target not in state.trusted:
        state.trusted.append(target)
    elif action == "key revoke":
        state.trusted = [k for k in state.trusted if k != target]
        state.revoked = sorted({*state.revoked, target})
    elif action == "key threshold":
        state.threshold = int(target)
    elif action == "route target add":
        state.route_targets[target] = {k: details.get(k) for k in TARGET_FIELDS}
    elif action == "route target remove":
        state.route_targets.pop(target, None)
    elif action in ("route fallback on", "route fallback off"):
        state.fallback = action == "route fallback on"
    elif action in ("incident start", "incident end"):
        state.incident = action == "incident start"
    elif action in ("route policy set", "route policy unset"):
        state.route_policy = details.get("policy") or {}


def _routing(db: Database) -> dict[str, Any]:
    if not db["routing"].exists():  # migration 0004 snapshots the state before 0006 ran
        return {}
    row = next(db.query("SELECT * FROM routing WHERE id = 1"))
    return {
        "route_targets": {
            r["name"]: {k: r.get(k) for k in TARGET_FIELDS}
            for r in db.query("SELECT * FROM route_targets")
        },
        "fallback": bool(row["fallback"]),
        "incident": row["incident"] is not None,
        "route_policy": policy_overrides(row),
    }


def policy_overrides(row: dict[str, Any]) -> dict[str, Any]:
    """The routing policy overrides a routing row holds ({} for none, or for a value that is
    not a JSON object: the service then judges by the signed policy alone)."""
    try:
        overrides = json.loads(row.get("policy") or "{}")
    except ValueError:
        return {}
    return overrides if isinstance(overrides, dict) else {}


def _running_rollout(db: Database) -> dict[str, Any] | None:
    if not db["rollouts"].exists():  # migration 0004 snapshots the state before 0005 ran
        return None
    rows = list(db.query("SELECT * FROM rollouts WHERE state = 'running'"))
    if not rows:
        return None
    row = rows[0]
    return {"candidate": row["manifest_sha256"], "mode": row["mode"], "step": row["step"]}


def _show(value: Any, names: dict[str, str]) -> str:
    """A readable rendering: a manifest digest by its release's name."""
    if isinstance(value, str) and value in names:
        return f"{names[value]} ({value[:12]})"
    return json.dumps(value, sort_keys=True)[:160]
