"""Writing a new key pair to disk: private key mode 0600, never overwriting."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import UsageError
from appliance.trust.crypto import generate_signing_key


@dataclass(frozen=True)
class KeyPairFiles:
    key_id: str
    private_key: Path
    public_key: Path


def write_key_pair(out_dir: Path, name: str, passphrase: bytes | None) -> KeyPairFiles:
    if not name or "/" in name or name.startswith("."):
        raise UsageError(f"invalid key name {name!r}")
    private_path, public_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise UsageError(f"{path} already exists; refusing to overwrite a key")
    key = generate_signing_key()
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_new(private_path, key.private_pem(passphrase), 0o600)
    _write_new(public_path, key.public_key.pem, 0o644)
    return KeyPairFiles(key.public_key.key_id, private_path, public_path)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
