"""Eval scorers and statistics against known values; the runner, reports and gate on real
releases (tiny model; Gemma for the regression gate, marked)."""

from __future__ import annotations

import importlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from xml.etree import ElementTree

import httpx
import pytest
from conftest import CASES, EASY_SPEC, write_bundle_dir, write_tiny_eval_bundle_dir
from prometheus_client.parser import text_string_to_metric_families
from serving import start_server
from tinymodel import write_tiny_gguf

from appliance.evals.scorers import SCORERS
from appliance.evals.stats import mcnemar_exact, paired_bootstrap_interval, wilson_interval
from appliance.guard.detectors import pii_findings
from appliance.paths import appliance_paths


def score(name: str, output: str, expected: dict | None = None, latency: float = 0.0) -> bool:
    return SCORERS[name](output, expected or {}, latency).passed


@pytest.mark.parametrize(
    ("name", "output", "expected", "passes"),
    [
        ("exact", " Paris ", {"text": "Paris"}, True),
        ("exact", "paris", {"text": "Paris"}, False),
        ("normalized_exact", "  PARÍS!! ", {"text": "paris"}, True),
        ("normalized_exact", "Lyon", {"text": "paris"}, False),
        ("contains", "It is Paris.", {"contains_all": ["paris", "is"]}, True),
        ("contains", "It is Lyon.", {"contains_any": ["Paris", "Rome"]}, False),
        ("contains", "It is Paris.", {"contains_none": ["Lyon"]}, True),
        ("contains", "It is Lyon.", {"contains_none": ["lyon"]}, False),
        ("regex", "id: 42", {"regex": r"id: \d+"}, True),
        ("regex", "id: x", {"regex": r"id: \d+"}, False),
        ("json_valid", 'Result: {"a": [1, 2]} done', {}, True),
        ("json_valid", "{a: 1}", {}, False),
        (
            "json_schema",
            '{"age": 7}',
            {
                "schema": {
                    "type": "object",
                    "required": ["age"],
                    "properties": {"age": {"type": "integer"}},
                }
            },
            True,
        ),
        (
            "json_schema",
            '{"age": "7"}',
            {"schema": {"properties": {"age": {"type": "integer"}}}},
            False,
        ),
        ("numeric", " = 4\n", {"number": 4}, True),
        ("numeric", "3.14159", {"number": 3.14, "tolerance": 0.01}, True),
        ("numeric", "about 5", {"number": 4, "tolerance": 0.5}, False),
        ("numeric", "no digits", {"number": 4}, False),
        ("refusal_expected", "I can't help with that.", {}, True),
        ("refusal_expected", "Sure, here it is.", {}, False),
        ("must_not_refuse", "Sure, here it is.", {}, True),
        ("must_not_refuse", "I'm unable to do that.", {}, False),
        ("pii_leak", "Contact us at the front desk.", {}, True),
        ("pii_leak", "Mail jane.roe@example.com today", {}, False),
        ("max_length", "short", {"max_chars": 10}, True),
        ("max_length", "far too long for it", {"max_chars": 10}, False),
        ("latency", "", {"max_latency_ms": 100}, True),
    ],
)
def test_scorers(name, output, expected, passes):
    assert score(name, output, expected, latency=50.0) is passes


def test_latency_scorer_fails_slow_cases():
    assert not score("latency", "", {"max_latency_ms": 100}, latency=250.0)


def test_pii_leak_scorer_uses_the_guard_detectors():
    text = (
        "card 4111-1111-1111-1111, IBAN DE89 3704 0044 0532 0130 00, "
        "call +1 415 555 0100, order 1234 5678 9012 3456"
    )
    found = {(text[f.start : f.end], f.detector) for f in pii_findings(text)}
    assert ("4111-1111-1111-1111", "card") in found
    assert ("DE89 3704 0044 0532 0130 00", "iban") in found
    assert ("+1 415 555 0100", "phone") in found
    assert not any("1234 5678" in matched for matched, _ in found)  # fails the Luhn check
    verdict = SCORERS["pii_leak"](text, {}, 0.0)
    assert not verdict.passed and "4111" not in verdict.reason  # says where, not what


def test_wilson_interval_known_values():
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.236593, abs=1e-6) and high == pytest.approx(0.763407, abs=1e-6)
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and high == pytest.approx(0.161125, abs=1e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_exact_mcnemar_known_values():
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024)
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 1024)
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 0) == 1.0


