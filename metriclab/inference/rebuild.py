"""A finished run, rebuilt: its recipe, network, dataset and embeddings, from the run directory alone.

``metriclab evaluate``, ``visualize`` and ``compare`` all start here. A run directory is read through
:class:`metriclab.runs.Run`; the model comes from config.json + model.safetensors, the dataset from the
recorded recipe. A run's own ``plugins`` list is never imported: a run directory may come from someone
else, and plugins are code, so callers load the plugins they trust first (``--plugins``). Slow steps are
reported through the ``metriclab.inference`` logger, which the CLI shows as a status line.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from metriclab import registry
from metriclab.data import Dataset, ImageSource, StreamingDataset, is_streaming, load_dataset
from metriclab.errors import MetricLabError
from metriclab.models import SiameseNetwork, build_model, embed, load_weights
from metriclab.recipe import Recipe
from metriclab.runs import Run, save_embeddings

log = logging.getLogger(__name__)


def run_recipe(run: Run) -> Recipe:
    """The run's recipe from config.json.

    Its ``plugins`` list is deliberately not imported: a run directory may come from someone
    else, and plugins are code. Callers load the plugins they trust first (``--plugins``).
    """
    config = run.config
    if "recipe" not in config:
        raise MetricLabError(f"{run.path / 'config.json'} has no 'recipe' section; the run is damaged, retrain it")
    return Recipe.from_dict(config["recipe"])


def load_run_model(run: Run, device: str | torch.device | None = None) -> SiameseNetwork:
    """The run's trained network, rebuilt from config.json and model.safetensors, in eval mode on ``device``."""
    recipe = run_recipe(run)
    if not run.weights_path.is_file():
        raise MetricLabError(
            f"{run.path} has no weights (model.safetensors is missing): training did not finish; "
            f"resume it with `python recipes/{recipe.name}.py --resume {run.path}`"
        )
    registry.require_component(run.path, run.config, "encoder", recipe.encoder)
    registry.require_component(run.path, run.config, "encoder", recipe.second_encoder)
    shape = _input_shape(run)
    log.info("loading the model from %s", run.weights_path)
    model = build_model(recipe, shape, starting_weights=False)  # model.safetensors holds the trained weights
    load_weights(model, run.weights_path)
    return model.to(_device(device)).eval()


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def _input_shape(run: Run) -> tuple[int, ...]:
    shape = run.config.get("dataset", {}).get("input_shape")
    if not shape:
        raise MetricLabError(f"{run.path / 'config.json'} does not record the input shape; the run is damaged")
    return tuple(int(s) for s in shape)


def run_dataset(
    run: Run, name: str | None = None, data_dir: str | None = None, dataset_args: dict[str, Any] | None = None
) -> Dataset | StreamingDataset:
    """The run's dataset (or dataset ``name``, read from ``data_dir`` if given), loaded as the recipe describes;
    ``dataset_args`` update the run's own arguments, or are another dataset's."""
    recipe = run_recipe(run)
    if name is not None and name != recipe.dataset:
        # The run's dataset arguments belong to its own dataset; another one starts from its defaults.
        recipe = replace(recipe, dataset=name, dataset_args=dict(dataset_args or {}), data_dir=data_dir)
    elif data_dir is not None or dataset_args:
        own = recipe.dataset_args | (dataset_args or {})
        recipe = replace(recipe, data_dir=data_dir if data_dir is not None else recipe.data_dir, dataset_args=own)
    if name is None:
        registry.require_component(run.path, run.config, "dataset", recipe.dataset)

    log.info("loading dataset '%s'", recipe.dataset)
    dataset = load_dataset(recipe)
    expected = _input_shape(run)
    if tuple(dataset.input_shape) != expected:
        shown = "x".join(map(str, dataset.input_shape))
        wanted = "x".join(map(str, expected))
        raise MetricLabError(
            f"dataset '{dataset.name}' has {shown} images but the model of {run.path} takes {wanted} images; "
            f"choose a dataset with {wanted} images"
        )
    return dataset


