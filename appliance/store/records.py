"""What the release store holds, as plain data: a release, the state row, an install's
result, and NAME@VERSION references."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlite_utils import Database

from appliance.errors import UsageError
from appliance.trust.manifest import NAME_PATTERN, VERSION_PATTERN


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


def parse_ref(ref: str) -> tuple[str, str]:
    name, sep, version = ref.partition("@")
    if not sep or not NAME_PATTERN.fullmatch(name) or not VERSION_PATTERN.fullmatch(version):
        raise UsageError(f"expected NAME@VERSION, got {ref!r}")
    return name, version


def find_release(db: Database, name: str, version: str) -> Release | None:
    rows = list(db.query("SELECT * FROM releases WHERE name = ? AND version = ?", [name, version]))
    return Release.from_row(rows[0]) if rows else None


def now() -> str:
    """A timestamp as the store records them (UTC, seconds)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