def test_paired_bootstrap_interval():
    same = [True, False] * 10
    assert paired_bootstrap_interval(same, same) == (0.0, 0.0)
    worse = [False] * 20
    low, high = paired_bootstrap_interval(worse, [True] * 20)
    assert low == high == -1.0
    mixed = paired_bootstrap_interval([True] * 15 + [False] * 5, [True] * 10 + [False] * 10)
    assert mixed == paired_bootstrap_interval([True] * 15 + [False] * 5, [True] * 10 + [False] * 10)
    assert mixed[0] < 0.25 < mixed[1]


# -- the runner and the gate on a real (tiny) release -----------------------------------


def tiny_release(
    cli,
    tmp_path: Path,
    model: Path,
    min_pass_rate: float,
    version: str,
    sequence: int,
    max_tokens: int = 256,
    cases: list[dict] = CASES,
    load: str = "",
    max_cost_per_success: float = 1.0,
) -> str:
    toml = write_tiny_eval_bundle_dir(
        tmp_path / f"src-{version}",
        model,
        (version, sequence),
        EASY_SPEC.format(min_pass_rate=min_pass_rate, max_cost_per_success=max_cost_per_success)
        + load,
        cases,
    )
    toml.write_text(toml.read_text().replace("max_tokens = 256", f"max_tokens = {max_tokens}"))
    return build_and_install(cli, toml, tmp_path, version)


def build_and_install(cli, toml: Path, tmp_path: Path, version: str) -> str:
    """Sign with the trusted test key, install, and return NAME@VERSION."""
    out = tmp_path / f"out-{version}"
    assert (
        cli("bundle", "build", toml, "--key", tmp_path / "keys/release.key", "--out", out)[0] == 0
    )
    assert cli("release", "install", out / f"demo-{version}.tar")[0] == 0
    return f"demo@{version}"


@pytest.fixture
def cli(run_cli, trusted_key):
    def run(*args):
        result = run_cli(*args, "--json")
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception  # a crash, not a reported error: show its traceback
        body = result.stdout.strip()
        return result.exit_code, json.loads(body[body.index("{") :]) if "{" in body else {}

    return run


def test_eval_run_writes_reports_and_opens_the_gate(cli, tmp_path, tiny_gguf):
    ref = tiny_release(cli, tmp_path, tiny_gguf, min_pass_rate=0.6, version="1.0.0", sequence=1)
    code, result = cli("eval", "run", ref)
    assert code == 0, result
    assert result["overall"]["n"] == 3
    assert result["gate"] == {"passed": True, "failures": [], "inconclusive": []}
    weights = {"short-1": 1, "short-2": 1, "paris": 3}
    report = json.loads(Path(result["files"]["json"]).read_text())
    assert report["spec_hash"] == cli("release", "show", ref)[1]["spec_hash"]
    assert report["suites"]["shape"]["wilson_95"][0] < report["suites"]["shape"]["pass_rate"]
    assert report["defect_rates"]["pii"] == {"n": 1, "defects": 0, "rate": 0.0}
    assert report["cost_per_success"] > 0 and report["latency_ms"]["p95"] > 0
    assert report["regression"] is None  # nothing active to compare with
    passed_weight = sum(weights[c["id"]] for c in report["cases"] if c["passed"])
    assert report["overall"]["weighted_pass_rate"] == pytest.approx(passed_weight / 5)
    assert "# Eval report: demo@1.0.0" in Path(result["files"]["markdown"]).read_text()
    junit = ElementTree.parse(result["files"]["junit"]).getroot()
    assert junit.find("testsuite").get("tests") == "3"
    assert cli("eval", "gate", ref)[0] == 0
    assert cli("release", "activate", ref)[0] == 0  # no --force: the gate passed
    assert [r["action"] for r in cli("audit", "list")[1]["rows"]][:2] == ["activate", "eval"]


def test_failing_suite_closes_the_gate_with_its_code(cli, tmp_path, tiny_gguf):
    ref = tiny_release(cli, tmp_path, tiny_gguf, min_pass_rate=1.0, version="1.0.0", sequence=1)
    code, result = cli("eval", "run", ref)
    assert code == 40 and result["gate"]["failures"][0]["criterion"] == "suite_pass_rate"
    assert cli("eval", "gate", ref)[0] == 40
    code, error = cli("release", "activate", ref)
    assert code == 23 and "failed" in error["error"]
    markdown = sorted((appliance_paths().state_dir / "reports/demo/1.0.0").glob("*.md"))[-1]
    assert "`paris`: contains" in markdown.read_text()


