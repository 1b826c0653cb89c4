"""The network boundary is the kernel's: with socket activation the service runs in a
network namespace of its own, with no interface but a loopback that is down, and serves
clients on the host's loopback through the listening socket it inherits as fd 3 (what
appliance.socket and PrivateNetwork=yes do under systemd)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.skipif(
    shutil.which("unshare") is None or shutil.which("nsenter") is None,
    reason="needs unshare and nsenter",
)

# sd_listen_fds as systemd does it: the socket (our stdin) becomes fd 3, LISTEN_PID names
# the process that will serve (bash execs unshare, which execs python: the pid stays).
ACTIVATE = 'exec 3<&0 0</dev/null; export LISTEN_FDS=1 LISTEN_PID=$$; exec unshare -rn "$@"'

OUTBOUND_PROBE = """
import json, socket, sys
results = {}
for name, address in (("remote", ("192.0.2.1", 80)), ("host-loopback", ("127.0.0.1", PORT))):
    try:
        socket.create_connection(address, timeout=2).close()
        results[name] = "connected"
    except OSError as exc:
        results[name] = type(exc).__name__
print(json.dumps(results))
"""


def start_socket_activated(listener: socket.socket, home: Path, model: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "appliance", "serve", "--model", str(model)]
    command += ["--insecure-no-auth"]
    env = {**os.environ, "APPLIANCE_HOME": str(home)}
    home.mkdir(parents=True)
    with open(home / "serve.log", "w") as log:
        return subprocess.Popen(
            ["bash", "-c", ACTIVATE, "-", *command],
            stdin=listener.fileno(),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )


def wait_ready(url: str, process: subprocess.Popen, log: Path, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, f"server exited: {log.read_text()}"
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"not ready through the inherited socket: {log.read_text()}")


def interfaces(pid: int) -> list[str]:
    lines = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
    return [line.split(":", 1)[0].strip() for line in lines]


def test_socket_activated_service_has_no_network_but_serves(tiny_gguf, tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))  # in our namespace: the host's
    port = listener.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = start_socket_activated(listener, tmp_path / "home", tiny_gguf)
    listener.close()  # the server holds it now, as systemd would
    try:
        wait_ready(url, server, tmp_path / "home/serve.log")
        reply = httpx.post(
            url + "/v1/completions", json={"prompt": "hello", "max_tokens": 4}, timeout=60
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] is not None

        assert interfaces(server.pid) == ["lo"], "the service must have no network interface"
        outbound = subprocess.run(
            ["nsenter", "-t", str(server.pid), "-U", "-n", "--preserve-credentials"]
            + [sys.executable, "-c", OUTBOUND_PROBE.replace("PORT", str(port))],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert outbound.returncode == 0, outbound.stderr
        # No route anywhere: not even to the host's loopback, where the socket lives.
        assert json.loads(outbound.stdout) == {
            "remote": "OSError",
            "host-loopback": "OSError",
        }
        log = (tmp_path / "home/serve.log").read_text()
        assert f"fd 3 from systemd (http://127.0.0.1:{port})" in log
    finally:
        server.terminate()
        server.wait(30)


def not_listening() -> socket.socket:
    return socket.socket()


def loopback_listener() -> socket.socket:
    return socket.create_server(("127.0.0.1", 0))


def unix_listener() -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind("")  # an autobound abstract address
    sock.listen()
    return sock


@pytest.mark.parametrize(
    "make_socket, listen_pid, error",
    [
        (not_listening, "$$", "it is not listening"),
        (unix_listener, "$$", "it is not a TCP socket"),
        (loopback_listener, "1", "systemd passed no listening socket"),  # not for us
    ],
    ids=["not-listening", "unix", "other-pid"],
)
def test_socket_activation_refuses_a_wrong_socket(
    tiny_gguf, tmp_path, make_socket, listen_pid, error
):
    sock = make_socket()
    command = [sys.executable, "-m", "appliance", "serve", "--model", str(tiny_gguf)]
    command += ["--insecure-no-auth", "--require-socket-activation"]
    done = subprocess.run(
        ["bash", "-c", ACTIVATE.replace("$$", listen_pid), "-", *command],
        stdin=sock.fileno(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    sock.close()
    assert done.returncode == 5, done.stderr
    assert error in done.stderr
