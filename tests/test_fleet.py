"""A fleet on one machine: three appliance nodes on loopback (their own homes and ports, the
tiny model, one thread each) behind a real HAProxy, released by the real ansible-playbook
(deploy/ansible) with a local connection.

The tests share one fleet and run in order: each leaves it serving demo@1.1.0 on every
node, ready and back in HAProxy, except the last, which kills a node.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from conftest import CASES, EASY_SPEC, REPO, write_tiny_eval_bundle_dir
from serving import Server, appliance, free_port, start_server, wait_for

from appliance.bundler.builder import build_bundle
from appliance.bundler.spec import load_bundle_spec
from appliance.fleet.haproxy import RuntimeAPI
from appliance.fleet.nodes import read_node
from appliance.trust.crypto import load_signing_key
from appliance.trust.keyfiles import KeyPairFiles, write_key_pair

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
BIN = Path(sys.executable).parent
PLAYBOOKS = REPO / "deploy" / "ansible"
INTER_MS, FALL = 500, 2
# Three nodes share this host's cores and serve traffic while each gates: the fleet spec
# judges latency and cost whatever else the host does (a real node gates drained, alone).
FLEET_LOAD = "[load]\nclients = 2\nmax_busy_share = 1.0\n"
RELEASES = {  # version: (sequence, the suite's minimum pass rate: 1.0 fails on the tiny model)
    "1.0.0": (1, 0.0),
    "1.1.0": (2, 0.0),
    "1.2.0": (3, 1.0),
    "1.3.0": (4, 0.0),
}


@dataclass
class FleetNode:
    name: str
    server: Server

    @property
    def home(self) -> Path:
        return self.server.home


@dataclass
class Fleet:
    root: Path
    nodes: list[FleetNode]
    haproxy: subprocess.Popen
    socket: Path
    url: str
    key: str
    inventory: Path
    bundles: dict[str, Path] = field(default_factory=dict)

    @property
    def api(self) -> RuntimeAPI:
        return RuntimeAPI(self.socket)

    def playbook(self, name: str, **extra: object) -> tuple[int, str, dict[str, dict[str, int]]]:
        """Run deploy/ansible/NAME; its exit code, output and PLAY RECAP per host."""
        env = {
            **os.environ,
            "ANSIBLE_CONFIG": str(PLAYBOOKS / "ansible.cfg"),
            "ANSIBLE_HOME": str(self.root / "ansible-home"),
            "ANSIBLE_LOCAL_TEMP": str(self.root / "ansible-tmp"),
            "ANSIBLE_NOCOLOR": "1",
            "PATH": f"{BIN}:{os.environ['PATH']}",
        }
        env.pop("APPLIANCE_HOME", None)  # each node names its own
        command = [str(BIN / "ansible-playbook"), "-i", str(self.inventory), str(PLAYBOOKS / name)]
        if extra:  # as JSON: key=value would split a value at its spaces
            command += ["-e", json.dumps({k: str(v) for k, v in extra.items()})]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        out = done.stdout + done.stderr
        recap = {
            host: {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", counts)}
            for host, counts in re.findall(r"^(\S+)\s+:\s+(ok=.*)$", out, re.M)
        }
        return done.returncode, out, recap

    def roll(self, version: str) -> tuple[int, str, dict[str, dict[str, int]]]:
        return self.playbook("rollout.yml", bundle=self.bundles[version], release=f"demo@{version}")

    def all_back_in(self) -> bool:
        """Every node UP at full weight in HAProxy, within a few checks and the slow start."""
        return wait_for(
            lambda: all(s.status == "UP" and s.weight == 100 for s in self.api.servers()), 15
        )

    def serving(self) -> list[str | None]:
        return [read_node(n.server.url).release for n in self.nodes]

    def complete(self, prompt: str) -> httpx.Response:
        return httpx.post(
            self.url + "/v1/completions",
            headers={"Authorization": f"Bearer {self.key}"},
            json={"prompt": prompt, "max_tokens": 8, "temperature": 0},
            timeout=60,
        )


class Load:
    """Closed-loop clients through HAProxy, each sending distinct prompts until stopped."""

    def __init__(self, fleet: Fleet, clients: int = 3) -> None:
        self.fleet, self.stop = fleet, threading.Event()
        self.statuses: Counter[int | str] = Counter()
        self.releases: Counter[str] = Counter()
        self.failures: list[str] = []
        self._numbers = itertools.count()
        self._threads = [threading.Thread(target=self._client) for _ in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join()

    def _client(self) -> None:
        while not self.stop.is_set():
            prompt = f"Request {next(self._numbers)}: the weather today is"
            try:
                answer = self.fleet.complete(prompt)
            except httpx.HTTPError as exc:
                self.statuses[type(exc).__name__] += 1
                self.failures.append(f"{prompt}: {exc!r}")
                continue
            self.statuses[answer.status_code] += 1
            if answer.status_code == 200:
                self.releases[answer.headers["x-appliance-release"]] += 1
            else:
                self.failures.append(f"{prompt}: {answer.status_code} {answer.text[:200]}")

    @property
    def answered(self) -> int:
        return self.statuses[200]


def sign_release(root: Path, tiny_gguf: Path, key_pem: Path, version: str) -> Path:
    sequence, min_pass_rate = RELEASES[version]
    spec = EASY_SPEC.format(min_pass_rate=min_pass_rate, max_cost_per_success=1.0) + FLEET_LOAD
    toml = write_tiny_eval_bundle_dir(
        root / f"src-{version}", tiny_gguf, (version, sequence), spec, CASES
    )
    toml.write_text(toml.read_text().replace("threads = 0 ", "threads = 1 "))
    key = load_signing_key(key_pem.read_bytes(), None)
    return build_bundle(load_bundle_spec(toml), [key], root / f"dist-{version}").path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path):
    root = tmp_path_factory.mktemp("fleet")
    keys = write_key_pair(root / "keys", "release", None)
    other = write_key_pair(root / "keys", "other", None)  # trusted by node1 and node2 only
    bundles = {
        v: sign_release(root, tiny_gguf, (other if v == "1.3.0" else keys).private_key, v)
        for v in RELEASES
    }

    controller = root / "controller"  # where the fleet's API keys are made and revoked
    key = appliance(controller, "apikeys", "create", "--name", "clients")[1]["key"]
    key_set = root / "api-keys.json"
    assert appliance(controller, "apikeys", "export", "--out", key_set)[0] == 0

    with contextlib.ExitStack() as running:  # stopped even when the setup fails midway
        yield start_fleet(running, root, bundles, key, key_set, (keys, other))


def start_fleet(
    running: contextlib.ExitStack,
    root: Path,
    bundles: dict[str, Path],
    key: str,
    key_set: Path,
    signers: tuple[KeyPairFiles, KeyPairFiles],
) -> Fleet:
    nodes = []
    for i in (1, 2, 3):
        home = root / f"node{i}"
        for signer in signers[: 2 if i < 3 else 1]:  # node3 trusts only the first
            assert appliance(home, "keys", "trust", signer.public_key)[0] == 0
        (home / "incoming").mkdir()
        server = start_server(home, "--slots", "2", expect_ready=False)
        running.callback(server.stop)
        nodes.append(FleetNode(f"node{i}", server))

    socket_path, port = root / "haproxy.sock", free_port()
    config = root / "haproxy.cfg"
    code, _ = appliance(
        root / "controller",
        "fleet", "haproxy-config",
        *[f"--node=node{i}={n.server.url.removeprefix('http://')}" for i, n in enumerate(nodes, 1)],
        "--bind", f"127.0.0.1:{port}", "--socket", socket_path,
        "--inter-ms", INTER_MS, "--fall", FALL, "--rise", 1, "--slowstart-s", 2,
        "--maxconn", 2, "--out", config,
    )  # fmt: skip
    assert code == 0
    subprocess.run([HAPROXY, "-c", "-q", "-f", str(config)], check=True)
    with open(root / "haproxy.log", "w") as log:  # no syslog here: its alerts go to stderr
        haproxy = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=log, stderr=log)
    running.callback(haproxy.wait, 10)
    running.callback(haproxy.terminate)

    inventory = root / "inventory.ini"
    hosts = "\n".join(
        f"{n.name} appliance_home={n.home} appliance_local_url={n.server.url} "
        f"appliance_bundle_dir={n.home / 'incoming'}"
        for n in nodes
    )
    inventory.write_text(
        f"[appliance]\n{hosts}\n\n[appliance:vars]\nansible_connection=local\n"
        f"ansible_python_interpreter={sys.executable}\nappliance_bin={BIN / 'appliance'}\n"
        f"haproxy_socket={socket_path}\ndrain_timeout=60\nready_timeout=120\n"
        "canary_seconds=3\ncanary_min_requests=1\n"
    )
    fleet = Fleet(
        root, nodes, haproxy, socket_path, f"http://127.0.0.1:{port}", key, inventory, bundles
    )
    assert wait_for(socket_path.exists, 10)
    code, out, _ = fleet.playbook("apikeys.yml", key_set=key_set)
    assert code == 0, out
    return fleet


def audit_rows(home: Path, action: str) -> list[dict]:
    """The node's audit rows of one action, newest first."""
    return [r for r in appliance(home, "audit", "list")[1]["rows"] if r["action"] == action]


