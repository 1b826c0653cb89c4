"""Retrieval: the signed corpus cut into passages, indexed with SQLite FTS5 at install,
searched, and judged by the gate apart from answer quality."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import httpx
import pytest
from conftest import DEMO_BUNDLE, write_bundle_dir
from prometheus_client.parser import text_string_to_metric_families
from serving import Server, gate_both_ways, serve_bundle, wait_for

from appliance.bundler.builder import build_bundle
from appliance.bundler.spec import load_bundle_spec
from appliance.errors import UsageError
from appliance.evals.evaluate import judge_release_retrieval
from appliance.evals.report import exit_code
from appliance.evals.spec import load_spec
from appliance.paths import AppliancePaths, appliance_paths
from appliance.retrieval.augment import DEFAULT_PREAMBLE, RetrievalSettings
from appliance.retrieval.corpus import (
    Passage,
    corpus_hash,
    load_corpus,
    markdown_passages,
    passages_of,
)
from appliance.retrieval.index import Index, build_index
from appliance.retrieval.quality import groundedness, judge_groundedness
from appliance.serve.config import MANIFEST_HEADER

DOC = """# Widget guide

Intro text before any section.

## Install

Run the installer.

```bash
# not a heading: a comment in a fenced block
install-widget --now
```

## Install

A second section with the same heading.

### Error ERR4471

