"""A test plugin: the built-in contrastive loss, slowed down or made to fail on chosen calls.

Loaded by the reliability tests with ``--plugins tests/reliability/faulty_plugin.py``.
Call numbers count this process's calls, from 1 (one call per training step).
"""

from __future__ import annotations

import os
import time

import torch
from metriclab_plugins.losses import ContrastiveLoss

from metriclab.registry import register_loss


class _NanGradient(torch.autograd.Function):
    """The identity whose gradient is NaN: a finite loss whose update makes every weight NaN."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@register_loss("faulty-contrastive")
class FaultyContrastiveLoss(ContrastiveLoss):
    """Contrastive loss that sleeps ``delay`` s per call, returns ``value`` on calls ``bad_calls``,
    has a NaN gradient (but a finite value) on calls ``nan_grad_calls``, and raises on call ``raise_at``
    in the process of rank ``raise_rank``."""

    def __init__(
        self,
        delay: float = 0.0,
        bad_calls: tuple = (),
        value: str = "nan",
        raise_at: int | None = None,
        raise_rank: int = 0,
        nan_grad_calls: tuple = (),
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.delay, self.bad_calls, self.value = delay, set(bad_calls), float(value)
        self.nan_grad_calls = set(nan_grad_calls)
        self.raise_at, self.raise_rank = raise_at, raise_rank
        self.calls = 0

    def forward(self, *args, **kwargs) -> torch.Tensor:
        """The contrastive loss, or ``value`` times it on a bad call (so the gradient is poisoned too)."""
        self.calls += 1
        if self.raise_at == self.calls and int(os.environ.get("RANK", "0")) == self.raise_rank:
            raise RuntimeError(f"faulty-contrastive: planted failure on rank {self.raise_rank}, call {self.calls}")
        if self.delay:
            time.sleep(self.delay)
        loss = super().forward(*args, **kwargs)
        if self.calls in self.nan_grad_calls:
            return _NanGradient.apply(loss)
        return loss * self.value if self.calls in self.bad_calls else loss