def test_the_first_rollout_installs_gates_and_serves_every_node(fleet: Fleet) -> None:
    assert [read_node(n.server.url).ready for n in fleet.nodes] == [False] * 3  # nothing yet
    code, out, recap = fleet.roll("1.0.0")
    assert code == 0, out
    assert fleet.serving() == ["demo@1.0.0"] * 3
    assert all(recap[n.name]["failed"] == 0 and recap[n.name]["changed"] > 0 for n in fleet.nodes)
    for node in fleet.nodes:
        # verified and gated on the node itself, then activated with the rollout's reason
        assert appliance(node.home, "eval", "gate", "demo@1.0.0")[0] == 0
        assert audit_rows(node.home, "activate")[0]["reason"] == "fleet rollout by Ansible"
    assert wait_for(lambda: all(s.status == "UP" for s in fleet.api.servers()), 10)
    answer = fleet.complete("The shared key works on every node")  # pushed as hashes
    assert answer.status_code == 200 and answer.headers["x-appliance-release"] == "demo@1.0.0"


def test_a_rolling_release_under_load_fails_no_request(fleet: Fleet) -> None:
    with Load(fleet) as load:
        time.sleep(2)
        code, out, recap = fleet.roll("1.1.0")
        time.sleep(2)
    assert code == 0, out
    assert load.failures == [] and load.answered >= 30, (load.statuses, load.failures[:3])
    assert set(load.releases) == {"demo@1.0.0", "demo@1.1.0"}  # served through the change
    assert fleet.serving() == ["demo@1.1.0"] * 3
    # one node at a time, the canary first: each node's activation in order
    stamps = [audit_rows(n.home, "activate")[0]["time"] for n in fleet.nodes]
    assert stamps == sorted(stamps)
    assert re.search(r"Watch the canary node on live traffic\] \**\nok: \[node1\]", out), out
    assert fleet.all_back_in()


