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

from sqlite_utils import Database

from appliance.trust.manifest import Manifest

MACHINE_ID = Path("/etc/machine-id")


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str
    report_id: int | None = None


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
    reports = list(
        db.query(
            "SELECT id, spec_hash, passed FROM eval_reports WHERE release_id = ? AND host = ?"
            " ORDER BY id DESC",
            [release_id, host_id()],
        )
    )
    for report in reports:
        if report["spec_hash"] == release_spec_hash:
            if report["passed"]:
                return GateDecision(True, f"eval report {report['id']} passed", report["id"])
            return GateDecision(False, f"the latest eval report ({report['id']}) failed")
    if reports:
        return GateDecision(False, "eval reports exist only for another spec hash")
    return GateDecision(False, "no eval report for this release on this host")
