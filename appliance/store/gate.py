"""The activation gate: a release may serve only after its frozen eval spec passed here.

The eval runner writes `eval_reports` rows; this module only asks whether a passing report
exists for this host and the release's exact signed content: its manifest digest (the
sha256 of the Statement its signatures cover), never a row id or a name that a removed or
re-built release could share. A report made on another host, or for another spec hash,
never counts.
"""

from __future__ import annotations

import hashlib
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from appliance.store.ledger import report_fingerprint
from appliance.trust.manifest import Manifest

MACHINE_ID = Path("/etc/machine-id")


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str
    report: dict[str, Any] | None = None  # the eval_reports row that counts, if one does


def spec_hash(manifest: Manifest) -> str:
    """sha256 over every signed file that changes behaviour: the eval files (cases, scorers,
    thresholds, sampling), the GGUF, serving.json (chat template, sampling, limits) and any
    file added later; only the cards (prose) are left out."""
    parts = [
        f"{name}:{entry.sha256}"
        for name, entry in sorted(manifest.files.items())
        if not name.startswith("cards/")
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _audited(db: Database, row: dict[str, Any]) -> bool:
    """A report counts only as the store recorded it: its audit row names the same content."""
    logged = db.query(
        "SELECT details FROM audit WHERE action = 'eval' AND json_extract(details, '$.report') = ?",
        [row["id"]],
    )
    fingerprint = report_fingerprint(row)
    return any(
        {k: json.loads(r["details"]).get(k) for k in fingerprint} == fingerprint for r in logged
    )


def host_id() -> str:
    try:
        return MACHINE_ID.read_text().strip() or socket.gethostname()
    except OSError:
        return socket.gethostname()


def activation_gate(db: Database, manifest_sha256: str, release_spec_hash: str) -> GateDecision:
    """The one gate rule: the latest report on this host for these exact signed bytes
    counts, if it was made for this spec hash."""
    rows = list(
        db.query(
            "SELECT * FROM eval_reports WHERE manifest_sha256 = ? AND host = ?"
            " ORDER BY id DESC LIMIT 1",
            [manifest_sha256, host_id()],
        )
    )
    if not rows:
        return GateDecision(False, "no eval report for this release on this host")
    row = rows[0]
    if not _audited(db, row):
        return GateDecision(
            False, f"eval report {row['id']} is not the one the audit log records; it never counts"
        )
    if row["spec_hash"] != release_spec_hash:
        return GateDecision(
            False,
            f"the latest eval report was made for another spec hash "
            f"({row['spec_hash'][:16]}, not {release_spec_hash[:16]})",
        )
    if row["passed"]:
        return GateDecision(True, f"eval report {row['id']} passed", row)
    verdict = json.loads(row["report"]).get("gate", {})
    if not verdict.get("failures") and verdict.get("inconclusive"):
        return GateDecision(
            False,
            f"the latest eval report ({row['id']}) is inconclusive on latency and cost "
            "(the host was busy); rerun `appliance eval run` on a quiet host",
            row,
        )
    return GateDecision(False, f"the latest eval report ({row['id']}) failed", row)
