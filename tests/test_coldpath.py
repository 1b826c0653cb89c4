"""The cold-path client against a real OpenAI-compatible server that nobody here wrote:
llama-cpp-python's own server, on loopback, serving another tiny model."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serving import free_port, start_server, wait_for
from tinymodel import write_tiny_gguf

from appliance.paths import appliance_paths
from appliance.serve.coldpath import CircuitBreaker, CircuitOpen, ColdPath, ColdPathError
from appliance.serve.egress import Admitted
from appliance.store.routing import Target

API_KEY = "sk-cold-test"
CHAT = {"messages": [{"role": "user", "content": "the model"}], "max_tokens": 8, "temperature": 0}


class LlamaCppServer:
    def __init__(self, model: Path, port: int, log: Path) -> None:
        self.model, self.port, self.log = model, port, log
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model),
                   "--port", str(self.port), "--n_ctx", "256", "--n_threads", "1",
                   "--api_key", API_KEY, "--model_alias", "tiny-cold"]  # fmt: skip
        with open(self.log, "a") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-2000:]
            try:
                headers = {"Authorization": f"Bearer {API_KEY}"}
                url = f"http://127.0.0.1:{self.port}/v1/models"
                if httpx.get(url, headers=headers, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError("llama_cpp.server did not start: " + self.log.read_text()[-2000:])

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)


@pytest.fixture
def cold_server(tmp_path):
    model = write_tiny_gguf(tmp_path / "cold.gguf", seed=1)
    server = LlamaCppServer(model, free_port(), tmp_path / "cold.log")
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.kill()


def target(port: int, key_file: Path | None) -> Target:
    url = f"http://127.0.0.1:{port}/v1"
    return Target("big", url, "tiny-cold", str(key_file) if key_file else None, 0.5, 1, "")


def test_the_cold_path_answers_and_its_breaker_opens_and_closes(cold_server, tmp_path):
    key_file = tmp_path / "cold.key"
    key_file.write_text(API_KEY + "\n")
    key_file.chmod(0o600)
    keyless = ColdPath(target(cold_server.port, None), retries=0)
    with pytest.raises(ColdPathError, match="HTTP 401"):
        keyless.complete("chat", CHAT)

    breaker = CircuitBreaker(failures_to_open=2, cooldown_seconds=1.0)
    cold = ColdPath(target(cold_server.port, key_file), timeout_seconds=30, breaker=breaker)
    answer = cold.complete("chat", CHAT)
    assert answer["choices"][0]["message"]["content"] is not None
    assert answer["usage"]["completion_tokens"] > 0
    text = cold.complete("completion", {"prompt": "the model", "max_tokens": 4})
    assert text["choices"][0]["text"] is not None

    cold_server.kill()  # one call, two attempts (a retry): both fail, the breaker opens
    with pytest.raises(ColdPathError, match="ConnectError"):
        cold.complete("chat", CHAT)
    assert breaker.state == "open"
    with pytest.raises(CircuitOpen):  # no attempt while it cools down
        cold.complete("chat", CHAT)

    cold_server.start()
    time.sleep(1.1)
    assert breaker.state == "half_open"
    assert cold.complete("chat", CHAT)["usage"]["completion_tokens"] > 0
    assert breaker.state == "closed"
    cold.close()
    keyless.close()


def test_a_failed_half_open_trial_opens_the_breaker_again():
    now = [0.0]
    breaker = CircuitBreaker(failures_to_open=2, cooldown_seconds=10, clock=lambda: now[0])
    breaker.failed()
    assert breaker.state == "closed" and breaker.allow()
    breaker.failed()
    assert breaker.state == "open" and not breaker.allow()
    now[0] = 10
    assert breaker.allow()  # the one trial
    assert not breaker.allow()  # and no second one beside it
    breaker.failed()
    assert breaker.state == "open" and not breaker.allow()
    now[0] = 20
    assert breaker.allow()
    breaker.succeeded()
    assert breaker.state == "closed" and breaker.allow() and breaker.allow()


def test_the_fallback_sends_requests_to_the_cold_path_and_the_hot_path_covers(
    cold_server, tmp_path, tiny_gguf, appliance_home, run_cli
):
    key_file = tmp_path / "cold.key"
    key_file.write_text(API_KEY)
    key_file.chmod(0o600)
    url = f"http://127.0.0.1:{cold_server.port}/v1"
    added = run_cli("route", "add", "big", "--url", url, "--model", "tiny-cold",
                    "--key-file", key_file)  # fmt: skip
    assert added.exit_code == 0, added.output
    server = start_server(appliance_home, "--model", str(tiny_gguf), "--insecure-no-auth")
    try:

        def ask(**extra) -> httpx.Response:
            response = server.post("/v1/chat/completions", json={**CHAT, **extra})
            assert response.status_code == 200, response.text
            return response

        assert ask().headers["x-appliance-route"] == "hot"
        assert run_cli("route", "fallback", "on", "--reason", "test").exit_code == 0
        assert wait_for(lambda: ask().headers["x-appliance-route"] == "cold:big")
        answer = ask()
        assert answer.headers["x-appliance-escalation"] == "fallback"
        assert answer.json()["model"] == "tiny-cold"
        streamed = ask(stream=True)
        events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and streamed.headers["x-appliance-route"] == "cold:big"
        text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
        assert text == answer.json()["choices"][0]["message"]["content"]

        cold_server.kill()  # the hot path answers and says why
        covered = ask()
        assert covered.headers["x-appliance-route"] == "hot"
        assert "ConnectError" in covered.headers["x-appliance-escalation-failed"]
        ask()  # three failures in a row open the breaker: then no call goes out
        assert "cooling down" in ask().headers["x-appliance-escalation-failed"]

        assert run_cli("route", "fallback", "off").exit_code == 0
        assert wait_for(lambda: "x-appliance-escalation-failed" not in ask().headers)
    finally:
        server.stop()


def test_the_egress_guard_admits_only_registered_addresses():
    admitted = Admitted()
    assert not admitted.admits(("10.0.0.7", 8000))
    admitted.set({("10.0.0.7", 8000), ("fd00::7", 9000)})
    assert admitted.admits(("10.0.0.7", 8000)) and admitted.admits(("fd00:0::7", 9000, 0, 0))
    assert not admitted.admits(("10.0.0.7", 8001)) and not admitted.admits(("10.0.0.8", 8000))
    assert not admitted.admits(("llm.internal", 8000))  # a name is never resolved
    admitted.set(set())
    assert not admitted.admits(("10.0.0.7", 8000))


def test_the_policy_escalates_by_each_rule_and_telemetry_names_the_route(
    cold_server, tmp_path, tiny_gguf, appliance_home, run_cli
):
    """Each rule of the routing policy (set by an admin over a development model's empty
    signed policy) sends its request to the cold path, named in the headers, /metrics
    and telemetry; a request no rule catches stays hot."""
    key_file = tmp_path / "cold.key"
    key_file.write_text(API_KEY)
    key_file.chmod(0o600)
    url = f"http://127.0.0.1:{cold_server.port}/v1"
    assert run_cli("route", "add", "big", "--url", url, "--model", "tiny-cold", "--key-file",
                   key_file, "--cost-per-1k-tokens", "0.5").exit_code == 0  # fmt: skip

    def policy(key: str, value: str) -> None:
        result = run_cli("route", "policy", "set", key, value, "--reason", "test")
        assert result.exit_code == 0, result.output

    server = start_server(appliance_home, "--model", str(tiny_gguf), "--insecure-no-auth")
    try:

        def ask(content: str = "the model", headers: dict | None = None, **extra):
            body = {**CHAT, "messages": [{"role": "user", "content": content}], **extra}
            response = server.post("/v1/chat/completions", json=body, headers=headers or {})
            assert response.status_code == 200, response.text
            return response.headers.get("x-appliance-route"), response.headers.get(
                "x-appliance-escalation"
            )

        assert ask() == ("hot", None)
        assert ask(headers={"x-appliance-escalate": "true"}) == ("hot", None)  # not allowed
        policy("client_may_escalate", "true")
        assert wait_for(lambda: ask(headers={"x-appliance-escalate": "true"})[0] == "cold:big")
        policy("categories", '{"legal": "(?i)contract"}')
        assert wait_for(lambda: ask("Check this CONTRACT") == ("cold:big", "category:legal"))
        policy("max_prompt_tokens", "3")
        assert wait_for(lambda: ask("a prompt of more than three tokens")[1] == "prompt_tokens")
        policy("max_prompt_tokens", "0")
        # after generation: whole answers only (a streamed one has reached its client)
        json_format = {"response_format": {"type": "json_object"}}
        assert wait_for(lambda: ask(**json_format) == ("cold:big", "invalid_json"))
        assert ask(stream=True, **json_format) == ("hot", None)
        policy("validate_json", "false")
        assert wait_for(lambda: ask(**json_format) == ("hot", None))
        policy("min_mean_logprob", "-0.0001")  # the tiny model is never that sure
        assert wait_for(lambda: ask() == ("cold:big", "low_confidence"))
        policy("min_mean_logprob", "-1000")
        assert wait_for(lambda: ask() == ("hot", None))
        policy("refusal_patterns", '["^"]')  # every answer "refuses"
        assert wait_for(lambda: ask() == ("cold:big", "refusal"))

        cold_server.kill()  # the release answers, and says what it stood in for
        response = server.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 200
        assert response.headers["x-appliance-route"] == "hot"
        assert response.headers["x-appliance-escalation"] == "refusal"
        assert "ConnectError" in response.headers["x-appliance-escalation-failed"]

        metrics = server.get("/metrics").text
        assert (
            'appliance_route_requests_total{escalation="category:legal",route="cold:big",status="200"}'
            in metrics
        )
        assert (
            'appliance_route_requests_total{escalation="refusal",route="hot",status="200"}'
            in metrics
        )
        assert re.search(r'^appliance_cold_tokens_total\{route="cold:big"\} [1-9]', metrics, re.M)
        db = sqlite3.connect(appliance_paths().state_db)

        def rows() -> set:
            return set(db.execute(
                "SELECT route, escalation, cold_tokens > 0 FROM requests WHERE role = 'stable'"
            ))  # fmt: skip

        assert wait_for(lambda: ("hot", "refusal", 0) in rows())
        assert {("hot", None, 0), ("cold:big", "client", 1), ("cold:big", "low_confidence", 1),
                ("cold:big", "invalid_json", 1)} <= rows()  # fmt: skip
    finally:
        server.stop()
