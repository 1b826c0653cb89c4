"""`appliance apikeys`: keys for the inference API (stored hashed, shown once)."""

from __future__ import annotations

import click

from appliance.cli.common import emit_json, json_option, pass_store, reason_option
from appliance.store.apikeys import create_api_key, list_api_keys, revoke_api_key
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
