"""The demo workflow: the main job on the embedded default model, end to end.

Creates a demo signing key under the appliance home (once) and trusts it, builds the signed
bundle into <state>/bundles, verifies it as an operator would, installs it into the release
store, runs its frozen eval gate on this host and makes it the active release if the gate
passes. Safe to run again: each step that is already done is skipped. `appliance demo`
prints the steps and may serve the result.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from appliance.bundler.builder import build_bundle
from appliance.bundler.spec import load_bundle_spec
from appliance.errors import StoreError
from appliance.evals.evaluate import evaluate_release, judge_gate, plan_evaluation
from appliance.evals.report import verdict_word
from appliance.serve.probe import probe_release
from appliance.store.apikeys import create_api_key
from appliance.store.records import Release
from appliance.store.releases import ReleaseStore
from appliance.trust.crypto import load_public_key, load_signing_key
from appliance.trust.keyfiles import write_key_pair
from appliance.trust.truststore import load_trust_store
from appliance.trust.verify import verify_bundle

DEMO_KEY_NAME = "demo-signing"

Say = Callable[[str], None]
# progress_bar(total, label) -> a context yielding update(n); the CLI draws it on a terminal
ProgressBar = Callable[[int, str], AbstractContextManager[Callable[[int], None]]]


def run_demo(store: ReleaseStore, bundle_toml: Path, say: Say, bar: ProgressBar) -> Release:
    """Build, sign, verify, install, gate and activate the release BUNDLE_TOML describes;
    return it, active. Raises GateFailed (and activates nothing) when the gate fails."""
    private_key = _demo_signing_key(store, say)
    spec = load_bundle_spec(bundle_toml)
    ref = f"{spec.name}@{spec.version}"
    installed = _installed(store, ref)
    if installed is None:
        say(f"[2/6] building {ref} from {bundle_toml}")
        signing_key = load_signing_key(private_key.read_bytes(), None)
        built = build_bundle(spec, [signing_key], store.paths.state_dir / "bundles")
        say(f"      wrote {built.path} ({built.path.stat().st_size / 1e6:.1f} MB)")
        _verify(store, built.path, say, bar)
        say("[4/6] installing into the release store")
        installed = store.install(built.path, probe_release).release
        say(f"      installed at {installed.path}")
    else:
        say(f"[2-4/6] {ref} is already installed at {installed.path}")
    with store.reading() as db:
        decision = store.gate(db, installed)
    if decision.passed:
        say(f"[5/6] eval gate: PASSED earlier ({decision.reason})")
    else:
        _run_gate(store, ref, say, bar)
    activated, changed = store.activate(ref)
    say(f"[6/6] {activated.ref} is {'now the active release' if changed else 'already active'}")
    return activated


def demo_api_key(store: ReleaseStore) -> str:
    """The demo's API key, created once and kept (mode 0600) beside the demo signing key."""
    path = store.paths.config_dir / "demo-keys" / "api-key"
    if path.exists():
        return path.read_text().strip()
    _row, token = create_api_key(store, "demo")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def _installed(store: ReleaseStore, ref: str) -> Release | None:
    with store.reading() as db:
        try:
            return store.release(db, ref)
        except StoreError:
            return None


def _demo_signing_key(store: ReleaseStore, say: Say) -> Path:
    keys_dir = store.paths.config_dir / "demo-keys"
    private_key = keys_dir / f"{DEMO_KEY_NAME}.key"
    if private_key.exists():
        say(f"[1/6] using the demo signing key in {keys_dir}")
    else:
        write_key_pair(keys_dir, DEMO_KEY_NAME, passphrase=None)
        say(f"[1/6] generated a demo signing key in {keys_dir}")
    public = load_public_key((keys_dir / f"{DEMO_KEY_NAME}.pub").read_bytes())
    if load_trust_store(store.paths.trust_store).active_key(public.key_id) is None:
        store.trust_key(public, DEMO_KEY_NAME)
    return private_key


def _verify(store: ReleaseStore, bundle: Path, say: Say, bar: ProgressBar) -> None:
    say("[3/6] verifying the bundle against the trust store")
    trust = load_trust_store(store.paths.trust_store)
    with bar(bundle.stat().st_size, "      verifying") as update:
        verified = verify_bundle(bundle, trust, progress=update)
    gguf = verified.gguf
    say(
        f"      VERIFIED: signed by {', '.join(k[:16] for k in verified.signers)}; "
        f"{gguf.architecture} {gguf.file_type}, {gguf.parameter_count / 1e6:.0f}M params"
    )


def _run_gate(store: ReleaseStore, ref: str, say: Say, bar: ProgressBar) -> None:
    """The frozen eval spec on this host; the release may serve only if it passes."""
    plan = plan_evaluation(store, ref)
    say(f"[5/6] eval gate: running the frozen spec on this host ({plan.case_runs} case runs)")
    with bar(plan.case_runs, "      evaluating") as update:
        evaluation = evaluate_release(store, plan, progress=update)
    report, verdict = evaluation.report, evaluation.report["gate"]
    overall = report["overall"]
    say(
        f"      {verdict_word(verdict)}: {overall['passed']}/{overall['n']} cases, "
        f"p95 {report['latency_ms']['p95']:.0f} ms, {report['wall_seconds']:.1f} s; "
        f"report {evaluation.files['markdown']}"
    )
    for failure in verdict["failures"]:
        say(f"      FAIL {failure['criterion']}: {failure['detail']}")
    for item in verdict.get("inconclusive", []):
        say(f"      INCONCLUSIVE {item['criterion']}: {item['detail']}")
    if not verdict["passed"]:
        judge_gate(store, ref)  # raises with the failed criterion's exit code, or 45