The widget reports ERR4471 when its licence has expired.
"""


def test_markdown_is_cut_into_sections_with_stable_ids():
    passages = markdown_passages("widget", DOC)
    assert [p.id for p in passages] == [
        "widget#widget-guide",
        "widget#install",
        "widget#install-1",
        "widget#error-err4471",
    ]
    assert passages[0].title == "Widget guide" and passages[0].text.startswith("Intro")
    assert passages[1].title == "Widget guide: Install"
    assert "# not a heading" in passages[1].text  # a fenced block is kept whole


def test_jsonl_passages_and_refused_corpora(tmp_path):
    (tmp_path / "faq.jsonl").write_text(
        json.dumps({"id": "faq-1", "title": "Hours", "text": "Open 9 to 5."}) + "\n"
    )
    assert load_corpus(tmp_path) == [Passage("faq-1", "Hours", "Open 9 to 5.")]
    (tmp_path / "more.jsonl").write_text(json.dumps({"id": "faq-1", "text": "again"}) + "\n")
    with pytest.raises(UsageError, match="two passages with the id 'faq-1'"):
        load_corpus(tmp_path)
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(UsageError, match="bad.jsonl line 1"):
        passages_of([tmp_path / "bad.jsonl"])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match="not notes.txt"):
        passages_of([tmp_path / "notes.txt"])


def test_search_ranks_titles_and_finds_identifiers_inside_words(tmp_path):
    build_index(markdown_passages("widget", DOC), tmp_path / "index.sqlite")
    index = Index(tmp_path / "index.sqlite")
    try:
        assert index.search("how do I install it", 2).ids[0].startswith("widget#install")
        # "4471" is no word of its own ("ERR4471" is one token): the trigram index finds it
        assert index.search("what does 4471 mean", 1).ids == ["widget#error-err4471"]
        assert index.search("", 3).ids == [] and index.search('" OR *', 3).ids == []
    finally:
        index.close()


def test_the_demo_corpus_returns_the_labelled_passages(tmp_path):
    spec = load_spec(DEMO_BUNDLE)
    release = tmp_path / "release"
    (release / "corpus").mkdir(parents=True)
    for doc in (DEMO_BUNDLE / "corpus").iterdir():
        (release / "corpus" / doc.name).write_text(doc.read_text())
    judged = judge_release_retrieval(spec, release)
    assert judged["cases"] == len(spec.retrieval.cases) >= 8
    for measure, minimum in spec.retrieval.minimums().items():
        assert judged[measure] >= minimum, (measure, judged["per_case"])
    assert all(case["reciprocal_rank"] > 0 for case in judged["per_case"])


def test_the_corpus_is_signed_and_indexed_at_install(tmp_path, tiny_gguf, trusted_key, run_cli):
    toml = write_bundle_dir(tmp_path / "src", tiny_gguf)
    bundle = build_bundle(load_bundle_spec(toml), [trusted_key.signing_key], tmp_path / "out")
    names = set(bundle.manifest.files)
    assert {f"corpus/{doc.name}" for doc in (DEMO_BUNDLE / "corpus").iterdir()} <= names
    installed = run_cli("release", "install", bundle.path, "--json")
    assert installed.exit_code == 0, installed.output
    sha = json.loads(installed.stdout)["release"]["manifest_sha256"]
    index = Index(appliance_paths().corpus_index(sha))
    try:
        assert index.search("roll back to the previous release", 1).ids[0].startswith("rollback#")
    finally:
        index.close()
    # operators search the same index; a lost index is rebuilt from the verified corpus
    appliance_paths().corpus_index(sha).unlink()
    searched = run_cli("release", "search", "demo@1.0.0", "the disk is full", "-k", "2", "--json")
    assert searched.exit_code == 0, searched.output
    hits = json.loads(searched.stdout)["hits"]
    assert len(hits) == 2 and hits[0]["id"].startswith("disk-full#")
    assert appliance_paths().corpus_index(sha).is_file()


def test_a_bad_corpus_is_refused_at_build_time(tmp_path, tiny_gguf):
    toml = write_bundle_dir(tmp_path / "src", tiny_gguf)
    (toml.parent / "corpus" / "Notes.md").write_text("# x\n\ny\n")
    listed = '"corpus/rollback.md", "corpus/Notes.md",'
    toml.write_text(toml.read_text().replace('"corpus/rollback.md",', listed))
    with pytest.raises(UsageError, match="corpus file name 'Notes.md'"):
        load_bundle_spec(toml)


def test_a_retrieval_minimum_missed_fails_the_gate(tmp_path, tiny_gguf, trusted_key, run_cli):
    toml = write_bundle_dir(tmp_path / "src", tiny_gguf)
    spec_file = toml.parent / "eval" / "spec.toml"
    spec_file.write_text(spec_file.read_text().replace("min_mrr = 0.75", "min_mrr = 0.99"))
    bundle = build_bundle(load_bundle_spec(toml), [trusted_key.signing_key], tmp_path / "out")
    assert run_cli("release", "install", bundle.path).exit_code == 0
    ran = run_cli("eval", "run", "demo@1.0.0", "--baseline", "none", "--json")
    report = json.loads(Path(json.loads(ran.stdout)["files"]["json"]).read_text())
    assert report["retrieval"]["mrr"] < 0.99
    assert {"criterion": "retrieval", "detail": f"mrr {report['retrieval']['mrr']:.2f} < 0.99"} in (
        report["gate"]["failures"]
    )
    markdown = Path(json.loads(ran.stdout)["files"]["markdown"]).read_text()
    assert "- Retrieval, 8 cases at k = 3: precision@k" in markdown


# -- retrieval in the service and the gate ----------------------------------------------

SAMPLING = {"max_tokens": 8, "temperature": 0, "seed": 7}
ON, OFF = {"x-appliance-retrieval": "on"}, {"x-appliance-retrieval": "off"}


def test_retrieval_settings_are_checked_at_build_time(tmp_path, tiny_gguf):
    toml = write_bundle_dir(tmp_path / "src", tiny_gguf)
    original = toml.read_text()
    for setting, message in (
        ('endpoints = ["embeddings"]', "endpoints are chat or completions"),
        ('when = "sometimes"', "when is 'always' or 'asked'"),
        ("k = 0", "k must be an integer from 1 to 20"),
        ("colour = 1", "unknown retrieval settings: colour"),
    ):
        key = setting.split(" =")[0]
        changed = re.sub(rf"^{key} = .*$", setting, original, count=1, flags=re.M)
        if changed == original:
            changed = original.replace("[retrieval]\n", f"[retrieval]\n{setting}\n")
        toml.write_text(changed)
        with pytest.raises(UsageError, match=re.escape(message)):
            load_bundle_spec(toml)
    no_corpus = re.sub(r"^corpus = \[[^\]]*\]\n", "", original, flags=re.M)
    toml.write_text(no_corpus)
    with pytest.raises(UsageError, match="names endpoints but lists no corpus"):
        load_bundle_spec(toml)


@pytest.fixture(scope="module")
def retrieving(tmp_path_factory, tiny_gguf):
    """The demo bundle on the tiny model, serving with retrieval when asked: one passage
    per request, with a budget it never reaches (so the test can write the prompt out)."""
    home, work = tmp_path_factory.mktemp("rag-home"), tmp_path_factory.mktemp("rag-work")
    toml = write_bundle_dir(work / "src", tiny_gguf)
    text = re.sub(r"^k = 3$", "k = 1", toml.read_text(), flags=re.M)
    toml.write_text(re.sub(r"^budget_tokens = .*$", "budget_tokens = 1800", text, flags=re.M))
    running = serve_bundle(home, toml, work / "out")
    yield running
    running.stop()


def appliance_paths_of(server: Server) -> AppliancePaths:
    home = server.home
    return AppliancePaths(home / "etc", home / "var", home / "cache")


def written_out(passage_id: str) -> str:
    """The block retrieval puts in a prompt for one passage, written out by hand."""
    passage = next(p for p in load_corpus(DEMO_BUNDLE / "corpus") if p.id == passage_id)
    return f"{DEFAULT_PREAMBLE}\n\n[{passage.id}] {passage.title}\n{passage.text}"


def test_a_completion_that_asks_gets_the_passages_the_corpus_gives(retrieving):
    server = retrieving
    prompt = "The disk is full: what do I check?"
    asked = server.post("/v1/completions", json={"prompt": prompt, **SAMPLING}, headers=ON)
    assert asked.status_code == 200, asked.text
    said = asked.json()["appliance_retrieval"]
    index = Index(appliance_paths_of(server).corpus_index(asked.headers[MANIFEST_HEADER]))
    try:
        assert said["ids"] == index.search(prompt, 1).ids  # what `release search` finds
    finally:
        index.close()
    assert said["ids"][0].startswith("disk-full#")
    assert said["corpus_sha256"] == corpus_hash(DEMO_BUNDLE / "corpus")
    assert asked.headers["x-appliance-retrieval"] == said["ids"][0]
    # the model saw exactly the passages ahead of the prompt
    literal = server.post(
        "/v1/completions",
        json={"prompt": f"{written_out(said['ids'][0])}\n\n{prompt}", **SAMPLING},
        headers=OFF,
    ).json()
    assert asked.json()["choices"] == literal["choices"]
    assert asked.json()["usage"] == literal["usage"]
    assert "appliance_retrieval" not in literal
    # by default ("asked"), a request gets none
    plain = server.post("/v1/completions", json={"prompt": prompt, **SAMPLING})
    assert "appliance_retrieval" not in plain.json()
    assert plain.json()["usage"]["prompt_tokens"] < asked.json()["usage"]["prompt_tokens"]


def test_a_chat_gets_them_as_a_system_message_through_the_template(retrieving):
    server = retrieving
    question = "How do I roll back to the previous release?"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]
    asked = server.post(
        "/v1/chat/completions", json={"messages": messages, **SAMPLING}, headers=ON
    ).json()
    (passage,) = asked["appliance_retrieval"]["ids"]
    assert passage.startswith("rollback#")
    merged = f"Be brief.\n\n{written_out(passage)}"
    literal = server.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "system", "content": merged}, messages[1]], **SAMPLING},
    ).json()
    assert asked["choices"] == literal["choices"] and asked["usage"] == literal["usage"]
    # streamed: the header before the first token, the ids in the final event
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        json={"messages": messages[1:], **SAMPLING, "stream": True},
        headers={**server.headers, **ON},
        timeout=60,
    ) as response:
        assert response.headers["x-appliance-retrieval"] == passage
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    final = json.loads(events[-2])
    assert final["choices"][0]["finish_reason"] is not None
    assert final["appliance_retrieval"]["ids"] == [passage]


def test_a_bad_ask_is_refused(retrieving):
    server = retrieving
    body = {"prompt": "disk full", **SAMPLING}
    refused = server.post("/v1/completions", json=body, headers={"x-appliance-retrieval": "yes"})
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "retrieval_unavailable"


def test_who_retrieves_by_endpoint_setting_and_ask():
    asked = RetrievalSettings(endpoints=("chat",), when="asked")
    assert asked.applies("chat", "on") and not asked.applies("chat", None)
    assert not asked.applies("chat", "off") and not asked.applies("completions", None)
    with pytest.raises(UsageError, match="offers no retrieval on completions"):
        asked.applies("completions", "on")
    always = RetrievalSettings(endpoints=("chat", "completions"), when="always")
    assert always.applies("completions", None) and not always.applies("chat", "off")


def test_each_retrieval_is_its_own_record_with_no_raw_pii(retrieving):
    server = retrieving
    email = "quinn.vale@example.net"  # found nowhere else in the home
    query = f"the audit chain is broken, write to {email}"
    asked = server.post("/v1/completions", json={"prompt": query, **SAMPLING}, headers=ON).json()
    state = server.home / "var" / "state.db"

    def rows() -> list[sqlite3.Row]:
        with sqlite3.connect(state) as db:
            db.row_factory = sqlite3.Row
            found = db.execute("SELECT * FROM retrievals WHERE query LIKE '%audit chain%'")
            return found.fetchall()

    assert wait_for(lambda: len(rows()) == 1)
    (row,) = rows()
    assert row["query"] == "the audit chain is broken, write to [REDACTED:email]"
    assert json.loads(row["ids"]) == asked["appliance_retrieval"]["ids"]
    assert row["k"] == 1 and len(json.loads(row["scores"])) == 1
    assert row["corpus_sha256"] == asked["appliance_retrieval"]["corpus_sha256"]
    assert row["release"] == "demo@1.0.0" and row["endpoint"] == "completions"
    assert 0 < row["seconds"] < 5
    written = b"".join(p.read_bytes() for p in server.home.rglob("*") if p.is_file())
    assert email.encode() not in written
    metrics = {
        (s.labels["endpoint"], s.labels["matched"]): s.value
        for family in text_string_to_metric_families(server.get("/metrics").text)
        if family.name == "appliance_retrievals"
        for s in family.samples
        if s.name.endswith("_total")
    }
    assert metrics[("completions", "true")] >= 1


def test_the_gate_retrieves_as_the_service_does_in_process_and_over_http(retrieving):
    runs = gate_both_ways(retrieving)
    reports = [report for _said, report in runs]
    grounded = [
        {c["id"]: c["retrieved"] for c in r["cases"] if c["suite"] == "grounded"} for r in reports
    ]
    assert grounded[0] == grounded[1]  # the same passages for each case, either way
    assert all(len(ids) == 1 for ids in grounded[0].values())
    assert all(c["retrieved"] is None for c in reports[0]["cases"] if c["suite"] == "facts")
    for report in reports:
        section = report["groundedness"]
        assert section["cases"] >= 1 and section["minimum"] == 0.6
        assert 0.0 <= section["groundedness"] <= 1.0
    assert reports[0]["groundedness"] == reports[1]["groundedness"]
    markdown = Path(runs[0][0]["files"]["markdown"]).read_text()
    assert "- Groundedness, " in markdown


def test_groundedness_is_the_share_of_the_answer_the_passages_hold():
    passages = ["Run `appliance release rollback --reason TEXT` to switch back."]
    assert groundedness("appliance release rollback", passages) == 1.0
    assert groundedness("Paris is the capital of France", passages) == 0.0
    assert groundedness("run the rollback in Paris", passages) == pytest.approx(2 / 3)
    assert groundedness("... !", passages) is None
    judged = judge_groundedness(
        [("a", "release rollback", ["p1"]), ("b", "anything", [])], {"p1": passages[0]}, 0.5
    )
    assert judged["cases"] == 1 and judged["without_passages"] == 1
    assert judged["groundedness"] == 1.0


def test_a_groundedness_minimum_missed_fails_the_gate_with_its_own_code(
    tmp_path, tiny_gguf, trusted_key, run_cli
):
    toml = write_bundle_dir(tmp_path / "src", tiny_gguf)
    spec_file = toml.parent / "eval" / "spec.toml"
    spec_file.write_text(
        spec_file.read_text().replace("min_groundedness = 0.6", "min_groundedness = 1.01")
    )
    bundle = build_bundle(load_bundle_spec(toml), [trusted_key.signing_key], tmp_path / "out")
    assert run_cli("release", "install", bundle.path).exit_code == 0
    ran = run_cli("eval", "run", "demo@1.0.0", "--baseline", "none", "--json")
    report = json.loads(Path(json.loads(ran.stdout)["files"]["json"]).read_text())
    failed = [f for f in report["gate"]["failures"] if f["criterion"] == "groundedness"]
    assert failed and failed[0]["detail"].endswith("answers that retrieved")
    # the tiny model fails suites too (40 comes first); alone, groundedness exits 47
    assert exit_code({"failures": failed}) == 47


def test_a_corrupted_corpus_fails_verification_and_search(
    tmp_path, tiny_gguf, trusted_key, run_cli
):
    toml = write_bundle_dir(tmp_path / "src", tiny_gguf)
    bundle = build_bundle(load_bundle_spec(toml), [trusted_key.signing_key], tmp_path / "out")
    installed = run_cli("release", "install", bundle.path, "--json")
    release_dir = Path(json.loads(installed.stdout)["release"]["path"])
    target = release_dir / "corpus" / "rollback.md"
    target.chmod(0o644)
    target.write_text(target.read_text().replace("rollback", "rm -rf /"))
    verified = run_cli("release", "verify", "demo@1.0.0")
    assert verified.exit_code == 13, verified.output
    searched = run_cli("release", "search", "demo@1.0.0", "roll back")
    assert searched.exit_code == 13, searched.output
