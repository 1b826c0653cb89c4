#!/usr/bin/env python3
"""Benchmark: what a 100% shadow costs the stable release's clients.

Builds two releases of the same model (default: the embedded Gemma 3 270M Q4_K_M) in a
throwaway appliance home, gates both on this host, activates the first and serves it.
Then 4 clients stream distinct prompts (scripts/bench_serve.py's "distinct" workload),
each waiting --think seconds between its requests (a shadow runs only while stable is
idle, so a load that never lets stable idle leaves it nothing to do), three times: with
no rollout, with the second release as a 100% shadow, and with no rollout again (the two
bracket drift). It prints stable's p50/p95 latency in each run, the ratio of the shadow
run's p95 (and p50) to the mean of the other two (the target is <= 1.10), how many copies
the shadow answered and dropped, and the judge's last verdict on the shadow.

    .venv/bin/python scripts/bench_shadow.py [--requests 16] [--think 2] [--model FILE.gguf]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serve  # noqa: E402 - the workloads and the streaming client

REPO = Path(__file__).resolve().parent.parent
CLIENTS = 4
UNLOAD_SECONDS = 15


def appliance(home: Path, *args: object) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "appliance", *map(str, args), "--json"],
        env={**os.environ, "APPLIANCE_HOME": str(home)},
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise SystemExit(f"appliance {' '.join(map(str, args))}: {result.stderr.strip()}")
    return json.loads(result.stdout or "{}")


def release_source(work: Path, version: str, sequence: int, model: Path | None) -> Path:
    source = work / f"src-{version}"
    shutil.copytree(REPO / "bundles" / "demo", source)
    toml = source / "bundle.toml"
    text = re.sub(r'version = "[^"]+"', f'version = "{version}"', toml.read_text(), count=1)
    text = re.sub(r"\nsequence = \d+", f"\nsequence = {sequence}", text, count=1)
    if model is not None:
        text = re.sub(r'embedded = "[^"]+"', f'path = "{model}"', text)
    toml.write_text(text)
    return toml


def prepare(home: Path, work: Path, model: Path | None) -> None:
    print("building, installing and gating two releases (a few minutes)...", flush=True)
    appliance(home, "keys", "generate", "--out", work / "keys", "--name", "bench")
    appliance(home, "keys", "trust", work / "keys" / "bench.pub")
    for version, sequence in (("1.0.0", 1), ("1.1.0", 2)):
        toml = release_source(work, version, sequence, model)
        built = appliance(
            home,
            "bundle",
            "build",
            toml,
            "--key",
            work / "keys" / "bench.key",
            "--out",
            work / "dist",
        )
        appliance(home, "release", "install", built["bundle"])
        gate = subprocess.run(
            [
                sys.executable,
                "-m",
                "appliance",
                "eval",
                "run",
                f"demo@{version}",
                "--baseline",
                "none",
            ],
            env={**os.environ, "APPLIANCE_HOME": str(home)},
            capture_output=True,
            text=True,
        )
        if gate.returncode != 0:
            raise SystemExit(f"the gate of demo@{version} did not pass: {gate.stdout[-400:]}")
    appliance(home, "release", "activate", "demo@1.0.0")


Prompts = Callable[[int, Iterator[int]], Iterator[str]]  # (client index, shared counter)


def distinct(index: int, counter: Iterator[int]) -> Iterator[str]:
    return bench_serve.prompts_for("distinct", index, counter)


def run_clients(
    base: str,
    requests_each: int,
    prompts: Prompts = distinct,
    headers: dict[str, str] | None = None,
    think: float = 0.0,
    clients: int = CLIENTS,
) -> tuple[list[bench_serve.Stream], float]:
    """`clients` clients (CLIENTS unless given), each streaming `requests_each` of its
    prompts with `think` seconds between its requests; the streams and the wall time."""
    streams: list[bench_serve.Stream] = []
    counter = itertools.count()

    def client(index: int) -> None:
        mine = prompts(index, counter)
        for _ in range(requests_each):
            streams.append(bench_serve.stream_completion(base, next(mine), headers))
            time.sleep(think)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return streams, time.perf_counter() - start


def measure(base: str, label: str, requests_each: int, think: float) -> tuple[float, float]:
    """Distinct prompts with `think` seconds between a client's requests (a shadow can only
    use the time stable is idle); stable's p50/p95 latency."""
    streams, wall = run_clients(base, requests_each, think=think)
    m = bench_serve.summarise(label, "distinct", CLIENTS, wall, streams)
    print(
        f"{label:<12} {len(streams)} requests  p50 {m.p50:6.2f} s  p95 {m.p95:6.2f} s  "
        f"TTFT p95 {m.ttft_p95:5.2f} s",
        flush=True,
    )
    return m.p50, m.p95


def metric(base: str, pattern: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=5).text
    return sum(float(v) for v in re.findall(pattern + r" (\S+)$", text, re.M))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16, help="requests per client per run")
    parser.add_argument("--model", type=Path, help="a GGUF instead of the embedded default")
    parser.add_argument(
        "--think", type=float, default=2.0, help="seconds each client waits between requests"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-shadow-"))
    home = work / "home"
    prepare(home, work, args.model)
    try:
        with serving(home, work / "serve.log") as base:
            shadowed, before, after, answered, dropped, look = run(home, base, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    p50, p95 = (shadowed[i] / ((before[i] + after[i]) / 2) for i in (0, 1))
    print(
        f"\nstable p95 with a 100% shadow / without: {p95:.2f}x (target <= 1.10), "
        f"p50 {p50:.2f}x; "
        f"the shadow answered {answered:.0f} copies and dropped {dropped:.0f}; the judge's "
        f"last look: {look.get('verdict', '-')} ({look.get('why', '')})"
    )


def run(home: Path, base: str, args: argparse.Namespace) -> tuple:
    """No shadow, a 100% shadow, no shadow again: stable's figures in each, and the shadow's."""
    measure(base, "warm-up", 1, 0)
    before = measure(base, "no shadow", args.requests, args.think)
    appliance(
        home,
        "rollout",
        "start",
        "demo@1.1.0",
        "--shadow",
        "--percent",
        "100",
        "--interval",
        "10s",
    )
    wait(lambda: "rollout" in httpx.get(f"{base}/readyz", timeout=1).json())
    shadowed = measure(base, "shadow 100%", args.requests, args.think)
    answered = metric(
        base,
        r'^appliance_release_requests_total\{release="demo@1\.1\.0",'
        r'role="shadow",status="200"\}',
    )
    dropped = metric(base, r"^appliance_shadow_dropped_total")
    look = appliance(home, "rollout", "status")["rollout"]["last_check"] or {}
    appliance(home, "rollout", "abort", "--reason", "benchmark done")
    wait(lambda: "rollout" not in httpx.get(f"{base}/readyz", timeout=1).json())
    time.sleep(UNLOAD_SECONDS)  # the candidate is unloaded in the background
    after = measure(base, "no shadow", args.requests, args.think)
    return shadowed, before, after, answered, dropped, look


@contextlib.contextmanager
def serving(home: Path, log: Path, *args: str) -> Iterator[str]:
    """`appliance serve [ARGS]` on a free loopback port, ready; yields its base URL."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "appliance",
                "serve",
                "--port",
                str(port),
                "--insecure-no-auth",
                *args,
            ],  # fmt: skip
            env={**os.environ, "APPLIANCE_HOME": str(home)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait(lambda: httpx.get(f"{base}/readyz", timeout=1).status_code == 200)
            yield base
        finally:
            server.terminate()
            server.wait(60)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait(condition, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("timed out waiting for the service")


if __name__ == "__main__":
    main()
