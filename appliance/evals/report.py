"""Eval reports: per-suite pass rates with Wilson intervals, defect rates by tag, latency
percentiles, tokens/s, cost per successful task, the paired regression against a baseline,
and the gate verdict; written as JSON (machines), Markdown (people) and JUnit XML (CI)."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from xml.etree import ElementTree

from appliance.evals.spec import EvalSpec

if TYPE_CHECKING:  # the console reads reports without loading the engine
    from appliance.evals.runner import CaseResult, RunResult
from appliance.evals.stats import (
    mcnemar_exact,
    paired_bootstrap_interval,
    percentile,
    percentile_interval,
    wilson_interval,
)

# Gate criteria in the order they are checked; the exit code of `eval gate` is the first
# failing one's (all failures are listed in the report).
CRITERIA = {
    "suite_pass_rate": 40,
    "defect_rate": 41,
    "p95_latency": 42,
    "cost_per_success": 43,
    "regression": 44,
    "retrieval": 46,
    "groundedness": 47,
}
# Latency and cost were measured on a host other processes kept busy: not judged.
INCONCLUSIVE_EXIT = 45


def build_report(
    spec: EvalSpec,
    run: RunResult,
    release: str,
    manifest_sha256: str,
    spec_hash: str,
    host: str,
    baseline: tuple[str, RunResult] | None = None,
    retrieval: dict[str, Any] | None = None,
    groundedness: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report of a run; `retrieval` is appliance.retrieval.quality's judgement of the
    spec's retrieval cases (with their "minimums"), and `groundedness` its judgement of the
    answers of cases that retrieved: both kept apart from answer quality."""
    cases = run.cases
    successes = sum(c.passed for c in cases)
    latencies = [c.latency_ms for c in cases]
    ttfts = [c.ttft_ms for c in cases if c.ttft_ms is not None]
    cpu_cost = run.cpu_seconds / 3600 * spec.gates.cost_per_cpu_hour
    cost = cpu_cost + sum(c.cold_cost for c in cases)  # what the routed system cost
    report: dict[str, Any] = {
        "release": release,
        "manifest_sha256": manifest_sha256,  # the exact signed content that was measured
        "spec": spec.name,
        "spec_hash": spec_hash,
        "host": host,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "overall": {**_rate(successes, len(cases)), "weighted_pass_rate": _weighted(spec, cases)},
        "suites": {
            s.name: {
                **_rate(
                    sum(c.passed for c in cases if c.suite == s.name),
                    sum(1 for c in cases if c.suite == s.name),
                ),
                "min_pass_rate": s.min_pass_rate,
            }
            for s in spec.suites
        },
        "defect_rates": _defect_rates(cases),
        "load": {"clients": spec.load.clients, "max_busy_share": spec.load.max_busy_share},
        "host_state": run.host.as_dict(),
        "latency_ms": {
            "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95),
            "p99": percentile(latencies, 99),
            "bootstrap_95": {
                f"p{q}": list(percentile_interval(latencies, q, seed=spec.seed))
                for q in (50, 95, 99)
            },
        },
        "ttft_ms": {
            "p50": percentile(ttfts, 50),
            "p95": percentile(ttfts, 95),
            "p99": percentile(ttfts, 99),
        },
        "tokens_per_second": sum(c.completion_tokens for c in cases) / run.wall_seconds,
        "wall_seconds": run.wall_seconds,
        "cpu_seconds": run.cpu_seconds,
        "cost": cost,
        "cost_per_success": cost / successes if successes else None,
        "routing": _routing(cases, cpu_cost),
        "safety": _safety(cases),
        "retrieval": retrieval,
        "groundedness": groundedness,
        "regression": _regression(spec, cases, baseline),
        "cases": [asdict(c) for c in cases],
    }
    report["gate"] = gate_verdict(spec, report)
    return report


