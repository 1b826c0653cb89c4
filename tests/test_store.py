"""The release store through the CLI: install, replay refusal, gate, rollback, freeze,
remove, busy lock, audit chain. Real bundles, a real SQLite file, real signatures."""

from __future__ import annotations

import fcntl
import json
import sqlite3
from pathlib import Path

import pytest
from conftest import json_runner

from appliance.paths import appliance_paths
from appliance.store.gate import host_id


def ok(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.output) if result.output.startswith("{") else {}


@pytest.fixture
def cli(run_cli):
    return json_runner(run_cli)


def states(cli) -> dict[str, str]:
    code, listing = cli("release", "list")
    assert code == 0
    return {r["ref"]: r["state"] for r in listing["releases"]}


def audit_actions(cli) -> list[str]:
    return [r["action"] for r in reversed(cli("audit", "list")[1]["rows"])]


def force(cli, ref: str) -> None:
    assert cli("release", "activate", ref, "--force", "--reason", "test")[0] == 0


def test_install_is_recorded_read_only_and_idempotent(cli, make_bundle):
    bundle = make_bundle("1.0.0", 1)
    code, result = cli("release", "install", bundle)
    assert code == 0 and result["installed"] is True
    path = Path(result["release"]["path"])
    assert path == appliance_paths().releases_dir / "demo" / "1.0.0"
    assert (path / "model.gguf").stat().st_mode & 0o777 == 0o444
    assert states(cli) == {"demo@1.0.0": "installed"}

    code, again = cli("release", "install", bundle)
    assert code == 0 and again["installed"] is False
    assert audit_actions(cli) == ["key trust", "install"]
    assert cli("release", "verify", "demo@1.0.0")[0] == 0


def test_replay_and_downgrade_are_refused(cli, make_bundle):
    first, second, third = make_bundle("1.0.0", 1), make_bundle("1.1.0", 3), make_bundle("1.0.1", 1)
    assert cli("release", "install", first)[0] == 0
    assert cli("release", "install", second)[0] == 0
    code, error = cli("release", "install", third)
    assert code == 21
    assert "replay or downgrade refused" in error["error"]
    downgrade = make_bundle("1.0.2", 2)
    assert cli("release", "install", downgrade)[0] == 21
    assert set(states(cli)) == {"demo@1.0.0", "demo@1.1.0"}
    assert not any(appliance_paths().staging_dir.iterdir())


def test_same_version_with_other_content_is_refused(cli, make_bundle, tmp_path):
    assert cli("release", "install", make_bundle("1.0.0", 1))[0] == 0
    other = make_bundle("1.0.0", 5, padding_bytes=2000)
    code, error = cli("release", "install", other)
    assert code == 21 and "different content" in error["error"]


def test_rejected_bundle_installs_nothing(cli, make_bundle, tmp_path):
    data = bytearray(make_bundle("1.0.0", 1).read_bytes())
    data[-20000] ^= 0xFF
    bad = tmp_path / "bad.tar"
    bad.write_bytes(data)
    assert cli("release", "install", bad)[0] == 13
    assert states(cli) == {}
    assert not any(appliance_paths().staging_dir.iterdir())
    assert not any(appliance_paths().releases_dir.glob("*/*"))


def test_install_refuses_a_model_that_aborts_llama_cpp(cli, tmp_path, trusted_key):
    """A validly signed model that passes our header check but makes llama.cpp abort():
    the install loads it once in a child process and refuses it (exit 17); nothing lands."""
    from conftest import write_bundle_dir
    from tinymodel import write_tiny_gguf

    from appliance.bundler.builder import build_bundle
    from appliance.bundler.spec import load_bundle_spec

    model = write_tiny_gguf(tmp_path / "aborts.gguf", aborts_llama_cpp=True)
    spec = load_bundle_spec(write_bundle_dir(tmp_path / "src", model))
    bundle = build_bundle(spec, [trusted_key.signing_key], tmp_path / "out").path
    code, error = cli("release", "install", bundle)
    assert code == 17 and "failed the load probe" in error["error"]
    assert states(cli) == {}
    assert not any(appliance_paths().staging_dir.iterdir())
    assert not any(appliance_paths().releases_dir.glob("*/*"))


