"""Helpers to run the real service in a subprocess on a free loopback port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from click.testing import CliRunner

from appliance.bundler.builder import build_bundle
from appliance.bundler.spec import load_bundle_spec
from appliance.cli import cli
from appliance.trust.crypto import load_signing_key
from appliance.trust.keyfiles import write_key_pair


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    url: str
    home: Path
    process: subprocess.Popen
    log: Path
    key: str = ""

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(self.url + path, headers=self.headers, timeout=60, **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return httpx.post(self.url + path, headers=headers, timeout=120, **kwargs)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_server(
    home: Path, *args: str, ready_seconds: float = 120, expect_ready: bool = True
) -> Server:
    """Start `appliance serve`; wait until /readyz is 200 (or, with expect_ready=False, until
    /healthz answers: a service that is up but has nothing it can serve)."""
    port = free_port()
    log = home / f"serve-{port}.log"
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "APPLIANCE_HOME": str(home)}
    env.pop("APPLIANCE_FAULT", None)
    command = [sys.executable, "-m", "appliance", "serve", "--port", str(port), *args]
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", home, process, log)
    deadline = time.monotonic() + ready_seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()}")
        try:
            probe = "/readyz" if expect_ready else "/healthz"
            if httpx.get(server.url + probe, timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server not ready in {ready_seconds} s: {log.read_text()}")


def wait_for(predicate, seconds: float = 15, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def appliance(home: Path, *args: object) -> tuple[int, dict]:
    """Run the CLI with --json in `home`: its exit code and what it printed."""
    result = CliRunner().invoke(cli, [*map(str, args), "--json"], env={"APPLIANCE_HOME": str(home)})
    return result.exit_code, json.loads(result.stdout) if result.stdout.strip() else {}


def serve_bundle(home: Path, toml: Path, out: Path) -> Server:
    """Sign the bundle of `toml` with a key `home` trusts, install and activate it there
    (its gate not run), and serve it with an API key (server.key)."""
    keys = home / "etc" / "release-keys"
    write_key_pair(keys, "release", None)
    assert appliance(home, "keys", "trust", keys / "release.pub")[0] == 0
    key = load_signing_key((keys / "release.key").read_bytes(), None)
    bundle = build_bundle(load_bundle_spec(toml), [key], out).path
    assert appliance(home, "release", "install", bundle)[0] == 0
    assert appliance(home, "release", "activate", "demo@1.0.0", "--force", "--reason", "t")[0] == 0
    running = start_server(home)
    running.key = appliance(home, "apikeys", "create", "--name", "tests")[1]["key"]
    return running


def gate_both_ways(server: Server, ref: str = "demo@1.0.0") -> list[tuple[dict, dict]]:
    """`eval run` of `ref` in-process, then over HTTP against `server`: for each, what the
    CLI printed and the report it wrote."""
    runs = [
        appliance(server.home, "eval", "run", ref, "--baseline", "none"),
        appliance(
            server.home,
            *("eval", "run", ref, "--baseline", "none"),
            *("--url", server.url, "--api-key", server.key),
        ),
    ]
    return [(said, json.loads(Path(said["files"]["json"]).read_text())) for _code, said in runs]