def test_a_second_run_changes_nothing(fleet: Fleet) -> None:
    code, out, recap = fleet.roll("1.1.0")
    assert code == 0, out
    assert {n: (r["changed"], r["failed"]) for n, r in recap.items()} == {
        n.name: (0, 0) for n in fleet.nodes
    }, out


def test_a_release_that_fails_its_gate_stops_the_rollout_at_the_first_node(fleet: Fleet) -> None:
    code, out, _ = fleet.roll("1.2.0")
    assert code != 0
    assert "failed at 'Run the eval gate" in out, out
    assert fleet.serving() == ["demo@1.1.0"] * 3
    installed = [
        {r["ref"] for r in appliance(n.home, "release", "list")[1]["releases"]} for n in fleet.nodes
    ]
    assert "demo@1.2.0" in installed[0]
    assert "demo@1.2.0" not in installed[1] | installed[2]  # the rest untouched
    assert fleet.all_back_in()


def test_a_later_node_that_refuses_the_bundle_rolls_back_the_nodes_before_it(fleet: Fleet) -> None:
    # node3 does not trust the key that signed 1.3.0: no node trusts the controller
    with Load(fleet) as load:
        code, out, _ = fleet.roll("1.3.0")
    assert code != 0
    assert "node3 failed at 'Install it" in out, out
    assert load.failures == [] and load.releases["demo@1.3.0"] > 0, load.statuses
    assert fleet.serving() == ["demo@1.1.0"] * 3
    for node in fleet.nodes[:2]:
        assert audit_rows(node.home, "rollback")[0]["reason"].endswith("node3 failed")
    assert fleet.all_back_in()


