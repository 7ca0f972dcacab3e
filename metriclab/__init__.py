"""metriclab: deep metric learning on PyTorch, from recipe to evaluated run directory."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from metriclab.errors import MetricLabError  # noqa: E402
from metriclab.recipe import Recipe  # noqa: E402

__all__ = ["MetricLabError", "Recipe", "load_model", "main", "__version__"]


def __getattr__(name: str) -> Any:
    # `import metriclab` stays light (no torch); the training entry point is imported when first used.
    if name == "main":
        from metriclab.training.launch import main

        return main
    if name == "load_model":
        from metriclab.inference.model import load_model

        return load_model
    raise AttributeError(f"module 'metriclab' has no attribute {name!r}")
