"""Cold-path targets, the fallback switch and incident mode, as store state: validated,
audited, replayed by `audit verify`, and changed in one step."""

from __future__ import annotations

import sqlite3

import pytest
from conftest import json_runner
from test_store import audit_actions, force, states

from appliance.paths import appliance_paths


@pytest.fixture
def cli(run_cli):
    return json_runner(run_cli)


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "cold.key"
    path.write_text("sk-cold-path\n")
    path.chmod(0o600)
    return path


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://llm.internal:8000/v1", "must be an IP address"),
        ("http://10.0.0.7/v1", "give the port"),
        ("ftp://10.0.0.7:21", "http(s)://IP:PORT"),
        ("http://user:pw@10.0.0.7:8000", "no credentials"),
    ],
)
def test_a_target_is_an_ip_and_a_port(cli, url, reason):
    code, error = cli("route", "add", "big", "--url", url, "--model", "m")
    assert code == 3 and reason in error["error"]
    assert cli("route", "status")[1]["targets"] == []


def test_a_target_is_registered_audited_and_replayed(cli, key_file, tmp_path):
    key_file.chmod(0o644)
    code, error = cli("route", "add", "big", "--url", "http://10.0.0.7:8000/v1", "--model", "m",
                      "--key-file", key_file)  # fmt: skip
    assert code == 3 and "readable by others" in error["error"]
    key_file.chmod(0o600)
    code, added = cli("route", "add", "big", "--url", "http://10.0.0.7:8000/v1/", "--model",
                      "llama-70b", "--key-file", key_file, "--cost-per-1k-tokens", "0.5",
                      "--reason", "the larger model")  # fmt: skip
    assert code == 0, added
    assert added["target"]["url"] == "http://10.0.0.7:8000/v1"
    code, second = cli("route", "add", "vllm", "--url", "http://[fd00::7]:9000", "--model", "m")
    assert code == 0 and second["target"]["position"] == 2
    assert cli("route", "add", "big", "--url", "http://10.0.0.8:1", "--model", "m")[0] == 24
    status = cli("route", "status")[1]
    assert [t["name"] for t in status["targets"]] == ["big", "vllm"]
    assert "sk-cold-path" not in str(status)  # the key stays in its file
    assert audit_actions(cli)[-2:] == ["route target add", "route target add"]
    assert cli("audit", "verify")[0] == 0

    assert cli("route", "remove", "vllm", "--reason", "retired")[0] == 0
    assert cli("route", "remove", "vllm")[0] == 24
    assert cli("audit", "verify")[0] == 0
    # A target added behind the audit log's back is a way out nobody approved.
    db = sqlite3.connect(appliance_paths().state_db)
    db.execute(
        "INSERT INTO route_targets (name, url, model, position, cost_per_1k_tokens)"
        " VALUES ('exfil', 'http://203.0.113.9:80', 'm', 9, 0)"
    )
    db.commit()
    code, error = cli("audit", "verify")
    assert code == 25 and "route targets differ" in error["error"] and "exfil" in error["error"]


def test_incident_freezes_routes_to_the_fallback_and_rolls_back_in_one_step(
    cli, make_bundle, key_file
):
    for version, sequence in (("1.0.0", 1), ("2.0.0", 2)):
        assert cli("release", "install", make_bundle(version, sequence))[0] == 0
    force(cli, "demo@1.0.0")
    code, opened = cli("incident", "start", "--reason", "bad answers", "--rollback")
    assert code == 24 and "no previous good" in opened["error"]  # and nothing changed
    assert cli("release", "list")[1]["frozen"] is False
    assert cli("incident", "status")[1]["incident"] is None
    force(cli, "demo@2.0.0")
    assert cli("route", "fallback", "on", "--reason", "x")[0] == 24  # no target yet
    assert cli("route", "add", "big", "--url", "http://10.0.0.7:8000/v1", "--model", "m")[0] == 0

    code, opened = cli("incident", "start", "--reason", "bad answers", "--rollback")
    assert code == 0, opened
    assert opened["fallback"] is True and opened["rolled_back_to"] == "demo@1.0.0"
    assert states(cli) == {"demo@1.0.0": "active", "demo@2.0.0": "installed"}
    assert cli("release", "list")[1]["frozen"] is True
    assert cli("route", "status")[1]["fallback"] is True
    assert cli("incident", "status")[1]["incident"] == "bad answers"
    assert cli("release", "activate", "demo@2.0.0", "--force", "--reason", "x")[0] == 22
    assert cli("incident", "start", "--reason", "again")[0] == 24
    assert audit_actions(cli)[-4:] == ["rollback", "freeze", "route fallback on", "incident start"]

    code, ended = cli("incident", "end", "--reason", "fixed")
    assert code == 0 and ended["fallback"] is False and ended["incident"] is None
    assert cli("release", "list")[1]["frozen"] is False
    assert cli("incident", "end")[0] == 24
    assert cli("audit", "verify")[0] == 0
