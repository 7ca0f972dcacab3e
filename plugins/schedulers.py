"""Built-in learning-rate schedulers: torch's own ``torch.optim.lr_scheduler`` classes, by name.

Contract for scheduler plugins: a factory registered with ``@register_scheduler(name)`` takes the
optimizer, the keyword argument ``total_steps: int`` (optimizer steps the schedule spans, after any
warm-up; the engine supplies it) and options of its own, and returns a
``torch.optim.lr_scheduler.LRScheduler``. The engine steps it once per optimizer step, saves it in
every checkpoint and restores it on resume; a linear warm-up (the recipe's ``warmup_steps``) is put
in front of any of them (``metriclab.training.optimization.build_scheduler``). Lengths are in optimizer steps.
"""

from __future__ import annotations

import torch
from torch.optim import lr_scheduler

from metriclab.errors import MetricLabError
from metriclab.registry import register_scheduler


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise MetricLabError(f"scheduler argument '{name}' must be a positive number of steps, got {value!r}")


@register_scheduler("constant")
def constant(optimizer: torch.optim.Optimizer, *, total_steps: int) -> lr_scheduler.LRScheduler:
    """The recipe's learning rate throughout (useful behind a warm-up)."""
    return lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


@register_scheduler("cosine")
def cosine(optimizer: torch.optim.Optimizer, *, total_steps: int, min_lr: float = 0.0) -> lr_scheduler.LRScheduler:
    """Cosine annealing from the recipe's lr to ``min_lr`` over the run (``CosineAnnealingLR``)."""
    return lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1), eta_min=min_lr)


@register_scheduler("step")
def step(
    optimizer: torch.optim.Optimizer, *, total_steps: int, step_size: int | None = None, gamma: float = 0.1
) -> lr_scheduler.LRScheduler:
    """Multiply the lr by ``gamma`` every ``step_size`` steps (default: a third of the run; ``StepLR``)."""
    step_size = step_size if step_size is not None else max(total_steps // 3, 1)
    _positive("step_size", step_size)
    return lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)


@register_scheduler("multistep")
def multistep(
    optimizer: torch.optim.Optimizer, *, total_steps: int, milestones: list | None = None, gamma: float = 0.1
) -> lr_scheduler.LRScheduler:
    """Multiply the lr by ``gamma`` at each milestone step (default: at 50% and 75% of the run; ``MultiStepLR``)."""
    milestones = milestones if milestones is not None else [total_steps // 2, (3 * total_steps) // 4]
    return lr_scheduler.MultiStepLR(optimizer, milestones=[int(m) for m in milestones], gamma=gamma)


@register_scheduler("exponential")
def exponential(
    optimizer: torch.optim.Optimizer, *, total_steps: int, gamma: float = 0.999
) -> lr_scheduler.LRScheduler:
    """Multiply the lr by ``gamma`` every step (``ExponentialLR``)."""
    return lr_scheduler.ExponentialLR(optimizer, gamma=gamma)


@register_scheduler("linear")
def linear(optimizer: torch.optim.Optimizer, *, total_steps: int, end_factor: float = 0.0) -> lr_scheduler.LRScheduler:
    """Linear decay from the recipe's lr to ``end_factor`` times it at the end of the run (``LinearLR``)."""
    return lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=end_factor, total_iters=max(total_steps, 1))
