"""`appliance bundle`: build, verify and unpack signed release bundles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from appliance.cli.common import (
    emit_json,
    json_option,
    load_key_file,
    out_dir_option,
    private_key_option,
    progress_bar,
)
from appliance.paths import appliance_paths
from appliance.trust.truststore import load_trust_store
from appliance.trust.verify import VerifiedBundle, unpack_bundle, verify_bundle


@click.group()
def bundle() -> None:
    """Build, verify and unpack signed release bundles."""


@bundle.command()
@click.argument("bundle_toml", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@private_key_option("Private signing key (PEM); repeat for several signatures.", multiple=True)
@out_dir_option("Directory to write NAME-VERSION.tar into.")
@json_option
def build(bundle_toml: Path, key_paths: tuple[Path, ...], out_dir: Path, as_json: bool) -> None:
    """Build and sign the release described by BUNDLE_TOML."""
    # here, not at the top: the spec's safety detectors take ~0.2 s to import, and verify
    # (run by security staff on many bundles) needs none of it
    from appliance.bundler.builder import build_bundle, source_model
    from appliance.bundler.spec import load_bundle_spec

    spec = load_bundle_spec(bundle_toml)
    signing_keys = [load_key_file(p) for p in key_paths]
    source, _ = source_model(spec)
    total = 2 * source.stat().st_size  # hashed once, copied into the tar once
    with progress_bar(total, "hashing, signing, writing", enabled=not as_json) as update:
        built = build_bundle(spec, signing_keys, out_dir, progress=update)
    release = built.manifest.release
    result = {
        "ok": True,
        "bundle": str(built.path),
        "release": release.__dict__,
        "signers": list(built.signer_key_ids),
        "files": sorted(built.manifest.files),
    }
    if as_json:
        emit_json(result)
        return
    click.echo(
        f"built {built.path}\n  release   {release.ref} (sequence {release.sequence})\n"
        f"  model     {release.quant_type}, {len(built.manifest.files)} files signed"
    )
    for key_id in built.signer_key_ids:
        click.echo(f"  signed by {key_id}")


@bundle.command()
@click.argument("bundle_file", type=click.Path(dir_okay=False, path_type=Path))
@json_option
def verify(bundle_file: Path, as_json: bool) -> None:
    """Verify BUNDLE_FILE's signatures, hashes, archive safety and GGUF header.

    Nothing is written anywhere. Exit codes: 0 verified, 10 bad or missing signature,
    11 untrusted or revoked key, 12 threshold not met, 13 hash or size mismatch,
    14 unsafe archive, 15 bad GGUF, 16 unreadable input.
    """
    trust = load_trust_store(appliance_paths().trust_store)
    with progress_bar(_size(bundle_file), "verifying", enabled=not as_json) as update:
        verified = verify_bundle(bundle_file, trust, progress=update)
    _report(verified, bundle_file, as_json)


@bundle.command()
@click.argument("bundle_file", type=click.Path(dir_okay=False, path_type=Path))
@out_dir_option("Directory to create; it appears only if verification passes.")
@json_option
def unpack(bundle_file: Path, out_dir: Path, as_json: bool) -> None:
    """Verify BUNDLE_FILE and lay its files out in OUT (for independent verifiers)."""
    trust = load_trust_store(appliance_paths().trust_store)
    with progress_bar(_size(bundle_file), "verifying and unpacking", not as_json) as update:
        verified = unpack_bundle(bundle_file, trust, out_dir, progress=update)
    _report(verified, bundle_file, as_json, unpacked_to=out_dir)


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def _report(
    verified: VerifiedBundle, path: Path, as_json: bool, unpacked_to: Path | None = None
) -> None:
    release = verified.manifest.release
    result: dict[str, Any] = {
        "ok": True,
        "verdict": "verified",
        "bundle": str(path),
        "release": release.__dict__,
        "signers": list(verified.signers),
        "ignored_signers": [{"key_id": k, "status": s} for k, s in verified.ignored_signers],
        "files": {n: e.__dict__ for n, e in sorted(verified.manifest.files.items())},
        "gguf": verified.gguf.as_dict(),
    }
    if unpacked_to is not None:
        result["unpacked_to"] = str(unpacked_to)
    if as_json:
        emit_json(result)
        return
    gguf = verified.gguf
    click.echo(
        f"VERIFIED {path}\n  release   {release.ref} (sequence {release.sequence}, "
        f"created {release.created})"
    )
    for key_id in verified.signers:
        click.echo(f"  signer    {key_id}")
    for key_id, status in verified.ignored_signers:
        click.echo(f"  ignored   {key_id} ({status})")
    click.echo(
        f"  model     {gguf.architecture} {gguf.file_type}, "
        f"{gguf.parameter_count / 1e6:.1f}M parameters, context {gguf.context_length}"
    )
    click.echo(f"  files     {len(verified.manifest.files)} signed files, all hashes match")
    if unpacked_to is not None:
        click.echo(f"  unpacked  {unpacked_to}")
