"""The `appliance` command: thin click groups that parse, call and print."""

from __future__ import annotations

import click

from appliance import __version__
from appliance.cli.apikeys import apikeys
from appliance.cli.audit import audit
from appliance.cli.bundle import bundle
from appliance.cli.common import ApplianceGroup
from appliance.cli.console import console
from appliance.cli.demo import demo
from appliance.cli.evals import eval_group
from appliance.cli.installer import installer
from appliance.cli.keys import keys
from appliance.cli.release import release
from appliance.cli.serve import serve


@click.group(cls=ApplianceGroup)
@click.version_option(__version__, prog_name="appliance")
def cli() -> None:
    """Custom SLM Appliance: signed small-language-model releases, served offline.

    State lives under $APPLIANCE_HOME when set, else in /etc/appliance and
    /var/lib/appliance. Exit codes are listed in SECURITY.md.
    """


cli.add_command(keys)
cli.add_command(bundle)
cli.add_command(release)
cli.add_command(eval_group)
cli.add_command(audit)
cli.add_command(installer)
cli.add_command(serve)
cli.add_command(apikeys)
cli.add_command(console)
cli.add_command(demo)


def main() -> None:
    cli()
