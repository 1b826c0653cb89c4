"""Hot swap: activate and rollback switch the running service under load with zero failed
requests; a release that fails to load leaves the old one serving."""

from __future__ import annotations

import importlib
import os
import threading
from pathlib import Path

import httpx
import pytest
from serving import start_server, wait_for
from test_serve import appliance, install_release
from tinymodel import write_tiny_gguf


@pytest.fixture
def two_releases(tmp_path, tiny_gguf):
    home = tmp_path / "home"
    first = install_release(home, tmp_path, tiny_gguf, "1.0.0", 1)
    second = install_release(
        home, tmp_path, write_tiny_gguf(tmp_path / "b.gguf", seed=3), "2.0.0", 2
    )
    appliance(home, "release", "activate", first, "--force", "--reason", "test")
    key = appliance(home, "apikeys", "create", "--name", "load")["key"]
    server = start_server(home)
    server.key = key
    yield server, first, second
    server.stop()


def serving(server) -> str:
    return server.get("/v1/models").json()["data"][0]["id"]


class Load:
    """Clients sending requests back to back until stopped; every response is kept."""

    def __init__(self, server, clients: int = 4) -> None:
        self.server, self.statuses, self.models = server, [], set()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def _client(self) -> None:
        body = {"prompt": "the model", "max_tokens": 24, "ignore_eos": True}
        with httpx.Client(headers=self.server.headers, timeout=60) as http:
            while not self.stop.is_set():
                response = http.post(self.server.url + "/v1/completions", json=body)
                self.statuses.append(response.status_code)
                if response.status_code == 200:
                    self.models.add(response.json()["model"])

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def test_activate_and_rollback_swap_under_load_without_failures(two_releases):
    server, first, second = two_releases
    load = Load(server)
    try:
        assert wait_for(lambda: len(load.statuses) >= 5)
        appliance(server.home, "release", "activate", second, "--force", "--reason", "swap")
        assert wait_for(lambda: serving(server) == second, seconds=20)
        count = len(load.statuses)
        assert wait_for(lambda: len(load.statuses) >= count + 5)
        appliance(server.home, "release", "rollback", "--reason", "swap back")
        assert wait_for(lambda: serving(server) == first, seconds=20)
        count = len(load.statuses)
        assert wait_for(lambda: len(load.statuses) >= count + 5)
    finally:
        load.finish()
    assert set(load.statuses) == {200}, f"failed requests during the swaps: {load.statuses}"
    assert load.models == {first, second}
    assert "serving demo@2.0.0" in server.log.read_text()


def test_a_release_that_fails_to_load_leaves_the_old_one_serving(two_releases):
    server, first, second = two_releases
    release_dir = Path(appliance(server.home, "release", "show", second)["path"])
    model = release_dir / "model.gguf"
    os.chmod(release_dir, 0o755)
    os.chmod(model, 0o644)
    with open(model, "r+b") as f:  # damage the installed weights after installation
        f.seek(model.stat().st_size // 2)
        f.write(b"\0" * 64)
    appliance(server.home, "release", "activate", second, "--force", "--reason", "broken")
    assert wait_for(lambda: "failed to load" in server.log.read_text(), seconds=20)
    assert serving(server) == first
    assert httpx.get(server.url + "/readyz").json()["release"] == first
    assert server.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).is_success


def test_a_release_that_aborts_llama_cpp_never_takes_the_service_down(
    two_releases, tmp_path, monkeypatch
):
    """Activating a signed release whose model makes llama.cpp abort() used to kill the
    running service, and `appliance serve` then crash-looped at start. Now the load probe
    (a child process) takes the abort: the old release keeps serving, and a restarted
    service stays up, not ready, and says why."""
    server, first, _ = two_releases
    release_cli = importlib.import_module("appliance.cli.release")
    monkeypatch.setattr(release_cli, "probe_release", lambda _dir: None)  # as 0.1 installed
    model = write_tiny_gguf(tmp_path / "aborts.gguf", aborts_llama_cpp=True)
    bad = install_release(server.home, tmp_path, model, "3.0.0", 3)
    appliance(server.home, "release", "activate", bad, "--force", "--reason", "bad weights")
    assert wait_for(lambda: "failed the load probe" in server.log.read_text(), seconds=30)
    assert server.process.poll() is None, "the service must survive"
    assert serving(server) == first
    ready = httpx.get(server.url + "/readyz").json()
    assert ready["release"] == first and "SIGABRT" in ready["failed_to_load"]
    assert server.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).is_success

    server.stop()
    restarted = start_server(server.home, expect_ready=False)
    try:
        ready = httpx.get(restarted.url + "/readyz")
        assert ready.status_code == 503 and "failed the load probe" in ready.json()["reason"]
        assert restarted.process.poll() is None, "no crash loop: up, not ready"
        restarted.key = server.key
        refused = restarted.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert refused.status_code == 503 and "failed the load probe" in refused.text
        appliance(server.home, "release", "rollback", "--reason", "back to good")
        assert wait_for(lambda: httpx.get(restarted.url + "/readyz").status_code == 200, 30)
    finally:
        restarted.stop()
