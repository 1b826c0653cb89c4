"""`appliance demo`: the main job on the embedded default model (appliance.demo), then
optionally serve it."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from appliance.cli.common import pass_store, progress_bar
from appliance.cli.serve import DEFAULTS, serve
from appliance.demo import demo_api_key, run_demo
from appliance.store.releases import ReleaseStore


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
    help=f"Finish by serving the release on {DEFAULTS.host} (until Ctrl-C).",
)
@click.option("--port", default=DEFAULTS.port, show_default=True, type=click.IntRange(1, 65535))
@click.pass_context
@pass_store
def demo(
    store: ReleaseStore, ctx: click.Context, bundle_toml: Path, then_serve: bool, port: int
) -> None:
    """Build, sign, verify, install, gate, activate (and serve) BUNDLE_TOML with a demo key.

    Creates a demo signing key under the appliance home (once) and trusts it, builds the
    signed bundle into <state>/bundles, verifies it as an operator would, installs it
    into the release store, runs its frozen eval gate on this host, makes it the active
    release if the gate passes and, with --serve, serves it with a demo API key. Safe to
    run again.
    """
    bar = functools.partial(progress_bar, enabled=True)
    activated = run_demo(store, bundle_toml, click.echo, bar)
    click.echo(f"\nappliance home: {store.paths.config_dir.parent}")
    if then_serve:
        hint = SERVE_HINT.format(
            url=f"http://{DEFAULTS.host}:{port}", key=demo_api_key(store), model=activated.ref
        )
        click.echo(hint)
        ctx.invoke(serve, port=port)


SERVE_HINT = """
serving on {url} (Ctrl-C stops it); try, from another terminal:

  curl -s {url}/v1/completions -H "Authorization: Bearer {key}" \\
       -H "Content-Type: application/json" \\
       -d '{{"prompt": "The Eiffel Tower is in the city of", "max_tokens": 12}}'

  python - <<'PY'
  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key="{key}")
  print(client.completions.create(model="{model}", prompt="Monday, Tuesday,",
                                  max_tokens=12).choices[0].text)
  PY
"""
