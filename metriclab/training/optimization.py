"""What a run optimises and how its learning rate moves: parameter groups, the schedule, a frozen backbone.

Parameter groups (:func:`parameter_groups`): the head (every network parameter outside a
``backbone`` module) at the recipe's ``lr``, the backbone at ``lr * backbone_lr_multiplier``, the
loss's own parameters (ArcFace's class weights, ProxyAnchor's proxies) at ``loss_lr``, as
pytorch-metric-learning advises; normalisation weights and biases without weight decay unless
``weight_decay_norms_and_biases``. Each group is named (``group["name"]``); the optimizer's state
dict keeps them, so a resumed run continues with the same groups.

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
from metriclab.errors import MetricLabError
from metriclab.recipe import Recipe
from metriclab.training.contracts import check_scheduler

_NORMS = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.LocalResponseNorm)


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
    check_scheduler(name, schedule)
    if recipe.warmup_steps == 0:
        return schedule
    warmup = lr_scheduler.LinearLR(
        optimizer, start_factor=recipe.warmup_start_factor, end_factor=1.0, total_iters=recipe.warmup_steps
    )
    return lr_scheduler.SequentialLR(optimizer, [warmup, schedule], milestones=[recipe.warmup_steps])


def _backbone_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters that live inside a module called ``backbone`` (see ``BackboneEncoder``)."""
    return {n for n, _ in model.named_parameters() if "backbone" in n.split(".")[:-1]}


def _no_decay_names(module: torch.nn.Module) -> set[str]:
    """Biases, normalisation weights and other 1-D parameters (timm's rule: scales, position biases)."""
    names = set()
    for module_name, child in module.named_modules():
        for name, param in child.named_parameters(recurse=False):
            if isinstance(child, _NORMS) or name.endswith("bias") or param.ndim <= 1:
                names.add(f"{module_name}.{name}" if module_name else name)
    return names


def parameter_groups(recipe: Recipe, model: torch.nn.Module, loss_fn: torch.nn.Module) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: head, backbone, loss, each split by weight decay; only non-empty ones.

    The head's groups come first, so ``param_groups[0]["lr"]`` is the recipe's lr (history.csv's ``lr``).
    """
    backbone = _backbone_names(model)
    fine_tuning = recipe.backbone_lr_multiplier != 1.0 or recipe.freeze_backbone_epochs or recipe.freeze_backbone_steps
    if fine_tuning and not backbone:
        raise MetricLabError(
            f"encoder '{recipe.encoder}' has no backbone to freeze or to train at another lr; use a backbone "
            "encoder (timm:<model>, torchvision:<model>) or drop --freeze-backbone-*/--backbone-lr-multiplier"
        )
    no_decay = set() if recipe.weight_decay_norms_and_biases else _no_decay_names(model)
    loss_no_decay = set() if recipe.weight_decay_norms_and_biases else _no_decay_names(loss_fn)
    parts = {"head": [], "head_no_decay": [], "backbone": [], "backbone_no_decay": []}
    for name, param in model.named_parameters():
        part = "backbone" if name in backbone else "head"
        parts[part + ("_no_decay" if name in no_decay else "")].append(param)
    loss_lr = recipe.loss_lr if recipe.loss_lr is not None else recipe.lr
    loss_parts = {"loss": [], "loss_no_decay": []}
    for name, param in loss_fn.named_parameters():
        loss_parts["loss" + ("_no_decay" if name in loss_no_decay else "")].append(param)
    lrs = {"head": recipe.lr, "backbone": recipe.lr * recipe.backbone_lr_multiplier, "loss": loss_lr}
    groups = []
    for name, params in {**parts, **loss_parts}.items():
        if params:
            group = {"name": name, "params": params, "lr": lrs[name.removesuffix("_no_decay")]}
            if name.endswith("_no_decay"):
                group["weight_decay"] = 0.0
            groups.append(group)
    return groups


def group_lr(optimizer: torch.optim.Optimizer, name: str) -> float:
    """The current lr of the group ``name`` (``'backbone'``), or of the first group when there is none."""
    for group in optimizer.param_groups:
        if group.get("name", "").removesuffix("_no_decay") == name:
            return group["lr"]
    return optimizer.param_groups[0]["lr"]


class BackboneFreezer:
    """Keeps a network's backbone frozen for the first ``epochs`` epochs or ``steps`` steps, whichever is later.

    Frozen means no gradients (autograd stops at the head, so steps are cheaper) and eval mode (BatchNorm's
    running statistics stay as loaded), so the backbone's whole state dict stays bit-identical. Whether it
    is frozen follows from the trainer's step and epoch alone, so a resumed run is frozen exactly when the
    uninterrupted run would be.
    """

    def __init__(self, model: torch.nn.Module, epochs: int, steps: int) -> None:
        self.epochs, self.steps = epochs, steps
        self.backbones = [
            m.backbone for m in model.modules() if isinstance(getattr(m, "backbone", None), torch.nn.Module)
        ]
        self.frozen: bool | None = None

    @property
    def active(self) -> bool:
        """Whether the recipe freezes the backbone at all."""
        return bool(self.backbones) and (self.epochs > 0 or self.steps > 0)

    def should_freeze(self, epoch: int, step: int) -> bool:
        """Whether the backbone is frozen for the step after ``step`` in epoch ``epoch`` (0-based)."""
        return self.active and (epoch < self.epochs or step < self.steps)

    def update(self, epoch: int, step: int, force: bool = False) -> None:
        """Freeze or unfreeze for the coming step; ``force`` re-applies after ``model.train()`` reset the modes."""
        frozen = self.should_freeze(epoch, step)
        if frozen == self.frozen and not force:
            return
        for backbone in self.backbones:
            backbone.requires_grad_(not frozen)
            if frozen:
                backbone.eval()
            elif not force:  # unfrozen mid-epoch: back to the network's training mode
                backbone.train()
        self.frozen = frozen