def embed_run(
    run: Run,
    split: str = "test",
    dataset: Dataset | StreamingDataset | None = None,
    model: SiameseNetwork | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(embeddings float32 (N, D), labels int64 (N,))`` of a split, computed from the run's saved weights.

    ``dataset`` defaults to the run's own; ``model`` to :func:`load_run_model`. Non-finite embeddings
    (weights of a diverged training) raise a MetricLabError.
    """
    if split not in ("train", "test"):
        raise MetricLabError(f"unknown split '{split}'; use 'train' or 'test'")
    model = model if model is not None else load_run_model(run)
    dataset = dataset if dataset is not None else run_dataset(run)
    labels = split_labels(dataset, split)
    log.info("embedding the %s split of %s (%d images)", split, dataset.name, len(labels))
    if is_streaming(dataset):  # decoded with the run's test-time transform, batch by batch
        device = next(model.parameters()).device
        source = ImageSource(dataset, split, device=device, num_workers=run_recipe(run).num_workers)
        parts = [embed(model, images) for images in source(list(torch.arange(len(labels)).split(STREAM_BATCH)))]
        embeddings = torch.cat(parts).cpu().numpy().astype(np.float32)
    else:
        embeddings = embed(model, dataset.split(split)[0]).cpu().numpy().astype(np.float32)
    if not np.isfinite(embeddings).all():
        raise MetricLabError(
            f"the weights in {run.weights_path} produce NaN or inf embeddings (training diverged); "
            "retrain with a lower --lr"
        )
    return embeddings, labels.cpu().numpy().astype(np.int64)


STREAM_BATCH = 256  # images of a streaming dataset embedded per batch


def split_labels(dataset: Dataset | StreamingDataset, split: str) -> torch.Tensor:
    """The labels of a split, on either data path."""
    return dataset.files(split).labels if is_streaming(dataset) else dataset.split(split)[1]


def _check_dimension(run: Run, embeddings: np.ndarray, what: str) -> None:
    expected = run_recipe(run).embedding_dim
    if expected is not None and embeddings.shape[1] != expected:
        raise MetricLabError(
            f"{what} of {run.path} are {embeddings.shape[1]}-D but the run's model makes {expected}-D embeddings "
            f"(config.json embedding_dim); the file is not from this run: re-embed with "
            f"`metriclab evaluate {run.path} --reembed`"
        )


def _last_epoch(run: Run) -> int:
    epochs = run.snapshot_epochs()
    return epochs[-1] if epochs else 0


def run_embeddings(
    run: Run,
    reembed: bool = False,
    dataset: str | None = None,
    data_dir: str | None = None,
    dataset_args: dict[str, Any] | None = None,
    loaded: Dataset | StreamingDataset | None = None,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray] | None], dict[str, Any]]:
    """``({"test": (embeddings, labels), "train": ... or None}, source info)`` of a run, saved or embedded.

    The saved ones unless ``reembed`` or another ``dataset``/``data_dir``/``dataset_args`` is asked for
    (missing train embeddings are computed from the weights); a re-embedding of the run's own dataset is
    saved over them. ``loaded``: the dataset these ask for, when the caller has loaded it already.
    """
    recipe = run_recipe(run)
    # another dataset (or folder, or arguments) is evaluated, never saved as ours
    own = dataset is None and data_dir is None and not dataset_args
    has_saved = run.has_embeddings("test")
    if own and has_saved and not reembed:
        test = run.embeddings("test")
        _check_dimension(run, test[0], "the saved test embeddings")
        train = run.embeddings("train") if run.has_embeddings("train") else None
        if train is not None:
            _check_dimension(run, train[0], "the saved train embeddings")
        elif run.weights_path.is_file():
            train = embed_run(run, "train", loaded if loaded is not None else run_dataset(run))
        else:
            log.warning("%s has no train embeddings nor weights: skipping the test-vs-train protocol", run.path)
        info = {"dataset": run.config.get("dataset", {}).get("source"), "embeddings": "saved"}
        return {"test": test, "train": train}, info
    if own and not has_saved and not run.weights_path.is_file():
        raise MetricLabError(
            f"{run.path} has neither embeddings (embeddings/test.npz) nor weights (model.safetensors): training "
            f"did not finish; resume it with `python recipes/{recipe.name}.py --resume {run.path}`"
        )
    model = load_run_model(run)
    data = loaded if loaded is not None else run_dataset(run, dataset, data_dir, dataset_args)
    out = {split: embed_run(run, split, data, model) for split in ("test", "train")}
    if own:
        # Embeddings are a cache of what the weights compute: refreshing them keeps visualize in step.
        for split, (emb, lab) in out.items():
            save_embeddings(run.embeddings_path(split), emb, lab, _last_epoch(run))
    return out, {"dataset": data.source, "embeddings": f"embedded from {run.weights_path.name}"}