def _routing(cases: list[CaseResult], cpu_cost: float) -> dict[str, Any]:
    """Escalations by reason, and each route's cases, successes and cost per success: the
    release's route costs the run's CPU (every case it generated, escalated ones too), a
    cold path the tokens it was paid for."""
    escalations = Counter(c.escalation for c in cases if c.escalation is not None)
    routes: dict[str, dict[str, Any]] = {}
    for route in sorted({"hot", *(c.route for c in cases)}):
        answered = [c for c in cases if c.route == route]
        passed = sum(c.passed for c in answered)
        cost = cpu_cost if route == "hot" else sum(c.cold_cost for c in answered)
        routes[route] = {
            "cases": len(answered),
            "passed": passed,
            "cost": cost,
            "cost_per_success": cost / passed if passed else None,
        }
    return {
        "escalation_rate": sum(escalations.values()) / len(cases) if cases else 0.0,
        "escalations": dict(sorted(escalations.items())),
        # escalated, but the release answered: no cold path registered, or none answered
        "not_escalated": sum(1 for c in cases if c.escalation is not None and c.route == "hot"),
        "routes": routes,
    }


def _safety(cases: list[CaseResult]) -> dict[str, Any]:
    """What the release's safety policy did over the run, by direction, detector and
    action, and how many cases it refused or stopped (their outputs were scored as sent)."""
    counted: Counter[tuple[str, str, str]] = Counter()
    for case in cases:
        for a in case.guard:
            counted[(a.direction, a.detector, a.action)] += a.count
    return {
        "findings": [
            {"direction": d, "detector": detector, "action": action, "count": n}
            for (d, detector, action), n in sorted(counted.items())
        ],
        "refused": sum(1 for c in cases if any(a.action == "deny" for a in c.guard)),
        "stopped": sum(1 for c in cases if any(a.action == "stop" for a in c.guard)),
    }


def _safety_line(safety: dict[str, Any] | None) -> str:
    if not safety or not safety["findings"]:
        return "- Safety policy: no findings"
    found = ", ".join(
        f"{f['direction']} {f['detector']} {f['action']} {f['count']}" for f in safety["findings"]
    )
    return (
        f"- Safety policy: {found}; {safety['refused']} request(s) refused, "
        f"{safety['stopped']} answer(s) stopped"
    )


RETRIEVAL_MEASURES = (
    ("precision_at_k", "precision@k"),
    ("recall_at_k", "recall@k"),
    ("mrr", "MRR"),
)


def _retrieval_line(retrieval: dict[str, Any] | None) -> str:
    if not retrieval:
        return "- Retrieval: not measured (the spec has no retrieval cases)"
    minimums = retrieval.get("minimums", {})
    shown = ", ".join(
        f"{label} {retrieval[key]:.2f}" + (f" (min {minimums[key]:.2f})" if key in minimums else "")
        for key, label in RETRIEVAL_MEASURES
    )
    return f"- Retrieval, {retrieval['cases']} cases at k = {retrieval['k']}: {shown}"


def _groundedness_line(grounded: dict[str, Any] | None) -> str:
    if not grounded:
        return "- Groundedness: not measured (no case retrieved a passage)"
    minimum = grounded["minimum"]
    floor = f" (min {minimum:.2f})" if minimum is not None else ""
    apart = grounded["without_passages"]
    none_found = f"; {apart} retrieved nothing" if apart else ""
    return (
        f"- Groundedness, {grounded['cases']} answers that retrieved: "
        f"{grounded['groundedness']:.2f} of their words are in the passages{floor}{none_found}"
    )


def _routing_line(routing: dict[str, Any] | None) -> str:
    if not routing:
        return "- Routing: not measured"
    reasons = ", ".join(f"{k} {v}" for k, v in routing["escalations"].items()) or "none"
    routes = "; ".join(
        f"{name}: {r['passed']}/{r['cases']} passed, cost per success "
        f"{_number(r['cost_per_success'])}"
        for name, r in routing["routes"].items()
    )
    stayed = routing["not_escalated"]
    held = f" ({stayed} answered here: no cold path answered)" if stayed else ""
    return (
        f"- Routing: escalation rate {routing['escalation_rate']:.2f} ({reasons}){held}; {routes}"
    )


