"""Rollouts: a candidate release served beside the active (stable) one, as store state.

A canary sends a growing share of traffic to the candidate (`steps`, in percent), one step
per `interval`, while the service judges it against stable; a shadow mirrors a share of
stable's requests to it and never answers a client with it. At most one rollout runs.
Every change goes through the admin lock, is one transaction with its audit row (the
judge's evidence in its details) and has fault points for the crash tests. A running
rollout lives only in this table: a service that restarts reads it and carries on from the
step it records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from sqlite_utils import Database

from appliance.errors import FrozenError, StoreError, UsageError
from appliance.store import audit
from appliance.store.db import write_transaction
from appliance.store.faults import fault_point
from appliance.store.records import Release, now

if TYPE_CHECKING:  # releases.py imports this module: activate, remove, rollback check rollouts
    from appliance.store.releases import ReleaseStore

Mode = Literal["canary", "shadow"]
DEFAULT_STEPS = (5.0, 25.0, 50.0)


@dataclass(frozen=True)
class Rollout:
    id: int
    release_id: int
    candidate: str  # NAME@VERSION
    manifest_sha256: str
    mode: Mode
    steps: tuple[float, ...]  # canary: percent of traffic per step; shadow: (mirror percent,)
    step: int  # index into steps
    interval_seconds: float
    min_requests: int
    state: Literal["running", "promoted", "aborted"]
    started: str
    step_started: str
    ended: str | None
    reason: str | None
    last_check: dict[str, Any] | None  # the judge's latest look (not audited: an observation)

    @property
    def percent(self) -> float:
        """Canary: the candidate's share of traffic now; shadow: the share mirrored."""
        return self.steps[self.step]

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Rollout:
        fields = dict(row)
        fields["steps"] = tuple(json.loads(row["steps"]))
        fields["last_check"] = json.loads(row["last_check"]) if row["last_check"] else None
        return cls(**fields)

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "steps": list(self.steps), "percent": self.percent}


def running_rollout(db: Database) -> Rollout | None:
    rows = list(db.query("SELECT * FROM rollouts WHERE state = 'running'"))
    return Rollout.from_row(rows[0]) if rows else None


def latest_rollout(db: Database) -> Rollout | None:
    rows = list(db.query("SELECT * FROM rollouts ORDER BY id DESC LIMIT 1"))
    return Rollout.from_row(rows[0]) if rows else None


def rollout_history(db: Database, rollout_id: int) -> list[dict[str, Any]]:
    """The audited decisions of one rollout, oldest first."""
    rows = db.query(
        "SELECT time, action, reason, details FROM audit WHERE action LIKE 'rollout %' ORDER BY id"
    )
    history = []
    for row in rows:
        details = json.loads(row["details"] or "{}")
        if details.get("rollout") == rollout_id:
            history.append({**row, "details": details})
    return history


def start_rollout(
    store: ReleaseStore,
    ref: str,
    mode: Mode,
    steps: tuple[float, ...],
    interval_seconds: float,
    min_requests: int,
    reason: str = "",
) -> Rollout:
    """Load REF beside the active release as a canary or a shadow. It must have passed its
    offline gate on this host, as for activate; a freeze blocks it."""
    _check_plan(mode, steps, interval_seconds, min_requests)
    with store.admin() as db:
        release, state = store.release(db, ref), store.state(db)
        if state.frozen:
            raise FrozenError(f"releases are frozen ({state.frozen_reason}); unfreeze first")
        running = running_rollout(db)
        if running is not None:
            raise StoreError(f"a rollout of {running.candidate} is running; promote or abort it")
        if state.active_id is None:
            raise StoreError("nothing is active to compare with: activate a release first")
        if state.active_id == release.id:
            raise StoreError(f"{ref} is the active release already")
        store.check_activatable(db, release)
        stamp = now()
        row = {
            "release_id": release.id,
            "candidate": release.ref,
            "manifest_sha256": release.manifest_sha256,
            "mode": mode,
            "steps": json.dumps(list(steps)),
            "step": 0,
            "interval_seconds": interval_seconds,
            "min_requests": min_requests,
            "state": "running",
            "started": stamp,
            "step_started": stamp,
            "ended": None,
            "reason": reason,
            "last_check": None,
        }
        with write_transaction(db):
            rollout_id = db["rollouts"].insert(row).last_pk
            audit.append(
                db,
                "rollout start",
                release.ref,
                reason,
                {
                    "rollout": rollout_id,
                    "manifest_sha256": release.manifest_sha256,
                    "mode": mode,
                    "steps": list(steps),
                    "step": 0,
                    "interval_seconds": interval_seconds,
                    "min_requests": min_requests,
                },
            )
            fault_point("rollout.in_transaction")
        fault_point("rollout.after_commit")
        return _get(db, rollout_id)


