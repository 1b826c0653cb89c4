# ruff: noqa: F811 - `cli` is test_evals' fixture, imported for these tests
"""Rollouts: a canary judged live against the stable release and a shadow, as store state
(audited, crash-safe) and as the real service serves them.

Two tiny models whose outputs differ in a known way: at temperature 0, the seed-5 model's
answers to PROMPTS all contain an "8" and the seed-0 model's never do, so the signed online
check "no-eights" passes on one and fails on the other.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pytest
from serving import start_server, wait_for
from test_console import confirm_with, console_for, until
from test_evals import cli, tiny_release  # noqa: F401
from tinymodel import write_tiny_gguf

from appliance.evals.spec import Online
from appliance.serve.rollout import MIN_LATENCY_SAMPLES, _Side, _tests
from appliance.store.faults import FAULT_ENV

PROMPTS = ["the model", "hello world", "one two three"]
# These releases answer in ~15 ms, so one stall of this 2-core host (the tests' own CLI
# calls) is 10x their median: their p95 may double before the judge calls it a regression.
# The latency judge itself is pinned by the tests of _tests below.
ONLINE = """
[online]
checks = [{ name = "no-eights", scorer = "contains", expected = { contains_none = ["8"] } }]
latency_margin = 1.0
"""


def gated_release(cli, tmp_path, model, version: str, sequence: int) -> str:
    """Install a release of `model` with the online check and a passing gate on this host."""
    ref = tiny_release(cli, tmp_path, model, 0.0, version, sequence, max_tokens=16, load=ONLINE)
    code, result = cli("eval", "run", ref, "--baseline", "none")
    assert code == 0, result
    return ref


@pytest.fixture
def stable(cli, tmp_path, tiny_gguf):
    ref = gated_release(cli, tmp_path, tiny_gguf, "1.0.0", 1)
    assert cli("release", "activate", ref)[0] == 0
    return ref


@pytest.fixture
def broken_model(tmp_path):
    return write_tiny_gguf(tmp_path / "eights.gguf", seed=5)


def appliance(*args: object, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run(
        [sys.executable, "-m", "appliance", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def status() -> dict:
    return json.loads(appliance("rollout", "status", "--json").stdout)


# -- the store ----------------------------------------------------------------------------


def test_a_rollout_needs_a_passing_gate_no_freeze_and_no_other_rollout(
    cli,
    tmp_path,
    tiny_gguf,
    stable,
):
    ungated = tiny_release(cli, tmp_path, tiny_gguf, 0.0, "1.1.0", 2, load=ONLINE)
    code, error = cli("rollout", "start", ungated, "--canary")
    assert code == 23 and "has not passed its eval gate" in error["error"]
    assert cli("rollout", "start", stable, "--canary")[1]["error"].endswith("already")
    candidate = gated_release(cli, tmp_path, tiny_gguf, "1.2.0", 3)
    assert cli("release", "freeze", "--reason", "incident")[0] == 0
    assert cli("rollout", "start", candidate, "--canary")[0] == 22
    assert cli("release", "unfreeze")[0] == 0
    code, started = cli("rollout", "start", candidate, "--canary", "--steps", "10,50")
    assert code == 0 and started["rollout"]["percent"] == 10
    assert cli("rollout", "start", candidate, "--shadow")[1]["error"].startswith("a rollout of")
    assert "promote or abort it first" in cli("release", "activate", ungated)[1]["error"]
    assert "running rollout" in cli("release", "remove", candidate)[1]["error"]
    assert cli("rollout", "start", candidate, "--canary", "--steps", "50,10")[0] == 3
    code, aborted = cli("rollout", "abort", "--reason", "changed my mind")
    assert code == 0 and aborted["rollout"]["state"] == "aborted"
    assert cli("audit", "verify")[0] == 0
    actions = [row["action"] for row in cli("audit", "list")[1]["rows"][:2]]
    assert actions == ["rollout abort", "rollout start"]


def test_promote_is_an_activation_and_rollback_aborts_a_running_rollout(
    cli,
    tmp_path,
    tiny_gguf,
    stable,
):
    candidate = gated_release(cli, tmp_path, tiny_gguf, "1.1.0", 2)
    assert cli("rollout", "start", candidate, "--shadow", "--percent", "50")[0] == 0
    code, promoted = cli("rollout", "promote", "--reason", "looks good")
    assert code == 0 and promoted["rollout"]["state"] == "promoted"
    states = {r["ref"]: r["state"] for r in cli("release", "list")[1]["releases"]}
    assert states == {stable: "previous-good", candidate: "active"}
    newer = gated_release(cli, tmp_path, tiny_gguf, "1.2.0", 3)
    assert cli("rollout", "start", newer, "--canary")[0] == 0
    assert cli("release", "rollback", "--reason", "incident")[0] == 0
    assert status()["rollout"]["state"] == "aborted"
    assert cli("audit", "verify")[0] == 0


@pytest.mark.parametrize("command", ["start", "promote", "abort"])
@pytest.mark.parametrize("point", ["in_transaction", "after_commit"])
def test_a_rollout_change_killed_at_each_point_leaves_the_store_consistent(
    cli,
    tmp_path,
    tiny_gguf,
    stable,
    command,
    point,
):
    candidate = gated_release(cli, tmp_path, tiny_gguf, "1.1.0", 2)
    args = {
        "start": ("rollout", "start", candidate, "--canary"),
        "promote": ("rollout", "promote"),
        "abort": ("rollout", "abort", "--reason", "test"),
    }[command]
    if command != "start":
        assert cli("rollout", "start", candidate, "--canary")[0] == 0
    killed = appliance(*args, fault=f"rollout.{point}")
    assert killed.returncode == -signal.SIGKILL
    verified = appliance("audit", "verify")
    assert verified.returncode == 0, verified.stderr
    rollout, committed = status()["rollout"], point == "after_commit"
    if command == "start":
        assert (rollout is not None and rollout["state"] == "running") is committed
    else:
        ended = {"promote": "promoted", "abort": "aborted"}[command]
        assert rollout["state"] == (ended if committed else "running")
    if not committed:  # what the kill undid can be done again
        assert appliance(*args).returncode == 0
        assert appliance("audit", "verify").returncode == 0


# -- the service --------------------------------------------------------------------------


class Traffic:
    """Clients sending PROMPTS back to back, each request its own session, until stopped."""

    def __init__(self, server, clients: int = 3) -> None:
        self.server, self.responses = server, []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client) for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def _client(self) -> None:
        with httpx.Client(headers=self.server.headers, timeout=60) as http:
            while not self.stop.is_set():
                for prompt in PROMPTS:
                    response = http.post(
                        self.server.url + "/v1/completions",
                        json={"prompt": prompt, "max_tokens": 16, "temperature": 0},
                        headers={"x-appliance-session": uuid.uuid4().hex},
                    )
                    role = response.headers.get("x-appliance-role")
                    text = response.json()["choices"][0]["text"] if response.is_success else None
                    self.responses.append((time.time(), response.status_code, role, text))

    def finish(self) -> list:
        self.stop.set()
        for thread in self.threads:
            thread.join()
        return self.responses


@pytest.fixture
def service(appliance_home, stable):
    key = json.loads(appliance("apikeys", "create", "--name", "t", "--json").stdout)["key"]
    server = start_server(appliance_home)
    server.key = key
    yield server
    server.stop()


def wait_for_rollout(state: str, seconds: float = 90) -> dict:
    assert wait_for(lambda: status()["rollout"]["state"] == state, seconds), status()
    return status()


def test_an_equivalent_canary_promotes_through_its_steps(
    cli,
    tmp_path,
    tiny_gguf,
    service,
):
    candidate = gated_release(cli, tmp_path, tiny_gguf, "1.1.0", 2)
    start = ("rollout", "start", candidate, "--canary", "--steps", "30,60")
    assert cli(*start, "--interval", "2s", "--min-requests", "4")[0] == 0
    traffic = Traffic(service)
    try:
        done = wait_for_rollout("promoted")
    finally:
        responses = traffic.finish()
    assert all(status == 200 for _t, status, _role, _text in responses)
    assert {role for *_x, role, _text in responses} >= {"stable", "canary"}
    actions = [row["action"] for row in done["history"]]
    assert actions == ["rollout start", "rollout advance", "rollout promote"]
    evidence = done["history"][1]["details"]["evidence"]
    assert evidence["decision"] == "proceed" and evidence["sides"]["canary"]["n"] >= 4
    assert wait_for(lambda: service.get("/v1/models").json()["data"][0]["id"] == candidate)
    assert len(service.get("/v1/models").json()["data"]) == 1
    assert appliance("audit", "verify").returncode == 0


def test_a_canary_that_breaks_an_online_check_is_aborted_by_itself(
    cli,
    tmp_path,
    broken_model,
    service,
):
    candidate = gated_release(cli, tmp_path, broken_model, "1.1.0", 2)
    start = ("rollout", "start", candidate, "--canary", "--steps", "25,50")
    assert cli(*start, "--interval", "2s", "--min-requests", "200")[0] == 0
    assert wait_for(lambda: len(service.get("/v1/models").json()["data"]) == 2, 60)
    traffic = Traffic(service)
    try:
        done = wait_for_rollout("aborted")
        aborted_at = time.time()
        time.sleep(1.5)
    finally:
        responses = traffic.finish()
    abort = done["history"][-1]
    assert abort["action"] == "rollout abort" and "the canary regressed" in abort["reason"]
    assert abort["details"]["evidence"]["tests"]["online_checks"]["regression"] is True
    assert abort["details"]["evidence"]["sides"]["canary"]["n"] < 200  # no need to wait
    canary = [r for r in responses if r[2] == "canary"]
    assert canary and all("8" in text for *_x, text in canary)
    assert len(canary) < 0.5 * len(responses)  # only the canary's share saw it
    assert not [r for r in responses if r[2] == "canary" and r[0] > aborted_at + 1]
    assert all(status == 200 for _t, status, _role, _text in responses)
    assert appliance("audit", "verify").returncode == 0


def side(latencies: list[float]) -> _Side:
    """A side of the judge's window whose answers all succeeded, unchecked."""
    n = len(latencies)
    return _Side(n=n, errors=0, latencies=latencies, checked=0, check_failures=0, agreements=[])


