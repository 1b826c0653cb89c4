# ruff: noqa: F811 - fixtures imported from other test modules
"""Every command of every runbook in docs/runbooks, run as written (in bash, in order,
with the exit code its `# exits N` comment names) against a real store and a real
service set up in the state the runbook is for; then what recovery means is checked.
So a runbook cannot drift from the CLI. systemctl and journalctl lines are the only ones
not run: these tests run without systemd."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from serving import start_server
from test_coldpath import API_KEY, cold_server  # noqa: F401
from test_evals import EASY_SPEC, cli, tiny_release  # noqa: F401
from test_rollout import ONLINE, Traffic, broken_model, gated_release, wait_for_rollout  # noqa: F401

from appliance.paths import appliance_paths

RUNBOOKS = Path(__file__).resolve().parent.parent / "docs" / "runbooks"
HOST_ONLY = ("systemctl ", "sudo systemctl ", "journalctl ")
EXITS = re.compile(r"#\s*exits\s+(\d+)\s*$")


def commands(runbook: str) -> list[tuple[str, int]]:
    """(command, expected exit code) for each line of the runbook's bash blocks."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", (RUNBOOKS / runbook).read_text(), re.S):
        for line in block.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            expected = EXITS.search(line)
            found.append((line, int(expected.group(1)) if expected else 0))
    return found


