"""A recipe's dataset, created from the registry (with its transforms, for datasets of image files)."""

from __future__ import annotations

from metriclab import registry
from metriclab.data.dataset import Dataset
from metriclab.data.images import StreamingDataset
from metriclab.errors import MetricLabError
from metriclab.recipe import Recipe

DEFAULT_IMAGE_SIZE = 224
DEFAULT_TRANSFORMS = {"train": "random-resized-crop", "test": "resize-center-crop"}


def load_dataset(recipe: Recipe) -> Dataset | StreamingDataset:
    """The recipe's dataset, passing ``data_dir`` to factories that accept it.

    A streaming dataset gets the recipe's image size and its train and test transforms (built from the
    ``transform`` registry, recorded in ``dataset.transforms`` and so in config.json).
    """
    args = dict(recipe.dataset_args)
    if recipe.data_dir is not None:
        found = registry.keyword_parameters(registry.datasets.get(recipe.dataset))
        if found is None or "data_dir" not in found[0]:
            raise MetricLabError(f"dataset '{recipe.dataset}' does not read from a directory; drop --data-dir")
        args["data_dir"] = recipe.data_dir
    dataset = registry.datasets.create(recipe.dataset, **args)
    if isinstance(dataset, StreamingDataset):
        attach_transforms(dataset, recipe)
    return dataset


def attach_transforms(dataset: StreamingDataset, recipe: Recipe) -> None:
    """Set ``dataset``'s image size and train/test transforms from the recipe (defaults where it names none)."""
    size = recipe.image_size or DEFAULT_IMAGE_SIZE
    dataset.image_size = size
    for split, name, args in (
        ("train", recipe.train_transform, recipe.train_transform_args),
        ("test", recipe.test_transform, recipe.test_transform_args),
    ):
        name = name or DEFAULT_TRANSFORMS[split]
        factory = registry.transforms.get(name)
        transform = registry.transforms.create(name, **registry.accepted_arguments(factory, {"size": size}), **args)
        setattr(dataset, f"{split}_transform", transform)
        dataset.transforms[split] = {
            "name": name,
            "source": registry.transforms.source(name),
            "args": registry.resolved_arguments(factory, {"size": size, **args}),
        }