def test_a_drained_node_gets_no_new_requests(fleet: Fleet) -> None:
    drained = fleet.nodes[1]
    code, said = appliance(fleet.root, "fleet", "server", "node2", "--state", "drain",
                           "--wait-idle", 30, "--haproxy", fleet.socket)  # fmt: skip
    assert code == 0 and said["changed"] and said["after"]["status"] == "DRAIN", said
    before = [read_node(n.server.url).counts.requests for n in fleet.nodes]
    for i in range(12):
        assert fleet.complete(f"Drained test {i}:").status_code == 200
    after = [read_node(n.server.url).counts.requests for n in fleet.nodes]
    assert after[1] == before[1]  # node2: not one
    assert after[0] + after[2] - before[0] - before[2] == 12
    code, said = appliance(fleet.root, "fleet", "server", drained.name, "--state", "ready",
                           "--haproxy", fleet.socket)  # fmt: skip
    assert code == 0 and said["after"]["status"] == "UP"


def test_fleet_status_shows_haproxy_and_each_node(fleet: Fleet) -> None:
    code, said = appliance(fleet.root, "fleet", "status", "--haproxy", fleet.socket)
    assert code == 0
    rows = {r["name"]: r for r in said["nodes"]}
    assert sorted(rows) == ["node1", "node2", "node3"]
    for node in fleet.nodes:
        row = rows[node.name]
        assert row["haproxy"]["status"] == "UP" and row["haproxy"]["check"] == "L7OK"
        assert row["haproxy"]["address"] == node.server.url.removeprefix("http://")
        assert row["node"]["ready"] and row["node"]["release"] == "demo@1.1.0"
        assert row["node"]["counts"]["requests"] > 0


def test_freeze_and_incident_mode_fleet_wide(fleet: Fleet) -> None:
    code, out, recap = fleet.playbook("freeze.yml", fleet_action="freeze", reason="change window")
    assert code == 0, out
    for node in fleet.nodes:
        assert appliance(node.home, "release", "list")[1]["frozen"]
        assert appliance(node.home, "release", "activate", "demo@1.0.0")[0] == 22
    assert all(
        r["changed"] == 0
        for r in fleet.playbook("freeze.yml", fleet_action="freeze", reason="again")[2].values()
    )
    code, out, _ = fleet.playbook("freeze.yml", fleet_action="unfreeze", reason="window over")
    assert code == 0 and not any(
        appliance(n.home, "release", "list")[1]["frozen"] for n in fleet.nodes
    )

    code, out, _ = fleet.playbook("incident.yml", fleet_action="start", reason="bad answers")
    assert code == 0, out
    for node in fleet.nodes:
        status = appliance(node.home, "incident", "status")[1]
        assert status["incident"] == "bad answers" and status["frozen"]
    assert all(
        r["changed"] == 0
        for r in fleet.playbook("incident.yml", fleet_action="start", reason="x")[2].values()
    )
    code, out, _ = fleet.playbook("incident.yml", fleet_action="end", reason="fixed")
    assert code == 0, out
    assert not any(appliance(n.home, "incident", "status")[1]["incident"] for n in fleet.nodes)


