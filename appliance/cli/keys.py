"""`appliance keys`: signing keys and the trust store."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import click

from appliance.cli.common import (
    PASSPHRASE_ENV,
    emit_json,
    json_option,
    out_dir_option,
    pass_store,
    reason_option,
)
from appliance.errors import UsageError
from appliance.paths import appliance_paths
from appliance.store.releases import ReleaseStore
from appliance.trust.crypto import load_public_key
from appliance.trust.keyfiles import write_key_pair
from appliance.trust.truststore import (
    TrustedKey,
    load_trust_store,
)


@click.group()
def keys() -> None:
    """Generate signing keys; trust, list and revoke public keys; set the threshold."""


@keys.command()
@out_dir_option("Directory for NAME.key (private, mode 0600) and NAME.pub.")
@click.option("--name", default="signing", show_default=True, help="File name stem.")
@click.option(
    "--encrypt",
    is_flag=True,
    help=f"Encrypt the private key with a passphrase (from ${PASSPHRASE_ENV}, else prompted).",
)
@json_option
def generate(out_dir: Path, name: str, encrypt: bool, as_json: bool) -> None:
    """Generate an ECDSA P-256 signing key pair."""
    passphrase = _new_passphrase() if encrypt else None
    pair = write_key_pair(out_dir, name, passphrase)
    result = {
        "key_id": pair.key_id,
        "private_key": str(pair.private_key),
        "public_key": str(pair.public_key),
        "encrypted": passphrase is not None,
    }
    if as_json:
        emit_json(result)
    else:
        click.echo(
            f"key id     {pair.key_id}\nprivate    {pair.private_key} (mode 0600)\n"
            f"public     {pair.public_key}"
        )


@keys.command()
@click.argument("public_key", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", help="A label for the key (default: the file name stem).")
@json_option
@pass_store
def trust(store: ReleaseStore, public_key: Path, name: str | None, as_json: bool) -> None:
    """Trust PUBLIC_KEY (PEM, ECDSA P-256) to sign bundles."""
    pem = load_public_key(public_key.read_bytes())
    key = store.trust_key(pem, name or public_key.stem)
    _print_key(key, as_json, verb="trusted")


@keys.command()
@click.argument("key_id")
@reason_option
@json_option
@pass_store
def revoke(store: ReleaseStore, key_id: str, reason: str, as_json: bool) -> None:
    """Revoke the trusted key KEY_ID (a unique prefix of at least 8 hex digits)."""
    key = store.revoke_key(key_id, reason)
    _print_key(key, as_json, verb="revoked")


@keys.command(name="list")
@json_option
def list_keys(as_json: bool) -> None:
    """List trusted and revoked keys and the signature threshold."""
    store = load_trust_store(appliance_paths().trust_store)
    if as_json:
        emit_json(
            {"threshold": store.threshold, "keys": [_key_dict(k) for k in store.keys.values()]}
        )
        return
    click.echo(f"threshold: {store.threshold} distinct trusted key(s) per bundle")
    if not store.keys:
        click.echo("no keys (appliance keys trust PUB.pem)")
    for key in store.keys.values():
        status = f"revoked {key.revoked}" if key.revoked else "trusted"
        click.echo(f"{key.key_id}  {key.name:<16} added {key.added}  {status}")


@keys.command()
@click.argument("k", type=int, required=False)
@json_option
@pass_store
def threshold(store: ReleaseStore, k: int | None, as_json: bool) -> None:
    """Show, or set to K, how many distinct trusted keys must sign a bundle."""
    trust = load_trust_store(store.paths.trust_store) if k is None else store.set_threshold(k)
    if as_json:
        emit_json({"threshold": trust.threshold})
    else:
        click.echo(f"threshold: {trust.threshold}")


def _new_passphrase() -> bytes:
    passphrase = os.environ.get(PASSPHRASE_ENV)
    if passphrase is None:
        passphrase = click.prompt("Passphrase", hide_input=True, confirmation_prompt=True)
    if not passphrase:
        raise UsageError("an empty passphrase does not encrypt anything")
    return passphrase.encode()


def _key_dict(key: TrustedKey) -> dict[str, object]:
    fields = asdict(key)
    fields.pop("pem")
    return {**fields, "status": "revoked" if key.revoked else "trusted"}


def _print_key(key: TrustedKey, as_json: bool, verb: str) -> None:
    if as_json:
        emit_json(_key_dict(key))
    else:
        click.echo(f"{verb} {key.key_id} ({key.name})")
