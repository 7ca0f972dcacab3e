"""metriclab: deep metric learning on PyTorch, from recipe to evaluated run directory."""

__version__ = "0.1.0"
