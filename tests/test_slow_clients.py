"""Slow clients (slowloris) cannot hold the service's connections: a request must arrive
whole within the read timeout of its first byte, and a connection with no request under
way is closed after the idle timeout. The real service, on a tiny model."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest
from serving import Server, start_server

READ_TIMEOUT = 2.0
IDLE_TIMEOUT = 3.0  # unlike READ_TIMEOUT, so each test shows which deadline struck
SLACK = 1.5


@pytest.fixture(scope="module")
def server(tiny_gguf, tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:  # the options' environment variables
        env.setenv("APPLIANCE_READ_TIMEOUT", str(READ_TIMEOUT))
        env.setenv("APPLIANCE_IDLE_TIMEOUT", str(IDLE_TIMEOUT))
        server = start_server(
            tmp_path_factory.mktemp("slow") / "home",
            "--model",
            str(tiny_gguf),
            "--insecure-no-auth",
        )
    yield server
    server.stop()


def connect(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def seconds_until_closed(sock: socket.socket, trickle: bytes, limit: float) -> tuple[float, int]:
    """Send `trickle` a byte a second until the server closes the connection.

    Returns the seconds that took (or `limit`, if it stayed open) and the bytes trickled."""
    start, sent = time.monotonic(), 0
    sock.settimeout(1.0)
    while time.monotonic() - start < limit:
        try:
            if sock.recv(4096) == b"":
                break
        except TimeoutError:
            try:
                if sent < len(trickle):
                    sock.sendall(trickle[sent : sent + 1])
                    sent += 1
            except OSError:  # reset: the server has gone
                break
        except OSError:
            break
    return time.monotonic() - start, sent


def completion_works(server: Server) -> bool:
    reply = server.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4})
    return reply.status_code == 200 and reply.json()["choices"][0]["text"] is not None


@pytest.mark.parametrize(
    "opening, trickle",
    [
        # slowloris: a request head that never ends
        (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n", b"X-Slow: " + b"a" * 60),
        # a whole head, then a body that trickles in
        (
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 60\r\n\r\n",
            b" " * 60,
        ),
    ],
    ids=["head", "body"],
)
def test_slowloris_is_disconnected_within_read_timeout(server, opening, trickle):
    with connect(server) as sock:
        sock.sendall(opening)
        seconds, sent = seconds_until_closed(sock, trickle, limit=READ_TIMEOUT + IDLE_TIMEOUT + 3)
    assert seconds < READ_TIMEOUT + SLACK, f"still connected after {seconds:.1f} s"
    assert sent >= 1, "closed before the client trickled anything"
    assert completion_works(server)


def test_silent_connection_is_disconnected_within_idle_timeout(server):
    with connect(server) as sock:
        seconds, _ = seconds_until_closed(sock, b"", limit=IDLE_TIMEOUT + 5)
    assert IDLE_TIMEOUT - 0.5 < seconds < IDLE_TIMEOUT + SLACK, f"{seconds:.1f} s"


def test_unhurried_requests_on_a_kept_alive_connection_still_work(server):
    assert completion_works(server)
    body = json.dumps({"prompt": "hello", "max_tokens": 4}).encode()
    connection = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=60)
    for turn in range(2):  # the same connection: each request gets a deadline of its own
        if turn:
            time.sleep(READ_TIMEOUT / 2)  # idle, but for less than the idle timeout
        connection.putrequest("POST", "/v1/completions")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders()
        time.sleep(READ_TIMEOUT / 2)  # the body comes late, but within the read timeout
        connection.send(body)
        reply = connection.getresponse()
        assert reply.status == 200, reply.read()
        assert json.loads(reply.read())["choices"]
    connection.close()
