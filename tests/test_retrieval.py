"""Retrieval: the signed corpus cut into passages, indexed with SQLite FTS5 at install,
searched, and judged by the gate apart from answer quality."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import DEMO_BUNDLE, write_bundle_dir

from appliance.bundler.builder import build_bundle
from appliance.bundler.spec import load_bundle_spec
from appliance.errors import UsageError
from appliance.evals.evaluate import judge_release_retrieval
from appliance.evals.spec import load_spec
from appliance.paths import appliance_paths
from appliance.retrieval.corpus import Passage, load_corpus, markdown_passages, passages_of
from appliance.retrieval.index import Index, build_index

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