def test_a_cost_over_its_limit_fails_with_figures_people_read(cli, tmp_path, tiny_gguf):
    ref = tiny_release(cli, tmp_path, tiny_gguf, 0.0, "1.0.0", 1, max_cost_per_success=1e-12)
    code, result = cli("eval", "run", ref)
    assert code == 43
    detail = result["gate"]["failures"][0]["detail"]  # e.g. "3.56e-05 > 1e-12"
    assert re.fullmatch(r"\d(\.\d{1,2})?(e-\d+)? > 1e-12", detail), detail


def test_a_report_for_another_spec_hash_is_refused(cli, tmp_path, tiny_gguf):
    ref = tiny_release(cli, tmp_path, tiny_gguf, min_pass_rate=0.0, version="1.0.0", sequence=1)
    assert cli("eval", "run", ref)[0] == 0
    db = sqlite3.connect(appliance_paths().state_db)  # as if the hash's definition changed
    db.execute("UPDATE releases SET spec_hash = ? WHERE version = '1.0.0'", ["e" * 64])
    db.commit()
    code, error = cli("eval", "gate", ref)
    assert code == 23 and "another spec hash" in error["error"]
    assert cli("release", "activate", ref)[0] == 23


def test_a_removed_releases_verdict_is_not_inherited_by_a_reused_row_id(cli, tmp_path, tiny_gguf):
    """SQLite hands a removed release's row id to the next install; the verdict must not
    follow the id: reports name the signed content they judged and go with the release."""
    tiny_release(cli, tmp_path, tiny_gguf, min_pass_rate=0.0, version="1.0.0", sequence=1)
    judged = tiny_release(cli, tmp_path, tiny_gguf, min_pass_rate=0.0, version="2.0.0", sequence=2)
    assert cli("eval", "run", judged, "--baseline", "none")[0] == 0
    old_id = cli("release", "show", judged)[1]["id"]
    assert cli("release", "remove", judged)[0] == 0
    fresh = tiny_release(cli, tmp_path, tiny_gguf, min_pass_rate=0.0, version="3.0.0", sequence=3)
    shown = cli("release", "show", fresh)[1]
    assert shown["id"] == old_id, "the precondition: SQLite reused the row id"
    assert shown["gate"]["passed"] is False
    assert cli("eval", "gate", fresh)[0] == 23
    assert cli("release", "activate", fresh)[0] == 23
    removal = cli("audit", "list")[1]["rows"][1]
    assert removal["action"] == "remove" and removal["details"]["reports_dropped"] == 1
    assert cli("audit", "verify")[0] == 0


def test_serving_json_is_part_of_the_spec_hash(cli, tmp_path, tiny_gguf):
    """Same model and eval files, another serving.json (template, sampling, limits): another
    spec hash, so one release's verdict can never stand for the other."""
    one = tiny_release(cli, tmp_path, tiny_gguf, 0.0, "1.0.0", 1, max_tokens=256)
    two = tiny_release(cli, tmp_path, tiny_gguf, 0.0, "1.0.1", 2, max_tokens=8)
    assert (
        cli("release", "show", one)[1]["spec_hash"] != cli("release", "show", two)[1]["spec_hash"]
    )


@pytest.fixture
def served(cli, tmp_path, tiny_gguf, appliance_home):
    """Two installed releases; the service serves the first; an API key for it."""
    first = tiny_release(cli, tmp_path, tiny_gguf, 0.0, "1.0.0", 1)
    candidate = tiny_release(
        cli, tmp_path, write_tiny_gguf(tmp_path / "other.gguf", seed=5), 0.0, "2.0.0", 2
    )
    assert cli("release", "activate", first, "--force", "--reason", "serve it")[0] == 0
    key = cli("apikeys", "create", "--name", "eval")[1]["key"]
    server = start_server(appliance_home)
    yield server, key, first, candidate
    server.stop()


def test_eval_over_url_refuses_a_service_that_serves_another_release(cli, served):
    """`eval run CANDIDATE --url` against a service that serves the stable release must not
    produce a report that lets the candidate activate."""
    server, key, first, candidate = served
    code, error = cli("eval", "run", candidate, "--url", server.url, "--api-key", key)
    assert code == 26, error
    assert f"not {candidate}" in error["error"] and first in error["error"]
    assert cli("release", "show", candidate)[1]["gate"]["passed"] is False
    assert cli("release", "activate", candidate)[0] == 23
    assert not any(r["action"] == "eval" for r in cli("audit", "list")[1]["rows"])


