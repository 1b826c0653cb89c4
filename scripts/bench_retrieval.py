#!/usr/bin/env python3
"""Benchmark: what retrieval adds to each request.

Two measurements:

1. Retrieval's own work, in-process: the demo corpus indexed as at install, each of the
   demo spec's retrieval queries searched and its passages fitted to the release's token
   budget with the model's tokenizer (Retriever.fetch, what a request pays before
   generation). Milliseconds per retrieval, p50 and p95.
2. The service end to end: the demo release (default: the embedded Gemma 3 270M Q4_K_M,
   retrieval "asked") in a throwaway home. Four clients stream distinct runbook questions
   (the spec's retrieval queries, each with a ticket number, so no two prompts are the
   same), the same questions with x-appliance-retrieval on and off, in turn (on, off, on:
   the two "on" runs bracket drift). It prints p50/p95 latency, p95 time to first token,
   prompt tokens and CPU seconds per request, and the ratios on/off. Most of what "on"
   adds is prefilling the passages (up to the budget, 256 tokens in the demo), not the
   search.

    .venv/bin/python scripts/bench_retrieval.py [--requests 12] [--model FILE.gguf]

The release is activated with --force (not gated): this measures cost, not quality.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_guard import measure, print_ratios  # noqa: E402 - the clients and the ratios
from bench_shadow import appliance, release_source, serving  # noqa: E402

from appliance.retrieval.augment import RETRIEVAL_HEADER as HEADER  # noqa: E402
from appliance.retrieval.augment import Retriever  # noqa: E402
from appliance.serve.config import ServingConfig  # noqa: E402
from appliance.serve.engine import Engine, EngineConfig  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "bundles" / "demo"


def queries() -> list[str]:
    lines = (DEMO / "eval" / "golden" / "retrieval.jsonl").read_text().splitlines()
    return [json.loads(line)["query"] for line in lines if line.strip()]


def questions(_client: int, counter: Iterator[int]) -> Iterator[str]:
    """Runbook questions an operator would ask, each one distinct."""
    asked = queries()
    for n in counter:
        yield f"Question: {asked[n % len(asked)]} (ticket {4000 + n})\nAnswer:"


def retrieval_work(release: Path, rounds: int = 20) -> tuple[float, float]:
    """Milliseconds per retrieval in-process, (p50, p95), over the spec's queries, on an
    installed release (its corpus, settings and model's tokenizer)."""
    settings = ServingConfig.from_release_dir(release).retrieval_settings()
    config = EngineConfig(model_path=release / "model.gguf", slots=1, context_per_slot=512)
    engine = Engine(config)
    work = Path(tempfile.mkdtemp(prefix="bench-retrieval-index-"))
    retriever = Retriever.open(
        release,
        work / "index.sqlite",
        settings,
        lambda text: engine.tokenize(text, add_special=False),
        engine.piece,
    )
    assert retriever is not None, "the demo release retrieves"
    times = []
    try:
        for _ in range(rounds):
            for query in queries():
                started = time.perf_counter()
                retriever.fetch(query)
                times.append((time.perf_counter() - started) * 1000)
    finally:
        retriever.close()
        engine.close()
        shutil.rmtree(work, ignore_errors=True)
    return statistics.median(times), statistics.quantiles(times, n=20)[18]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=12, help="requests per client per run")
    parser.add_argument("--model", type=Path, help="a GGUF instead of the embedded default")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-retrieval-"))
    home = work / "home"
    try:
        print("building and installing the demo release...", flush=True)
        appliance(home, "keys", "generate", "--out", work / "keys", "--name", "bench")
        appliance(home, "keys", "trust", work / "keys" / "bench.pub")
        toml = release_source(work, "1.0.0", 1, args.model)
        key = work / "keys" / "bench.key"
        built = appliance(home, "bundle", "build", toml, "--key", key, "--out", work / "dist")
        installed = appliance(home, "release", "install", built["bundle"])["release"]
        p50, p95 = retrieval_work(Path(installed["path"]))
        print(f"retrieval per request (search, token budget): p50 {p50:.2f} ms, p95 {p95:.2f} ms")
        appliance(home, "release", "activate", "demo@1.0.0", "--force", "--reason", "benchmark")
        runs: dict[str, list[dict[str, float]]] = {}
        with serving(home, work / "serve.log") as base:
            measure(base, "warm-up", 1, questions, {HEADER: "on"})
            for label, asked in (
                ("retrieval on", "on"),
                ("retrieval off", "off"),
                ("retrieval on", "on"),
            ):
                measured = measure(base, label, args.requests, questions, {HEADER: asked})
                runs.setdefault(label, []).append(measured)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_ratios(runs["retrieval on"], runs["retrieval off"][0])


if __name__ == "__main__":
    main()
