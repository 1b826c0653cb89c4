"""Installing a bundle into the release store, and recovering from a crashed install.

Verify while extracting into staging (same filesystem), probe the model in a child process,
fsync, make read-only, rename into releases/<name>/<version>/, then record it with its audit
row in one transaction. A crash before the record leaves an orphan directory that the next
admin operation removes (`recover`); a crash after it leaves a complete release. Nothing
half-installed is ever visible, and installing never changes the active release.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from appliance.errors import HostError, ReplayError
from appliance.paths import AppliancePaths
from appliance.retrieval.index import index_corpus
from appliance.store import audit
from appliance.store.db import write_transaction
from appliance.store.faults import fault_point
from appliance.store.gate import spec_hash
from appliance.store.records import InstallResult, Release, find_release, now
from appliance.trust.manifest import Manifest, statement_bytes
from appliance.trust.truststore import TrustStore, load_trust_store
from appliance.trust.verify import VerifiedBundle, verify_bundle

Progress = Callable[[int], None]
# Loads a staged release's model in a child process and raises if llama.cpp dies on it. The
# store sits below the engine, so the caller hands it in (appliance.serve.probe.probe_release).
ModelProbe = Callable[[Path], None]


class _AlreadyInstalled(Exception):
    def __init__(self, release: Release) -> None:
        self.release = release


def install_bundle(
    db: Database,
    paths: AppliancePaths,
    bundle: Path,
    probe: ModelProbe,
    progress: Progress | None = None,
) -> InstallResult:
    """Verify, probe and install a bundle (inactive). The caller holds the admin lock."""
    trust = load_trust_store(paths.trust_store)
    paths.staging_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=paths.staging_dir, prefix="install-"))
    try:
        return _install(db, paths, bundle, trust, staging / "release", probe, progress)
    except _AlreadyInstalled as done:
        return InstallResult(done.release, installed=False)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise HostError("disk full while installing; nothing was installed") from exc
        raise
    finally:
        remove_tree(staging)


def recover(db: Database, paths: AppliancePaths) -> None:
    """Remove what a crashed operation left behind: staging, unrecorded release dirs."""
    if paths.staging_dir.is_dir():
        for leftover in paths.staging_dir.iterdir():
            remove_tree(leftover)
    recorded = {r["path"] for r in db.query("SELECT path FROM releases")}
    if paths.releases_dir.is_dir():
        for name_dir in paths.releases_dir.iterdir():
            for version_dir in name_dir.iterdir():
                if str(version_dir) not in recorded:
                    remove_tree(version_dir)


def sequence_marks(db: Database, name: str) -> tuple[int | None, int]:
    """(highest sequence installed, floor) for a name; both survive `release remove`."""
    rows = list(db.query("SELECT highest, floor FROM sequences WHERE name = ?", [name]))
    return (rows[0]["highest"], rows[0]["floor"]) if rows else (None, 0)


def remove_tree(path: Path) -> None:
    """rmtree that first restores write permission on the read-only release dirs."""
    if not path.exists():
        return
    for directory, _subdirs, _files in os.walk(path):
        os.chmod(directory, stat.S_IRWXU)
    shutil.rmtree(path)


def _install(
    db: Database,
    paths: AppliancePaths,
    bundle: Path,
    trust: TrustStore,
    staging: Path,
    probe: ModelProbe,
    progress: Progress | None,
) -> InstallResult:
    def on_chunk(n: int) -> None:
        if progress:
            progress(n)
        fault_point("install.during_extract")

    verified = verify_bundle(
        bundle,
        trust,
        extract_to=staging,
        progress=on_chunk,
        on_manifest=lambda m: _check_installable(db, m),
    )
    fault_point("install.after_extract")
    probe(staging)
    manifest = verified.manifest
    index_corpus(staging, paths.corpus_index(_manifest_sha256(manifest)))  # none: a no-op
    _seal(staging)
    target = paths.releases_dir / manifest.release.name / manifest.release.version
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(staging, target)
    _fsync_dir(target.parent)
    fault_point("install.after_rename")
    with write_transaction(db):
        row = _release_row(verified, target)
        db["releases"].insert(row)
        _raise_sequence_marks(db, manifest)
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
    installed = find_release(db, manifest.release.name, manifest.release.version)
    assert installed is not None  # recorded just above, under the admin lock
    return InstallResult(installed, installed=True)


def _check_installable(db: Database, manifest: Manifest) -> None:
    release = manifest.release
    existing = find_release(db, release.name, release.version)
    if existing is not None and existing.manifest_sha256 == _manifest_sha256(manifest):
        raise _AlreadyInstalled(existing)
    if existing is not None:
        raise ReplayError(f"{release.ref} is already installed with different content")
    highest = sequence_marks(db, release.name)[0]
    if highest is not None and release.sequence <= highest:
        raise ReplayError(
            f"{release.ref} has sequence {release.sequence}, not above {highest}, the "
            f"highest installed for {release.name!r}: replay or downgrade refused "
            "(to go back, activate or roll back to an installed release)"
        )


def _raise_sequence_marks(db: Database, manifest: Manifest) -> None:
    release = manifest.release
    highest, floor = sequence_marks(db, release.name)
    db["sequences"].upsert(
        {
            "name": release.name,
            "highest": max(highest or 0, release.sequence),
            "floor": max(floor, release.min_sequence),
        },
        pk="name",
    )


def _release_row(verified: VerifiedBundle, path: Path) -> dict[str, Any]:
    manifest, meta = verified.manifest, verified.manifest.release
    return {
        "name": meta.name,
        "version": meta.version,
        "sequence": meta.sequence,
        "min_sequence": meta.min_sequence,
        "created": meta.created,
        "installed_at": now(),
        "manifest_sha256": _manifest_sha256(manifest),
        "model_sha256": manifest.files["model.gguf"].sha256,
        "source_model_sha256": meta.source_model_sha256,
        "quant_type": meta.quant_type,
        "spec_hash": spec_hash(manifest),
        "signers": json.dumps(list(verified.signers)),
        "gguf": json.dumps(verified.gguf.as_dict()),
        "path": str(path),
    }


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