def _rate(passed: int, n: int) -> dict[str, Any]:
    low, high = wilson_interval(passed, n)
    return {
        "n": n,
        "passed": passed,
        "pass_rate": passed / n if n else 0.0,
        "wilson_95": [low, high],
    }


def _weighted(spec: EvalSpec, cases: list[CaseResult]) -> float:
    """Pass rate with each case counted by its `weight` (1 unless the case says otherwise)."""
    weights = {case.id: case.weight for case in spec.cases}
    total = sum(weights[c.id] for c in cases)
    return sum(weights[c.id] for c in cases if c.passed) / total if total else 0.0


def _defect_rates(cases: list[CaseResult]) -> dict[str, dict[str, Any]]:
    tags = sorted({t for c in cases for t in c.tags})
    rates = {}
    for tag in tags:
        tagged = [c for c in cases if tag in c.tags]
        defects = sum(not c.passed for c in tagged)
        rates[tag] = {"n": len(tagged), "defects": defects, "rate": defects / len(tagged)}
    return rates


def _regression(
    spec: EvalSpec, cases: list[CaseResult], baseline: tuple[str, RunResult] | None
) -> dict[str, Any] | None:
    if baseline is None:
        return None
    name, run = baseline
    before = {c.id: c.passed for c in run.cases}
    paired = [(c.passed, before[c.id]) for c in cases if c.id in before]
    if not paired:
        return None
    now, then = [p[0] for p in paired], [p[1] for p in paired]
    to_fail = [c.id for c in cases if c.id in before and before[c.id] and not c.passed]
    to_pass = [c.id for c in cases if c.id in before and not before[c.id] and c.passed]
    difference = (sum(now) - sum(then)) / len(paired)
    p_value = mcnemar_exact(len(to_fail), len(to_pass))
    return {
        "baseline": name,
        "paired_cases": len(paired),
        "difference": difference,
        "bootstrap_95": list(paired_bootstrap_interval(now, then, seed=spec.seed)),
        "mcnemar_p": p_value,
        "flipped_to_fail": to_fail,
        "flipped_to_pass": to_pass,
        "significant_regression": p_value < spec.gates.alpha
        and difference < -spec.gates.non_inferiority_margin,
    }


