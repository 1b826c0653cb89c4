"""The inference service, for real: a subprocess serving an installed, signed tiny-model
release over HTTP on loopback, driven by the official openai client and by raw HTTP."""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from click.testing import CliRunner
from conftest import write_bundle_dir
from prometheus_client.parser import text_string_to_metric_families
from serving import Server, start_server, wait_for

from appliance.bundler.builder import build_bundle
from appliance.bundler.spec import load_bundle_spec
from appliance.cli import cli
from appliance.serve.service import KEY_RECHECK_SECONDS
from appliance.trust.crypto import load_signing_key
from appliance.trust.keyfiles import write_key_pair


def appliance(home: Path, *args: object) -> dict:
    result = CliRunner().invoke(cli, [*map(str, args), "--json"], env={"APPLIANCE_HOME": str(home)})
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def install_release(home: Path, work: Path, model: Path, version: str, sequence: int) -> str:
    keys = home / "etc" / "release-keys"
    if not (keys / "release.key").exists():
        write_key_pair(keys, "release", None)
        appliance(home, "keys", "trust", keys / "release.pub")
    key = load_signing_key((keys / "release.key").read_bytes(), None)
    spec = load_bundle_spec(
        write_bundle_dir(work / f"src-{version}", model, release=(version, sequence, 0))
    )
    bundle = build_bundle(spec, [key], work / f"out-{version}").path
    appliance(home, "release", "install", bundle)
    return f"demo@{version}"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_gguf):
    home = tmp_path_factory.mktemp("serve-home")
    ref = install_release(home, tmp_path_factory.mktemp("work"), tiny_gguf, "1.0.0", 1)
    appliance(home, "release", "activate", ref, "--force", "--reason", "test")
    key = appliance(home, "apikeys", "create", "--name", "tests")["key"]
    running = start_server(home, "--openapi")
    running.key = key
    yield running
    running.stop()