def test_activation_needs_the_gate_or_an_audited_force(cli, run_cli, make_bundle):
    assert cli("release", "install", make_bundle("1.0.0", 1))[0] == 0
    code, error = cli("release", "activate", "demo@1.0.0")
    assert code == 23 and "eval gate" in error["error"]
    no_reason = run_cli("release", "activate", "demo@1.0.0", "--force")
    assert no_reason.exit_code == 3 and "--reason" in no_reason.output
    force(cli, "demo@1.0.0")
    assert states(cli) == {"demo@1.0.0": "active"}
    row = cli("audit", "list")[1]["rows"][0]
    assert row["action"] == "activate --force" and row["reason"] == "test"


def test_a_passing_report_inserted_behind_the_store_never_opens_the_gate(cli, make_bundle):
    """An attacker with write access to the database adds a passing report for the exact
    release: the gate ignores it (no audit row records it) and `audit verify` names it."""
    assert cli("release", "install", make_bundle("1.0.0", 1))[0] == 0
    release = cli("release", "show", "demo@1.0.0")[1]
    db = sqlite3.connect(appliance_paths().state_db)
    db.execute(
        "INSERT INTO eval_reports (manifest_sha256, spec_hash, host, passed, created, report)"
        " VALUES (?, ?, ?, 1, '2026-01-01T00:00:00Z', '{}')",
        [release["manifest_sha256"], release["spec_hash"], host_id()],
    )
    db.commit()
    code, error = cli("release", "activate", "demo@1.0.0")
    assert code == 23 and "audit log" in error["error"]
    assert cli("release", "show", "demo@1.0.0")[1]["gate"]["passed"] is False
    code, error = cli("audit", "verify")
    assert code == 25 and "eval reports differ" in error["error"]


def test_rollback_returns_to_previous_good(cli, make_bundle):
    for version, sequence in (("1.0.0", 1), ("2.0.0", 2)):
        assert cli("release", "install", make_bundle(version, sequence))[0] == 0
    force(cli, "demo@1.0.0")
    force(cli, "demo@2.0.0")
    assert states(cli) == {"demo@1.0.0": "previous-good", "demo@2.0.0": "active"}
    code, result = cli("release", "rollback", "--reason", "p95 regression")
    assert code == 0 and result == {
        "ok": True,
        "active": "demo@1.0.0",
        "rolled_back_from": "demo@2.0.0",
    }
    assert states(cli) == {"demo@1.0.0": "active", "demo@2.0.0": "installed"}
    code, error = cli("release", "rollback")
    assert code == 24 and "no previous good" in error["error"]
    assert audit_actions(cli)[-1] == "rollback"


def test_freeze_blocks_activation_but_not_rollback(cli, run_cli, make_bundle):
    for version, sequence in (("1.0.0", 1), ("2.0.0", 2)):
        assert cli("release", "install", make_bundle(version, sequence))[0] == 0
    force(cli, "demo@1.0.0")
    force(cli, "demo@2.0.0")
    assert run_cli("release", "freeze").exit_code == 2  # --reason is required
    assert cli("release", "freeze", "--reason", "incident 42")[0] == 0
    code, error = cli("release", "activate", "demo@1.0.0", "--force", "--reason", "x")
    assert code == 22 and "incident 42" in error["error"]
    assert cli("release", "list")[1]["frozen"] is True
    assert cli("release", "rollback")[0] == 0
    assert cli("release", "unfreeze")[0] == 0
    force(cli, "demo@2.0.0")
    assert audit_actions(cli)[-4:] == ["freeze", "rollback", "unfreeze", "activate --force"]


