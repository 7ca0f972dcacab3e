"""metriclab: deep metric learning on PyTorch, from recipe to evaluated run directory."""

__version__ = "0.1.0"

from metriclab.errors import MetricLabError  # noqa: E402
from metriclab.recipe import Recipe, main  # noqa: E402

__all__ = ["MetricLabError", "Recipe", "main", "__version__"]
