"""Release store operations. Each is one admin operation under the store's lock, and each
state change is one SQLite transaction that also appends its audit row.

Install: verify while extracting into staging (same filesystem), probe the model in a child
process, fsync, make read-only, rename into releases/<name>/<version>/, then record it. A
crash before the record leaves an orphan directory that the next operation removes; a crash
after it leaves a complete release. Nothing half-installed is ever visible, and the active
release never changes except by activate or rollback.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from appliance.errors import (
    FrozenError,
    GateError,
    HostError,
    ReplayError,
    StoreBusyError,
    StoreError,
    UsageError,
)
from appliance.paths import AppliancePaths
from appliance.store import audit, ledger
from appliance.store.db import open_state_db
from appliance.store.faults import fault_point
from appliance.store.gate import GateDecision, activation_gate, host_id, spec_hash
from appliance.trust.crypto import PublicKey
from appliance.trust.manifest import NAME_PATTERN, VERSION_PATTERN, Manifest, statement_bytes
from appliance.trust.truststore import (
    TrustedKey,
    TrustStore,
    load_trust_store,
    revoke_key,
    set_threshold,
    trust_key,
)
from appliance.trust.verify import VerifiedBundle, verify_bundle, verify_directory

Progress = Callable[[int], None]
# Loads a staged release's model in a child process and raises if llama.cpp dies on it. The
# store sits below the engine, so the caller hands it in (appliance.serve.probe.probe_release).
ModelProbe = Callable[[Path], None]


@dataclass(frozen=True)
class Release:
    id: int
    name: str
    version: str
    sequence: int
    min_sequence: int
    created: str
    installed_at: str
    manifest_sha256: str
    model_sha256: str
    source_model_sha256: str
    quant_type: str
    spec_hash: str
    signers: list[str]
    gguf: dict[str, Any]
    path: str

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Release:
        fields = dict(row)
        fields["signers"], fields["gguf"] = json.loads(row["signers"]), json.loads(row["gguf"])
        return cls(**fields)


@dataclass(frozen=True)
class StoreState:
    active_id: int | None
    previous_good_id: int | None
    frozen: bool
    frozen_reason: str | None
    frozen_at: str | None


@dataclass(frozen=True)
class InstallResult:
    release: Release
    installed: bool  # False: this exact bundle was already installed (a no-op)


class _AlreadyInstalled(Exception):
    def __init__(self, release: Release) -> None:
        self.release = release


def parse_ref(ref: str) -> tuple[str, str]:
    name, sep, version = ref.partition("@")
    if not sep or not NAME_PATTERN.fullmatch(name) or not VERSION_PATTERN.fullmatch(version):
        raise UsageError(f"expected NAME@VERSION, got {ref!r}")
    return name, version


class ReleaseStore:
    def __init__(self, paths: AppliancePaths) -> None:
        self.paths = paths

    # -- reading ---------------------------------------------------------------------

    def open_db(self) -> Database:
        return open_state_db(self.paths.state_db)

    def releases(self, db: Database) -> list[Release]:
        rows = db.query("SELECT * FROM releases ORDER BY name, sequence")
        return [Release.from_row(r) for r in rows]

    def release(self, db: Database, ref: str) -> Release:
        name, version = parse_ref(ref)
        rows = list(
            db.query("SELECT * FROM releases WHERE name = ? AND version = ?", [name, version])
        )
        if not rows:
            raise StoreError(f"{ref} is not installed")
        return Release.from_row(rows[0])

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
                self._recover(db)
                yield db
            finally:
                db.close()

    def install(
        self, bundle: Path, probe: ModelProbe, progress: Progress | None = None
    ) -> InstallResult:
        """Verify, probe and install a bundle (inactive); `probe` loads its model once in a
        child process, so a model that crashes llama.cpp is refused here."""
        with self.admin() as db:
            trust = load_trust_store(self.paths.trust_store)
            self.paths.staging_dir.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=self.paths.staging_dir, prefix="install-"))
            try:
                return self._install(db, bundle, trust, staging / "release", probe, progress)
            except _AlreadyInstalled as done:
                return InstallResult(done.release, installed=False)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise HostError("disk full while installing; nothing was installed") from exc
                raise
            finally:
                _remove_tree(staging)

    def _install(self, db, bundle, trust, staging: Path, probe, progress) -> InstallResult:
        def on_chunk(n: int) -> None:
            if progress:
                progress(n)
            fault_point("install.during_extract")

        verified = verify_bundle(
            bundle,
            trust,
            extract_to=staging,
            progress=on_chunk,
            on_manifest=lambda m: self._check_installable(db, m),
        )
        fault_point("install.after_extract")
        probe(staging)
        manifest = verified.manifest
        _seal(staging)
        target = self.paths.releases_dir / manifest.release.name / manifest.release.version
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staging, target)
        _fsync_dir(target.parent)
        fault_point("install.after_rename")
        with db.atomic():
            row = self._release_row(verified, target)
            db["releases"].insert(row)
            self._raise_sequence_marks(db, manifest)
            audit.append(
                db,
                "install",
                manifest.release.ref,
                details={
                    "sequence": manifest.release.sequence,
                    "min_sequence": manifest.release.min_sequence,
                    "signers": list(verified.signers),
                    "manifest_sha256": row["manifest_sha256"],
                },
            )
            fault_point("install.in_transaction")
        fault_point("install.after_commit")
        return InstallResult(self.release(db, manifest.release.ref), installed=True)

    def _check_installable(self, db: Database, manifest: Manifest) -> None:
        release = manifest.release
        digest = _manifest_sha256(manifest)
        existing = list(
            db.query(
                "SELECT * FROM releases WHERE name = ? AND version = ?",
                [release.name, release.version],
            )
        )
        if existing and existing[0]["manifest_sha256"] == digest:
            raise _AlreadyInstalled(Release.from_row(existing[0]))
        if existing:
            raise ReplayError(f"{release.ref} is already installed with different content")
        highest = self._sequence_marks(db, release.name)[0]
        if highest is not None and release.sequence <= highest:
            raise ReplayError(
                f"{release.ref} has sequence {release.sequence}, not above {highest}, the "
                f"highest installed for {release.name!r}: replay or downgrade refused "
                "(to go back, activate or roll back to an installed release)"
            )

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
            self._check_floor(db, release)
            decision = self.gate(db, release)
            if not decision.passed and not force:
                raise GateError(
                    f"{ref} has not passed its eval gate on this host ({decision.reason}); "
                    "run the eval, or use --force --reason TEXT"
                )
            previous = self.release_by_id(db, state.active_id)
            with db.atomic():
                self._set_state(db, active_id=release.id, previous_good_id=state.active_id)
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

    def rollback(self, reason: str = "") -> tuple[Release, Release | None]:
        """Switch back to the previous good release (allowed while frozen)."""
        with self.admin() as db:
            state = self.state(db)
            target = self.release_by_id(db, state.previous_good_id)
            if target is None:
                raise StoreError("there is no previous good release to roll back to")
            self._check_floor(db, target)
            current = self.release_by_id(db, state.active_id)
            with db.atomic():
                self._set_state(db, active_id=target.id, previous_good_id=None)
                audit.append(
                    db,
                    "rollback",
                    target.ref,
                    reason,
                    {
                        "from": current.ref if current else None,
                        "manifest_sha256": target.manifest_sha256,
                    },
                )
                fault_point("rollback.in_transaction")
            fault_point("rollback.after_commit")
            return target, current

    def freeze(self, reason: str) -> None:
        if not reason.strip():
            raise UsageError("freezing needs a reason")
        with self.admin() as db, db.atomic():
            now = _now()
            db["state"].update(
                1, {"frozen": 1, "frozen_reason": reason, "frozen_at": now, "updated_at": now}
            )
            audit.append(db, "freeze", "releases", reason)

    def unfreeze(self, reason: str = "") -> None:
        with self.admin() as db, db.atomic():
            db["state"].update(
                1, {"frozen": 0, "frozen_reason": None, "frozen_at": None, "updated_at": _now()}
            )
            audit.append(db, "unfreeze", "releases", reason)

    def remove(self, ref: str, reason: str = "") -> Release:
        with self.admin() as db:
            release, state = self.release(db, ref), self.state(db)
            if release.id == state.active_id:
                raise StoreError(f"{ref} is the active release; activate another one first")
            if release.id == state.previous_good_id:
                raise StoreError(f"{ref} is the previous good release, kept for rollback")
            with db.atomic():
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
            _remove_tree(Path(release.path))  # a crash here leaves an orphan that _recover removes
            return release

    def record_eval_report(self, release: Release, passed: bool, report_json: str) -> int:
        """Store an eval report for this host and the release's exact signed content (the
        activation gate reads it) and audit it."""
        row = {
            "manifest_sha256": release.manifest_sha256,
            "spec_hash": release.spec_hash,
            "host": host_id(),
            "passed": int(passed),
            "created": _now(),
            "report": report_json,
        }
        with self.admin() as db, db.atomic():
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
            already = load_trust_store(self.paths.trust_store).active_key(public_key.key_id)
            if already is not None:
                return already  # nothing changes, nothing to audit
            key = trust_key(self.paths.trust_store, public_key, name)
            with db.atomic():
                audit.append(db, "key trust", key.key_id, details={"name": key.name})
            return key

    def revoke_key(self, key_id_prefix: str, reason: str = "") -> TrustedKey:
        with self.admin() as db:
            key = revoke_key(self.paths.trust_store, key_id_prefix)
            with db.atomic():
                audit.append(db, "key revoke", key.key_id, reason, {"name": key.name})
            return key

    def set_threshold(self, threshold: int) -> TrustStore:
        with self.admin() as db:
            store = set_threshold(self.paths.trust_store, threshold)
            with db.atomic():
                audit.append(db, "key threshold", str(threshold))
            return store

    # -- internals ---------------------------------------------------------------------

    def _set_state(self, db: Database, **values: Any) -> None:
        db["state"].update(1, {**values, "updated_at": _now()})

    def _sequence_marks(self, db: Database, name: str) -> tuple[int | None, int]:
        """(highest sequence installed, floor) for a name; both survive `release remove`."""
        rows = list(db.query("SELECT highest, floor FROM sequences WHERE name = ?", [name]))
        return (rows[0]["highest"], rows[0]["floor"]) if rows else (None, 0)

    def _raise_sequence_marks(self, db: Database, manifest: Manifest) -> None:
        release = manifest.release
        highest, floor = self._sequence_marks(db, release.name)
        db["sequences"].upsert(
            {
                "name": release.name,
                "highest": max(highest or 0, release.sequence),
                "floor": max(floor, release.min_sequence),
            },
            pk="name",
        )

    def _check_floor(self, db: Database, release: Release) -> None:
        """Refuse a release older than a newer release's min_sequence allows to run."""
        floor = self._sequence_marks(db, release.name)[1]
        if release.sequence < floor:
            raise ReplayError(
                f"{release.ref} (sequence {release.sequence}) is below the minimum sequence "
                f"{floor} that a newer {release.name!r} release requires"
            )

    def _release_row(self, verified: VerifiedBundle, path: Path) -> dict[str, Any]:
        manifest, meta = verified.manifest, verified.manifest.release
        return {
            "name": meta.name,
            "version": meta.version,
            "sequence": meta.sequence,
            "min_sequence": meta.min_sequence,
            "created": meta.created,
            "installed_at": _now(),
            "manifest_sha256": _manifest_sha256(manifest),
            "model_sha256": manifest.files["model.gguf"].sha256,
            "source_model_sha256": meta.source_model_sha256,
            "quant_type": meta.quant_type,
            "spec_hash": spec_hash(manifest),
            "signers": json.dumps(list(verified.signers)),
            "gguf": json.dumps(verified.gguf.as_dict()),
            "path": str(path),
        }

    def _recover(self, db: Database) -> None:
        """Remove what a crashed operation left behind: staging, unrecorded release dirs."""
        if self.paths.staging_dir.is_dir():
            for leftover in self.paths.staging_dir.iterdir():
                _remove_tree(leftover)
        recorded = {r["path"] for r in db.query("SELECT path FROM releases")}
        if self.paths.releases_dir.is_dir():
            for name_dir in self.paths.releases_dir.iterdir():
                for version_dir in name_dir.iterdir():
                    if str(version_dir) not in recorded:
                        _remove_tree(version_dir)


def _manifest_sha256(manifest: Manifest) -> str:
    return hashlib.sha256(statement_bytes(manifest)).hexdigest()


def _seal(root: Path) -> None:
    """Make an extracted release read-only and durable before it becomes visible."""
    for directory, subdirs, files in os.walk(root, topdown=False):
        for name in files:
            os.chmod(Path(directory) / name, 0o444)
        for name in subdirs:
            _fsync_dir(Path(directory) / name)
            os.chmod(Path(directory) / name, 0o555)
    _fsync_dir(root)
    os.chmod(root, 0o555)


def _remove_tree(path: Path) -> None:
    """rmtree that first restores write permission on the read-only release dirs."""
    if not path.exists():
        return
    for directory, _subdirs, _files in os.walk(path):
        os.chmod(directory, stat.S_IRWXU)
    shutil.rmtree(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
