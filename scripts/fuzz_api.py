"""A longer, randomized fuzzing campaign against the inference API (the test suite runs a
short one pinned to one seed).

Starts `appliance serve` on a throwaway appliance home (the tiny test model unless --model
names a GGUF), with an API key and --openapi, then runs schemathesis from the service's own
OpenAPI document with a fresh random seed (printed, so a failure can be replayed with
--seed). Any 5xx fails the run.

    .venv/bin/python scripts/fuzz_api.py [--max-examples 500] [--seed N] [--model FILE.gguf]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from serving import start_server  # noqa: E402 - the tests' helpers, on the path just above
from tinymodel import write_tiny_gguf  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-examples", type=int, default=500, help="per operation")
    parser.add_argument("--seed", type=int, default=None, help="replay a campaign")
    parser.add_argument("--model", type=Path, help="a GGUF to serve (default: the tiny model)")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    with tempfile.TemporaryDirectory(prefix="fuzz-api-") as work:
        home = Path(work) / "home"
        env = {**os.environ, "APPLIANCE_HOME": str(home)}
        model = args.model or write_tiny_gguf(Path(work) / "tiny.gguf")
        created = subprocess.run(
            [sys.executable, "-m", "appliance", "apikeys", "create", "--name", "fuzz", "--json"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        key = json.loads(created.stdout)["key"]
        server = start_server(home, "--model", str(model), "--openapi")
        try:
            schema = Path(work) / "openapi.json"
            headers = {"Authorization": f"Bearer {key}"}
            schema.write_bytes(httpx.get(server.url + "/openapi.json", headers=headers).content)
            print(f"fuzz_api: seed {seed}, {args.max_examples} examples per operation", flush=True)
            done = subprocess.run(
                [
                    str(Path(sys.executable).parent / "schemathesis"),
                    "run",
                    str(schema),
                    "--url",
                    server.url,
                    "--checks",
                    "not_a_server_error",
                    "--max-examples",
                    str(args.max_examples),
                    "--seed",
                    str(seed),
                    "--request-timeout",
                    "120",
                    "-H",
                    f"Authorization: Bearer {key}",
                ]
            )
        finally:
            server.stop()
        if done.returncode != 0:
            print(f"fuzz_api: FAILED; replay with --seed {seed}", file=sys.stderr)
        return done.returncode


if __name__ == "__main__":
    sys.exit(main())
