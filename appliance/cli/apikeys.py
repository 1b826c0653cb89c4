"""`appliance apikeys`: keys for the inference API (stored hashed, shown once)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from appliance.cli.common import emit_json, json_option, pass_store, reason_option
from appliance.errors import UsageError
from appliance.store.apikeys import (
    create_api_key,
    export_api_keys,
    import_api_keys,
    list_api_keys,
    revoke_api_key,
)
from appliance.store.releases import ReleaseStore


@click.group()
def apikeys() -> None:
    """Create, list and revoke API keys for the inference service."""


@apikeys.command()
@click.option("--name", required=True, help="Who or what uses the key.")
@json_option
@pass_store
def create(store: ReleaseStore, name: str, as_json: bool) -> None:
    """Create a key; it is printed once and stored only as a hash."""
    row, token = create_api_key(store, name)
    if as_json:
        emit_json({**row, "key": token})
    else:
        click.echo(
            f"{token}\n(key {row['id']}, {row['name']}: store it now, it is not shown again)"
        )


@apikeys.command(name="list")
@json_option
@pass_store
def list_keys(store: ReleaseStore, as_json: bool) -> None:
    """List keys (id, name, prefix, created, revoked); never the keys themselves."""
    with store.reading() as db:
        rows = list_api_keys(db)
    if as_json:
        emit_json({"keys": rows})
        return
    for row in rows:
        state = f"revoked {row['revoked']}" if row["revoked"] else "active"
        click.echo(
            f"{row['id']:>4}  {row['prefix']}...  {row['name']:<20} {row['created']}  {state}"
        )


@apikeys.command()
@click.argument("key")
@reason_option
@json_option
@pass_store
def revoke(store: ReleaseStore, key: str, reason: str, as_json: bool) -> None:
    """Revoke KEY (its id, its shown prefix or the key itself); the service stops accepting it
    within seconds."""
    row = revoke_api_key(store, key, reason)
    if as_json:
        emit_json(row)
    else:
        click.echo(f"revoked key {row['id']} ({row['name']})")


@apikeys.command(name="export")
@click.option(
    "--out",
    "out_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the key set (JSON: names, prefixes and hashes; never a key).",
)
@json_option
@pass_store
def export_keys(store: ReleaseStore, out_file: Path, as_json: bool) -> None:
    """Write this home's keys as hashes, for `apikeys import` on every node of a fleet (a
    client's key then works on whichever node HAProxy picks)."""
    with store.reading() as db:
        key_set = export_api_keys(db)
    out_file.write_text(json.dumps(key_set, indent=2, sort_keys=True) + "\n")
    count = len(key_set["keys"])
    if as_json:
        emit_json({"ok": True, "keys": count, "file": str(out_file)})
    else:
        click.echo(f"wrote {count} keys (hashes only) to {out_file}")


@apikeys.command(name="import")
@click.argument("key_set_file", type=click.Path(dir_okay=False, path_type=Path))
@reason_option
@json_option
@pass_store
def import_keys(store: ReleaseStore, key_set_file: Path, reason: str, as_json: bool) -> None:
    """Merge KEY_SET_FILE (from `apikeys export`): add the keys missing here, revoke those it
    says are revoked (audited). A key revoked here stays revoked; importing again changes
    nothing."""
    try:
        key_set = json.loads(key_set_file.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read the key set {key_set_file}: {exc}") from exc
    result = import_api_keys(store, key_set, reason)
    if as_json:
        emit_json({"ok": True, **result})
    else:
        click.echo(f"added {len(result['added'])} keys, revoked {len(result['revoked'])}")
