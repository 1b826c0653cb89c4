"""The activation gate: a release may serve only after its frozen eval spec passed here.

The eval runner (a later issue) writes `eval_reports` rows; this module only asks whether
a passing report exists for this release, its spec hash and this host. A report made for
another spec hash or on another host never counts.
"""

from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from appliance.trust.manifest import Manifest

MACHINE_ID = Path("/etc/machine-id")


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str
    report: dict[str, Any] | None = None  # the eval_reports row that counts, if one does


def spec_hash(manifest: Manifest) -> str:
    """sha256 over the signed eval files (cases, scorers, thresholds, sampling) and the GGUF."""
    parts = [
        f"{name}:{entry.sha256}"
        for name, entry in sorted(manifest.files.items())
        if name.startswith("eval/") or name == "model.gguf"
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def host_id() -> str:
    try:
        return MACHINE_ID.read_text().strip() or socket.gethostname()
    except OSError:
        return socket.gethostname()


def activation_gate(db: Database, release_id: int, release_spec_hash: str) -> GateDecision:
    """The one gate rule: the latest report on this host counts, if made for this spec hash."""
    rows = list(
        db.query(
            "SELECT * FROM eval_reports WHERE release_id = ? AND host = ? ORDER BY id DESC LIMIT 1",
            [release_id, host_id()],
        )
    )
    if not rows:
        return GateDecision(False, "no eval report for this release on this host")
    row = rows[0]
    if row["spec_hash"] != release_spec_hash:
        return GateDecision(
            False,
            f"the latest eval report was made for another spec hash "
            f"({row['spec_hash'][:16]}, not {release_spec_hash[:16]})",
        )
    if row["passed"]:
        return GateDecision(True, f"eval report {row['id']} passed", row)
    return GateDecision(False, f"the latest eval report ({row['id']}) failed", row)
