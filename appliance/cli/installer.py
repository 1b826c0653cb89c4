"""`appliance installer`: build the signed offline installer tarball."""

from __future__ import annotations

from pathlib import Path

import click

from appliance.bundler.installer import build_installer
from appliance.cli.common import (
    emit_json,
    json_option,
    load_key_file,
    out_dir_option,
    private_key_option,
)
from appliance.trust.crypto import load_public_key


@click.group()
def installer() -> None:
    """Build the signed offline installer for air-gapped hosts."""


@installer.command()
@private_key_option("Private key (ECDSA P-256 PEM) that signs the installer.")
@click.option(
    "--trust-key",
    "trust_keys",
    multiple=True,
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Public key the installed appliance will trust for bundles; repeatable.",
)
@out_dir_option("Directory for the tarball, its .sig and install.sh.")
@click.option(
    "--source",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=".",
    show_default=True,
    help="The project's source tree.",
)
@click.option(
    "--wheelhouse",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default="wheelhouse",
    show_default=True,
    help="Where scripts/setup put the portable llama-cpp-python wheel.",
)
@json_option
def build(
    key_path: Path,
    trust_keys: tuple[Path, ...],
    out_dir: Path,
    source: Path,
    wheelhouse: Path,
    as_json: bool,
) -> None:
    """Build appliance-installer-VERSION.tar, its detached signature and install.sh.

    Collects every wheel the appliance needs (from PyPI on this build host, and the
    portable llama-cpp-python wheel from WHEELHOUSE), so the target needs no network.
    """
    key = load_key_file(key_path)
    trusted = [load_public_key(p.read_bytes()) for p in trust_keys]
    if not as_json:
        click.echo("collecting wheels (this package and every dependency)...", err=True)
    built = build_installer(source.resolve(), key, trusted, out_dir, wheelhouse.resolve())
    result = {
        "ok": True,
        "version": built.version,
        "tarball": str(built.tarball),
        "signature": str(built.signature),
        "install_script": str(built.install_script),
        "wheels": list(built.wheels),
    }
    if as_json:
        emit_json(result)
        return
    click.echo(
        f"built {built.tarball} ({built.tarball.stat().st_size / 1e6:.0f} MB, "
        f"{len(built.wheels)} wheels)\nsigned {built.signature}\n"
        f"script {built.install_script}\nverify with: openssl dgst -sha256 -verify "
        f"PUB.pem -signature {built.signature} {built.tarball}"
    )