def run_runbook(runbook: str, env: dict[str, str]) -> list[str]:
    """Run every command; return the outputs of those that ran."""
    environment = {**os.environ, **env}
    environment["PATH"] = f"{Path(sys.executable).parent}:{environment['PATH']}"
    environment.pop("APPLIANCE_FAULT", None)
    outputs, ran = [], 0
    for command, expected in commands(runbook):
        if command.startswith(HOST_ONLY):
            continue
        result = subprocess.run(
            ["bash", "-c", command], env=environment, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == expected, (
            f"{runbook}: {command!r} exited {result.returncode}, not {expected}:\n"
            f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )
        outputs.append(result.stdout)
        ran += 1
    assert ran >= 4, f"{runbook} has too few commands to be a runbook"
    return outputs


def test_every_runbook_is_listed_and_tested():
    listed = set(re.findall(r"\]\(([a-z-]+\.md)\)", (RUNBOOKS / "README.md").read_text()))
    files = {p.name for p in RUNBOOKS.glob("*.md")} - {"README.md"}
    tested = {n for n in globals() if n.startswith("test_runbook_")}
    assert listed == files and len(files) == 8
    assert {f"test_runbook_{f[:-3].replace('-', '_')}" for f in files} == tested
    for name in files:  # symptoms, checks, commands, confirmation
        text = (RUNBOOKS / name).read_text()
        assert "## Symptoms" in text and "## Checks" in text and "## Confirm" in text, name


# -- the states the runbooks are for --------------------------------------------------


@pytest.fixture
def api_key(cli):
    code, created = cli("apikeys", "create", "--name", "runbook")
    assert code == 0, created
    return created["key"]


def serve(home: Path, key: str, expect_ready: bool = True):
    server = start_server(home, expect_ready=expect_ready)
    server.key = key
    return server


def env_for(server, key: str, **extra: object) -> dict[str, str]:
    return {
        "APPLIANCE_URL": server.url,
        "APPLIANCE_API_KEY": key,
        "APPLIANCE_STATE_DIR": str(appliance_paths().state_dir),
        **{k: str(v) for k, v in extra.items()},
    }


def activated(cli, tmp_path, model: Path, version: str, sequence: int) -> None:
    """Install demo@VERSION of `model`, pass its gate here, and activate it."""
    ref = tiny_release(cli, tmp_path, model, 0.0, version, sequence, max_tokens=16)
    assert cli("eval", "run", ref, "--baseline", "none")[0] == 0
    assert cli("release", "activate", ref)[0] == 0


def two_releases(cli, tmp_path, model: Path) -> None:
    """demo@1.0.0 the previous good release, demo@2.0.0 active; both gated here."""
    activated(cli, tmp_path, model, "1.0.0", 1)
    activated(cli, tmp_path, model, "2.0.0", 2)


def active(cli) -> str:
    return next(r["ref"] for r in cli("release", "list")[1]["releases"] if r["state"] == "active")


# -- one test per runbook -------------------------------------------------------------


def test_runbook_rollback(cli, tmp_path, tiny_gguf, appliance_home, api_key):
    two_releases(cli, tmp_path, tiny_gguf)
    server = serve(appliance_home, api_key)
    try:
        run_runbook("rollback.md", env_for(server, api_key))
        assert active(cli) == "demo@1.0.0"
        assert server.get("/readyz").json()["release"] == "demo@1.0.0"
    finally:
        server.stop()


def test_runbook_fallback(cli, tmp_path, tiny_gguf, appliance_home, api_key, cold_server):
    two_releases(cli, tmp_path, tiny_gguf)
    key_file = tmp_path / "big.key"
    key_file.write_text(API_KEY)
    key_file.chmod(0o600)
    server = serve(appliance_home, api_key)
    try:
        url = f"http://127.0.0.1:{cold_server.port}/v1"
        env = env_for(server, api_key, COLD_URL=url, COLD_MODEL="tiny-cold", COLD_KEY_FILE=key_file)
        outputs = run_runbook("fallback.md", env)
        assert 'route="cold:big"' in outputs[-3]  # the metrics line the runbook greps for
        status = cli("route", "status")[1]
        assert status["fallback"] is False and status["targets"][0]["name"] == "big"
    finally:
        server.stop()


def test_runbook_incident(cli, tmp_path, tiny_gguf, appliance_home, api_key):
    two_releases(cli, tmp_path, tiny_gguf)
    server = serve(appliance_home, api_key)
    try:
        run_runbook("incident.md", env_for(server, api_key))
        assert active(cli) == "demo@1.0.0"  # rolled back in the incident's step
        assert cli("incident", "status")[1]["incident"] is None
        assert cli("release", "list")[1]["frozen"] is False
    finally:
        server.stop()


def test_runbook_canary_aborted(cli, tmp_path, tiny_gguf, broken_model, appliance_home, api_key):
    stable = gated_release(cli, tmp_path, tiny_gguf, "1.0.0", 1)
    assert cli("release", "activate", stable)[0] == 0
    candidate = gated_release(cli, tmp_path, broken_model, "2.0.0", 2)
    server = serve(appliance_home, api_key)
    try:
        start = ("rollout", "start", candidate, "--canary", "--steps", "25,50")
        assert cli(*start, "--interval", "2s", "--min-requests", "200")[0] == 0
        traffic = Traffic(server)
        try:
            wait_for_rollout("aborted")
        finally:
            traffic.finish()
        run_runbook("canary-aborted.md", env_for(server, api_key))
        refs = [r["ref"] for r in cli("release", "list")[1]["releases"]]
        assert refs == ["demo@1.0.0"]
    finally:
        server.stop()


def test_runbook_service_will_not_start(cli, tmp_path, tiny_gguf, appliance_home, api_key):
    two_releases(cli, tmp_path, tiny_gguf)
    model = appliance_paths().releases_dir / "demo" / "2.0.0" / "model.gguf"
    model.chmod(0o644)
    with open(model, "r+b") as changed:  # one byte of a tensor, after installation
        changed.seek(model.stat().st_size - 1)
        last = changed.read(1)
        changed.seek(-1, os.SEEK_CUR)
        changed.write(bytes([last[0] ^ 1]))
    server = serve(appliance_home, api_key, expect_ready=False)
    try:
        assert server.get("/readyz").status_code == 503
        run_runbook("service-will-not-start.md", env_for(server, api_key))
        assert server.get("/readyz").json() == {"status": "ready", "release": "demo@1.0.0"}
    finally:
        server.stop()


def test_runbook_disk_full(cli, tmp_path, tiny_gguf, appliance_home, api_key):
    for version, sequence in (("0.9.0", 1), ("1.0.0", 2), ("2.0.0", 3)):
        activated(cli, tmp_path, tiny_gguf, version, sequence)
    server = serve(appliance_home, api_key)
    try:
        run_runbook("disk-full.md", env_for(server, api_key))
        assert not (appliance_paths().releases_dir / "demo" / "0.9.0").exists()
        assert active(cli) == "demo@2.0.0"
    finally:
        server.stop()


def test_runbook_key_compromised(cli, tmp_path, tiny_gguf, appliance_home, api_key):
    activated(cli, tmp_path, tiny_gguf, "1.0.0", 1)
    old_key = cli("keys", "list")[1]["keys"][0]["key_id"]
    # the same release, to be signed again as 1.0.1 (a higher sequence) with a new key
    source = tmp_path / "src-1.0.0" / "bundle.toml"
    toml = source.read_text().replace('version = "1.0.0"', 'version = "1.0.1"')
    source.write_text(re.sub(r"^sequence = 1 ", "sequence = 2 ", toml, flags=re.M))
    server = serve(appliance_home, api_key)
    try:
        env = env_for(
            server,
            api_key,
            OLD_KEY_ID=old_key[:12],
            KEYS_DIR=tmp_path / "new-keys",
            DIST_DIR=tmp_path / "dist",
            BUNDLE_TOML=source,
            APPLIANCE_KEY_PASSPHRASE="correct horse battery staple",
        )
        run_runbook("key-compromised.md", env)
        keys = cli("keys", "list")[1]
        assert [k["revoked"] is not None for k in keys["keys"] if k["key_id"] == old_key] == [True]
        assert active(cli) == "demo@1.0.1"
    finally:
        server.stop()


def test_runbook_audit_break(cli, tmp_path, tiny_gguf, appliance_home, api_key):
    activated(cli, tmp_path, tiny_gguf, "1.0.0", 1)
    db = sqlite3.connect(appliance_paths().state_db)
    rogue = db.execute(
        "INSERT INTO api_keys (name, prefix, sha256, created) "
        "VALUES ('backdoor', 'sk-app-zzzz', 'ab', '2026-12-01T00:00:00Z')"
    ).lastrowid
    db.commit()
    db.close()
    server = serve(appliance_home, api_key)
    try:
        evidence = tmp_path / "evidence"
        env = env_for(server, api_key, ROGUE_KEY_ID=rogue, EVIDENCE_DIR=evidence)
        run_runbook("audit-break.md", env)
        copies = sorted(p.name for p in evidence.iterdir())
        assert len(copies) == 2 and copies[0].startswith("state-")
        kept = sqlite3.connect(evidence / copies[0])  # the evidence holds the rogue key
        assert kept.execute("SELECT name FROM api_keys WHERE id = ?", [rogue]).fetchone()
        assert cli("release", "list")[1]["frozen"] is True
    finally:
        server.stop()


def test_commands_are_read_with_their_expected_exit_codes():
    parsed = dict(commands("service-will-not-start.md"))
    assert parsed["appliance release verify demo@2.0.0   # exits 13"] == 13
    assert parsed["appliance release list"] == 0
    assert any(c.startswith("journalctl") for c in parsed)  # listed, not run