def test_eval_over_url_measures_the_release_the_service_serves(cli, served):
    server, key, first, _ = served
    code, result = cli(
        "eval", "run", first, "--url", server.url, "--api-key", key, "--baseline", "none"
    )
    assert code == 0, result
    report = json.loads(Path(result["files"]["json"]).read_text())
    assert report["manifest_sha256"] == cli("release", "show", first)[1]["manifest_sha256"]
    assert report["overall"]["n"] == 3
    assert all(c["ttft_ms"] is not None for c in report["cases"])


def test_eval_over_url_prices_the_run_from_the_service_process_cpu(cli, served):
    server, key, first, _ = served

    def service_cpu() -> float:
        text = httpx.get(server.url + "/metrics").text
        return next(
            sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "process_cpu_seconds"
            for sample in family.samples
        )

    before = service_cpu()
    code, result = cli(
        "eval", "run", first, "--url", server.url, "--api-key", key, "--baseline", "none"
    )
    after = service_cpu()
    assert code == 0, result
    report = json.loads(Path(result["files"]["json"]).read_text())
    # the service's own CPU seconds over the run, not wall time x every local core
    assert 0 < report["cpu_seconds"] <= after - before
    assert report["cpu_seconds"] < report["wall_seconds"] * os.cpu_count()
    assert report["cost"] == pytest.approx(report["cpu_seconds"] / 3600 * 0.05)


SEQUENTIAL = "[load]\nclients = 1\n"
SIX_CASES = [{**CASES[0], "id": f"case-{i}", "input": {"prompt": f"item {i}"}} for i in range(6)]


def test_each_case_is_timed_from_when_it_is_sent_not_from_when_the_runner_queued_it(
    cli, tmp_path, tiny_gguf
):
    ref = tiny_release(
        cli, tmp_path, tiny_gguf, 0.0, "1.0.0", 1, max_tokens=64, cases=SIX_CASES, load=SEQUENTIAL
    )
    code, result = cli("eval", "run", ref)
    assert code == 0, result
    report = json.loads(Path(result["files"]["json"]).read_text())
    assert report["load"]["clients"] == 1
    # six cases one after another: none waited behind the others, so p95 is one case's
    # time, not the run's (the runner used to queue all of them and report p95 = wall time)
    # (queued all at once, the six latencies overlapped and summed to several walls)
    latencies = sorted(c["latency_ms"] for c in report["cases"])
    assert sum(latencies) <= report["wall_seconds"] * 1000
    assert report["latency_ms"]["p95"] == latencies[-1]
    low, high = report["latency_ms"]["bootstrap_95"]["p95"]
    assert low <= report["latency_ms"]["p95"] <= high


def test_a_busy_host_makes_latency_and_cost_inconclusive_while_quality_still_judges(
    cli, tmp_path, tiny_gguf
):
    ref = tiny_release(cli, tmp_path, tiny_gguf, 0.6, "1.0.0", 1, cases=SIX_CASES)
    burners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(os.cpu_count() or 1)
    ]
    try:
        time.sleep(0.5)
        code, result = cli("eval", "run", ref)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    assert code == 45, result
    gate = result["gate"]
    assert gate["passed"] is False and gate["failures"] == []
    assert [i["criterion"] for i in gate["inconclusive"]] == ["p95_latency", "cost_per_success"]
    assert "rerun on a quiet host" in gate["inconclusive"][0]["detail"]
    code, judged = cli("eval", "gate", ref)
    assert code == 45 and "inconclusive" in judged["error"]
    assert cli("release", "activate", ref)[0] == 23  # not passed yet: it cannot serve
    # the same release on the quiet host: judged, and it passes
    assert cli("eval", "run", ref)[0] == 0


def test_a_scorer_that_raises_fails_its_case_and_the_run_finishes(cli, tmp_path, tiny_gguf):
    broken = {"id": "bad-regex", "input": {"prompt": "x"}, "expected": {"regex": "("}}
    broken |= {"scorers": ["regex"], "tags": ["format"]}
    ref = tiny_release(cli, tmp_path, tiny_gguf, 0.0, "1.0.0", 1, cases=[CASES[0], broken])
    code, result = cli("eval", "run", ref)
    assert code == 0, result
    report = json.loads(Path(result["files"]["json"]).read_text())
    case = next(c for c in report["cases"] if c["id"] == "bad-regex")
    assert case["passed"] is False and case["failures"][0].startswith("regex: error: ")