def test_p95_latency_is_judged_only_on_enough_answers():
    """A canary just loaded answers its first requests slowly; on 16 answers its p95 was
    one of them and aborted a candidate identical to stable. Below MIN_LATENCY_SAMPLES
    answers a side the p95 is not judged; with them, a slow canary still aborts."""
    few = _tests(side([0.1] * 20), side([0.35] * 16), Online())["p95_latency"]
    assert not few["regression"] and "not judged yet" in few["detail"]
    n = MIN_LATENCY_SAMPLES
    enough = _tests(side([0.1] * n), side([0.35] * n), Online())["p95_latency"]
    assert enough["regression"], enough
    alike = _tests(side([0.1] * n), side([0.1] * n), Online())["p95_latency"]
    assert not alike["regression"], alike


# A look that aborted a candidate identical to stable (recorded here while reproducing a
# CI failure of this file's freeze test; latencies in ms): host stalls had slowed three
# pairs of requests in flight, which fell to the canary, while stable's p95 read 36 ms.
STALLED_CANARY = """15 11 203 151 27 24 30 23 13 7 162 145 111 25 18 20 17 82 68 26 19 20 11 12 15
    16 20 21 28 24 14 23 29 13 12 22 23 9 9 34"""
STALLED_STABLE = """19 17 43 17 16 14 16 19 24 20 20 6 6 8 22 6 123 20 13 14 14 15 8 10 8 11 36
    14 9 29 23 14 14 12 8 12 17 14 12 19 19 24"""


