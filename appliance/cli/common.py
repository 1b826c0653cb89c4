"""What every command group shares: error reporting, --json, progress bars, key loading."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from appliance.errors import ApplianceError, HostError, UsageError
from appliance.trust.crypto import SigningKey, WrongPassphrase, load_signing_key

PASSPHRASE_ENV = "APPLIANCE_KEY_PASSPHRASE"

json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON document on stdout for scripts."
)


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


def want_json_errors(ctx: click.Context, as_json: bool) -> None:
    """With --json, failures are also reported as JSON on stdout."""
    ctx.find_root().meta["json_errors"] = as_json


def emit_json(document: dict[str, Any]) -> None:
    click.echo(json.dumps(document, indent=2, sort_keys=True))


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
