#!/usr/bin/env python3
"""Benchmark: what the safety policy adds to each request.

Two measurements, both printed with the ratio on/off:

1. The policy's own work, in-process: a request's input check plus its answer streamed
   token by token through the output side (the hold-back included), on realistic texts:
   prompts that carry an e-mail address and a card number, answers of ~1,000 characters.
2. The service end to end: two releases of the same model (default: the embedded Gemma 3
   270M Q4_K_M) in a throwaway home, built from bundles/demo, one with its policy.toml and
   one without, served in turn (on, off, on again: the two "on" runs bracket drift). Four
   clients stream distinct prompts (bench_serve.py's "distinct"), so the model does the
   same work either way and only the checks differ; it prints p50/p95 latency, p95 time to
   first text (a stream holds back the word being written) and CPU seconds per request.
   Tokens/s is left out: the stream's chunks are words, not tokens, once held back.

    .venv/bin/python scripts/bench_guard.py [--requests 16] [--model FILE.gguf]

The releases are activated with --force (not gated): this measures cost, not quality.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serve  # noqa: E402 - the streaming client and its summary
from bench_shadow import (  # noqa: E402 - the service, its clients and its metrics
    CLIENTS,
    Prompts,
    appliance,
    distinct,
    metric,
    release_source,
    run_clients,
    serving,
    wait,
)

from appliance.guard.policy import load_policy  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ANSWER = (REPO / "docs" / "runbooks" / "rollback.md").read_text()[:1000]


def pii_prompt(n: int) -> str:
    """A prompt with an e-mail address and a card number to redact."""
    return f"{bench_serve.BASE} the year {1900 + n}. (user{n}@example.com paid 4111 1111 1111 1111)"


def policy_work(rounds: int = 200) -> tuple[float, float]:
    """Milliseconds per request of the policy's own work: (input check, streamed output)."""
    policy = load_policy(REPO / "bundles" / "demo")
    prompt = pii_prompt(1)
    chunks = [ANSWER[i : i + 4] for i in range(0, len(ANSWER), 4)]  # ~a token each
    started = time.perf_counter()
    for _ in range(rounds):
        policy.check_inputs([prompt])
    inputs = (time.perf_counter() - started) / rounds
    started = time.perf_counter()
    for _ in range(rounds):
        stream = policy.stream()
        for chunk in chunks:
            stream.feed(chunk)
        stream.close()
    outputs = (time.perf_counter() - started) / rounds
    return inputs * 1000, outputs * 1000


def measure(
    base: str,
    label: str,
    requests_each: int,
    prompts: Prompts = distinct,
    headers: dict[str, str] | None = None,
) -> dict[str, float]:
    """Latency, p95 TTFT, and the service's CPU and prompt tokens per request, for CLIENTS
    clients streaming `requests_each` prompts each."""
    cpu = metric(base, r"^process_cpu_seconds_total")
    tokens = metric(base, r"^appliance_prompt_tokens_total")
    streams, wall = run_clients(base, requests_each, prompts, headers)
    cpu = (metric(base, r"^process_cpu_seconds_total") - cpu) / len(streams)
    tokens = (metric(base, r"^appliance_prompt_tokens_total") - tokens) / len(streams)
    m = bench_serve.summarise(label, "distinct", CLIENTS, wall, streams)
    print(
        f"{label:<14} {len(streams)} requests  p50 {m.p50:5.2f} s  p95 {m.p95:5.2f} s  "
        f"TTFT p95 {m.ttft_p95:5.2f} s  {tokens:4.0f} prompt tokens  {cpu:5.2f} CPU-s/request",
        flush=True,
    )
    return {"p50": m.p50, "p95": m.p95, "ttft_p95": m.ttft_p95, "cpu": cpu, "tokens": tokens}


def prepare(home: Path, work: Path, model: Path | None) -> None:
    print("building and installing two releases (with and without the policy)...", flush=True)
    appliance(home, "keys", "generate", "--out", work / "keys", "--name", "bench")
    appliance(home, "keys", "trust", work / "keys" / "bench.pub")
    for version, sequence, guarded in (("1.0.0", 1, True), ("1.1.0", 2, False)):
        toml = release_source(work, version, sequence, model)
        if not guarded:
            toml.write_text(re.sub(r"\n\[safety\]\npolicy = [^\n]+\n", "\n", toml.read_text()))
        key = work / "keys" / "bench.key"
        built = appliance(home, "bundle", "build", toml, "--key", key, "--out", work / "dist")
        appliance(home, "release", "install", built["bundle"])


def serve(home: Path, ref: str, base: str) -> None:
    appliance(home, "release", "activate", ref, "--force", "--reason", "benchmark")
    wait(lambda: httpx.get(f"{base}/readyz", timeout=1).json().get("release") == ref)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16, help="requests per client per run")
    parser.add_argument("--model", type=Path, help="a GGUF instead of the embedded default")
    args = parser.parse_args()

    inputs_ms, outputs_ms = policy_work()
    print(
        f"policy work per request: input check {inputs_ms:.2f} ms, a ~1,000-character "
        f"answer streamed through the output side {outputs_ms:.2f} ms",
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="bench-guard-"))
    home = work / "home"
    prepare(home, work, args.model)
    appliance(home, "release", "activate", "demo@1.0.0", "--force", "--reason", "benchmark")
    runs: dict[str, list[dict[str, float]]] = {}
    try:
        with serving(home, work / "serve.log") as base:
            measure(base, "warm-up", 1)
            for label, ref in (
                ("policy on", "1.0.0"),
                ("policy off", "1.1.0"),
                ("policy on", "1.0.0"),
            ):
                serve(home, f"demo@{ref}", base)
                runs.setdefault(label, []).append(measure(base, label, args.requests))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_ratios(runs["policy on"], runs["policy off"][0])


def print_ratios(on_runs: list[dict[str, float]], off: dict[str, float]) -> None:
    """The "on" runs (their mean) against the "off" run: latency, CPU and prompt tokens."""
    print()
    for key, what in (("p50", "p50 latency"), ("p95", "p95 latency"), ("ttft_p95", "p95 TTFT")):
        on = statistics.mean(run[key] for run in on_runs)
        print(f"{what:<12} on/off: {on / off[key]:.3f}x ({1000 * (on - off[key]):+.0f} ms)")
    on_cpu = statistics.mean(run["cpu"] for run in on_runs)
    print(f"CPU per request on/off: {on_cpu / off['cpu']:.3f}x ({on_cpu - off['cpu']:+.3f} s)")
    on_tokens = statistics.mean(run["tokens"] for run in on_runs)
    print(f"prompt tokens per request: on {on_tokens:.0f}, off {off['tokens']:.0f}")


if __name__ == "__main__":
    main()
