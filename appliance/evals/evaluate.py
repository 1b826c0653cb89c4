"""Evaluate an installed release and judge its gate: the functions the CLI and the demo call."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.errors import GateError, GateFailed
from appliance.evals.report import build_report, exit_code, write_reports
from appliance.evals.runner import Progress, run_in_process, run_over_http
from appliance.evals.spec import EvalSpec, load_spec
from appliance.store.gate import host_id
from appliance.store.records import Release
from appliance.store.releases import ReleaseStore


@dataclass(frozen=True)
class EvalPlan:
    """A candidate and its baseline, both re-verified, and the spec read from the
    verified candidate: what an evaluation will run."""

    release: Release
    baseline: Release | None
    spec: EvalSpec

    @property
    def case_runs(self) -> int:
        """How many case runs the evaluation makes (for progress bars)."""
        return len(self.spec.cases) * (2 if self.baseline else 1)


def plan_evaluation(store: ReleaseStore, ref: str, baseline_ref: str | None = "active") -> EvalPlan:
    """Verify the candidate (and the baseline) first: nothing is read from a release
    directory, the spec included, before its files and signatures check out."""
    release, baseline = releases_to_run(store, ref, baseline_ref)
    store.verify_installed(release)
    if baseline is not None:
        store.verify_installed(baseline)
    return EvalPlan(release, baseline, load_spec(Path(release.path)))


@dataclass(frozen=True)
class Evaluation:
    report: dict[str, Any]
    files: dict[str, Path]
    report_id: int


def evaluate_release(
    store: ReleaseStore,
    plan: EvalPlan,
    url: str | None = None,
    api_key: str = "",
    progress: Progress | None = None,
) -> Evaluation:
    """Run the release's frozen spec (in-process, or against the service at `url`), compare
    with the baseline (default: the active release) on the same cases, store the report."""
    release, baseline, spec = plan.release, plan.baseline, plan.spec
    if url:  # refused unless the service serves exactly these signed bytes
        run = run_over_http(spec, url, api_key, release.ref, release.manifest_sha256, progress)
    else:
        run = run_in_process(spec, Path(release.path), progress)
    compared = None
    if baseline is not None:
        compared = (baseline.ref, run_in_process(spec, Path(baseline.path), progress))
    report = build_report(
        spec, run, release.ref, release.manifest_sha256, release.spec_hash, host_id(), compared
    )
    files = write_reports(
        report, store.paths.state_dir / "reports" / release.name / release.version
    )
    report_id = store.record_eval_report(release, report["gate"]["passed"], json.dumps(report))
    return Evaluation(report, files, report_id)


def releases_to_run(
    store: ReleaseStore, ref: str, baseline_ref: str | None
) -> tuple[Release, Release | None]:
    """The candidate and its baseline ("active": the active release, unless that is the
    candidate itself or nothing is active; None: no baseline)."""
    db = store.open_db()
    try:
        release = store.release(db, ref)
        if baseline_ref is None:
            return release, None
        if baseline_ref == "active":
            active = store.release_by_id(db, store.state(db).active_id)
            return release, active if active is not None and active.id != release.id else None
        return release, store.release(db, baseline_ref)
    finally:
        db.close()


def judge_gate(store: ReleaseStore, ref: str) -> dict[str, Any]:
    """The report that counts for this release on this host (the same rule activation
    uses); raise when there is none, or when it failed a criterion."""
    db = store.open_db()
    try:
        decision = store.gate(db, store.release(db, ref))
    finally:
        db.close()
    if decision.report is None:
        raise GateError(f"{ref}: {decision.reason}; run `appliance eval run {ref}`")
    report = json.loads(decision.report["report"])
    verdict = report["gate"]
    if verdict["failures"]:
        raise GateFailed(
            f"{ref} fails its gate: "
            + "; ".join(f"{f['criterion']} ({f['detail']})" for f in verdict["failures"]),
            exit_code(verdict),
        )
    if verdict.get("inconclusive"):
        names = ", ".join(f["criterion"] for f in verdict["inconclusive"])
        raise GateFailed(
            f"{ref} has not passed its gate yet: {names} inconclusive "
            f"({verdict['inconclusive'][0]['detail']})",
            exit_code(verdict),
        )
    return report
