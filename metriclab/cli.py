"""The ``metriclab`` command line: a thin typer app over library functions."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

import metriclab
from metriclab.errors import MetricLabError

app = typer.Typer(
    name="metriclab",
    help="Deep metric learning toolkit: inspect plugins, evaluate, visualize and compare training runs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console()
errors = Console(stderr=True)


@contextlib.contextmanager
def exit_on_user_error(debug: bool = False) -> Iterator[None]:
    """Turn a MetricLabError into one red line on stderr and exit code 2 (a traceback only with --debug)."""
    try:
        yield
    except MetricLabError as err:
        if debug:
            raise
        errors.print(f"[bold red]error:[/] {err}", highlight=False)
        sys.exit(2)


def _version(value: bool) -> None:
    if value:
        console.print(f"metriclab {metriclab.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
) -> None:
    """metriclab: deep metric learning from recipe to evaluated run."""
    ctx.obj = {"debug": debug}


@app.command()
def plugins(
    ctx: typer.Context,
    pattern: Annotated[str, typer.Argument(help="Kind ('losses') or wildcard name pattern ('pml.*Loss').")] = "*",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List registered encoders, losses, miners, datasets and optimizers with the package each came from."""
    from metriclab import registry

    with exit_on_user_error(ctx.obj["debug"]):
        kinds = list(registry.REGISTRIES.values())
        if pattern.rstrip("s") in registry.REGISTRIES or pattern in ("losses",):
            kinds, pattern = [registry.registry(pattern)], "*"
        rows = [(r.kind, e.name, e.source) for r in kinds for e in r.entries(pattern)]
        if not rows:
            raise MetricLabError(f"no component matches '{pattern}'; run `metriclab plugins` to list all")
    if as_json:
        print(json.dumps([{"kind": k, "name": n, "source": s} for k, n, s in rows], indent=2))
        return
    table = Table(title=f"metriclab components matching '{pattern}'")
    for column in ("kind", "name", "from"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)
