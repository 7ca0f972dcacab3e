"""Epoch orders and per-process shards, computed on the device that holds the data.

Every process computes the same order from ``(seed, epoch)``, so the global batch of step
``s`` is ``order[s*G:(s+1)*G]`` everywhere (``G`` = per-process batch x processes) and
each process takes its contiguous part of it. The last batch of an epoch may be short;
it is split as evenly as possible, so no sample is dropped or repeated.
"""

from __future__ import annotations

import torch


def epoch_generator(seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from ``(seed, epoch)``, identical on every process."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed * 1_000_003 + epoch)
    return generator


def epoch_order(
    labels: torch.Tensor, seed: int, epoch: int, sampler: str = "random", m_per_class: int = 4
) -> torch.Tensor:
    """A permutation of ``range(len(labels))`` for one epoch.

    ``random``: a uniform shuffle. ``m-per-class``: samples are grouped in runs of ``m``
    of one class and the groups shuffled, so a batch whose size is a multiple of ``m``
    is made of whole groups: every class in it has a multiple of ``m`` samples, hence
    positives for every anchor (like pytorch-metric-learning's MPerClassSampler, but one
    tensor operation on device; unlike it, two groups of one class may share a batch).
    """
    device = labels.device
    generator = epoch_generator(seed, epoch, device)
    n = labels.numel()
    if sampler == "random":
        return torch.randperm(n, generator=generator, device=device)
    # Shuffle, then stable-sort by class: a random order within each class.
    shuffled = torch.randperm(n, generator=generator, device=device)
    by_class = shuffled[torch.sort(labels[shuffled], stable=True).indices]
    sorted_labels = labels[by_class]
    # Position of each sample inside its class run -> group id = (class, position // m).
    counts = torch.bincount(sorted_labels)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(n, device=device) - starts[sorted_labels]
    group = position // m_per_class
    groups_per_class = (counts + m_per_class - 1) // m_per_class
    group_offset = torch.cumsum(groups_per_class, 0) - groups_per_class
    group_id = group_offset[sorted_labels] + group
    group_rank = torch.randperm(int(groups_per_class.sum()), generator=generator, device=device)
    # Order samples by the shuffled rank of their group, keeping within-group order.
    key = group_rank[group_id] * m_per_class + position % m_per_class
    return by_class[torch.argsort(key)]


def shard(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This process's contiguous part of a global batch (parts differ in size by at most 1)."""
    return torch.tensor_split(batch, world_size)[rank]


def shard_sizes(total: int, world_size: int) -> list[int]:
    """Sizes of the parts :func:`shard` makes of ``total`` items."""
    base, extra = divmod(total, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]