def test_remove_spares_active_and_previous_good(cli, make_bundle):
    for version, sequence in (("1.0.0", 1), ("2.0.0", 2), ("3.0.0", 3)):
        assert cli("release", "install", make_bundle(version, sequence))[0] == 0
    force(cli, "demo@2.0.0")
    force(cli, "demo@3.0.0")
    assert cli("release", "remove", "demo@3.0.0")[0] == 24
    assert cli("release", "remove", "demo@2.0.0")[0] == 24
    path = Path(cli("release", "show", "demo@1.0.0")[1]["path"])
    assert cli("release", "remove", "demo@1.0.0")[0] == 0
    assert not path.exists()
    assert set(states(cli)) == {"demo@2.0.0", "demo@3.0.0"}
    # The sequence high-water mark survives removal: the old bundle cannot come back.
    assert cli("release", "install", make_bundle("1.0.0", 1))[0] == 21


def test_min_sequence_floor_blocks_rolling_back_too_far(cli, make_bundle):
    assert cli("release", "install", make_bundle("1.0.0", 1))[0] == 0
    force(cli, "demo@1.0.0")
    assert cli("release", "install", make_bundle("2.0.0", 2, min_sequence=2))[0] == 0
    force(cli, "demo@2.0.0")
    code, error = cli("release", "rollback")
    assert code == 21 and "minimum sequence" in error["error"]
    assert cli("release", "activate", "demo@1.0.0", "--force", "--reason", "x")[0] == 21
    assert states(cli)["demo@2.0.0"] == "active"


def test_a_second_admin_operation_is_busy(cli, make_bundle):
    bundle = make_bundle("1.0.0", 1)
    lock_path = appliance_paths().admin_lock
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        code, error = cli("release", "install", bundle)
    assert code == 20 and "another admin operation" in error["error"]
    assert cli("release", "install", bundle)[0] == 0


def test_installed_files_that_change_fail_verification(cli, make_bundle):
    assert cli("release", "install", make_bundle("1.0.0", 1))[0] == 0
    card = Path(cli("release", "show", "demo@1.0.0")[1]["path"]) / "cards" / "data-card.md"
    card.parent.chmod(0o755)
    card.chmod(0o644)
    card.write_text("edited after install")
    code, error = cli("release", "verify", "demo@1.0.0")
    assert code == 13 and "cards/data-card.md" in error["error"]


def test_key_changes_are_audited(cli, run_cli, make_key):
    key = make_key("ops")
    assert run_cli("keys", "trust", key.public).exit_code == 0
    assert run_cli("keys", "threshold", "1").exit_code == 0
    assert run_cli("keys", "revoke", key.key_id).exit_code == 0
    rows = cli("audit", "list")[1]["rows"]
    assert [r["action"] for r in rows][:3] == ["key revoke", "key threshold", "key trust"]
    assert rows[0]["target"] == key.key_id


@pytest.fixture
def audited_store(cli, make_bundle):
    """A store with seven audit rows (the trusted key's, then six changes)."""
    for version, sequence in (("1.0.0", 1), ("2.0.0", 2)):
        assert cli("release", "install", make_bundle(version, sequence))[0] == 0
    force(cli, "demo@1.0.0")
    force(cli, "demo@2.0.0")
    assert cli("release", "freeze", "--reason", "r")[0] == 0
    assert cli("release", "unfreeze")[0] == 0
    code, status = cli("audit", "verify")
    assert code == 0 and status["rows"] == 7
    return sqlite3.connect(appliance_paths().state_db)


def test_audit_verify_names_an_edited_row(cli, audited_store):
    audited_store.execute("UPDATE audit SET reason = 'nothing to see' WHERE id = 3")
    audited_store.commit()
    code, error = cli("audit", "verify")
    assert code == 25 and "row 3" in error["error"] and "edited" in error["error"]


def test_audit_verify_names_the_row_after_a_deleted_one(cli, audited_store):
    audited_store.execute("DELETE FROM audit WHERE id = 4")
    audited_store.commit()
    code, error = cli("audit", "verify")
    assert code == 25 and "row 5" in error["error"] and "deleted" in error["error"]


