"""`appliance apikeys`: keys for the inference API (stored hashed, shown once)."""

from __future__ import annotations

import click

from appliance.cli.common import emit_json, json_option, want_json_errors
from appliance.paths import appliance_paths
from appliance.store.apikeys import create_api_key, list_api_keys, revoke_api_key
from appliance.store.releases import ReleaseStore


@click.group()
def apikeys() -> None:
    """Create, list and revoke API keys for the inference service."""


@apikeys.command()
@click.option("--name", required=True, help="Who or what uses the key.")
@json_option
@click.pass_context
def create(ctx: click.Context, name: str, as_json: bool) -> None:
    """Create a key; it is printed once and stored only as a hash."""
    want_json_errors(ctx, as_json)
    row, token = create_api_key(ReleaseStore(appliance_paths()), name)
    if as_json:
        emit_json({**row, "key": token})
    else:
        click.echo(
            f"{token}\n(key {row['id']}, {row['name']}: store it now, it is not shown again)"
        )


@apikeys.command(name="list")
@json_option
@click.pass_context
def list_keys(ctx: click.Context, as_json: bool) -> None:
    """List keys (id, name, prefix, created, revoked); never the keys themselves."""
    want_json_errors(ctx, as_json)
    rows = list_api_keys(ReleaseStore(appliance_paths()).open_db())
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
@click.option("--reason", default="", help="Why; recorded in the audit log.")
@json_option
@click.pass_context
def revoke(ctx: click.Context, key: str, reason: str, as_json: bool) -> None:
    """Revoke KEY (its id, its shown prefix or the key itself); the service stops accepting it
    within seconds."""
    want_json_errors(ctx, as_json)
    row = revoke_api_key(ReleaseStore(appliance_paths()), key, reason)
    if as_json:
        emit_json(row)
    else:
        click.echo(f"revoked key {row['id']} ({row['name']})")
