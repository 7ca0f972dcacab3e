"""A recipe's dataset, created from the registry."""

from __future__ import annotations

from metriclab import registry
from metriclab.data.dataset import Dataset
from metriclab.errors import MetricLabError
from metriclab.recipe import Recipe


def load_dataset(recipe: Recipe) -> Dataset:
    """The recipe's dataset, passing ``data_dir`` to factories that accept it."""
    args = dict(recipe.dataset_args)
    if recipe.data_dir is not None:
        found = registry.keyword_parameters(registry.datasets.get(recipe.dataset))
        if found is None or "data_dir" not in found[0]:
            raise MetricLabError(f"dataset '{recipe.dataset}' does not read from a directory; drop --data-dir")
        args["data_dir"] = recipe.data_dir
    return registry.datasets.create(recipe.dataset, **args)