def gate_verdict(spec: EvalSpec, report: dict[str, Any]) -> dict[str, Any]:
    """Failed criteria, and those that could not be judged (latency and cost on a host that
    other processes kept busy). A gate passes only with neither."""
    gates, failures = spec.gates, []
    for name, suite in report["suites"].items():
        if suite["pass_rate"] < suite["min_pass_rate"]:
            failures.append(
                {
                    "criterion": "suite_pass_rate",
                    "detail": f"{name}: {suite['pass_rate']:.2f} < {suite['min_pass_rate']:.2f}",
                }
            )
    for tag, limit in gates.max_defect_rate.items():
        rate = report["defect_rates"].get(tag, {"rate": 0.0})["rate"]
        if rate > limit:
            failures.append({"criterion": "defect_rate", "detail": f"{tag}: {rate:.2f} > {limit}"})
    p95 = report["latency_ms"]["p95"]
    if gates.max_p95_latency_ms is not None and p95 is not None and p95 > gates.max_p95_latency_ms:
        failures.append(
            {
                "criterion": "p95_latency",
                "detail": f"{p95:.0f} ms > {gates.max_p95_latency_ms:.0f} ms",
            }
        )
    cost = report["cost_per_success"]
    if gates.max_cost_per_success is not None and (
        cost is None or cost > gates.max_cost_per_success
    ):
        spent = "no case succeeded" if cost is None else _number(cost)
        failures.append(
            {
                "criterion": "cost_per_success",
                "detail": f"{spent} > {_number(gates.max_cost_per_success)}",
            }
        )
    regression = report["regression"]
    if regression and regression["significant_regression"]:
        failures.append(
            {
                "criterion": "regression",
                "detail": f"{regression['difference']:+.2f} vs {regression['baseline']} "
                f"(McNemar p = {regression['mcnemar_p']:.4f})",
            }
        )
    retrieval = report.get("retrieval") or {}
    for measure, minimum in retrieval.get("minimums", {}).items():
        if retrieval[measure] < minimum:
            failures.append(
                {
                    "criterion": "retrieval",
                    "detail": f"{measure} {retrieval[measure]:.2f} < {minimum:.2f}",
                }
            )
    grounded = report.get("groundedness") or {}
    if grounded.get("minimum") is not None and grounded["groundedness"] < grounded["minimum"]:
        failures.append(
            {
                "criterion": "groundedness",
                "detail": f"{grounded['groundedness']:.2f} < {grounded['minimum']:.2f} over "
                f"{grounded['cases']} answers that retrieved",
            }
        )
    failures.sort(key=lambda f: CRITERIA[f["criterion"]])
    inconclusive = []
    busy = report["host_state"]["busy_share"]
    if busy > spec.load.max_busy_share:
        reason = (
            f"other processes used {busy:.0%} of the host's CPU (limit "
            f"{spec.load.max_busy_share:.0%}): rerun on a quiet host"
        )
        host_sensitive = {
            "p95_latency": gates.max_p95_latency_ms,
            "cost_per_success": gates.max_cost_per_success,
        }
        failures = [f for f in failures if f["criterion"] not in host_sensitive]
        inconclusive = [
            {"criterion": name, "detail": reason}
            for name, limit in host_sensitive.items()
            if limit is not None
        ]
    return {
        "passed": not failures and not inconclusive,
        "failures": failures,
        "inconclusive": inconclusive,
    }


def exit_code(verdict: dict[str, Any]) -> int:
    """0, the first failed criterion's code, or INCONCLUSIVE_EXIT."""
    if verdict["failures"]:
        return CRITERIA[verdict["failures"][0]["criterion"]]
    return INCONCLUSIVE_EXIT if verdict.get("inconclusive") else 0


