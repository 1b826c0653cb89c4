#!/usr/bin/env python3
"""Benchmark: `appliance bundle verify` against `sha256sum` on the same bundle file.

Both run as whole commands, alternating, several times; the script prints the median
wall time of each and the speed ratio (sha256sum time / verify time; >= 0.8 is the goal).
It also times, in this process, the verifier's streaming pass against one plain hashlib
pass over the same file (the floor: goal <= 1.5x), and `appliance --help` (start-up:
goal < 0.15 s). Without --bundle it builds the demo bundle (Gemma 3 270M Q4_K_M, 253 MB)
in a temporary appliance home with a throwaway key.

    .venv/bin/python scripts/bench_verify.py [--bundle FILE --home DIR] [--repeat 5]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
APPLIANCE = str(Path(sys.executable).parent / "appliance")


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def build_demo_bundle(home: Path, env: dict[str, str]) -> Path:
    def run(*args: str) -> None:
        subprocess.run([APPLIANCE, *args], check=True, env=env, stdout=subprocess.DEVNULL)

    run("keys", "generate", "--out", str(home / "keys"), "--name", "bench")
    run("keys", "trust", str(home / "keys" / "bench.pub"))
    run("bundle", "build", str(REPO / "bundles/demo/bundle.toml"),
        "--key", str(home / "keys" / "bench.key"), "--out", str(home / "out"))  # fmt: skip
    return home / "out" / "demo-1.0.0.tar"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="an existing bundle (needs --home)")
    parser.add_argument("--home", type=Path, help="APPLIANCE_HOME whose trust store signs it")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-verify-"))
    try:
        home = args.home or workdir / "home"
        env = {**os.environ, "APPLIANCE_HOME": str(home)}
        bundle = args.bundle or build_demo_bundle(home, env)
        size_mb = bundle.stat().st_size / 1e6
        sha256sum, verify, hash_pass, verify_pass, startup = [], [], [], [], []
        for _ in range(args.repeat):
            sha256sum.append(timed(["sha256sum", str(bundle)], env))
            verify.append(timed([APPLIANCE, "bundle", "verify", str(bundle)], env))
            hash_pass.append(timed_call(lambda: hashlib_pass(bundle)))
            verify_pass.append(timed_call(lambda: in_process_verify(bundle, home)))
            startup.append(timed([APPLIANCE, "--help"], env))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    base, ours = statistics.median(sha256sum), statistics.median(verify)
    floor, pass_ = statistics.median(hash_pass), statistics.median(verify_pass)
    print(f"bundle           {size_mb:.0f} MB, {args.repeat} runs each, medians")
    print(f"sha256sum        {base:.2f} s  ({size_mb / base:.0f} MB/s)")
    print(f"bundle verify    {ours:.2f} s  ({size_mb / ours:.0f} MB/s)")
    print(f"speed ratio      {base / ours:.2f}x sha256sum (goal >= 0.80x)")
    print(f"hashlib pass     {floor:.3f} s, in this process")
    print(f"verify pass      {pass_:.3f} s, in this process: {pass_ / floor:.2f}x (goal <= 1.5x)")
    print(f"appliance --help {statistics.median(startup):.3f} s (goal < 0.15 s)")


def timed_call(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def hashlib_pass(path: Path) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)


def in_process_verify(bundle: Path, home: Path) -> None:
    from appliance.trust.truststore import load_trust_store
    from appliance.trust.verify import verify_bundle

    verify_bundle(bundle, load_trust_store(home / "etc" / "trust.json"))


if __name__ == "__main__":
    main()
