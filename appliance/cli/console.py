"""`appliance console`: the Textual admin console."""

from __future__ import annotations

import click

from appliance.paths import appliance_paths
from appliance.serve.config import ServiceOptions


@click.command()
@click.option(
    "--url",
    default=ServiceOptions().url,
    show_default=True,
    help="The local service, for queue depth, busy slots and what it serves.",
)
@click.option("--read-only", is_flag=True, help="Show everything; change nothing.")
def console(url: str, read_only: bool) -> None:
    """Open the admin console: dashboard, releases (activate, roll back, freeze), evals,
    audit log and keys. Keys: d l e g k switch screens, a r f u act, q quits."""
    from appliance.console.app import ConsoleApp  # textual is imported only here
    from appliance.console.state import ConsoleActions, load_snapshot

    paths = appliance_paths()
    actions = None if read_only else ConsoleActions(paths)
    ConsoleApp(lambda: load_snapshot(paths, url), actions).run()