def test_p95_latency_judge_weighs_the_noise_of_both_sides():
    """Stable's p95 is an estimate too: the judge resamples both sides. The look above,
    judged against stable's single p95 x 1.25 (45 ms), read the canary's interval as
    [68, 203] ms and aborted; here it is no regression. Identical steady sides rarely read
    as one, and a canary twice as slow still does."""
    stalled = _tests(
        side([int(ms) / 1000 for ms in STALLED_STABLE.split()]),
        side([int(ms) / 1000 for ms in STALLED_CANARY.split()]),
        Online(),
    )["p95_latency"]
    assert not stalled["regression"], stalled
    low, high = stalled["excess_interval_ms"]
    assert low < 0 < high  # undecided, not in the canary's favour
    rng = random.Random(11)

    def steady(n: int, scale: float = 1.0) -> list[float]:
        return [scale * 0.3 * rng.lognormvariate(0, 0.3) for _ in range(n)]

    def regressions(scale: float, looks: int = 100) -> int:
        return sum(
            _tests(side(steady(60)), side(steady(60, scale)), Online())["p95_latency"]["regression"]
            for _ in range(looks)
        )

    assert regressions(1.0) <= 2
    assert regressions(2.0) >= 90


def test_too_little_traffic_is_inconclusive_and_a_freeze_holds_the_canary(
    cli,
    tmp_path,
    tiny_gguf,
    service,
):
    candidate = gated_release(cli, tmp_path, tiny_gguf, "1.1.0", 2)
    start = ("rollout", "start", candidate, "--canary", "--steps", "50,100")
    assert cli(*start, "--interval", "1s", "--min-requests", "1000")[0] == 0
    for prompt in PROMPTS:
        service.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4})
    assert wait_for(
        lambda: (status()["rollout"]["last_check"] or {}).get("decision") == "inconclusive", 30
    )
    assert status()["rollout"]["step"] == 0 and status()["rollout"]["state"] == "running"
    assert "of 1000 canary requests" in status()["rollout"]["last_check"]["why"]
    code, result = cli("release", "freeze", "--reason", "incident")
    assert code == 0, result
    code, _ = cli("rollout", "abort", "--reason", "retry with a lower bar")
    assert code == 0
    again = ("rollout", "start", candidate, "--canary", "--steps", "50,100")
    assert cli("release", "unfreeze")[0] == 0
    assert cli(*again, "--interval", "1s", "--min-requests", "2")[0] == 0
    assert cli("release", "freeze", "--reason", "incident")[0] == 0
    traffic = Traffic(service, clients=2)
    try:
        assert wait_for(
            lambda: (status()["rollout"]["last_check"] or {}).get("decision") == "proceed", 60
        ), status()["rollout"]  # the judge's last look says why not
        time.sleep(3)
        held = status()["rollout"]
    finally:
        traffic.finish()
    # judged good, held by the freeze (a later look may still abort it: the message says why)
    assert held["state"] == "running" and held["step"] == 0, (held["last_check"] or {}).get("why")
    assert cli("release", "unfreeze")[0] == 0


