#!/usr/bin/env python3
"""Benchmark: throughput through HAProxy with 1, 2 and 3 appliance nodes on this machine.

Builds a release of the model (default: the embedded Gemma 3 270M Q4_K_M) whose
serving.json gives llama.cpp one thread, installs it into three appliance homes, serves
each on its own loopback port (4 slots) and puts a real HAProxy in front
(`appliance fleet haproxy-config`, maxconn 4 per node). Then 8 clients stream distinct
prompts (scripts/bench_serve.py's "distinct" workload) through HAProxy with 1, 2 and 3
nodes in rotation (the others in maintenance through the runtime API), and once straight
to one node with no HAProxy (the peer that shows the balancer's own cost). It prints
tokens/s, p50/p95 latency and p95 time to first token for each, and each one's ratio to
one node behind HAProxy.

    .venv/bin/python scripts/bench_fleet.py [--requests 4] [--model FILE.gguf]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serve  # noqa: E402 - the workloads and the streaming client
from bench_shadow import (  # noqa: E402
    appliance,
    free_port,
    release_source,
    run_clients,
    serving,
    wait,
)

NODES = 3
SLOTS = 4
CLIENTS = 8


def prepare(work: Path, model: Path | None) -> list[Path]:
    """A one-thread release, installed and active in NODES homes (no gate: this measures
    the fleet, not the release)."""
    print("building the release and installing it on three nodes...", flush=True)
    keys = work / "keys"
    appliance(work / "builder", "keys", "generate", "--out", keys, "--name", "bench")
    toml = release_source(work, "1.0.0", 1, model)
    toml.write_text(toml.read_text().replace("threads = 0 ", "threads = 1 "))
    bundle = appliance(
        work / "builder",
        "bundle",
        "build",
        toml,
        "--key",
        keys / "bench.key",
        "--out",
        work / "dist",
    )["bundle"]
    homes = []
    for i in range(1, NODES + 1):
        home = work / f"node{i}"
        appliance(home, "keys", "trust", keys / "bench.pub")
        appliance(home, "release", "install", bundle)
        appliance(home, "release", "activate", "demo@1.0.0", "--force", "--reason", "benchmark")
        homes.append(home)
    return homes


@contextlib.contextmanager
def fleet(work: Path, homes: list[Path]) -> Iterator[tuple[list[str], str, Path]]:
    """The nodes and HAProxy in front of them: (node URLs, HAProxy's URL, its socket)."""
    with contextlib.ExitStack() as running:
        urls = [
            running.enter_context(serving(home, work / f"{home.name}.log", "--slots", str(SLOTS)))
            for home in homes
        ]
        socket_path, port = work / "haproxy.sock", free_port()
        config = work / "haproxy.cfg"
        appliance(
            work / "builder", "fleet", "haproxy-config",
            *[f"--node=node{i}={u.removeprefix('http://')}" for i, u in enumerate(urls, 1)],
            "--bind", f"127.0.0.1:{port}", "--socket", socket_path, "--maxconn", SLOTS,
            "--inter-ms", 1000, "--slowstart-s", 0, "--out", config,
        )  # fmt: skip
        haproxy = subprocess.Popen(
            [shutil.which("haproxy") or "/usr/sbin/haproxy", "-db", "-f", str(config)]
        )
        running.callback(haproxy.wait, 60)
        running.callback(haproxy.terminate)
        base = f"http://127.0.0.1:{port}"
        wait(lambda: httpx.get(f"{base}/readyz", timeout=1).status_code == 200)
        yield urls, base, socket_path


def in_rotation(work: Path, socket_path: Path, count: int) -> None:
    for i in range(1, NODES + 1):
        state = "ready" if i <= count else "maint"
        appliance(work / "builder", "fleet", "server", f"node{i}", "--state", state,
                  "--haproxy", socket_path)  # fmt: skip


def measure(base: str, label: str, requests_each: int) -> bench_serve.Measurement:
    streams, wall = run_clients(base, requests_each, clients=CLIENTS)
    m = bench_serve.summarise(label, "distinct", CLIENTS, wall, streams)
    print(
        f"{label:<22} {len(streams):>3} requests  {m.tokens_per_second:6.1f} tok/s  "
        f"p50 {m.p50:5.2f} s  p95 {m.p95:5.2f} s  TTFT p95 {m.ttft_p95:5.2f} s",
        flush=True,
    )
    return m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4, help="requests per client per run")
    parser.add_argument("--model", type=Path, help="a GGUF instead of the embedded default")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    try:
        homes = prepare(work, args.model)
        with fleet(work, homes) as (urls, base, socket_path):
            print(f"{CLIENTS} clients, distinct prompts, {bench_serve.MAX_TOKENS} tokens each; "
                  f"{os.cpu_count()} cores shared by every node", flush=True)  # fmt: skip
            for url in urls:  # warm each node once
                measure(url, "warm-up", 1)
            results = {"direct, 1 node": measure(urls[0], "direct, 1 node", args.requests)}
            for count in range(1, NODES + 1):
                in_rotation(work, socket_path, count)
                label = f"HAProxy, {count} node{'s' if count > 1 else ''}"
                results[label] = measure(base, label, args.requests)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    one = results["HAProxy, 1 node"].tokens_per_second
    print("\ntokens/s against one node behind HAProxy:")
    for label, m in results.items():
        print(f"  {label:<22} {m.tokens_per_second / one:5.2f}x")


if __name__ == "__main__":
    main()
