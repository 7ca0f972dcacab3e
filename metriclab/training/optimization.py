"""What a run optimises and how its learning rate moves: the optimizer and the learning-rate schedule.

The schedule is a registered ``scheduler`` (``metriclab_plugins.schedulers``: torch's
``lr_scheduler`` classes by name) behind an optional linear warm-up, measured in optimizer steps
(with gradient accumulation, one optimizer step per ``gradient_accumulation_steps`` batches).
The engine prepares it with accelerate, so every checkpoint holds it and a resumed run continues it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim import lr_scheduler

from metriclab import registry
from metriclab.recipe import Recipe


def total_batches(recipe: Recipe, train_size: int, global_batch: int) -> int:
    """How many batches the run trains on: ``epochs`` epochs, capped by ``max_steps``."""
    total = math.ceil(train_size / global_batch) * recipe.epochs
    return min(total, recipe.max_steps) if recipe.max_steps is not None else total


def optimizer_steps(recipe: Recipe, train_size: int, global_batch: int) -> int:
    """How many times the optimizer steps in the run (batches / gradient accumulation)."""
    return math.ceil(total_batches(recipe, train_size, global_batch) / recipe.gradient_accumulation_steps)


def build_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    """The recipe's schedule over ``total_steps`` optimizer steps, behind its warm-up; None when it has neither."""
    if recipe.scheduler is None and recipe.warmup_steps == 0:
        return None
    name = recipe.scheduler or "constant"
    args = {"total_steps": max(total_steps - recipe.warmup_steps, 1), **recipe.scheduler_args}
    schedule = registry.schedulers.create(name, optimizer=optimizer, **args)
    if recipe.warmup_steps == 0:
        return schedule
    warmup = lr_scheduler.LinearLR(
        optimizer, start_factor=recipe.warmup_start_factor, end_factor=1.0, total_iters=recipe.warmup_steps
    )
    return lr_scheduler.SequentialLR(optimizer, [warmup, schedule], milestones=[recipe.warmup_steps])
