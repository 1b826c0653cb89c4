"""`appliance release`: install, list, show, activate, roll back, freeze, remove, verify,
search."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from appliance.cli.common import (
    emit_json,
    json_option,
    pass_store,
    progress_bar,
    reason_option,
    report_done,
    required_reason_option,
)
from appliance.errors import StoreError
from appliance.serve.probe import probe_release
from appliance.store.records import Release, StoreState
from appliance.store.releases import ReleaseStore


@click.group()
def release() -> None:
    """Install signed bundles and switch, freeze or remove releases (all audited)."""


@release.command()
@click.argument("bundle_file", type=click.Path(dir_okay=False, path_type=Path))
@json_option
@pass_store
def install(store: ReleaseStore, bundle_file: Path, as_json: bool) -> None:
    """Verify BUNDLE_FILE while extracting it, and install it (not active yet).

    Refuses a sequence at or below the highest installed for the name (replay or
    downgrade). Installing the same bundle again changes nothing.
    """
    size = bundle_file.stat().st_size if bundle_file.is_file() else 0
    with progress_bar(size, "verifying and installing", enabled=not as_json) as update:
        result = store.install(bundle_file, probe_release, progress=update)
    if as_json:
        emit_json(
            {"ok": True, "installed": result.installed, "release": _release_dict(result.release)}
        )
        return
    verb = "installed" if result.installed else "already installed"
    click.echo(
        f"{verb} {result.release.ref} (sequence {result.release.sequence}) at {result.release.path}"
    )


@release.command(name="list")
@json_option
@pass_store
def list_releases(store: ReleaseStore, as_json: bool) -> None:
    """List installed releases and which one is active, previous good, or frozen."""
    with store.reading() as db:
        releases, state = store.releases(db), store.state(db)
    if as_json:
        emit_json(
            {
                "frozen": state.frozen,
                "frozen_reason": state.frozen_reason,
                "releases": [{**_release_dict(r), "state": _state_of(r, state)} for r in releases],
            }
        )
        return
    if state.frozen:
        click.echo(f"FROZEN since {state.frozen_at}: {state.frozen_reason}")
    if not releases:
        click.echo("no releases installed (appliance release install BUNDLE)")
    for r in releases:
        click.echo(
            f"{r.ref:<24} seq {r.sequence:<4} {_state_of(r, state):<14} "
            f"{r.quant_type:<8} installed {r.installed_at}  signed by "
            f"{', '.join(k[:12] for k in r.signers)}"
        )


@release.command()
@click.argument("ref", metavar="NAME@VERSION")
@json_option
@pass_store
def show(store: ReleaseStore, ref: str, as_json: bool) -> None:
    """Show a release's metadata, signers, eval gate status and cards."""
    with store.reading() as db:
        r, state = store.release(db, ref), store.state(db)
        gate = store.gate(db, r)
    cards = {
        name: (Path(r.path) / "cards" / f"{name}-card.md").read_text() for name in ("model", "data")
    }
    if as_json:
        emit_json(
            {
                **_release_dict(r),
                "state": _state_of(r, state),
                "cards": cards,
                "gate": {"passed": gate.passed, "reason": gate.reason},
            }
        )
        return
    click.echo(
        f"{r.ref}  ({_state_of(r, state)})\n  sequence  {r.sequence} "
        f"(min {r.min_sequence}), created {r.created}, installed {r.installed_at}\n"
        f"  model     {r.gguf['architecture']} {r.quant_type}, "
        f"{r.gguf['parameter_count'] / 1e6:.1f}M params, sha256 {r.model_sha256}\n"
        f"  spec      {r.spec_hash}\n  gate      {'passed' if gate.passed else 'not passed'}"
        f" ({gate.reason})\n  path      {r.path}"
    )
    for key_id in r.signers:
        click.echo(f"  signer    {key_id}")
    for name, text in cards.items():
        click.echo(f"\n--- {name} card ---\n{text.rstrip()}")


