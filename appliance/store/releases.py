"""The release store: reads, and the admin operations. Each operation runs alone under the
store's lock, first cleaning up after a crashed one, and each state change is one SQLite
transaction that also appends its audit row. The active release changes only by activate
and rollback. Installing lives in store/install.py, trust-store changes in
store/keychanges.py; this module takes the lock for them.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from appliance.errors import (
    FrozenError,
    GateError,
    ReplayError,
    StoreBusyError,
    StoreError,
    UsageError,
)
from appliance.paths import AppliancePaths
from appliance.store import audit, keychanges, ledger
from appliance.store.db import open_state_db, write_transaction
from appliance.store.faults import fault_point
from appliance.store.gate import GateDecision, activation_gate, host_id
from appliance.store.install import (
    ModelProbe,
    Progress,
    install_bundle,
    recover,
    remove_tree,
    sequence_marks,
)
from appliance.store.records import (
    InstallResult,
    Release,
    StoreState,
    find_release,
    now,
    parse_ref,
)
from appliance.store.rollouts import end, release_in_rollout, running_rollout
from appliance.trust.crypto import PublicKey
from appliance.trust.truststore import TrustedKey, TrustStore, load_trust_store
from appliance.trust.verify import VerifiedBundle, verify_directory


class ReleaseStore:
    def __init__(self, paths: AppliancePaths) -> None:
        self.paths = paths

    # -- reading ---------------------------------------------------------------------

    def open_db(self) -> Database:
        return open_state_db(self.paths.state_db)

    @contextmanager
    def reading(self) -> Iterator[Database]:
        """A DB handle for reads, closed when the block ends."""
        db = self.open_db()
        try:
            yield db
        finally:
            db.close()

    def releases(self, db: Database) -> list[Release]:
        rows = db.query("SELECT * FROM releases ORDER BY name, sequence")
        return [Release.from_row(r) for r in rows]

    def release(self, db: Database, ref: str) -> Release:
        release = find_release(db, *parse_ref(ref))
        if release is None:
            raise StoreError(f"{ref} is not installed")
        return release

    def release_by_id(self, db: Database, release_id: int | None) -> Release | None:
        if release_id is None:
            return None
        rows = list(db.query("SELECT * FROM releases WHERE id = ?", [release_id]))
        return Release.from_row(rows[0]) if rows else None

    def state(self, db: Database) -> StoreState:
        row = next(db.query("SELECT * FROM state WHERE id = 1"))
        return StoreState(
            row["active_id"],
            row["previous_good_id"],
            bool(row["frozen"]),
            row["frozen_reason"],
            row["frozen_at"],
        )

    def gate(self, db: Database, release: Release) -> GateDecision:
        return activation_gate(db, release.manifest_sha256, release.spec_hash)

    def verify_installed(self, release: Release) -> VerifiedBundle:
        """Re-verify an installed release's files and signatures against the trust store."""
        return verify_directory(Path(release.path), load_trust_store(self.paths.trust_store))

    # -- admin operations --------------------------------------------------------------

    @contextmanager
    def admin(self) -> Iterator[Database]:
        """One admin operation at a time: take the lock, open the DB, clean up after crashes."""
        self.paths.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.paths.admin_lock, "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise StoreBusyError(
                    "another admin operation is running on this appliance; try again"
                ) from exc
            db = self.open_db()
            try:
                recover(db, self.paths)
                yield db
            finally:
                db.close()

    def install(
        self, bundle: Path, probe: ModelProbe, progress: Progress | None = None
    ) -> InstallResult:
        """Verify, probe and install a bundle (inactive); `probe` loads its model once in a
        child process, so a model that crashes llama.cpp is refused here."""
        with self.admin() as db:
            return install_bundle(db, self.paths, bundle, probe, progress)

    def activate(self, ref: str, force: bool = False, reason: str = "") -> tuple[Release, bool]:
        """Make ref the active release; returns (release, changed)."""
        if force and not reason.strip():
            raise UsageError("--force needs --reason: say why the gate is bypassed")
        with self.admin() as db:
            release, state = self.release(db, ref), self.state(db)
            if state.frozen:
                raise FrozenError(f"releases are frozen ({state.frozen_reason}); unfreeze first")
            if state.active_id == release.id:
                return release, False
            rollout = running_rollout(db)
            if rollout is not None:
                raise StoreError(
                    f"a rollout of {rollout.candidate} is running; promote or abort it first"
                )
            decision = self.check_activatable(db, release, force)
            with write_transaction(db):
                previous = self.switch_active(db, release)
                audit.append(
                    db,
                    "activate --force" if force else "activate",
                    ref,
                    reason,
                    {
                        "from": previous.ref if previous else None,
                        "gate": decision.reason,
                        "manifest_sha256": release.manifest_sha256,
                    },
                )
                fault_point("activate.in_transaction")
            fault_point("activate.after_commit")
            return release, True

    def check_activatable(
        self, db: Database, release: Release, force: bool = False
    ) -> GateDecision:
        """Refuse a release below its name's sequence floor, or without a passing gate on
        this host (unless forced); return the gate's decision."""
        self._check_floor(db, release)
        decision = self.gate(db, release)
        if not decision.passed and not force:
            raise GateError(
                f"{release.ref} has not passed its eval gate on this host ({decision.reason}); "
                "run the eval, or use --force --reason TEXT"
            )
        return decision

    def switch_active(self, db: Database, release: Release) -> Release | None:
        """Within the caller's transaction: make `release` active and the active one the
        previous good release; return that one."""
        state = self.state(db)
        previous = self.release_by_id(db, state.active_id)
        self._set_state(db, active_id=release.id, previous_good_id=state.active_id)
        return previous

    def rollback(self, reason: str = "") -> tuple[Release, Release | None]:
        """Switch back to the previous good release (allowed while frozen)."""
        with self.admin() as db:
            current = self.release_by_id(db, self.state(db).active_id)
            with write_transaction(db):
                target = self.rollback_in(db, reason)
                fault_point("rollback.in_transaction")
            fault_point("rollback.after_commit")
            return target, current

    def rollback_in(self, db: Database, reason: str) -> Release:
        """Within the caller's transaction: roll back; return the release now active."""
        state = self.state(db)
        target = self.release_by_id(db, state.previous_good_id)
        if target is None:
            raise StoreError("there is no previous good release to roll back to")
        self._check_floor(db, target)
        current = self.release_by_id(db, state.active_id)
        rollout = running_rollout(db)
        if rollout is not None:  # a rollback is an incident: no candidate stays on
            end(db, rollout, "aborted", f"rollback: {reason}".rstrip(": "), None)
        self._set_state(db, active_id=target.id, previous_good_id=None)
        audit.append(
            db,
            "rollback",
            target.ref,
            reason,
            {"from": current.ref if current else None, "manifest_sha256": target.manifest_sha256},
        )
        return target

    def freeze(self, reason: str) -> None:
        if not reason.strip():
            raise UsageError("freezing needs a reason")
        with self.admin() as db, write_transaction(db):
            self.freeze_in(db, reason)

    def freeze_in(self, db: Database, reason: str) -> None:
        """Within the caller's transaction: freeze releases."""
        stamp = now()
        db["state"].update(
            1, {"frozen": 1, "frozen_reason": reason, "frozen_at": stamp, "updated_at": stamp}
        )
        audit.append(db, "freeze", "releases", reason)

    def unfreeze(self, reason: str = "") -> None:
        with self.admin() as db, write_transaction(db):
            self.unfreeze_in(db, reason)

    def unfreeze_in(self, db: Database, reason: str) -> None:
        """Within the caller's transaction: unfreeze releases."""
        db["state"].update(
            1, {"frozen": 0, "frozen_reason": None, "frozen_at": None, "updated_at": now()}
        )
        audit.append(db, "unfreeze", "releases", reason)

    def remove(self, ref: str, reason: str = "") -> Release:
        with self.admin() as db:
            release, state = self.release(db, ref), self.state(db)
            if release.id == state.active_id:
                raise StoreError(f"{ref} is the active release; activate another one first")
            if release.id == state.previous_good_id:
                raise StoreError(f"{ref} is the previous good release, kept for rollback")
            if release_in_rollout(db, release):
                raise StoreError(f"{ref} is in a running rollout; abort it first")
            routed = [r["name"] for r in db.query("SELECT * FROM route_targets")
                      if r.get("release") == ref]  # fmt: skip
            if routed:
                raise StoreError(
                    f"{ref} is the cold-path target {routed[0]}; route remove it first"
                )
            with write_transaction(db):
                db["releases"].delete(release.id)
                # Its reports go with it: they judged bytes that are no longer here.
                dropped = db.execute(
                    "DELETE FROM eval_reports WHERE manifest_sha256 = ?",
                    [release.manifest_sha256],
                ).rowcount
                audit.append(
                    db,
                    "remove",
                    ref,
                    reason,
                    {
                        "sequence": release.sequence,
                        "manifest_sha256": release.manifest_sha256,
                        "reports_dropped": dropped,
                    },
                )
            fault_point("remove.after_commit")
            remove_tree(Path(release.path))  # a crash here leaves an orphan that _recover removes
            return release

    def record_eval_report(self, release: Release, passed: bool, report_json: str) -> int:
        """Store an eval report for this host and the release's exact signed content (the
        activation gate reads it) and audit it."""
        row = {
            "manifest_sha256": release.manifest_sha256,
            "spec_hash": release.spec_hash,
            "host": host_id(),
            "passed": int(passed),
            "created": now(),
            "report": report_json,
        }
        with self.admin() as db, write_transaction(db):
            if self.release_by_id(db, release.id) != release:
                raise StoreError(f"{release.ref} was removed or replaced during the eval")
            report_id = db["eval_reports"].insert(row).last_pk
            audit.append(
                db,
                "eval",
                release.ref,
                details={"report": report_id, **ledger.report_fingerprint(row)},
            )
            return report_id

    def trust_key(self, public_key: PublicKey, name: str) -> TrustedKey:
        with self.admin() as db:
            return keychanges.trust(db, self.paths, public_key, name)

    def revoke_key(self, key_id_prefix: str, reason: str = "") -> TrustedKey:
        with self.admin() as db:
            return keychanges.revoke(db, self.paths, key_id_prefix, reason)

    def set_threshold(self, threshold: int) -> TrustStore:
        with self.admin() as db:
            return keychanges.threshold(db, self.paths, threshold)

    # -- internals ---------------------------------------------------------------------

    def _set_state(self, db: Database, **values: Any) -> None:
        db["state"].update(1, {**values, "updated_at": now()})

    def _check_floor(self, db: Database, release: Release) -> None:
        """Refuse a release older than a newer release's min_sequence allows to run."""
        floor = sequence_marks(db, release.name)[1]
        if release.sequence < floor:
            raise ReplayError(
                f"{release.ref} (sequence {release.sequence}) is below the minimum sequence "
                f"{floor} that a newer {release.name!r} release requires"
            )
