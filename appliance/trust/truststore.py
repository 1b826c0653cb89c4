"""The trust store: which public keys may sign bundles, which were revoked, the threshold.

It is one JSON file, replaced atomically (write, fsync, rename) under an exclusive lock,
so a reader sees either the old or the new store, never a mix.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from appliance.errors import KeyStoreError, UsageError
from appliance.trust.crypto import PublicKey

FORMAT_VERSION = 1


@dataclass(frozen=True)
class TrustedKey:
    key_id: str
    name: str
    pem: str
    added: str
    revoked: str | None = None

    @property
    def public_key(self) -> PublicKey:
        return PublicKey(self.pem.encode())


@dataclass(frozen=True)
class TrustStore:
    threshold: int = 1
    keys: dict[str, TrustedKey] = field(default_factory=dict)

    def active_key(self, key_id: str) -> TrustedKey | None:
        key = self.keys.get(key_id)
        return key if key is not None and key.revoked is None else None

    def is_revoked(self, key_id: str) -> bool:
        key = self.keys.get(key_id)
        return key is not None and key.revoked is not None


def load_trust_store(path: Path) -> TrustStore:
    """Read the store; a missing file is an empty store with threshold 1."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return TrustStore()
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read trust store {path}: {exc}") from exc
    if raw.get("format") != FORMAT_VERSION:
        raise UsageError(f"trust store {path} has an unknown format")
    keys = {k["key_id"]: TrustedKey(**k) for k in raw["keys"]}
    return TrustStore(threshold=int(raw["threshold"]), keys=keys)


def trust_key(path: Path, public_key: PublicKey, name: str) -> TrustedKey:
    with _locked_update(path) as (store, commit):
        existing = store.keys.get(public_key.key_id)
        if existing is not None and existing.revoked:
            raise KeyStoreError(
                f"key {public_key.key_id[:16]} was revoked on {existing.revoked}; "
                "a revoked key cannot be trusted again"
            )
        if existing is not None:
            return existing
        key = TrustedKey(public_key.key_id, name, public_key.pem.decode(), _now())
        commit(replace(store, keys={**store.keys, key.key_id: key}))
        return key


def revoke_key(path: Path, key_id_prefix: str) -> TrustedKey:
    with _locked_update(path) as (store, commit):
        key = _find_key(store, key_id_prefix)
        if key.revoked:
            return key
        revoked = replace(key, revoked=_now())
        commit(replace(store, keys={**store.keys, key.key_id: revoked}))
        return revoked


def set_threshold(path: Path, threshold: int) -> TrustStore:
    if threshold < 1:
        raise UsageError("the threshold must be at least 1")
    with _locked_update(path) as (store, commit):
        updated = replace(store, threshold=threshold)
        commit(updated)
        return updated


def _find_key(store: TrustStore, key_id_prefix: str) -> TrustedKey:
    prefix = key_id_prefix.lower()
    if len(prefix) < 8:
        raise UsageError("give at least 8 hex digits of the key id")
    matches = [k for k in store.keys.values() if k.key_id.startswith(prefix)]
    if not matches:
        raise KeyStoreError(f"no key with id {key_id_prefix} in the trust store")
    if len(matches) > 1:
        raise KeyStoreError(f"key id {key_id_prefix} is ambiguous; give more digits")
    return matches[0]


@contextmanager
def _locked_update(path: Path) -> Iterator[tuple[TrustStore, object]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield load_trust_store(path), lambda store: _write_atomically(path, store)


def _write_atomically(path: Path, store: TrustStore) -> None:
    document = {
        "format": FORMAT_VERSION,
        "threshold": store.threshold,
        "keys": [asdict(k) for k in sorted(store.keys.values(), key=lambda k: k.added)],
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".trust-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(document, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
