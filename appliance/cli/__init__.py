"""The `appliance` command: thin click groups that parse, call and print.

Each command's module is imported only when that command runs, so `appliance --help` and
the light commands never pay for llama.cpp, FastAPI or Textual. The one-line summaries
`--help` lists are kept here for the same reason (a test checks them against the
commands' own help).
"""

from __future__ import annotations

import importlib

import click

from appliance.cli.common import ApplianceGroup

# name: (module, attribute, the first paragraph of its help, which `appliance --help` shortens)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "keys": (
        "appliance.cli.keys",
        "keys",
        "Generate signing keys; trust, list and revoke public keys; set the threshold.",
    ),
    "bundle": (
        "appliance.cli.bundle",
        "bundle",
        "Build, verify and unpack signed release bundles.",
    ),
    "release": (
        "appliance.cli.release",
        "release",
        "Install signed bundles and switch, freeze or remove releases (all audited).",
    ),
    "rollout": (
        "appliance.cli.rollout",
        "rollout",
        "Canary or shadow a candidate release beside the active one; promote or abort it.",
    ),
    "route": (
        "appliance.cli.routing",
        "route",
        "Register cold-path targets and route to them (all audited).",
    ),
    "incident": (
        "appliance.cli.routing",
        "incident",
        "Incident mode: freeze releases, route to the fallback, optionally roll back.",
    ),
    "fleet": (
        "appliance.cli.fleet",
        "fleet",
        "Nodes behind HAProxy: write its config, read each node's state, drain and re-enable.",
    ),
    "eval": (
        "appliance.cli.evals",
        "eval_group",
        "Run eval specs and judge the activation gate (quality, defects, p95, cost, regression).",
    ),
    "audit": (
        "appliance.cli.audit",
        "audit",
        "Read and verify the audit log of every state change.",
    ),
    "installer": (
        "appliance.cli.installer",
        "installer",
        "Build the signed offline installer for air-gapped hosts.",
    ),
    "serve": (
        "appliance.cli.serve",
        "serve",
        "Serve the active release (hot-swapping on activate and rollback) on HOST:PORT.",
    ),
    "apikeys": (
        "appliance.cli.apikeys",
        "apikeys",
        "Create, list and revoke API keys for the inference service.",
    ),
    "console": (
        "appliance.cli.console",
        "console",
        "Open the admin console: dashboard, releases (activate, roll back, freeze), evals, "
        "audit log and keys. Keys: d l e g k switch screens, a r f u act, q quits.",
    ),
    "demo": (
        "appliance.cli.demo",
        "demo",
        "Build, sign, verify, install, gate, activate (and serve) BUNDLE_TOML with a demo key.",
    ),
}


class LazyGroup(ApplianceGroup):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute, _summary = COMMANDS[name]
        return getattr(importlib.import_module(module), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        limit = formatter.width - 6 - max(map(len, COMMANDS))  # as click.Group does
        rows = [(name, _shortened(COMMANDS[name][2], limit)) for name in COMMANDS]
        with formatter.section("Commands"):
            formatter.write_dl(sorted(rows))


def _shortened(text: str, limit: int) -> str:
    """The text, or as many whole words as fit in `limit` characters and "...", as click
    shortens a command's help in a listing."""
    if len(text) <= limit:
        return text
    return text[: limit - 3].rsplit(" ", 1)[0] + "..."


@click.group(cls=LazyGroup)
@click.version_option(package_name="custom-slm-appliance", prog_name="appliance")
def cli() -> None:
    """Custom SLM Appliance: signed small-language-model releases, served offline.

    State lives under $APPLIANCE_HOME when set, else in /etc/appliance and
    /var/lib/appliance. Exit codes are listed in SECURITY.md.
    """


def main() -> None:
    cli()
