# ruff: noqa: F811 - `cli` is test_evals' fixture, imported for these tests
"""A cold path that is another installed release on this host: registered only when
installed and gated here, served by the service beside the active release with no network,
used by the eval gate, and never removed while it is routed to."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from serving import start_server, wait_for
from test_evals import cli, tiny_release  # noqa: F401
from tinymodel import write_tiny_gguf

CHAT = {"messages": [{"role": "user", "content": "the model"}], "max_tokens": 8, "temperature": 0}


def test_an_installed_release_is_a_cold_path(cli, tmp_path, tiny_gguf, appliance_home):
    hot = tiny_release(cli, tmp_path, tiny_gguf, 0.0, "1.0.0", 1, max_tokens=16)
    assert cli("eval", "run", hot, "--baseline", "none")[0] == 0
    assert cli("release", "activate", hot)[0] == 0
    larger = write_tiny_gguf(tmp_path / "larger.gguf", seed=1)
    cold = tiny_release(cli, tmp_path, larger, 0.0, "3.0.0", 3, max_tokens=16)

    assert cli("route", "add", "big", "--release", "demo@9.9.9")[0] == 24  # not installed
    assert cli("route", "add", "big", "--release", cold)[0] == 23  # not gated here
    both = ("route", "add", "big", "--release", cold, "--url", "http://10.0.0.7:1/v1")
    assert cli(*both)[0] == 3
    assert cli("eval", "run", cold, "--baseline", "none")[0] == 0
    code, added = cli("route", "add", "big", "--release", cold, "--cost-per-1k-tokens", "0.2")
    assert code == 0 and added["target"]["release"] == cold and added["target"]["url"] == ""
    assert cli("route", "units")[1]["dropin"].startswith("# No cold-path endpoint")
    assert cli("audit", "verify")[0] == 0
    code, refused = cli("release", "remove", cold)
    assert code == 24 and "cold-path target big" in refused["error"]

    policy = ("route", "policy", "set", "client_may_escalate", "true", "--reason", "test")
    assert cli(*policy)[0] == 0
    server = start_server(appliance_home, "--insecure-no-auth")
    try:
        asks = {"x-appliance-escalate": "true"}

        def ask(headers: dict) -> httpx.Response:
            response = server.post("/v1/chat/completions", json=CHAT, headers=headers)
            assert response.status_code == 200, response.text
            return response

        assert wait_for(lambda: ask(asks).headers["x-appliance-route"] == "cold:big", 60)
        answer = ask(asks)
        assert answer.json()["model"] == cold and answer.json()["usage"]["completion_tokens"] > 0
        assert answer.headers["x-appliance-escalation"] == "client"
        assert ask({}).headers["x-appliance-route"] == "hot"
        assert [m["id"] for m in server.get("/v1/models").json()["data"]] == [hot]

        # The gate routes its cases the same way: everything, by a category rule.
        every = ("route", "policy", "set", "categories", '{"all": "."}', "--reason", "test")
        assert cli(*every)[0] == 0
        code, ran = cli("eval", "run", hot, "--baseline", "none")
        assert code == 0, ran
        report = json.loads(Path(ran["files"]["json"]).read_text())
        routing = report["routing"]
        assert routing["escalation_rate"] == 1.0 and routing["escalations"] == {"category:all": 3}
        assert (
            routing["routes"]["cold:big"]["cases"] == 3 and routing["routes"]["hot"]["cases"] == 0
        )
        assert {c["route"] for c in report["cases"]} == {"cold:big"}
        assert "escalation rate 1.00" in Path(ran["files"]["markdown"]).read_text()
        assert cli("route", "remove", "big", "--reason", "done")[0] == 0
        assert wait_for(lambda: "x-appliance-escalation" not in ask(asks).headers, 30)
    finally:
        server.stop()
    assert cli("release", "remove", cold)[0] == 0
