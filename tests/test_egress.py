"""No egress: the process-wide guard refuses non-loopback connections and name lookups.

Run inside a network namespace with no interfaces (unshare -rn), so that even a broken
guard could not send a packet anywhere."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import logging, socket
    logging.basicConfig(level=logging.ERROR, format="%(name)s %(message)s")
    from appliance.serve.egress import install_egress_guard
    install_egress_guard()

    def attempt(label, action):
        try:
            action()
            print(label, "allowed")
        except PermissionError:
            print(label, "blocked")
        except OSError as exc:
            print(label, "allowed-but-failed", type(exc).__name__)

    attempt("tcp-remote", lambda: socket.create_connection(("192.0.2.10", 443), timeout=1))
    attempt("tcp-remote-v6", lambda: socket.socket(socket.AF_INET6).connect(("2001:db8::1", 443)))
    attempt("udp-remote", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(
        b"x", ("198.51.100.7", 53)))
    attempt("dns-lookup", lambda: socket.getaddrinfo("updates.example.com", 443))
    attempt("tcp-loopback", lambda: socket.create_connection(("127.0.0.1", 9), timeout=1))
    attempt("unix", lambda: socket.socket(socket.AF_UNIX).connect("/nonexistent.sock"))
""")


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare")
def test_guard_blocks_outbound_and_allows_loopback():
    done = subprocess.run(
        ["unshare", "-rn", sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60
    )
    verdicts = dict(line.split(" ", 1) for line in done.stdout.strip().splitlines())
    assert verdicts["tcp-remote"] == "blocked"
    assert verdicts["tcp-remote-v6"] == "blocked"
    assert verdicts["udp-remote"] == "blocked"
    assert verdicts["dns-lookup"] == "blocked"
    assert verdicts["tcp-loopback"].startswith("allowed")  # refused by the port, not the guard
    assert verdicts["unix"].startswith("allowed")
    assert "blocked outbound network access to ('192.0.2.10', 443)" in done.stderr
