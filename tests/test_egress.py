"""No egress: the process-wide guard refuses non-loopback connections and name lookups,
and lets no DNS query out (not even one that CPython makes inside connect or sendto).

Run inside a network namespace of its own (unshare -rn), so that even a broken guard could
not send a packet beyond it; the DNS test brings up lo there, for a fake resolver."""

from __future__ import annotations

import json
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


# A fake resolver on 127.0.0.1:53 records every query it receives; each attempt then goes
# through the guard. Host names must be refused before CPython resolves them (it does so
# inside connect/sendto/bind, before the audit event), and reverse lookups not at all.
DNS_PROBE = textwrap.dedent("""
    import json, os, socket, sys, tempfile
    resolver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    resolver.bind(("127.0.0.1", 53))
    resolver.setblocking(False)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    unix_path = os.path.join(tempfile.mkdtemp(), "s.sock")
    unix_listener = socket.socket(socket.AF_UNIX)
    unix_listener.bind(unix_path)
    unix_listener.listen()

    from appliance.serve.egress import install_egress_guard
    install_egress_guard()

    def tcp():
        return socket.socket()

    def udp():
        return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    attempts = {
        "connect": lambda: tcp().connect(("leak-connect.example", 80)),
        "connect_ex": lambda: tcp().connect_ex(("leak-connect-ex.example", 80)),
        "connect-bytes": lambda: tcp().connect((b"leak-bytes.example", 80)),
        "sendto": lambda: udp().sendto(b"x", ("leak-sendto.example", 53)),
        "sendto-flags": lambda: udp().sendto(b"x", 0, ("leak-sendto-flags.example", 53)),
        "sendmsg": lambda: udp().sendmsg([b"x"], [], 0, ("leak-sendmsg.example", 53)),
        "bind": lambda: tcp().bind(("leak-bind.example", 0)),
        "gethostbyaddr": lambda: socket.gethostbyaddr("192.0.2.1"),
        "getnameinfo": lambda: socket.getnameinfo(("192.0.2.1", 80), 0),
        "getfqdn": lambda: socket.getfqdn("192.0.2.1"),
        "getaddrinfo": lambda: socket.getaddrinfo("leak.example", 80),
        "tcp-loopback": lambda: tcp().connect(("127.0.0.1", port)),
        "tcp-localhost": lambda: tcp().connect(("localhost", port)),
        "udp-loopback": lambda: udp().sendto(b"x", ("127.0.0.1", port)),
        "unix": lambda: socket.socket(socket.AF_UNIX).connect(unix_path),
    }
    verdicts = {}
    for label, attempt in attempts.items():
        try:
            attempt()
            verdicts[label] = "allowed"
        except PermissionError:
            verdicts[label] = "blocked"
        except OSError as exc:
            verdicts[label] = "failed: " + repr(exc)

    queries = []
    while True:
        try:
            packet = resolver.recv(512)
        except BlockingIOError:
            break
        labels, at = [], 12
        while packet[at]:
            labels.append(packet[at + 1 : at + 1 + packet[at]].decode())
            at += 1 + packet[at]
        queries.append(".".join(labels))
    print(json.dumps({"verdicts": verdicts, "queries": queries}))
""")

# In a user, network and mount namespace of its own: lo up, and a resolv.conf, hosts and
# nsswitch.conf of ours bind-mounted over the host's, so every DNS query goes to the probe.
NAMESPACE_SETUP = """
set -e
ip link set lo up
mount --bind "$1/resolv.conf" /etc/resolv.conf
mount --bind "$1/hosts" /etc/hosts
if [ -e /etc/nsswitch.conf ]; then mount --bind "$1/nsswitch.conf" /etc/nsswitch.conf; fi
# nscd would answer from the host's network namespace: hide its socket.
if [ -d /run/nscd ]; then mount -t tmpfs tmpfs /run/nscd; fi
exec "$2" -c "$3"
"""


@pytest.mark.skipif(
    shutil.which("unshare") is None or shutil.which("ip") is None, reason="needs unshare, ip"
)
def test_dns_leak_through_connect_sendto_and_reverse_lookups(tmp_path):
    (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")
    (tmp_path / "nsswitch.conf").write_text("hosts: files dns\n")
    done = subprocess.run(
        [
            "unshare",
            "-rnm",
            "bash",
            "-c",
            NAMESPACE_SETUP,
            "-",
            tmp_path,
            sys.executable,
            DNS_PROBE,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    verdicts = result["verdicts"]
    refused = [
        "connect",
        "connect_ex",
        "connect-bytes",
        "sendto",
        "sendto-flags",
        "sendmsg",
        "bind",
        "gethostbyaddr",
        "getnameinfo",
        "getfqdn",
        "getaddrinfo",
    ]
    assert {label: verdicts[label] for label in refused} == dict.fromkeys(refused, "blocked")
    assert result["queries"] == [], "the resolver was asked"
    for label in ("tcp-loopback", "tcp-localhost", "udp-loopback", "unix"):
        assert verdicts[label] == "allowed", label
    assert "blocked outbound network access to ('leak-connect.example', 80)" in done.stderr
