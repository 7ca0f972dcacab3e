"""A test plugin of components that break their contracts, one way each, plus a lazy encoder that keeps it.

Loaded by the reliability tests with ``--plugins tests/reliability/broken_plugin.py``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from metriclab_plugins.datasets import digits
from metriclab_plugins.losses import ContrastiveLoss

from metriclab.registry import (
    register_dataset,
    register_encoder,
    register_loss,
    register_miner,
    register_sampler,
    register_scheduler,
    register_transform,
)


@register_encoder("broken-not-a-module")
def not_a_module(*, embedding_dim, input_shape):
    """Returns the layer sizes instead of a network."""
    return {"in": math.prod(input_shape), "out": embedding_dim}


@register_encoder("broken-wide")
def too_wide(*, embedding_dim, input_shape):
    """Three more output features than asked for."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(input_shape), embedding_dim + 3))


@register_encoder("lazy-mlp")
def lazy_mlp(*, embedding_dim, input_shape, hidden: int = 16):
    """An MLP whose input sizes are found on the first forward (torch.nn.LazyLinear), as user code often is."""
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.LazyLinear(hidden), torch.nn.ReLU(), torch.nn.LazyLinear(embedding_dim)
    )


@register_dataset("broken-dataset")
def broken_dataset(damage: str = "float"):
    """sklearn digits, damaged as ``damage`` says."""
    data = digits()
    if damage == "float":
        return replace(data, train_images=data.train_images.float() / 255)
    if damage == "nhwc":
        return replace(data, train_images=data.train_images.permute(0, 2, 3, 1).contiguous())
    if damage == "labels-out-of-range":
        return replace(data, test_labels=data.test_labels + 1)
    if damage == "short-labels":
        return replace(data, train_labels=data.train_labels[:-5])
    if damage == "not-a-dataset":
        return {"train": (data.train_images, data.train_labels)}
    raise ValueError(damage)


@register_loss("broken-two-argument-loss")
class TwoArgumentLoss(torch.nn.Module):
    """forward(embeddings, labels): no indices, no reference embeddings."""

    def forward(self, embeddings, labels):
        return embeddings.pow(2).mean()


@register_loss("broken-vector-loss")
class VectorLoss(ContrastiveLoss):
    """The contrastive loss times one per sample: a vector, not a scalar."""

    def forward(self, embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None):
        return super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels) * embeddings.new_ones(
            len(labels)
        )


@register_miner("broken-miner")
class PairOnlyMiner(torch.nn.Module):
    """Returns (anchors, positives): neither triplets nor pairs."""

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        n = torch.arange(len(labels))
        return n, n


@register_encoder("buggy-encoder")
def buggy_encoder(*, embedding_dim, input_shape, hidden: tuple = (16,)):
    """A bug in the factory's own code: a list plus a number."""
    sizes = list(hidden) + embedding_dim
    return torch.nn.Linear(sizes[0], sizes[-1])


@register_sampler("broken-global-shuffle")
def global_shuffle():
    """Shuffles with torch's global random state instead of the generator it is given."""
    return lambda labels, generator: torch.randperm(len(labels))


@register_sampler("broken-list-sampler")
def list_sampler():
    """Returns a Python list."""
    return lambda labels, generator: list(range(len(labels)))


@register_sampler("broken-offset-sampler")
def offset_sampler():
    """Indices shifted past the end of the labels."""
    return lambda labels, generator: torch.randperm(len(labels), generator=generator) + 5


@register_sampler("broken-negative-sampler")
def negative_sampler():
    """Indices shifted below zero (Python would read them from the end)."""
    return lambda labels, generator: torch.randperm(len(labels), generator=generator) - 3


@register_scheduler("broken-scheduler")
def no_scheduler(optimizer, *, total_steps):
    """Forgets to return the schedule."""
    torch.optim.lr_scheduler.LinearLR(optimizer, total_iters=total_steps)


class _FloatImages:
    """Resizes, then scales to floats in [0, 1] (torchvision's ToDtype(scale=True)): the network scales again."""

    def __init__(self, size: int, grow: int = 0) -> None:
        self.size, self.grow = size, grow

    def __call__(self, image):
        size = self.size + self.grow
        resized = torch.nn.functional.interpolate(image[None].float(), size=(size, size))[0]
        return resized / 255 if not self.grow else resized.round().byte()


@register_transform("broken-float-transform")
def float_transform(size: int = 224):
    return _FloatImages(size)


@register_transform("broken-size-transform")
def size_transform(size: int = 224):
    """Three pixels larger than the size it is asked for."""
    return _FloatImages(size, grow=3)