def test_a_shadow_changes_nothing_clients_receive(cli, tmp_path, broken_model, service):
    def answers() -> list[tuple[str, str]]:
        got = []
        for prompt in PROMPTS:
            response = service.post(
                "/v1/completions", json={"prompt": prompt, "max_tokens": 16, "temperature": 0}
            )
            got.append(
                (response.headers["x-appliance-role"], response.json()["choices"][0]["text"])
            )
        return got

    before = answers()
    candidate = gated_release(cli, tmp_path, broken_model, "1.1.0", 2)
    shadow = ("rollout", "start", candidate, "--shadow", "--percent", "100", "--interval", "1s")
    assert cli(*shadow, "--min-requests", "6")[0] == 0
    assert wait_for(lambda: service.get("/readyz").json().get("rollout") is not None, 60)
    assert answers() == before  # stable answered, as before
    for _ in range(3):  # enough pairs for McNemar's test to see the regression
        answers()
    assert [m["id"] for m in service.get("/v1/models").json()["data"]] == ["demo@1.0.0"]
    assert wait_for(
        lambda: (
            'appliance_release_requests_total{release="demo@1.1.0",role='
            '"shadow"' in service.get("/metrics").text
        ),
        30,
    )

    def looked() -> dict:
        return status()["rollout"]["last_check"] or {}

    assert wait_for(lambda: looked().get("verdict") == "regresses", 60), looked()
    look = looked()
    assert look["decision"] == "observing"
    assert look["sides"]["shadow"]["check_pass_rate"] < 1.0
    assert look["sides"]["replay"]["n"] >= 1  # stable answered a copy itself: the noise floor
    assert look["divergence"] > 0  # the shadow agrees with stable less than stable does
    paired = look["tests"]["paired_checks"]
    assert paired["pairs"] >= 6 and paired["regression"] and "stable passed" in paired["detail"]
    assert look["tests"]["divergence"]["regression"]  # beyond stable's own noise floor
    assert "observing (regresses)" in appliance("rollout", "status").stdout
    # The shadow's pairs feed a canary of the same release: it is aborted at its first look,
    # before it needs any traffic of its own.
    assert cli("rollout", "abort", "--reason", "shadow regressed")[0] == 0
    canary = ("rollout", "start", candidate, "--canary", "--interval", "1s")
    assert cli(*canary, "--min-requests", "1000")[0] == 0
    aborted = wait_for_rollout("aborted", 60)["history"][-1]
    evidence = aborted["details"]["evidence"]
    assert evidence["tests"]["shadow_pairs"]["regression"] and evidence["sides"]["canary"]["n"] == 0
    assert "on " in aborted["reason"] and "paired requests" in aborted["reason"]