def write_reports(report: dict[str, Any], directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    stem = report["created"].replace(":", "")
    paths = {
        "json": directory / f"{stem}.json",
        "markdown": directory / f"{stem}.md",
        "junit": directory / f"{stem}.xml",
    }
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["markdown"].write_text(markdown(report))
    paths["junit"].write_bytes(junit_xml(report))
    return paths


def markdown(report: dict[str, Any]) -> str:
    gate = report["gate"]
    lines = [
        f"# Eval report: {report['release']}",
        "",
        f"- Verdict: **{verdict_word(gate)}**",
        f"- Spec: {report['spec']} (`{report['spec_hash'][:16]}`), host `{report['host'][:12]}`,"
        f" {report['created']}",
        f"- Measured: the signed content with manifest `{report['manifest_sha256']}`",
        f"- Overall: {_fmt_rate(report['overall'])}",
        f"- Load: {report['load']['clients']} request(s) in flight; other processes used "
        f"{report['host_state']['busy_share']:.0%} of the host's CPU "
        f"(limit {report['load']['max_busy_share']:.0%}), load average "
        f"{report['host_state']['load_1m']:.2f}",
        f"- Latency p50/p95/p99: {_ms(report['latency_ms'])} (p95 bootstrap 95% "
        f"{_ms_pair(report['latency_ms']['bootstrap_95']['p95'])}); time to first token: "
        f"{_ms(report['ttft_ms'])}",
        f"- {report['tokens_per_second']:.1f} tokens/s; {report['cpu_seconds']:.2f} CPU-s; "
        f"cost per successful case {_number(report['cost_per_success'])}",
        _routing_line(report.get("routing")),
        _safety_line(report.get("safety")),
        _retrieval_line(report.get("retrieval")),
        _groundedness_line(report.get("groundedness")),
        "",
        "| suite | pass rate (95% Wilson) | minimum |",
        "|---|---|---|",
    ]
    for name, suite in report["suites"].items():
        lines.append(f"| {name} | {_fmt_rate(suite)} | {suite['min_pass_rate']:.2f} |")
    if report["defect_rates"]:
        lines += ["", "| tag | defects |", "|---|---|"]
        for tag, d in report["defect_rates"].items():
            lines.append(f"| {tag} | {d['defects']}/{d['n']} ({d['rate']:.2f}) |")
    regression = report["regression"]
    if regression:
        lines += [
            "",
            f"## Against {regression['baseline']}",
            "",
            f"- Difference {regression['difference']:+.3f}, bootstrap 95% "
            f"[{regression['bootstrap_95'][0]:+.3f}, {regression['bootstrap_95'][1]:+.3f}],"
            f" exact McNemar p = {regression['mcnemar_p']:.4f}",
            f"- Flipped to fail: {', '.join(regression['flipped_to_fail']) or 'none'}",
            f"- Flipped to pass: {', '.join(regression['flipped_to_pass']) or 'none'}",
        ]
    if gate["failures"]:
        lines += ["", "## Gate failures", ""]
        lines += [f"- {f['criterion']}: {f['detail']}" for f in gate["failures"]]
    if gate.get("inconclusive"):
        lines += ["", "## Not judged (inconclusive)", ""]
        lines += [f"- {f['criterion']}: {f['detail']}" for f in gate["inconclusive"]]
    failed = [c for c in report["cases"] if not c["passed"]]
    if failed:
        lines += ["", "## Failed cases", ""]
        lines += [
            f"- `{c['id']}`: {'; '.join(c['failures'])} (output: {c['output'][:80]!r})"
            for c in failed
        ]
    return "\n".join(lines) + "\n"


def junit_xml(report: dict[str, Any]) -> bytes:
    root = ElementTree.Element("testsuites", name=f"eval {report['release']}")
    for name in report["suites"]:
        cases = [c for c in report["cases"] if c["suite"] == name]
        suite = ElementTree.SubElement(
            root,
            "testsuite",
            name=name,
            tests=str(len(cases)),
            failures=str(sum(not c["passed"] for c in cases)),
        )
        for case in cases:
            element = ElementTree.SubElement(
                suite,
                "testcase",
                classname=name,
                name=case["id"],
                time=f"{case['latency_ms'] / 1000:.3f}",
            )
            if not case["passed"]:
                failure = ElementTree.SubElement(
                    element, "failure", message=_xml_text("; ".join(case["failures"]))
                )
                failure.text = _xml_text(case["output"])
    return ElementTree.tostring(root, encoding="utf-8", xml_declaration=True)


_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_text(text: str) -> str:
    """Model output may hold control characters that XML 1.0 cannot carry."""
    return _NOT_XML.sub("\ufffd", text)


def _fmt_rate(rate: dict[str, Any]) -> str:
    low, high = rate["wilson_95"]
    return f"{rate['passed']}/{rate['n']} = {rate['pass_rate']:.2f} [{low:.2f}, {high:.2f}]"


def _ms(values: dict[str, Any]) -> str:
    quantiles = (values[q] for q in ("p50", "p95", "p99"))
    return "/".join("-" if v is None else f"{v:.0f}" for v in quantiles) + " ms"


def _ms_pair(pair: list[float | None]) -> str:
    low, high = pair
    return "-" if low is None else f"[{low:.0f}, {high:.0f}] ms"


def _number(value: float | None) -> str:
    """A figure for people: 3.56e-05, not 3.560019841269841e-05."""
    return "-" if value is None else f"{value:.3g}"


def verdict_word(gate: dict[str, Any]) -> str:
    """PASSED, FAILED, or INCONCLUSIVE (nothing failed, but latency and cost went unjudged)."""
    if gate["failures"]:
        return "FAILED"
    return "INCONCLUSIVE" if gate.get("inconclusive") else "PASSED"
