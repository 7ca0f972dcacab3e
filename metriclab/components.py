"""A recipe's components, built from the registry: dataset, Siamese network, loss and miner.

Also what a run records about them (``config.json``): every component with all its
arguments, defaults included, and where it came from. The engine trains with these; the
evaluation rebuilds a finished run's network and dataset with the same functions.
"""

from __future__ import annotations

import inspect
import platform
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from accelerate import Accelerator

import metriclab
from metriclab import registry
from metriclab.data import Dataset
from metriclab.errors import MetricLabError
from metriclab.model import SiameseNetwork
from metriclab.recipe import Recipe
from metriclab.runs import FORMAT_VERSION


def load_dataset(recipe: Recipe) -> Dataset:
    """The recipe's dataset, passing ``data_dir`` to factories that accept it."""
    factory = registry.datasets.get(recipe.dataset)
    args = dict(recipe.dataset_args)
    if recipe.data_dir is not None:
        if "data_dir" not in inspect.signature(factory).parameters:
            raise MetricLabError(f"dataset '{recipe.dataset}' does not read from a directory; drop --data-dir")
        args["data_dir"] = recipe.data_dir
    return registry.datasets.create(recipe.dataset, **args)


def build_objective(recipe: Recipe, num_classes: int) -> tuple[torch.nn.Module, Any]:
    """The recipe's loss (with ``num_classes``/``embedding_size`` injected where accepted) and miner."""
    context = {"num_classes": num_classes, "embedding_size": recipe.embedding_dim}
    loss_args = {**_accepted(registry.losses.get(recipe.loss), context), **recipe.loss_args}
    loss_fn = registry.losses.create(recipe.loss, **loss_args)
    miner = None
    if recipe.miner:
        miner_args = {**_accepted(registry.miners.get(recipe.miner), {"seed": recipe.seed}), **recipe.miner_args}
        miner = registry.miners.create(recipe.miner, **miner_args)
    return loss_fn, miner


def objective(loss_fn: torch.nn.Module, miner: Any) -> Callable[..., torch.Tensor]:
    """``(embeddings, labels, ref_emb, ref_labels) -> loss``: mine, then the loss on what was mined.

    Where the miner offers a fused computation for this loss (``miner.fuse(loss_fn)``, see
    ``metriclab_plugins.miners``), that one: same value, fixed shapes, no waits for the device.
    """
    fused = miner.fuse(loss_fn) if hasattr(miner, "fuse") else None
    if fused is not None:
        return fused

    def mine_then_loss(embeddings, labels, ref_emb=None, ref_labels=None):
        indices = miner(embeddings, labels, ref_emb, ref_labels) if miner is not None else None
        return loss_fn(embeddings, labels, indices, ref_emb, ref_labels)

    return mine_then_loss


def _accepted(factory: Any, context: dict[str, Any]) -> dict[str, Any]:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}
    return {k: v for k, v in context.items() if k in params}


def describe_run(recipe: Recipe, dataset: Dataset, accelerator: Accelerator, model: SiameseNetwork) -> dict:
    """The config.json of a run: resolved recipe, components with every argument, data source, environment."""
    components = {}
    for kind, name, args in [
        ("encoder", recipe.encoder, {"embedding_dim": recipe.embedding_dim, **recipe.encoder_args}),
        ("loss", recipe.loss, recipe.loss_args),
        ("miner", recipe.miner, recipe.miner_args),
        ("optimizer", recipe.optimizer, {"lr": recipe.lr, **recipe.optimizer_args}),
        ("dataset", recipe.dataset, recipe.dataset_args),
    ]:
        if name:
            entry = registry.registry(kind)
            factory = entry.get(name)
            source = next(e.source for e in entry.entries(name))
            components[kind] = {"name": name, "source": source, "args": resolved_arguments(factory, args)}
    versions = {}
    for package in ("metriclab", "torch", "torchvision", "pytorch-metric-learning", "accelerate", "numpy"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "format_version": FORMAT_VERSION,
        "recipe": recipe.to_dict(),
        "components": components,
        "dataset": dataset.describe(),
        "num_processes": accelerator.num_processes,
        "global_batch_size": recipe.batch_size * accelerator.num_processes,
        "device": str(accelerator.device),
        "device_name": torch.cuda.get_device_name() if accelerator.device.type == "cuda" else platform.processor(),
        "mixed_precision": recipe.mixed_precision,
        "parameters": sum(p.numel() for p in model.parameters()),
        "versions": {**versions, "python": platform.python_version(), "metriclab_module": metriclab.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def build_model(recipe: Any, input_shape: tuple[int, ...]) -> SiameseNetwork:
    """The recipe's Siamese network for images of ``input_shape`` (C, H, W)."""
    common = {"embedding_dim": recipe.embedding_dim, "input_shape": tuple(input_shape)}
    tower = registry.encoders.create(recipe.encoder, **common, **recipe.encoder_args)
    second = None
    if not recipe.share_weights:
        name = recipe.second_encoder or recipe.encoder
        args = recipe.second_encoder_args if recipe.second_encoder else recipe.encoder_args
        second = registry.encoders.create(name, **common, **args)
    elif recipe.second_encoder:
        raise MetricLabError("second_encoder is set but share_weights is true; pass --no-share-weights to use it")
    return SiameseNetwork(tower, second, channels=input_shape[0])


def resolved_arguments(factory: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` completed with the factory's defaults, as recorded in config.json."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return dict(kwargs)
    full = {
        name: p.default
        for name, p in params.items()
        if p.default is not inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    full.update(kwargs)
    return {k: v for k, v in full.items() if _jsonable(v)}


def _jsonable(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, list, tuple, dict))
