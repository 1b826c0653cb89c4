#!/usr/bin/env python3
"""Benchmark: `appliance bundle verify` against `sha256sum` on the same bundle file.

Both run as whole commands, alternating, several times; the script prints the median
wall time of each and the speed ratio (sha256sum time / verify time; >= 0.8 is the goal).
Without --bundle it builds the demo bundle (Gemma 3 270M Q4_K_M, 253 MB) in a temporary
appliance home with a throwaway key.

    .venv/bin/python scripts/bench_verify.py [--bundle FILE --home DIR] [--repeat 5]
"""

from __future__ import annotations

import argparse
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
        sha256sum, verify = [], []
        for _ in range(args.repeat):
            sha256sum.append(timed(["sha256sum", str(bundle)], env))
            verify.append(timed([APPLIANCE, "bundle", "verify", str(bundle)], env))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    base, ours = statistics.median(sha256sum), statistics.median(verify)
    print(f"bundle           {size_mb:.0f} MB, {args.repeat} runs each, medians")
    print(f"sha256sum        {base:.2f} s  ({size_mb / base:.0f} MB/s)")
    print(f"bundle verify    {ours:.2f} s  ({size_mb / ours:.0f} MB/s)")
    print(f"speed ratio      {base / ours:.2f}x sha256sum (goal >= 0.80x)")


if __name__ == "__main__":
    main()
