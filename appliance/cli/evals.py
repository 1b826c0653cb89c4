"""`appliance eval`: run a release's frozen eval spec and judge its activation gate."""

from __future__ import annotations

import click

from appliance.cli.common import emit_json, json_option, pass_store, progress_bar
from appliance.evals.evaluate import evaluate_release, judge_gate, plan_evaluation
from appliance.evals.report import exit_code, verdict_word
from appliance.store.releases import ReleaseStore


@click.group(name="eval")
def eval_group() -> None:
    """Run eval specs and judge the activation gate (quality, defects, p95, cost, regression)."""


@eval_group.command()
@click.argument("ref", metavar="NAME@VERSION")
@click.option(
    "--baseline",
    metavar="NAME@VERSION",
    default="active",
    show_default=True,
    help="Compare against this release on the same cases ('none' to skip).",
)
@click.option("--url", help="Run against this running service instead of in-process.")
@click.option(
    "--api-key",
    envvar="APPLIANCE_API_KEY",
    default="",
    help="API key for --url (or $APPLIANCE_API_KEY).",
)
@json_option
@click.pass_context
@pass_store
def run(
    store: ReleaseStore,
    ctx: click.Context,
    ref: str,
    baseline: str,
    url: str | None,
    api_key: str,
    as_json: bool,
) -> None:
    """Run NAME@VERSION's eval spec on this host, store and write the report.

    The spec's [load] section says how many requests are in flight. Exits 0 when the
    gate passes, else with the first failed criterion's code: 40 suite pass rate,
    41 defect rate, 42 p95 latency, 43 cost per success, 44 regression, 46 retrieval
    (precision@k, recall@k or MRR under the spec's minimum); 45 when quality passed but
    latency and cost are inconclusive (other processes kept the host busy: rerun on a
    quiet host).
    """
    baseline_ref = None if baseline == "none" else baseline
    plan = plan_evaluation(store, ref, baseline_ref)
    total = plan.case_runs
    with progress_bar(total, "evaluating", enabled=not as_json) as update:
        evaluation = evaluate_release(store, plan, url, api_key, update)
    report = evaluation.report
    code = exit_code(report["gate"])
    if as_json:
        emit_json(
            {
                "ok": code == 0,
                "report_id": evaluation.report_id,
                "files": {k: str(v) for k, v in evaluation.files.items()},
                "gate": report["gate"],
                "overall": report["overall"],
            }
        )
        ctx.exit(code)
    _print_summary(report, evaluation.files)
    if code:
        judge_gate(store, ref)  # raises with the first failed criterion's exit code, or 45


@eval_group.command()
@click.argument("ref", metavar="NAME@VERSION")
@json_option
@pass_store
def gate(store: ReleaseStore, ref: str, as_json: bool) -> None:
    """Judge NAME@VERSION's gate from its latest report on this host (no new run).

    Exit 0: passed. 23: no report, or one for another spec hash. 40-44: the first
    failed criterion, 45: latency and cost inconclusive (see `eval run`).
    """
    report = judge_gate(store, ref)
    if as_json:
        emit_json(
            {
                "ok": True,
                "release": ref,
                "spec_hash": report["spec_hash"],
                "created": report["created"],
            }
        )
    else:
        click.echo(
            f"{ref}: gate PASSED (report of {report['created']}, spec {report['spec_hash'][:16]})"
        )


def _print_summary(report: dict, files: dict) -> None:
    overall = report["overall"]
    verdict = verdict_word(report["gate"])
    click.echo(
        f"{report['release']}: gate {verdict}; {overall['passed']}/{overall['n']} cases "
        f"passed; p95 {report['latency_ms']['p95']:.0f} ms at {report['load']['clients']} "
        f"in flight; {report['tokens_per_second']:.1f} tok/s; {report['wall_seconds']:.1f} s; "
        f"host busy {report['host_state']['busy_share']:.0%}"
    )
    for name, suite in report["suites"].items():
        low, high = suite["wilson_95"]
        click.echo(
            f"  {name:<12} {suite['passed']}/{suite['n']} = {suite['pass_rate']:.2f} "
            f"[{low:.2f}, {high:.2f}] (min {suite['min_pass_rate']:.2f})"
        )
    for failure in report["gate"]["failures"]:
        click.echo(f"  FAIL {failure['criterion']}: {failure['detail']}")
    for item in report["gate"].get("inconclusive", []):
        click.echo(f"  INCONCLUSIVE {item['criterion']}: {item['detail']}")
    click.echo(f"  reports: {files['markdown']} (.json, .xml beside it)")
