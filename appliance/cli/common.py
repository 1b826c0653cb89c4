"""What every command group shares: error reporting, --json, progress bars, key loading."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click

from appliance.errors import ApplianceError, HostError, UsageError
from appliance.paths import appliance_paths

if TYPE_CHECKING:
    from appliance.trust.crypto import SigningKey

PASSPHRASE_ENV = "APPLIANCE_KEY_PASSPHRASE"
F = TypeVar("F", bound=Callable[..., Any])


def _json_errors(ctx: click.Context, _param: click.Parameter, as_json: bool) -> bool:
    """With --json, failures are also reported as JSON on stdout (ApplianceGroup reads this)."""
    ctx.find_root().meta["json_errors"] = as_json
    return as_json


json_option = click.option(
    "--json",
    "as_json",
    is_flag=True,
    is_eager=True,  # set the error mode before any other option can fail
    callback=_json_errors,
    help="Print one JSON document on stdout for scripts.",
)
reason_option = click.option("--reason", default="", help="Why; recorded in the audit log.")
required_reason_option = click.option(
    "--reason", required=True, help="Why; recorded in the audit log."
)


def out_dir_option(help_text: str) -> Callable[[F], F]:
    return click.option(
        "--out",
        "out_dir",
        required=True,
        type=click.Path(file_okay=False, path_type=Path),
        help=help_text,
    )


def private_key_option(help_text: str, multiple: bool = False) -> Callable[[F], F]:
    return click.option(
        "--key",
        "key_paths" if multiple else "key_path",
        multiple=multiple,
        required=True,
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help=help_text,
    )


def pass_store(command: F) -> F:
    """Hand the command a ReleaseStore for this appliance home as its first argument."""

    @functools.wraps(command)
    def with_store(*args: Any, **kwargs: Any) -> Any:
        from appliance.store.releases import ReleaseStore  # light commands never import it

        return command(ReleaseStore(appliance_paths()), *args, **kwargs)

    return cast(F, with_store)


class ApplianceGroup(click.Group):
    """A click group that turns ApplianceError into a one-line message and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            try:
                return super().invoke(ctx)
            except OSError as exc:  # disk full, permissions: a one-line reason, not a traceback
                where = f": {exc.filename}" if exc.filename else ""
                raise HostError(f"{exc.strerror or exc}{where}") from exc
        except ApplianceError as exc:
            if ctx.find_root().meta.get("json_errors"):
                emit_json(
                    {
                        "ok": False,
                        "error": exc.message,
                        "error_type": type(exc).__name__,
                        "exit_code": exc.exit_code,
                    }
                )
            click.echo(f"error: {exc.message}", err=True)
            ctx.exit(exc.exit_code)


def emit_json(document: dict[str, Any]) -> None:
    click.echo(json.dumps(document, indent=2, sort_keys=True))


def report_done(as_json: bool, document: dict[str, Any], message: str) -> None:
    """A state change went through: {"ok": true, ...document} with --json, else `message`."""
    if as_json:
        emit_json({"ok": True, **document})
    else:
        click.echo(message)


@contextmanager
def progress_bar(total: int, label: str, enabled: bool) -> Iterator[Callable[[int], None]]:
    """Yield an update(n_bytes) callback; draws a bar on stderr only for a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield lambda _n: None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        yield bar.update


def load_key_file(path: Path) -> SigningKey:
    """Load a private key, asking for its passphrase (env var or prompt) when encrypted."""
    from appliance.trust.crypto import WrongPassphrase, load_signing_key  # not for --help

    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read key {path}: {exc.strerror}") from exc
    try:
        return load_signing_key(pem, None)
    except WrongPassphrase:
        pass
    passphrase = os.environ.get(PASSPHRASE_ENV)
    if passphrase is None:
        if not sys.stdin.isatty():
            raise UsageError(f"key {path} is encrypted: set {PASSPHRASE_ENV} or run in a terminal")
        passphrase = click.prompt(f"Passphrase for {path}", hide_input=True)
    try:
        return load_signing_key(pem, passphrase.encode())
    except WrongPassphrase as exc:
        raise UsageError(f"wrong passphrase for key {path}") from exc
