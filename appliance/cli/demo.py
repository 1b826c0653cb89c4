"""`appliance demo`: the main job on the embedded default model, end to end."""

from __future__ import annotations

import os
from pathlib import Path

import click

from appliance.build.builder import build_bundle
from appliance.build.spec import load_bundle_spec
from appliance.cli.common import load_key_file, progress_bar
from appliance.cli.serve import serve
from appliance.errors import StoreError
from appliance.evals.evaluate import evaluate_release, judge_gate, plan_evaluation
from appliance.evals.report import verdict_word
from appliance.paths import appliance_paths
from appliance.serve.probe import probe_release
from appliance.store.apikeys import create_api_key
from appliance.store.releases import ReleaseStore
from appliance.trust.crypto import load_public_key
from appliance.trust.keyfiles import write_key_pair
from appliance.trust.truststore import load_trust_store
from appliance.trust.verify import verify_bundle

DEMO_KEY_NAME = "demo-signing"


@click.command()
@click.argument(
    "bundle_toml",
    default="bundles/demo/bundle.toml",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
)
@click.option(
    "--serve/--no-serve",
    "then_serve",
    default=False,
    help="Finish by serving the release on 127.0.0.1 (until Ctrl-C).",
)
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
@click.pass_context
def demo(ctx: click.Context, bundle_toml: Path, then_serve: bool, port: int) -> None:
    """Build, sign, verify, install, gate, activate (and serve) BUNDLE_TOML with a demo key.

    Creates a demo signing key under the appliance home (once) and trusts it, builds the
    signed bundle into <state>/bundles, verifies it as an operator would, installs it
    into the release store, runs its frozen eval gate on this host, makes it the active
    release if the gate passes and, with --serve, serves it with a demo API key. Safe to
    run again.
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
    finally:
        db.close()
    if installed is None:
        click.echo(f"[2/6] building {ref} from {bundle_toml}")
        built = build_bundle(spec, [load_key_file(private_key)], paths.state_dir / "bundles")
        click.echo(f"      wrote {built.path} ({built.path.stat().st_size / 1e6:.1f} MB)")
        _verify(built.path)
        click.echo("[4/6] installing into the release store")
        installed = store.install(built.path, probe_release).release
        click.echo(f"      installed at {installed.path}")
    else:
        click.echo(f"[2-4/6] {ref} is already installed at {installed.path}")
    db = store.open_db()
    decision = store.gate(db, installed)
    db.close()
    if decision.passed:
        click.echo(f"[5/6] eval gate: PASSED earlier ({decision.reason})")
    else:
        _run_gate(store, ref)
    activated, changed = store.activate(ref)
    how = "now the active release" if changed else "already active"
    click.echo(f"[6/6] {activated.ref} is {how}")
    click.echo(f"\nappliance home: {paths.config_dir.parent}")
    if then_serve:
        key = _demo_api_key(store)
        click.echo(SERVE_HINT.format(port=port, key=key, model=activated.ref))
        ctx.invoke(serve, port=port)


SERVE_HINT = """
serving on http://127.0.0.1:{port} (Ctrl-C stops it); try, from another terminal:

  curl -s http://127.0.0.1:{port}/v1/completions -H "Authorization: Bearer {key}" \\
       -H "Content-Type: application/json" \\
       -d '{{"prompt": "The Eiffel Tower is in the city of", "max_tokens": 12}}'

  python - <<'PY'
  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:{port}/v1", api_key="{key}")
  print(client.completions.create(model="{model}", prompt="Monday, Tuesday,",
                                  max_tokens=12).choices[0].text)
  PY
"""


def _demo_api_key(store: ReleaseStore) -> str:
    """The demo's API key, created once and kept (mode 0600) beside the demo signing key."""
    path = store.paths.config_dir / "demo-keys" / "api-key"
    if path.exists():
        return path.read_text().strip()
    _row, token = create_api_key(store, "demo")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def _demo_key(store: ReleaseStore) -> Path:
    keys_dir = store.paths.config_dir / "demo-keys"
    private_key = keys_dir / f"{DEMO_KEY_NAME}.key"
    if private_key.exists():
        click.echo(f"[1/6] using the demo signing key in {keys_dir}")
    else:
        write_key_pair(keys_dir, DEMO_KEY_NAME, passphrase=None)
        click.echo(f"[1/6] generated a demo signing key in {keys_dir}")
    public = load_public_key((keys_dir / f"{DEMO_KEY_NAME}.pub").read_bytes())
    if load_trust_store(store.paths.trust_store).active_key(public.key_id) is None:
        store.trust_key(public, DEMO_KEY_NAME)
    return private_key


def _run_gate(store: ReleaseStore, ref: str) -> None:
    """The frozen eval spec on this host; the release may serve only if it passes."""
    plan = plan_evaluation(store, ref)
    total = plan.case_runs
    click.echo(f"[5/6] eval gate: running the frozen spec on this host ({total} case runs)")
    with progress_bar(total, "      evaluating", enabled=True) as update:
        evaluation = evaluate_release(store, plan, progress=update)
    report, verdict = evaluation.report, evaluation.report["gate"]
    overall = report["overall"]
    click.echo(
        f"      {verdict_word(verdict)}: {overall['passed']}/"
        f"{overall['n']} cases, p95 {report['latency_ms']['p95']:.0f} ms, "
        f"{report['wall_seconds']:.1f} s; report {evaluation.files['markdown']}"
    )
    for failure in verdict["failures"]:
        click.echo(f"      FAIL {failure['criterion']}: {failure['detail']}")
    for item in verdict.get("inconclusive", []):
        click.echo(f"      INCONCLUSIVE {item['criterion']}: {item['detail']}")
    if not verdict["passed"]:
        judge_gate(store, ref)  # raises with the failed criterion's exit code, or 45


def _verify(bundle: Path) -> None:
    click.echo("[3/6] verifying the bundle against the trust store")
    trust = load_trust_store(appliance_paths().trust_store)
    with progress_bar(bundle.stat().st_size, "      verifying", enabled=True) as update:
        verified = verify_bundle(bundle, trust, progress=update)
    gguf = verified.gguf
    click.echo(
        f"      VERIFIED: signed by {', '.join(k[:16] for k in verified.signers)}; "
        f"{gguf.architecture} {gguf.file_type}, {gguf.parameter_count / 1e6:.0f}M params"
    )
