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
from appliance.trust.crypto import PublicKey, load_public_key

FORMAT_VERSION = 1
_KEY_FIELDS = frozenset({"key_id", "name", "pem", "added", "revoked"})


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
    """Read and validate the store; a missing file is an empty store with threshold 1.

    The file is checked on every load, because every check after it relies on it: a
    hand-edited or corrupted store is refused (KeyStoreError), never half-trusted.
    """
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return TrustStore()
    except (OSError, ValueError) as exc:
        raise KeyStoreError(f"cannot read trust store {path}: {_one_line(exc)}") from exc
    try:
        return _parse_store(raw)
    except _InvalidStore as exc:
        raise KeyStoreError(f"trust store {path} is invalid: {exc}") from exc


class _InvalidStore(Exception):
    """One reason why a trust store file cannot be used."""


def _parse_store(raw: object) -> TrustStore:
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_VERSION:
        raise _InvalidStore("unknown format")
    if set(raw) != {"format", "threshold", "keys"} or not isinstance(raw["keys"], list):
        raise _InvalidStore("expected exactly the fields format, threshold and keys (a list)")
    keys: dict[str, TrustedKey] = {}
    for entry in raw["keys"]:
        key = _parse_key(entry)
        # Ids are derived from the key material, so unique ids mean distinct keys.
        if key.key_id in keys:
            raise _InvalidStore(f"key {key.key_id[:16]} is listed twice")
        keys[key.key_id] = key
    threshold = raw["threshold"]
    if not _is_int(threshold) or not 1 <= threshold <= max(1, len(keys)):
        raise _InvalidStore(
            f"threshold {threshold!r} must be an integer from 1 to the number of keys ({len(keys)})"
        )
    return TrustStore(threshold=threshold, keys=keys)


def _parse_key(entry: object) -> TrustedKey:
    if not isinstance(entry, dict) or set(entry) != _KEY_FIELDS:
        raise _InvalidStore(
            f"a key entry needs exactly the fields {', '.join(sorted(_KEY_FIELDS))}"
        )
    label = repr(str(entry["key_id"])[:16])
    texts_ok = all(isinstance(entry[f], str) for f in ("key_id", "name", "pem", "added"))
    revoked = entry["revoked"]
    if not texts_ok or not (revoked is None or (isinstance(revoked, str) and revoked)):
        raise _InvalidStore(f"key {label} has a field of the wrong type")
    try:
        canonical = load_public_key(entry["pem"].encode())  # ECDSA P-256 only
    except UsageError as exc:
        raise _InvalidStore(f"key {label}: {_one_line(exc)}") from exc
    if entry["key_id"] != canonical.key_id:
        raise _InvalidStore(f"key id {label} is not the sha256 of its public key")
    return TrustedKey(**{**entry, "pem": canonical.pem.decode()})


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
        key = find_key(store, key_id_prefix)
        if key.revoked:
            return key
        revoked = replace(key, revoked=_now())
        commit(replace(store, keys={**store.keys, key.key_id: revoked}))
        return revoked


def set_threshold(path: Path, threshold: int) -> TrustStore:
    if not _is_int(threshold) or threshold < 1:
        raise UsageError("the threshold must be an integer of at least 1")
    with _locked_update(path) as (store, commit):
        active = sum(1 for key in store.keys.values() if key.revoked is None)
        # A threshold no set of trusted keys can meet locks every release out; 1 stays
        # allowed on a store without keys (it is the default there).
        if threshold > max(1, active):
            raise KeyStoreError(
                f"threshold {threshold} exceeds the {active} unrevoked trusted key(s)"
            )
        updated = replace(store, threshold=threshold)
        commit(updated)
        return updated


def find_key(store: TrustStore, key_id_prefix: str) -> TrustedKey:
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


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
