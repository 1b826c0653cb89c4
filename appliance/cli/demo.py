"""`appliance demo`: the main job on the embedded default model, end to end."""

from __future__ import annotations

from pathlib import Path

import click

from appliance.build.builder import build_bundle
from appliance.build.spec import load_bundle_spec
from appliance.cli.common import load_key_file, progress_bar
from appliance.errors import StoreError
from appliance.paths import appliance_paths
from appliance.store.releases import ReleaseStore
from appliance.trust.crypto import load_public_key
from appliance.trust.keyfiles import write_key_pair
from appliance.trust.truststore import load_trust_store
from appliance.trust.verify import verify_bundle

DEMO_KEY_NAME = "demo-signing"
FORCE_REASON = "demo: no eval report yet, activated without the gate"


@click.command()
@click.argument(
    "bundle_toml",
    default="bundles/demo/bundle.toml",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
)
def demo(bundle_toml: Path) -> None:
    """Build, sign, verify, install and activate BUNDLE_TOML with a local demo key.

    Creates a demo signing key under the appliance home (once) and trusts it, builds the
    signed bundle into <state>/bundles, verifies it as an operator would, installs it
    into the release store and makes it the active release. Safe to run again.
    """
    paths = appliance_paths()
    store = ReleaseStore(paths)
    private_key = _demo_key(store)
    spec = load_bundle_spec(bundle_toml)
    ref = f"{spec.name}@{spec.version}"
    db = store.open_db()
    try:
        installed = store.release(db, ref)
    except StoreError:
        installed = None
    if installed is None:
        click.echo(f"[2/5] building {ref} from {bundle_toml}")
        built = build_bundle(spec, [load_key_file(private_key)], paths.state_dir / "bundles")
        click.echo(f"      wrote {built.path} ({built.path.stat().st_size / 1e6:.1f} MB)")
        _verify(built.path)
        click.echo("[4/5] installing into the release store")
        installed = store.install(built.path).release
        click.echo(f"      installed at {installed.path}")
    else:
        click.echo(f"[2-4/5] {ref} is already installed at {installed.path}")
    activated, changed = store.activate(ref, force=True, reason=FORCE_REASON)
    how = "now the active release (--force, audited)" if changed else "already active"
    click.echo(f"[5/5] {activated.ref} is {how}")
    click.echo(f"\nappliance home: {paths.config_dir.parent}")


def _demo_key(store: ReleaseStore) -> Path:
    keys_dir = store.paths.config_dir / "demo-keys"
    private_key = keys_dir / f"{DEMO_KEY_NAME}.key"
    if private_key.exists():
        click.echo(f"[1/5] using the demo signing key in {keys_dir}")
    else:
        write_key_pair(keys_dir, DEMO_KEY_NAME, passphrase=None)
        click.echo(f"[1/5] generated a demo signing key in {keys_dir}")
    public = load_public_key((keys_dir / f"{DEMO_KEY_NAME}.pub").read_bytes())
    if load_trust_store(store.paths.trust_store).active_key(public.key_id) is None:
        store.trust_key(public, DEMO_KEY_NAME)
    return private_key


def _verify(bundle: Path) -> None:
    click.echo("[3/5] verifying the bundle against the trust store")
    trust = load_trust_store(appliance_paths().trust_store)
    with progress_bar(bundle.stat().st_size, "      verifying", enabled=True) as update:
        verified = verify_bundle(bundle, trust, progress=update)
    gguf = verified.gguf
    click.echo(
        f"      VERIFIED: signed by {', '.join(k[:16] for k in verified.signers)}; "
        f"{gguf.architecture} {gguf.file_type}, {gguf.parameter_count / 1e6:.0f}M params"
    )