def test_a_killed_node_is_taken_out_and_traffic_goes_on(fleet: Fleet) -> None:
    victim = fleet.nodes[2]
    with Load(fleet) as load:
        time.sleep(2)
        victim.server.process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        assert wait_for(lambda: fleet.api.server("node3").status.startswith("DOWN"), 10, 0.05)
        taken_out = time.monotonic() - killed
        answered = load.answered
        time.sleep(3)
    assert taken_out <= FALL * INTER_MS / 1000 + 1.0, taken_out  # fall x inter, plus a check
    assert load.answered > answered  # traffic went on
    assert load.failures == [], (load.statuses, load.failures[:3])  # retried on another node


def test_bad_fleet_input_is_a_clear_error(fleet: Fleet, tmp_path: Path) -> None:
    for bad in ("node1", "node1=db.example:80", "node1=127.0.0.1:0", "a b=127.0.0.1:8"):
        code, said = appliance(tmp_path, "fleet", "haproxy-config", "--node", bad)
        assert code == 3, (bad, said)
    code, said = appliance(tmp_path, "fleet", "server", "node9", "--state", "drain",
                           "--haproxy", fleet.socket)  # fmt: skip
    assert code == 50 and "no server 'node9'" in said["error"]
    code, said = appliance(tmp_path, "fleet", "status", "--haproxy", tmp_path / "none.sock")
    assert code == 50 and "cannot reach HAProxy" in said["error"]
    code, said = appliance(tmp_path, "fleet", "wait-ready", fleet.url, "--release", "demo@9",
                           "--timeout", 0.5)  # fmt: skip
    assert code == 51
    code, said = appliance(tmp_path, "fleet", "watch", "http://node1.example:8080")
    assert code == 3 and "IP" in said["error"]  # never a name to look up


def test_an_api_key_set_moves_as_hashes_and_revocations_follow(tmp_path: Path) -> None:
    source, node = tmp_path / "controller", tmp_path / "node"
    kept = appliance(source, "apikeys", "create", "--name", "kept")[1]
    gone = appliance(source, "apikeys", "create", "--name", "gone")[1]
    key_set = tmp_path / "keys.json"
    assert appliance(source, "apikeys", "export", "--out", key_set)[0] == 0
    assert kept["key"] not in key_set.read_text() and gone["key"] not in key_set.read_text()
    assert appliance(node, "apikeys", "import", key_set)[1]["changed"]
    assert not appliance(node, "apikeys", "import", key_set)[1]["changed"]  # the same again

    assert appliance(source, "apikeys", "revoke", gone["prefix"])[0] == 0
    assert appliance(source, "apikeys", "export", "--out", key_set)[0] == 0
    said = appliance(node, "apikeys", "import", key_set)[1]
    assert said["revoked"] == [gone["prefix"]] and said["added"] == []
    rows = {r["name"]: r for r in appliance(node, "apikeys", "list")[1]["keys"]}
    assert rows["gone"]["revoked"] and not rows["kept"]["revoked"]
    assert appliance(node, "audit", "verify")[0] == 0  # replayed like creations and revocations

    key_set.write_text(json.dumps({"format": "appliance-api-keys/1", "keys": [{"name": "x"}]}))
    assert appliance(node, "apikeys", "import", key_set)[0] == 3
