"""Crash safety: SIGKILL `release install`, `activate` and `rollback` at every named step,
then check that the store is consistent, the right release is active and its files
verify, and that running the command again succeeds. Plus a real full disk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from appliance.paths import HOME_ENV
from appliance.store.faults import FAULT_ENV

APPLIANCE = [sys.executable, "-m", "appliance"]


def appliance(*args: object, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run(
        [*APPLIANCE, *map(str, args)], env=env, capture_output=True, text=True, timeout=120
    )


def assert_consistent(active: str, appliance_home: Path, after_admin_op: bool = True) -> None:
    """Audit chain intact, `active` active and verified, every recorded release on disk.

    Right after a crash an unrecorded directory may remain (invisible: the database is the
    truth); the next admin operation removes it, so after one the two must match exactly.
    """
    assert appliance("audit", "verify").returncode == 0
    listing = json.loads(appliance("release", "list", "--json").stdout)
    states = {r["ref"]: r["state"] for r in listing["releases"]}
    assert states[active] == "active", states
    verified = appliance("release", "verify")
    assert verified.returncode == 0, verified.stderr
    releases = appliance_home / "var" / "releases"
    on_disk = {f"{p.parent.name}@{p.name}" for p in releases.glob("*/*")}
    assert set(states) <= on_disk, "a recorded release has no directory"
    if after_admin_op:
        assert on_disk == set(states), "release directories and the database disagree"


@pytest.fixture
def one_active(make_bundle, appliance_home):
    """demo@1.0.0 installed and active, demo@2.0.0 built but not installed."""
    first = make_bundle("1.0.0", 1)
    assert appliance("release", "install", first).returncode == 0
    assert (
        appliance("release", "activate", "demo@1.0.0", "--force", "--reason", "t").returncode == 0
    )
    return make_bundle("2.0.0", 2)


INSTALL_POINTS = [
    "during_extract",
    "after_extract",
    "after_rename",
    "in_transaction",
    "after_commit",
]


@pytest.mark.parametrize("point", INSTALL_POINTS)
def test_install_killed(one_active, appliance_home, point):
    killed = appliance("release", "install", one_active, fault=f"install.{point}")
    assert killed.returncode == -signal.SIGKILL
    assert_consistent("demo@1.0.0", appliance_home, after_admin_op=False)
    rerun = appliance("release", "install", one_active, "--json")
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["installed"] is (point != "after_commit")
    assert_consistent("demo@1.0.0", appliance_home)
    assert not any((appliance_home / "var" / "staging").iterdir())


@pytest.mark.parametrize("point", ["in_transaction", "after_commit"])
def test_activate_killed(one_active, appliance_home, point):
    assert appliance("release", "install", one_active).returncode == 0
    command = ("release", "activate", "demo@2.0.0", "--force", "--reason", "t")
    assert appliance(*command, fault=f"activate.{point}").returncode == -signal.SIGKILL
    committed = point == "after_commit"
    assert_consistent("demo@2.0.0" if committed else "demo@1.0.0", appliance_home, False)
    assert appliance(*command).returncode == 0
    assert_consistent("demo@2.0.0", appliance_home)


@pytest.mark.parametrize("point", ["in_transaction", "after_commit"])
def test_rollback_killed(one_active, appliance_home, point):
    assert appliance("release", "install", one_active).returncode == 0
    assert (
        appliance("release", "activate", "demo@2.0.0", "--force", "--reason", "t").returncode == 0
    )
    killed = appliance("release", "rollback", fault=f"rollback.{point}")
    assert killed.returncode == -signal.SIGKILL
    committed = point == "after_commit"
    assert_consistent("demo@1.0.0" if committed else "demo@2.0.0", appliance_home, False)
    rerun = appliance("release", "rollback")
    if committed:  # already rolled back: nothing left to roll back to, said clearly
        assert rerun.returncode == 24 and "no previous good" in rerun.stderr
    else:
        assert rerun.returncode == 0, rerun.stderr
    assert_consistent("demo@1.0.0", appliance_home)


@pytest.mark.parametrize("point", ["in_transaction", "after_commit"])
def test_incident_start_killed(one_active, appliance_home, point):
    """Rollback, freeze, fallback and the incident row land together or not at all."""
    assert appliance("release", "install", one_active).returncode == 0
    assert (
        appliance("release", "activate", "demo@2.0.0", "--force", "--reason", "t").returncode == 0
    )
    command = ("route", "add", "big", "--url", "http://10.0.0.7:8000/v1", "--model", "m")
    assert appliance(*command).returncode == 0
    command = ("incident", "start", "--reason", "t", "--rollback")
    assert appliance(*command, fault=f"routing.{point}").returncode == -signal.SIGKILL
    committed = point == "after_commit"
    assert_consistent("demo@1.0.0" if committed else "demo@2.0.0", appliance_home, False)
    status = json.loads(appliance("route", "status", "--json").stdout)
    assert (status["incident"] == "t", status["fallback"]) == (committed, committed)
    frozen = json.loads(appliance("release", "list", "--json").stdout)["frozen"]
    assert frozen is committed


@pytest.fixture
def second_public_key(tmp_path):
    made = appliance("keys", "generate", "--out", tmp_path / "k2", "--name", "second", "--json")
    assert made.returncode == 0, made.stderr
    return json.loads(made.stdout)


KEY_CHANGES = {
    "trust": lambda key: ("keys", "trust", key["public_key"]),
    "revoke": lambda key: ("keys", "revoke", key["key_id"][:16], "--reason", "t"),
    "threshold": lambda key: ("keys", "threshold", "2"),
}


@pytest.mark.parametrize("change", sorted(KEY_CHANGES))
def test_key_change_whose_write_fails_leaves_no_audit_row(
    one_active, appliance_home, second_public_key, change
):
    """The trust store is written after the audit row, in its transaction: a write that fails
    (a full disk) or a kill just before it leaves both as they were."""
    if change != "trust":
        assert appliance(*KEY_CHANGES["trust"](second_public_key)).returncode == 0
    trust_file = appliance_home / "etc" / "trust.json"
    before, rows = trust_file.read_bytes(), _audit_rows()
    command = KEY_CHANGES[change](second_public_key)
    failed = appliance(*command, fault="keys.before_write:enospc")
    assert failed.returncode == 5, failed.stderr
    assert appliance(*command, fault="keys.before_write").returncode == -signal.SIGKILL
    assert trust_file.read_bytes() == before and _audit_rows() == rows
    assert_consistent("demo@1.0.0", appliance_home)
    assert appliance(*command).returncode == 0
    assert trust_file.read_bytes() != before and len(_audit_rows()) == len(rows) + 1
    assert appliance("audit", "verify").returncode == 0


def test_key_change_killed_before_its_commit_is_reported_by_audit_verify(
    one_active, appliance_home, second_public_key
):
    command = KEY_CHANGES["trust"](second_public_key)
    assert appliance(*command, fault="keys.after_write").returncode == -signal.SIGKILL
    verified = appliance("audit", "verify")
    assert verified.returncode == 25
    assert "state changed outside the audit log" in verified.stderr
    assert "trust" in verified.stderr


def _audit_rows() -> list[dict]:
    return json.loads(appliance("audit", "list", "--json").stdout)["rows"]


def test_remove_killed_after_commit(one_active, appliance_home):
    assert appliance("release", "install", one_active).returncode == 0
    killed = appliance("release", "remove", "demo@2.0.0", fault="remove.after_commit")
    assert killed.returncode == -signal.SIGKILL
    # The row is gone; the next admin operation removes the orphaned directory.
    assert appliance("release", "unfreeze").returncode == 0
    assert_consistent("demo@1.0.0", appliance_home)


def test_injected_enospc_during_install(one_active, appliance_home):
    failed = appliance("release", "install", one_active, fault="install.during_extract:enospc")
    assert failed.returncode == 5
    assert "disk full" in failed.stderr and failed.stderr.count("\n") == 1
    assert_consistent("demo@1.0.0", appliance_home, after_admin_op=False)
    assert appliance("release", "install", one_active).returncode == 0


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_full_disk_on_a_real_small_filesystem(make_bundle, appliance_home, tmp_path):
    """The state directory on a 1.5 MB tmpfs (in a private mount namespace): the second,
    bigger bundle does not fit. Nothing changes; with more room the same command works."""
    small, big = make_bundle("1.0.0", 1), make_bundle("2.0.0", 2, padding_bytes=2_000_000)
    state = appliance_home / "var"
    state.mkdir(parents=True, exist_ok=True)
    script = textwrap.dedent(f"""\
        set -u
        mount -t tmpfs -o size=1500k tmpfs {state}
        run() {{ {" ".join(APPLIANCE)} "$@"; echo "rc=$?"; }}
        run release install {small}
        run release activate demo@1.0.0 --force --reason t
        run release install {big}
        run release list --json
        run release verify
        echo "staging=[$(ls -A {state}/staging)]"
        mount -o remount,size=8m {state}
        run release install {big}
    """)
    done = subprocess.run(
        ["unshare", "-rm", "bash", "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, HOME_ENV: str(appliance_home)},
    )
    if "mount:" in done.stderr and "rc=" not in done.stdout:
        pytest.skip(f"cannot mount tmpfs here: {done.stderr.strip()}")
    codes = [line for line in done.stdout.splitlines() if line.startswith("rc=")]
    assert codes == ["rc=0", "rc=0", "rc=5", "rc=0", "rc=0", "rc=0"], done.stdout + done.stderr
    assert "disk full" in done.stderr
    listing = json.loads(done.stdout.split("rc=5\n", 1)[1].split("rc=0", 1)[0])
    assert {r["ref"]: r["state"] for r in listing["releases"]} == {"demo@1.0.0": "active"}
    assert "staging=[]" in done.stdout, "the failed install left staging files behind"
