"""Evaluate an installed release and judge its gate: the functions the CLI and the demo call."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.errors import GateError, GateFailed, UsageError
from appliance.evals.report import build_report, exit_code, write_reports
from appliance.evals.runner import (
    CaseResult,
    Progress,
    Routing,
    RunResult,
    run_in_process,
    run_over_http,
)
from appliance.evals.spec import EvalSpec, load_spec
from appliance.retrieval.corpus import CORPUS_DIR, corpus_hash, load_corpus
from appliance.retrieval.index import Index, build_index
from appliance.retrieval.quality import judge_groundedness, judge_retrieval
from appliance.serve.config import ServiceOptions, ServingConfig
from appliance.serve.localpath import open_cold_path
from appliance.serve.policy import RoutingPolicy
from appliance.store.gate import host_id
from appliance.store.records import Release
from appliance.store.releases import ReleaseStore
from appliance.store.routing import routing_state, targets


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
    with routing_for(store, release) as routing:
        if url:  # refused unless the service serves exactly these signed bytes
            prices = {
                f"cold:{c.target.name}": c.target.cost_per_1k_tokens for c in routing.cold_paths
            }
            run = run_over_http(
                spec, url, api_key, release.ref, release.manifest_sha256, progress, prices
            )
        else:
            run = run_in_process(spec, Path(release.path), progress, routing)
    compared = None
    if baseline is not None:
        with routing_for(store, baseline) as routing:
            compared = (baseline.ref, run_in_process(spec, Path(baseline.path), progress, routing))
    retrieval = judge_release_retrieval(spec, Path(release.path))
    groundedness = judge_release_groundedness(spec, run, Path(release.path))
    report = build_report(
        spec,
        run,
        release.ref,
        release.manifest_sha256,
        release.spec_hash,
        host_id(),
        compared,
        retrieval,
        groundedness,
    )
    files = write_reports(
        report, store.paths.state_dir / "reports" / release.name / release.version
    )
    report_id = store.record_eval_report(release, report["gate"]["passed"], json.dumps(report))
    return Evaluation(report, files, report_id)


def judge_release_retrieval(spec: EvalSpec, release_dir: Path) -> dict[str, Any] | None:
    """The spec's retrieval cases on an index of the (verified) release's signed corpus,
    built the way the installer builds it; None when the spec has no retrieval cases. It is
    built afresh rather than read from the cache: the cache is not signed, and the gate
    judges only what was verified (a build takes milliseconds)."""
    if spec.retrieval is None:
        return None
    corpus = release_dir / CORPUS_DIR
    with tempfile.TemporaryDirectory(prefix="retrieval-") as work:
        path = Path(work) / "index.sqlite"
        build_index(load_corpus(corpus), path)
        index = Index(path)
        try:
            judged = judge_retrieval(index, list(spec.retrieval.cases), spec.retrieval.k)
        finally:
            index.close()
    return {**judged, "minimums": spec.retrieval.minimums(), "corpus_sha256": corpus_hash(corpus)}


def judge_release_groundedness(
    spec: EvalSpec, run: RunResult, release_dir: Path
) -> dict[str, Any] | None:
    """How much of each answer that retrieved is in its passages (the release's verified
    corpus, by id); None when no case retrieved."""
    answers = [(c.id, c.output, list(c.retrieved)) for c in run.cases if c.retrieved is not None]
    if not answers:
        return None
    passages = {
        p.id: f"[{p.id}] {p.title}\n{p.text}" for p in load_corpus(release_dir / CORPUS_DIR)
    }
    minimum = spec.retrieval.min_groundedness if spec.retrieval is not None else None
    return judge_groundedness(answers, passages, minimum)


@contextmanager
def routing_for(store: ReleaseStore, release: Release) -> Iterator[Routing]:
    """How the service would route the release's requests now: its signed policy, the
    admin's overrides and the registered cold paths (a release target is verified and
    loaded here, one slot); all closed when the block ends."""
    signed = ServingConfig.from_release_dir(Path(release.path)).routing_policy()
    routing = Routing(signed)
    try:
        with store.reading() as db:
            routing.policy = signed.with_overrides(routing_state(db).policy)
            options = ServiceOptions(slots=1, max_queue=64)
            for target in targets(db):
                routing.cold_paths.append(open_cold_path(target, store, db, options))
        yield routing
    finally:
        for cold in routing.cold_paths:
            cold.close()


def calibrate_confidence(
    plan: EvalPlan, rate: float, progress: Progress | None = None
) -> dict[str, Any]:
    """The min_mean_logprob under which `rate` of the planned release's eval cases fall: each case
    runs here (no cold path) with its confidence scored, and the threshold is the value at
    that quantile, as RouteLLM calibrates its router on a labelled set. Also how often the
    cases it would escalate fail, against those it would keep: a threshold that escalates
    the failures is worth its cost."""
    if not 0 < rate < 1:
        raise UsageError("--rate must be between 0 and 1 (the share of requests to escalate)")
    release = plan.release  # verified by plan_evaluation
    scoring = Routing(RoutingPolicy(min_mean_logprob=-float("inf")))  # scores, never escalates
    run = run_in_process(plan.spec, Path(release.path), progress, scoring)
    scored = sorted(
        (c for c in run.cases if c.mean_logprob is not None), key=lambda c: c.mean_logprob
    )
    if not scored:
        raise GateError(f"{release.ref}: no eval case generated a token to score")
    cut = min(len(scored) - 1, round(rate * len(scored)))
    threshold = scored[cut].mean_logprob
    escalated, kept = scored[:cut], scored[cut:]
    return {
        "release": release.ref,
        "cases": len(scored),
        "target_rate": rate,
        "min_mean_logprob": threshold,
        "escalation_rate": len(escalated) / len(scored),
        "failure_rate_escalated": _failure_rate(escalated),
        "failure_rate_kept": _failure_rate(kept),
        "mean_logprob": {
            "min": scored[0].mean_logprob,
            "median": scored[len(scored) // 2].mean_logprob,
            "max": scored[-1].mean_logprob,
        },
    }


def _failure_rate(cases: list[CaseResult]) -> float | None:
    return sum(not c.passed for c in cases) / len(cases) if cases else None


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
