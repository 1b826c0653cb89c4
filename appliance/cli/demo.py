"""`appliance demo`: the main job on the embedded default model, end to end."""

from __future__ import annotations

from pathlib import Path

import click

from appliance.build.builder import build_bundle
from appliance.build.spec import load_bundle_spec
from appliance.cli.common import load_key_file, progress_bar
from appliance.paths import appliance_paths
from appliance.trust.crypto import load_public_key
from appliance.trust.keyfiles import write_key_pair
from appliance.trust.truststore import load_trust_store, trust_key
from appliance.trust.verify import verify_bundle

DEMO_KEY_NAME = "demo-signing"


@click.command()
@click.argument(
    "bundle_toml",
    default="bundles/demo/bundle.toml",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
)
def demo(bundle_toml: Path) -> None:
    """Build, sign and verify BUNDLE_TOML with a local demo key.

    Creates a demo signing key under the appliance home (once), trusts it, builds the
    signed bundle into <state>/bundles and verifies it as an operator would.
    """
    paths = appliance_paths()
    keys_dir = paths.config_dir / "demo-keys"
    private_key = keys_dir / f"{DEMO_KEY_NAME}.key"
    if not private_key.exists():
        write_key_pair(keys_dir, DEMO_KEY_NAME, passphrase=None)
        click.echo(f"[1/3] generated demo signing key in {keys_dir}")
    else:
        click.echo(f"[1/3] using demo signing key in {keys_dir}")
    public = load_public_key((keys_dir / f"{DEMO_KEY_NAME}.pub").read_bytes())
    trust_key(paths.trust_store, public, DEMO_KEY_NAME)

    spec = load_bundle_spec(bundle_toml)
    click.echo(f"[2/3] building {spec.name}@{spec.version} from {bundle_toml}")
    built = build_bundle(spec, [load_key_file(private_key)], paths.state_dir / "bundles")
    click.echo(f"      wrote {built.path} ({built.path.stat().st_size / 1e6:.1f} MB)")

    click.echo("[3/3] verifying the bundle against the trust store")
    trust = load_trust_store(paths.trust_store)
    with progress_bar(built.path.stat().st_size, "      verifying", enabled=True) as update:
        verified = verify_bundle(built.path, trust, progress=update)
    gguf = verified.gguf
    click.echo(
        f"      VERIFIED: signed by {', '.join(k[:16] for k in verified.signers)}; "
        f"{gguf.architecture} {gguf.file_type}, {gguf.parameter_count / 1e6:.0f}M params"
    )
    click.echo(f"\nappliance home: {paths.config_dir.parent}\nbundle: {built.path}")
