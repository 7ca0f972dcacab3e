"""Built-in optimizers: factories ``(params, lr=1e-3, **kwargs) -> torch.optim.Optimizer``.

Extra keyword arguments (``weight_decay``, ``betas``, ...) go to the torch optimizer unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from metriclab.errors import MetricLabError
from metriclab.registry import register_optimizer


def _build(cls: type[torch.optim.Optimizer], params: Iterable, lr: float, **kwargs: Any) -> torch.optim.Optimizer:
    if lr <= 0:
        raise MetricLabError(f"learning rate must be positive, got lr={lr}; pass e.g. lr=1e-3")
    return cls(params, lr=lr, **kwargs)


@register_optimizer("adam")
def adam(params: Iterable, lr: float = 1e-3, **kwargs: Any) -> torch.optim.Optimizer:
    """torch.optim.Adam."""
    return _build(torch.optim.Adam, params, lr, **kwargs)


@register_optimizer("adamw")
def adamw(params: Iterable, lr: float = 1e-3, **kwargs: Any) -> torch.optim.Optimizer:
    """torch.optim.AdamW (decoupled weight decay)."""
    return _build(torch.optim.AdamW, params, lr, **kwargs)


@register_optimizer("sgd")
def sgd(params: Iterable, lr: float = 1e-3, momentum: float = 0.9, **kwargs: Any) -> torch.optim.Optimizer:
    """torch.optim.SGD with momentum 0.9 unless told otherwise."""
    return _build(torch.optim.SGD, params, lr, momentum=momentum, **kwargs)


@register_optimizer("rmsprop")
def rmsprop(params: Iterable, lr: float = 1e-3, **kwargs: Any) -> torch.optim.Optimizer:
    """torch.optim.RMSprop."""
    return _build(torch.optim.RMSprop, params, lr, **kwargs)