def test_a_service_killed_mid_canary_resumes_it_from_the_store(
    cli,
    tmp_path,
    tiny_gguf,
    service,
    appliance_home,
):
    candidate = gated_release(cli, tmp_path, tiny_gguf, "1.1.0", 2)
    start = ("rollout", "start", candidate, "--canary", "--steps", "50,100")
    assert cli(*start, "--interval", "600s")[0] == 0
    assert wait_for(lambda: len(service.get("/v1/models").json()["data"]) == 2, 60)
    service.process.send_signal(signal.SIGKILL)
    service.process.wait()
    restarted = start_server(appliance_home)
    restarted.key = service.key
    try:
        assert wait_for(lambda: len(restarted.get("/v1/models").json()["data"]) == 2, 60)
        roles = {
            restarted.post(
                "/v1/completions",
                json={"prompt": "the model", "max_tokens": 2},
                headers={"x-appliance-session": session},
            ).headers["x-appliance-role"]
            for session in map(str, range(40))
        }
        assert roles == {"stable", "canary"}
        assert status()["rollout"]["state"] == "running"
        assert appliance("audit", "verify").returncode == 0
    finally:
        restarted.stop()


def test_a_session_stays_on_one_release(cli, tmp_path, tiny_gguf, service):
    candidate = gated_release(cli, tmp_path, tiny_gguf, "1.1.0", 2)
    assert (
        cli("rollout", "start", candidate, "--canary", "--steps", "50", "--interval", "1h")[0] == 0
    )
    assert wait_for(lambda: len(service.get("/v1/models").json()["data"]) == 2, 60)
    for session in ("alice", "bob", "carol", "dave"):
        roles = {
            service.post(
                "/v1/completions",
                json={"prompt": "the model", "max_tokens": 1},
                headers={"x-appliance-session": session},
            ).headers["x-appliance-role"]
            for _ in range(4)
        }
        assert len(roles) == 1, session


def test_the_console_aborts_a_canary(cli, tmp_path, tiny_gguf, service):
    candidate = gated_release(cli, tmp_path, tiny_gguf, "1.1.0", 2)
    assert cli("rollout", "start", candidate, "--canary", "--interval", "1h")[0] == 0
    assert wait_for(lambda: len(service.get("/v1/models").json()["data"]) == 2, 60)
    app = console_for(service)

    async def drive() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            assert await until(pilot, lambda: app.snapshot is not None)
            await pilot.press("o")
            status = str(app.query_one("#rollout-status").render())
            assert f"canary of {candidate}" in status and "r aborts" in status
            await pilot.press("r")  # during a rollout, r aborts it (not a rollback)
            await confirm_with(pilot, "operator saw enough")
            assert await until(pilot, lambda: status_of_rollout() == "aborted")

    asyncio.run(drive())
    history = status()["history"]
    assert history[-1]["action"] == "rollout abort"
    assert history[-1]["reason"] == "operator saw enough"
    assert wait_for(lambda: len(service.get("/v1/models").json()["data"]) == 1, 30)


def status_of_rollout() -> str:
    return status()["rollout"]["state"]