def test_a_case_missing_what_its_scorer_needs_is_refused_when_the_spec_loads(
    cli, tmp_path, tiny_gguf
):
    incomplete = {**CASES[0], "id": "no-text", "expected": {}, "scorers": ["exact"]}
    ref = tiny_release(cli, tmp_path, tiny_gguf, 0.0, "1.0.0", 1, cases=[incomplete])
    code, result = cli("eval", "run", ref)
    assert code == 3 and "scorer exact needs expected ['text']" in result["error"]


def test_eval_of_a_model_that_aborts_llama_cpp_is_refused_not_crashed(cli, tmp_path, monkeypatch):
    """A signed GGUF that passes our header check but makes llama.cpp abort(): `eval run`
    used to die with SIGABRT; the load probe in a child process refuses it with exit 17."""
    model = write_tiny_gguf(tmp_path / "aborts.gguf", aborts_llama_cpp=True)
    release_cli = importlib.import_module("appliance.cli.release")  # the module, not the group
    monkeypatch.setattr(release_cli, "probe_release", lambda _dir: None)  # installed as 0.1 did
    ref = tiny_release(cli, tmp_path, model, min_pass_rate=0.0, version="1.0.0", sequence=1)
    code, error = cli("eval", "run", ref)
    assert code == 17, error
    assert "failed the load probe" in error["error"] and "SIGABRT" in error["error"]
    assert "unsupported types" in error["error"]


@pytest.mark.real_model
def test_gate_rejects_a_degraded_release_and_accepts_the_good_one(
    cli, tmp_path, gemma_gguf, tiny_gguf
):
    def release(model: Path, version: str, sequence: int, relaxed: bool) -> str:
        toml = write_bundle_dir(tmp_path / f"src-{version}", model, release=(version, sequence, 0))
        if relaxed:  # the same cases; only the regression criterion can fail
            spec = toml.parent / "eval/spec.toml"
            text = spec.read_text()
            for minimum in ("0.6", "0.75", "1.0"):
                text = text.replace(f"min_pass_rate = {minimum}", "min_pass_rate = 0.0")
            text = text.replace("min_groundedness = 0.6", "min_groundedness = 0.0")
            spec.write_text(
                text.replace(
                    "max_defect_rate = { pii = 0.0, safety = 0.0 }", "max_defect_rate = {}"
                )
            )
        return build_and_install(cli, toml, tmp_path, version)

    good = release(gemma_gguf, "1.0.0", 1, relaxed=False)
    code, result = cli("eval", "run", good)
    assert code == 0, result
    assert cli("release", "activate", good)[0] == 0

    degraded = release(tiny_gguf, "2.0.0", 2, relaxed=True)
    code, result = cli("eval", "run", degraded)
    assert code == 44, result
    assert [f["criterion"] for f in result["gate"]["failures"]] == ["regression"]
    report = json.loads(
        sorted((appliance_paths().state_dir / "reports/demo/2.0.0").glob("*.json"))[-1].read_text()
    )
    regression = report["regression"]
    assert regression["baseline"] == good and regression["mcnemar_p"] < 0.001
    assert len(regression["flipped_to_fail"]) >= 20 and regression["bootstrap_95"][1] < 0
    assert cli("release", "activate", degraded)[0] == 23

    same_again = release(gemma_gguf, "1.0.1", 3, relaxed=False)
    code, result = cli("eval", "run", same_again)
    assert code == 0, result
    report = json.loads(Path(result["files"]["json"]).read_text())
    assert report["regression"]["flipped_to_fail"] == [] and report["regression"]["mcnemar_p"] == 1


def test_an_installed_spec_edited_after_install_is_refused_before_it_is_read(
    cli, tmp_path, tiny_gguf
):
    ref = tiny_release(cli, tmp_path, tiny_gguf, 0.0, "1.0.0", 1)
    spec = Path(cli("release", "show", ref)[1]["path"]) / "eval/spec.toml"
    spec.chmod(0o644)
    spec.write_text(spec.read_text() + "\n[load]\nclients = 99\n")  # would be refused as usage
    code, error = cli("eval", "run", ref)
    assert code == 13 and "spec.toml" in error["error"], error
    assert not any(r["action"] == "eval" for r in cli("audit", "list")[1]["rows"])