def advance_rollout(store: ReleaseStore, rollout_id: int, evidence: dict[str, Any]) -> Rollout:
    """The judge found the canary's step good: go to the next step, or promote after the
    last one. A freeze holds the canary where it is."""
    with store.admin() as db:
        rollout = _running(db, rollout_id)
        state = store.state(db)
        if state.frozen:
            raise FrozenError(f"releases are frozen ({state.frozen_reason}): the rollout waits")
        if rollout.mode != "canary" or rollout.step + 1 >= len(rollout.steps):
            return _promote(store, db, rollout, "every step passed", evidence)
        with write_transaction(db):
            db["rollouts"].update(rollout.id, {"step": rollout.step + 1, "step_started": now()})
            audit.append(
                db,
                "rollout advance",
                rollout.candidate,
                details={
                    "rollout": rollout.id,
                    "step": rollout.step + 1,
                    "percent": rollout.steps[rollout.step + 1],
                    "evidence": evidence,
                },
            )
            fault_point("rollout.in_transaction")
        fault_point("rollout.after_commit")
        return _get(db, rollout.id)


def promote_rollout(
    store: ReleaseStore, reason: str = "", evidence: dict[str, Any] | None = None
) -> Rollout:
    """Make the running rollout's candidate the active release (the old one becomes the
    previous good release, as with activate)."""
    with store.admin() as db:
        rollout = _running(db, None)
        if store.state(db).frozen:
            raise FrozenError("releases are frozen: a rollout cannot be promoted; unfreeze first")
        return _promote(store, db, rollout, reason, evidence)


def abort_rollout(
    store: ReleaseStore,
    reason: str,
    evidence: dict[str, Any] | None = None,
    rollout_id: int | None = None,
) -> Rollout:
    """Stop the running rollout: the candidate gets no more traffic and is unloaded. Allowed
    while frozen, like rollback."""
    if not reason.strip():
        raise UsageError("aborting a rollout needs a reason")
    with store.admin() as db:
        rollout = _running(db, rollout_id)
        with write_transaction(db):
            end(db, rollout, "aborted", reason, evidence)
            fault_point("rollout.in_transaction")
        fault_point("rollout.after_commit")
        return _get(db, rollout.id)


def end(
    db: Database,
    rollout: Rollout,
    state: Literal["promoted", "aborted"],
    reason: str,
    evidence: dict[str, Any] | None,
) -> None:
    """Within the caller's transaction: end the rollout and audit it."""
    db["rollouts"].update(rollout.id, {"state": state, "ended": now(), "reason": reason})
    audit.append(
        db,
        "rollout promote" if state == "promoted" else "rollout abort",
        rollout.candidate,
        reason,
        {
            "rollout": rollout.id,
            "manifest_sha256": rollout.manifest_sha256,
            "step": rollout.step,
            "evidence": evidence,
        },
    )


def record_check(db: Database, rollout_id: int, check: dict[str, Any]) -> None:
    """The judge's latest look at a running rollout, for `rollout status` and the console."""
    with write_transaction(db):
        db.execute(
            "UPDATE rollouts SET last_check = ? WHERE id = ? AND state = 'running'",
            [json.dumps(check), rollout_id],
        )


def _promote(
    store: ReleaseStore,
    db: Database,
    rollout: Rollout,
    reason: str,
    evidence: dict[str, Any] | None,
) -> Rollout:
    release = store.release_by_id(db, rollout.release_id)
    if release is None or release.manifest_sha256 != rollout.manifest_sha256:
        raise StoreError(f"{rollout.candidate} is no longer installed as it was")
    store.check_activatable(db, release)
    with write_transaction(db):
        store.switch_active(db, release)
        db["rollouts"].update(rollout.id, {"state": "promoted", "ended": now(), "reason": reason})
        audit.append(
            db,
            "rollout promote",
            rollout.candidate,
            reason,
            {
                "rollout": rollout.id,
                "manifest_sha256": rollout.manifest_sha256,
                "step": rollout.step,
                "evidence": evidence,
            },
        )
        fault_point("rollout.in_transaction")
    fault_point("rollout.after_commit")
    return _get(db, rollout.id)


def _running(db: Database, rollout_id: int | None) -> Rollout:
    rollout = running_rollout(db)
    if rollout is None or (rollout_id is not None and rollout.id != rollout_id):
        raise StoreError("no rollout is running" if rollout is None else "the rollout changed")
    return rollout


def _get(db: Database, rollout_id: int) -> Rollout:
    return Rollout.from_row(next(db.query("SELECT * FROM rollouts WHERE id = ?", [rollout_id])))


def _check_plan(
    mode: Mode, steps: tuple[float, ...], interval_seconds: float, min_requests: int
) -> None:
    if not steps or any(not 0 < s <= 100 for s in steps):
        raise UsageError("rollout percentages must be above 0 and at most 100")
    if mode == "canary" and list(steps) != sorted(set(steps)):
        raise UsageError("canary steps must rise, e.g. 5,25,50")
    if interval_seconds <= 0 or min_requests < 1:
        raise UsageError("the interval must be positive and --min-requests at least 1")


def release_in_rollout(db: Database, release: Release) -> bool:
    rollout = running_rollout(db)
    return rollout is not None and rollout.release_id == release.id
