"""The entry point of a recipe file: ``main(recipe)`` applies command-line overrides and trains."""

from __future__ import annotations

import sys
from pathlib import Path

from metriclab.errors import exit_on_user_error
from metriclab.recipe import Recipe
from metriclab.training.engine import train


def main(recipe: Recipe, argv: list[str] | None = None) -> None:
    """Apply CLI overrides to ``recipe`` and train it; a user error is one line and exit 2 (``--debug``: traceback)."""
    argv = list(argv if argv is not None else sys.argv[1:])
    debug = "--debug" in argv
    args = [a for a in argv if a != "--debug"]
    with exit_on_user_error(debug):
        train(recipe.with_overrides(args, prog=Path(sys.argv[0]).name))