@release.command()
@click.argument("ref", metavar="NAME@VERSION")
@click.option("--force", is_flag=True, help="Bypass the eval gate (needs --reason; audited).")
@reason_option
@json_option
@pass_store
def activate(store: ReleaseStore, ref: str, force: bool, reason: str, as_json: bool) -> None:
    """Make NAME@VERSION the active release; it must have passed its eval gate here."""
    r, changed = store.activate(ref, force=force, reason=reason)
    report_done(
        as_json,
        {"active": r.ref, "changed": changed},
        f"{r.ref} is {'now' if changed else 'already'} the active release",
    )


@release.command()
@reason_option
@json_option
@pass_store
def rollback(store: ReleaseStore, reason: str, as_json: bool) -> None:
    """Switch back to the previous good release (allowed while frozen)."""
    target, previous = store.rollback(reason)
    from_ref = previous.ref if previous else None
    report_done(
        as_json,
        {"active": target.ref, "rolled_back_from": from_ref},
        f"rolled back from {from_ref} to {target.ref}",
    )


@release.command()
@required_reason_option
@json_option
@pass_store
def freeze(store: ReleaseStore, reason: str, as_json: bool) -> None:
    """Freeze releases: nothing activates until unfreeze (rollback still works)."""
    store.freeze(reason)
    report_done(as_json, {"frozen": True, "reason": reason}, f"releases frozen: {reason}")


@release.command()
@reason_option
@json_option
@pass_store
def unfreeze(store: ReleaseStore, reason: str, as_json: bool) -> None:
    """Allow activations again."""
    store.unfreeze(reason)
    report_done(as_json, {"frozen": False}, "releases unfrozen")


@release.command()
@click.argument("ref", metavar="NAME@VERSION")
@reason_option
@json_option
@pass_store
def remove(store: ReleaseStore, ref: str, reason: str, as_json: bool) -> None:
    """Remove an installed release (never the active or previous good one)."""
    r = store.remove(ref, reason)
    report_done(as_json, {"removed": r.ref}, f"removed {r.ref}")


@release.command()
@click.argument("ref", metavar="[NAME@VERSION]", required=False)
@json_option
@pass_store
def verify(store: ReleaseStore, ref: str | None, as_json: bool) -> None:
    """Re-verify an installed release's files and signatures (default: the active one)."""
    with store.reading() as db:
        if ref is None:
            active = store.release_by_id(db, store.state(db).active_id)
            if active is None:
                raise StoreError("no release is active; name one")
            ref = active.ref
        installed = store.release(db, ref)
    verified = store.verify_installed(installed)
    report_done(
        as_json,
        {"verified": ref, "signers": list(verified.signers)},
        f"VERIFIED installed release {ref}: signatures and every file's sha256 match",
    )


@release.command()
@click.argument("ref", metavar="NAME@VERSION")
@click.argument("query")
@click.option("-k", "k", type=click.IntRange(1, 50), default=3, show_default=True)
@json_option
@pass_store
def search(store: ReleaseStore, ref: str, query: str, k: int, as_json: bool) -> None:
    """Search a release's signed corpus as retrieval does: the top K passages for QUERY.

    The release is re-verified first; its index (built at install) is rebuilt from the
    verified corpus if the cache lost it."""
    from appliance.retrieval.index import Index, index_corpus

    with store.reading() as db:
        installed = store.release(db, ref)
    store.verify_installed(installed)
    path = store.paths.corpus_index(installed.manifest_sha256)
    if not path.is_file() and not index_corpus(Path(installed.path), path):
        raise StoreError(f"{ref} has no corpus: its bundle.toml lists no [retrieval] corpus")
    index = Index(path)
    try:
        found = index.search(query, k)
    finally:
        index.close()
    if as_json:
        emit_json(
            {
                "release": ref,
                "query": query,
                "k": k,
                "seconds": found.seconds,
                "hits": [{"id": h.id, "title": h.title, "score": h.score} for h in found.hits],
            }
        )
        return
    if not found.hits:
        click.echo("no passage matches")
    for rank, hit in enumerate(found.hits, start=1):
        click.echo(f"{rank}. {hit.id}  ({hit.title}; score {hit.score:.4f})")


def _state_of(r: Release, state: StoreState) -> str:
    if r.id == state.active_id:
        return "active"
    if r.id == state.previous_good_id:
        return "previous-good"
    return "installed"


def _release_dict(r: Release) -> dict[str, Any]:
    return {**r.__dict__, "ref": r.ref}