def test_openai_client_chat_completions_and_streaming(server: Server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.key)
    chat = client.chat.completions.create(
        model="demo@1.0.0",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=8,
        temperature=0,
    )
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.completion_tokens <= 8 and chat.usage.prompt_tokens > 0

    stream = client.chat.completions.create(
        model="demo@1.0.0",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content, "streaming and whole responses agree"
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

    completion = client.completions.create(
        model="demo@1.0.0", prompt="the model", max_tokens=5, temperature=0
    )
    streamed = client.completions.create(
        model="demo@1.0.0", prompt="the model", max_tokens=5, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text
    assert [m.id for m in client.models.list()] == ["demo@1.0.0"]


def scrape(server: Server) -> dict[str, float]:
    """Every sample on /metrics, by name and labels, as prometheus_client parses it."""
    text = httpx.get(server.url + "/metrics").text
    return {
        sample.name + str(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_health_readiness_and_metrics(server: Server):
    assert httpx.get(server.url + "/healthz").json() == {"status": "alive"}
    assert httpx.get(server.url + "/readyz").json() == {"status": "ready", "release": "demo@1.0.0"}
    before = scrape(server)
    response = server.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert response.status_code == 200
    after = scrape(server)
    ok = "appliance_requests_total[('endpoint', 'completions'), ('status', '200')]"
    assert after[ok] == before.get(ok, 0) + 1, "one more successful request is counted"
    usage = response.json()["usage"]
    for name, delta in (
        ("appliance_prompt_tokens_total[]", usage["prompt_tokens"]),
        ("appliance_completion_tokens_total[]", usage["completion_tokens"]),
        ("appliance_request_latency_seconds_count[]", 1),
        ("appliance_time_to_first_token_seconds_count[]", 1),
    ):
        assert after[name] - before.get(name, 0) == delta, name
    metrics = httpx.get(server.url + "/metrics").text
    for series in (
        "appliance_requests_total",
        "appliance_prompt_tokens_total",
        "appliance_completion_tokens_total",
        "appliance_time_to_first_token_seconds",
        "appliance_request_latency_seconds_bucket",
        "appliance_queue_depth",
        "appliance_busy_slots",
        'appliance_active_release{release="demo@1.0.0"} 1.0',
    ):
        assert series in metrics, series


def test_api_keys_are_required_and_revocable(server: Server):
    body = {"prompt": "hi", "max_tokens": 1}
    missing = httpx.post(server.url + "/v1/completions", json=body)
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"
    wrong = server.post("/v1/completions", json=body, headers={"Authorization": "Bearer sk-no"})
    assert wrong.status_code == 401
    created = appliance(server.home, "apikeys", "create", "--name", "temporary")
    headers = {"Authorization": f"Bearer {created['key']}"}
    time.sleep(KEY_RECHECK_SECONDS)  # past the re-read that the wrong key above prompted
    # usable at once: an unknown key prompts a fresh read instead of waiting for the poll
    fresh = httpx.post(server.url + "/v1/completions", json=body, headers=headers)
    assert fresh.status_code == 200, fresh.text
    appliance(server.home, "apikeys", "revoke", created["prefix"])
    assert wait_for(
        lambda: (
            httpx.post(server.url + "/v1/completions", json=body, headers=headers).status_code
            == 401
        )
    )
    listed = appliance(server.home, "apikeys", "list")["keys"]
    assert all("sha256" not in k and "key" not in k for k in listed)


BAD_REQUESTS = {
    "malformed_json": (b'{"prompt": "x", ', 400),
    "wrong_type": (json.dumps({"prompt": "x", "max_tokens": "many"}).encode(), 400),
    "unknown_model": (json.dumps({"prompt": "x", "model": "gpt-9"}).encode(), 404),
    "invalid_utf8": (b'{"prompt": "\xff\xfe"}', 400),
    "negative_max_tokens": (json.dumps({"prompt": "x", "max_tokens": -5}).encode(), 400),
    "huge_max_tokens": (json.dumps({"prompt": "x", "max_tokens": 10**12}).encode(), 400),
    "two_prompts": (json.dumps({"prompt": ["a", "b"]}).encode(), 400),
    "n_above_one": (json.dumps({"prompt": "x", "n": 3}).encode(), 400),
    "temperature_out_of_range": (json.dumps({"prompt": "x", "temperature": 9}).encode(), 400),
    "not_an_object": (b"[1, 2, 3]", 400),
    "oversized_body": (json.dumps({"prompt": "x" * (2 << 20)}).encode(), 413),
    "lone_surrogate_in_prompt": (b'{"prompt": "a \\ud800 b"}', 400),
    "lone_surrogate_in_stop": (b'{"prompt": "a", "stop": ["\\udfff"]}', 400),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_is_a_clear_4xx(server: Server, case: str):
    body, status = BAD_REQUESTS[case]
    response = server.post(
        "/v1/completions", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]


def test_chat_with_no_messages_or_a_bad_role(server: Server):
    for body in ({"messages": []}, {"messages": [{"role": "wizard", "content": "x"}]}):
        assert server.post("/v1/chat/completions", json=body).status_code == 400


def test_prompt_longer_than_the_context(server: Server):
    response = server.post("/v1/completions", json={"prompt": "the model " * 3000})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_concurrent_requests_share_decode_steps(server: Server):
    body = {"prompt": "the bundle", "max_tokens": 48, "ignore_eos": True, "temperature": 0}
    results: list[httpx.Response] = []
    threads = [
        threading.Thread(target=lambda: results.append(server.post("/v1/completions", json=body)))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [200] * 8
    assert all(r.json()["usage"]["completion_tokens"] == 48 for r in results)
    metrics = httpx.get(server.url + "/metrics").text
    batched = float(re.search(r"^appliance_max_sequences_per_step (\S+)$", metrics, re.M)[1])
    assert batched >= 2, "several requests were decoded in the same llama_decode call"


def test_telemetry_is_recorded_and_queried(server: Server):
    from appliance.store.db import open_state_db
    from appliance.telemetry.queries import window_stats

    # temperature 0: the tiny model answers "the model" with text at once (a sampled answer
    # may be an early end of text, which has no first token to time)
    body = {"prompt": "the model", "max_tokens": 4, "temperature": 0}
    for _ in range(3):
        assert server.post("/v1/completions", json=body).is_success
    db = open_state_db(server.home / "var" / "state.db")
    assert wait_for(lambda: window_stats(db, 3600, "demo@1.0.0").requests >= 3)
    stats = window_stats(db, 3600, "demo@1.0.0")
    assert stats.latency_p50 is not None and stats.latency_p95 >= stats.latency_p50
    assert stats.completion_tokens_per_second > 0
    row = next(db.query("SELECT * FROM requests WHERE status = 200 ORDER BY id DESC LIMIT 1"))
    assert row["prompt_tokens"] > 0 and row["ttft_seconds"] is not None


def test_client_disconnect_cancels_generation(server: Server):
    body = {"prompt": "the", "max_tokens": 256, "ignore_eos": True, "stream": True}
    with httpx.stream(
        "POST", server.url + "/v1/completions", json=body, headers=server.headers, timeout=30
    ) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
    db = sqlite3.connect(server.home / "var" / "state.db")

    def cancelled_row():
        return db.execute("SELECT completion_tokens FROM requests WHERE status = 499").fetchone()

    assert wait_for(lambda: cancelled_row() is not None)
    assert wait_for(lambda: "appliance_busy_slots 0.0" in httpx.get(server.url + "/metrics").text)


@pytest.fixture
def tiny_server(tmp_path, tiny_gguf):
    """A development server with one slot and a one-request queue."""
    running = start_server(
        tmp_path / "home",
        "--model",
        str(tiny_gguf),
        "--slots",
        "1",
        "--queue",
        "1",
        "--insecure-no-auth",
    )
    yield running
    running.stop()


def test_full_queue_answers_429_with_retry_after(tiny_server: Server):
    body = {"prompt": "the", "max_tokens": 400, "ignore_eos": True}
    responses: list[httpx.Response] = []
    threads = [
        threading.Thread(
            target=lambda: responses.append(tiny_server.post("/v1/completions", json=body))
        )
        for _ in range(6)
    ]
    for t in threads:
        t.start()
        time.sleep(0.02)
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in responses)
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["code"] == "queue_full"


def test_fuzzing_the_openapi_document_finds_no_server_error(server: Server, tmp_path):
    """schemathesis generates hundreds of valid and invalid requests from the service's own
    OpenAPI document (served with --openapi, behind the API key). Pinned to one seed for CI;
    scripts/fuzz_api.py runs longer, randomized campaigns."""
    schema = tmp_path / "openapi.json"
    schema.write_bytes(server.get("/openapi.json").content)
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
            "30",
            "--request-timeout",
            "60",
            "--seed",
            "1",
            "-H",
            f"Authorization: Bearer {server.key}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    generated = re.search(r"(\d+) generated, (\d+) passed", done.stdout)
    assert generated and generated[1] == generated[2] and int(generated[1]) >= 100


def test_chat_content_cannot_forge_turns_over_http(server: Server):
    """Over the API too: a user message made of control-token text is answered as text."""

    def prompt_tokens(content: str) -> int:
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 1}
        return server.post("/v1/chat/completions", json=body).json()["usage"]["prompt_tokens"]

    # As control tokens "</s>" x 5 would be 5 tokens; as text it is 20 byte tokens.
    assert prompt_tokens("</s>" * 5) - prompt_tokens("x") >= 15


def test_the_api_key_is_checked_before_the_body_is_read(server: Server):
    """An unauthenticated caller gets 401 whatever it sends: no JSON parse, no 4xx that
    reveals how the body was judged, no 413 from reading it."""
    for content in (b'{"prompt": ', b"x" * (2 << 20)):
        response = httpx.post(server.url + "/v1/completions", content=content, timeout=30)
        assert response.status_code == 401, response.text


def test_an_oversized_chunked_body_is_a_413(server: Server):
    def chunks():
        for _ in range(40):
            yield b"x" * 65536  # 2.5 MiB in all, no Content-Length

    response = httpx.post(
        server.url + "/v1/completions",
        content=chunks(),
        headers={**server.headers, "Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "body_too_large"


def test_docs_and_openapi_are_off_by_default(tiny_server: Server):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(tiny_server.url + path).status_code == 404, path


def test_openapi_needs_the_api_key_when_enabled(server: Server):
    assert httpx.get(server.url + "/openapi.json").status_code == 401
    assert server.get("/openapi.json").json()["info"]["title"] == "Custom SLM Appliance"
    assert httpx.get(server.url + "/docs").status_code == 404  # never: it loads a public CDN


def test_a_huge_prompt_does_not_stall_the_event_loop(server: Server):
    """Tokenizing ~500 KB of CJK text takes the tiny model's byte-fallback tokenizer
    seconds; it runs off the event loop, so /healthz answers meanwhile."""
    prompt = "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(160_000))
    body = json.dumps({"prompt": prompt, "max_tokens": 1}, ensure_ascii=False).encode()
    finished: dict[str, float] = {}

    def big() -> None:
        response = server.post(
            "/v1/completions", content=body, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400  # longer than the context, once tokenized
        finished["big"] = time.monotonic()

    thread = threading.Thread(target=big)
    thread.start()
    time.sleep(0.3)  # the body is on the server; tokenization is under way
    assert httpx.get(server.url + "/healthz", timeout=30).status_code == 200
    finished["healthz"] = time.monotonic()
    thread.join()
    assert finished["healthz"] < finished["big"] - 1.0, finished


@pytest.mark.real_model
def test_gemma_serves_a_real_completion(tmp_path, gemma_gguf):
    server = start_server(tmp_path / "home", "--model", str(gemma_gguf), "--insecure-no-auth")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        completion = client.completions.create(
            model=f"dev:{gemma_gguf.name}",
            max_tokens=8,
            prompt="The Eiffel Tower is in the city of",
            temperature=0,
        )
        assert "Paris" in completion.choices[0].text
        chat = client.chat.completions.create(
            model=f"dev:{gemma_gguf.name}",
            max_tokens=8,
            messages=[{"role": "user", "content": "Hi"}],
        )
        assert chat.choices[0].message.role == "assistant"
    finally:
        server.stop()


def test_stop_strings_end_the_completion(server: Server):
    body = {"prompt": "the model", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    full = server.post("/v1/completions", json=body).json()["choices"][0]["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), f"need a visible stop string from {full!r}"
    cut = server.post("/v1/completions", json={**body, "stop": [stop]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == full[: full.index(stop)]


def test_seeded_sampling_is_reproducible(server: Server):
    body = {
        "prompt": "the model",
        "max_tokens": 16,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "min_p": 0.0,
        "ignore_eos": True,
    }
    texts = {
        seed: [
            server.post("/v1/completions", json={**body, "seed": seed}).json()["choices"][0]["text"]
            for _ in range(2)
        ]
        for seed in (1, 2)
    }
    assert texts[1][0] == texts[1][1] and texts[2][0] == texts[2][1]
    assert texts[1][0] != texts[2][0]


def test_scheduler_expires_requests_past_their_deadline(tiny_gguf):
    from appliance.serve.engine import Engine, EngineConfig, SamplingParams
    from appliance.serve.scheduler import Generation, Scheduler

    engine = Engine(EngineConfig(tiny_gguf, slots=1, context_per_slot=256))
    scheduler = Scheduler(engine, max_queue=4)
    events, done = [], threading.Event()

    def listener(event):
        events.append(event)
        if event.finish_reason:
            done.set()

    prompt = engine.tokenize("the model")
    expired = Generation(prompt, SamplingParams(temperature=0), 50, deadline=time.monotonic())
    scheduler.submit(expired, listener)
    assert done.wait(30)
    assert events[-1].finish_reason == "timeout" and events[-1].completion_tokens < 50
    scheduler.stop()
    engine.close()


def test_serve_on_a_port_in_use_fails_before_loading_and_never_says_serving(tiny_gguf, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "appliance",
                "serve",
                "--port",
                str(port),
                "--model",
                str(tiny_gguf),
                "--insecure-no-auth",
            ],  # fmt: skip
            env={**os.environ, "APPLIANCE_HOME": str(tmp_path / "home")},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 5, done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "serving" not in done.stderr and "llama" not in done.stderr.lower()