def test_audit_verify_names_reordered_rows(cli, audited_store):
    columns = "time, user, action, target, reason, details, prev_hash, hash"
    two, five = (
        audited_store.execute(f"SELECT {columns} FROM audit WHERE id = ?", [i]).fetchone()
        for i in (2, 5)
    )
    for row_id, values in ((2, five), (5, two)):
        assignments = ", ".join(f"{c} = ?" for c in columns.split(", "))
        audited_store.execute(f"UPDATE audit SET {assignments} WHERE id = ?", [*values, row_id])
    audited_store.commit()
    code, error = cli("audit", "verify")
    assert code == 25 and "row 2" in error["error"]


STATE_EDITS = {
    # what an attacker with write access to the database changes behind the store's back
    "active_release": (
        "UPDATE state SET active_id = (SELECT id FROM releases WHERE version = '1.0.0')",
        "active",
    ),
    "previous_good": ("UPDATE state SET previous_good_id = NULL", "previous good"),
    "freeze_lifted": ("UPDATE state SET frozen = 1, frozen_reason = 'x'", "frozen"),
    "sequence_floor": ("UPDATE sequences SET floor = 0, highest = 1", "sequences"),
    "release_row": ("DELETE FROM releases WHERE version = '1.0.0'", "releases"),
    "api_key": (
        "INSERT INTO api_keys (name, prefix, sha256, created) VALUES ('x', 'sk-x', 'ab', 'now')",
        "api keys",
    ),
}


@pytest.mark.parametrize("edit", sorted(STATE_EDITS))
def test_audit_verify_names_state_changed_outside_the_log(cli, audited_store, edit):
    sql, part = STATE_EDITS[edit]
    audited_store.execute(sql)
    audited_store.commit()
    code, error = cli("audit", "verify")
    assert code == 25, error
    assert "state changed outside the audit log" in error["error"] and part in error["error"]


def test_audit_verify_names_a_trust_store_changed_outside_the_log(cli, audited_store, make_key):
    from appliance.trust.crypto import load_public_key
    from appliance.trust.truststore import trust_key

    stranger = make_key("stranger")
    trust_key(appliance_paths().trust_store, load_public_key(stranger.public.read_bytes()), "x")
    code, error = cli("audit", "verify")
    assert code == 25 and "trusted" in error["error"]


def test_audit_verify_replays_every_kind_of_change(cli, run_cli, audited_store, make_key):
    """Every audited operation replays to the live state: no false alarms."""
    key = make_key("ops")
    assert run_cli("keys", "trust", key.public).exit_code == 0
    assert run_cli("keys", "revoke", key.key_id).exit_code == 0
    created = cli("apikeys", "create", "--name", "ci")[1]
    assert cli("apikeys", "revoke", created["prefix"])[0] == 0
    assert cli("release", "rollback", "--reason", "r")[0] == 0
    assert cli("release", "freeze", "--reason", "incident")[0] == 0
    assert cli("release", "remove", "demo@2.0.0")[0] == 0
    code, status = cli("audit", "verify")
    assert code == 0 and status["state"] == "matches", status


def test_an_api_key_is_revoked_by_the_key_itself_and_never_echoed(cli, run_cli):
    created = cli("apikeys", "create", "--name", "ci")[1]
    wrong = created["key"][:-4] + "XXXX"
    result = run_cli("apikeys", "revoke", wrong)
    assert result.exit_code == 24
    assert wrong not in result.output and wrong[len("sk-appl-") + 6 :] not in result.output
    code, row = cli("apikeys", "revoke", created["key"])
    assert code == 0 and row["id"] == created["id"] and row["revoked"]


def test_the_state_database_is_readable_by_its_owner_only(cli, appliance_home):
    assert cli("apikeys", "create", "--name", "ci")[0] == 0
    state = appliance_paths().state_db
    for path in state.parent.glob(state.name + "*"):
        if not path.name.endswith("-lock"):
            assert path.stat().st_mode & 0o077 == 0, path
