"""The command surface: help everywhere, version, documented commands, key management."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import click
from conftest import REPO

from appliance.cli import COMMANDS, cli


def all_commands(group: click.Group, prefix: tuple[str, ...] = ()):
    context = click.Context(group)
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from all_commands(command, (*prefix, name))


def test_help_lists_every_group_with_its_own_summary(run_cli):
    """`appliance --help` lists the commands without importing them, from summaries kept in
    appliance.cli.COMMANDS: each must be its command's own first paragraph of help."""
    result = run_cli("--help")
    assert result.exit_code == 0
    for path, command in all_commands(cli):
        if len(path) == 1:
            assert path[0] in result.output
            assert COMMANDS[path[0]][2] == " ".join(command.help.split("\n\n")[0].split())


def test_version(run_cli):
    result = run_cli("--version")
    assert result.exit_code == 0
    assert result.output.startswith("appliance, version ")


def test_every_command_has_help_and_is_documented(run_cli):
    readme = (REPO / "README.md").read_text()
    for path, command in all_commands(cli):
        assert command.help, f"{' '.join(path)} has no help text"
        result = run_cli(*path, "--help")
        assert result.exit_code == 0, path
        assert f"appliance {' '.join(path)}" in readme, f"README does not mention {path}"


def test_generate_writes_private_key_0600(run_cli, tmp_path):
    result = run_cli("keys", "generate", "--out", tmp_path / "k", "--name", "ops", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    private = tmp_path / "k" / "ops.key"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in private.read_bytes()
    assert len(info["key_id"]) == 64 and not info["encrypted"]


def test_generate_refuses_to_overwrite(run_cli, tmp_path):
    assert run_cli("keys", "generate", "--out", tmp_path).exit_code == 0
    result = run_cli("keys", "generate", "--out", tmp_path)
    assert result.exit_code == 3
    assert "refusing to overwrite" in result.output


def test_encrypted_key_signs_with_passphrase_from_env(
    run_cli, tmp_path, tiny_bundle_toml, monkeypatch
):
    monkeypatch.setenv("APPLIANCE_KEY_PASSPHRASE", "correct horse")
    assert run_cli("keys", "generate", "--out", tmp_path / "k", "--encrypt").exit_code == 0
    key = tmp_path / "k" / "signing.key"
    assert b"ENCRYPTED" in key.read_bytes()
    assert run_cli("keys", "trust", tmp_path / "k" / "signing.pub").exit_code == 0
    built = run_cli("bundle", "build", tiny_bundle_toml, "--key", key, "--out", tmp_path / "o")
    assert built.exit_code == 0, built.output

    monkeypatch.setenv("APPLIANCE_KEY_PASSPHRASE", "wrong")
    wrong = run_cli("bundle", "build", tiny_bundle_toml, "--key", key, "--out", tmp_path / "p")
    assert wrong.exit_code == 3
    assert "wrong passphrase" in wrong.output


def test_trust_list_revoke_and_threshold(run_cli, make_key):
    first, second = make_key("first"), make_key("second")
    assert run_cli("keys", "trust", first.public).exit_code == 0
    assert run_cli("keys", "trust", second.public, "--name", "backup").exit_code == 0
    assert run_cli("keys", "threshold", "2").exit_code == 0

    listed = json.loads(run_cli("keys", "list", "--json").output)
    assert listed["threshold"] == 2
    assert {k["key_id"]: k["status"] for k in listed["keys"]} == {
        first.key_id: "trusted",
        second.key_id: "trusted",
    }

    assert run_cli("keys", "revoke", second.key_id[:12]).exit_code == 0
    listed = json.loads(run_cli("keys", "list", "--json").output)
    statuses = {k["key_id"]: k["status"] for k in listed["keys"]}
    assert statuses[second.key_id] == "revoked"

    again = run_cli("keys", "trust", second.public)
    assert again.exit_code == 4
    assert "revoked" in again.output


def test_trust_refuses_non_p256_key(run_cli, tmp_path):
    pem = tmp_path / "ed25519.pub"
    pem.write_text(
        "-----BEGIN PUBLIC KEY-----\n"
        "MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n"
        "-----END PUBLIC KEY-----\n"
    )
    result = run_cli("keys", "trust", pem)
    assert result.exit_code == 3
    assert "P-256" in result.output


def test_revoke_unknown_key(run_cli):
    result = run_cli("keys", "revoke", "deadbeefdeadbeef")
    assert result.exit_code == 4
    assert "no key" in result.output


def test_errors_are_json_with_json_flag(run_cli, tmp_path):
    result = run_cli("bundle", "verify", tmp_path / "missing.tar", "--json")
    assert result.exit_code == 16
    document = json.loads(result.stdout)
    assert document == {
        "ok": False,
        "error": document["error"],
        "error_type": "UnreadableInputError",
        "exit_code": 16,
    }


def _trust_in_subprocess(args: tuple[str, str]) -> None:
    import os

    from appliance.trust.crypto import load_public_key
    from appliance.trust.truststore import trust_key

    store, pub = args
    os.environ.pop("APPLIANCE_HOME", None)
    trust_key(Path(store), load_public_key(Path(pub).read_bytes()), Path(pub).stem)


def test_concurrent_trust_changes_are_not_lost(make_key, tmp_path):
    import multiprocessing

    keys = [make_key(f"k{i}") for i in range(8)]
    store = tmp_path / "trust.json"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_trust_in_subprocess, [(str(store), str(k.public)) for k in keys])
    listed = json.loads(store.read_text())
    assert {k["key_id"] for k in listed["keys"]} == {k.key_id for k in keys}


def test_security_md_documents_every_exit_code_the_error_hierarchy_uses():
    """One error hierarchy (appliance/errors.py) and one table (SECURITY.md) that match."""
    import inspect
    import re

    import appliance.errors as errors
    from appliance.evals.report import CRITERIA, INCONCLUSIVE_EXIT

    table = (Path(__file__).parent.parent / "SECURITY.md").read_text()
    documented: set[int] = set()
    for first, last in re.findall(r"^\| (\d+)(?:-(\d+))? \|", table, flags=re.M):
        documented |= set(range(int(first), int(last or first) + 1))
    used = {
        cls.exit_code
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.ApplianceError) and cls is not errors.GateFailed
    }
    used |= set(CRITERIA.values()) | {INCONCLUSIVE_EXIT}
    assert used <= documented, f"undocumented exit codes: {sorted(used - documented)}"
    assert documented - used <= {0, 2}, f"documented but unused: {sorted(documented - used)}"
