"""The training objective (loss and miner from the registry) and what a run records about its components.

``describe_run`` is config.json's content: every component with all its arguments, defaults included,
and where it came from. The network and the dataset are built by :mod:`metriclab.models` and
:mod:`metriclab.data`, which evaluation uses too.
"""

from __future__ import annotations

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
from metriclab.models import SiameseNetwork
from metriclab.recipe import Recipe
from metriclab.runs import FORMAT_VERSION


def build_objective(recipe: Recipe, num_classes: int, embedding_dim: int | None = None) -> tuple[torch.nn.Module, Any]:
    """The recipe's loss (with ``num_classes``/``embedding_size`` injected where accepted) and miner.

    ``embedding_dim`` is the network's when the recipe keeps a backbone's own features (``embedding_dim=None``).
    """
    context = {"num_classes": num_classes, "embedding_size": recipe.embedding_dim or embedding_dim}
    loss_args = {**registry.accepted_arguments(registry.losses.get(recipe.loss), context), **recipe.loss_args}
    loss_fn = registry.losses.create(recipe.loss, **loss_args)
    miner = None
    if recipe.miner:
        miner_args = {
            **registry.accepted_arguments(registry.miners.get(recipe.miner), {"seed": recipe.seed}),
            **recipe.miner_args,
        }
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


def describe_run(recipe: Recipe, dataset: Dataset, accelerator: Accelerator, model: SiameseNetwork) -> dict:
    """The config.json of a run: resolved recipe, components with every argument, data source, environment."""
    components = {}
    for kind, name, args in [
        ("encoder", recipe.encoder, {"embedding_dim": recipe.embedding_dim, **recipe.encoder_args}),
        ("loss", recipe.loss, recipe.loss_args),
        ("miner", recipe.miner, recipe.miner_args),
        ("optimizer", recipe.optimizer, {"lr": recipe.lr, **recipe.optimizer_args}),
        ("scheduler", recipe.scheduler, recipe.scheduler_args),
        ("dataset", recipe.dataset, recipe.dataset_args),
        ("sampler", recipe.sampler, {"m_per_class": recipe.m_per_class, **recipe.sampler_args}),
    ]:
        if name:
            entry = registry.registry(kind)
            if kind == "sampler":  # m_per_class is offered to a sampler that takes it (data.sampling.build_sampler)
                offered = {"m_per_class": args.pop("m_per_class")}
                args = {**registry.accepted_arguments(entry.get(name), offered), **args}
            arguments = registry.resolved_arguments(entry.get(name), args)
            components[kind] = {"name": name, "source": entry.source(name), "args": arguments}
    tower = model.towers[0]
    if hasattr(tower, "data_config"):  # a backbone: what it expects as input, and which weights it started from
        components["encoder"]["data_config"] = tower.data_config
        components["encoder"]["weights"] = tower.weights
        components["encoder"]["embedding_dim"] = model.embedding_dim
    components["encoder"]["input_statistics"] = "backbone" if model.statistics_fixed else "training set"
    versions = {}
    # The stack, and the installed packages the components came from (a --plugins file has no version).
    plugins = sorted({c["source"] for c in components.values() if not str(c["source"]).endswith(".py")})
    for package in ("metriclab", "torch", "torchvision", "pytorch-metric-learning", "accelerate", "numpy", *plugins):
        if package in versions:
            continue
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
