"""Epoch orders and per-process shards, computed on the device that holds the labels.

Every process computes the same order from ``(seed, epoch)``, so the global batch of step
``s`` is ``order[s*G:(s+1)*G]`` everywhere (``G`` = per-process batch x processes) and
each process takes its contiguous part of it. The last batch of an epoch may be short;
it is split as evenly as possible, so no sample of the order is dropped or repeated.

A sampler (registry kind ``sampler``) is built from keyword arguments and returns a
callable ``(labels, generator) -> order``: a 1-D int64 tensor of sample indices on the
labels' device, drawn only from ``generator``, whose length is the same every epoch. The
order decides everything: the resident and the streaming data paths both read it, so a
sampler works unchanged on both and resume needs only the position in the order.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from metriclab import registry

Sampler = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def epoch_generator(seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from ``(seed, epoch)``, identical on every process."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed * 1_000_003 + epoch)
    return generator


def augmentation_seeds(seed: int, epoch: int, positions: torch.Tensor) -> list[int]:
    """One seed per sample for its random augmentation, from ``(seed, epoch, position in the epoch's order)``.

    So an image is augmented the same way however many processes and workers load it and whether or not the
    run was stopped and resumed before it. The seeds are splitmix64's outputs of a stream keyed by the run's
    seed and the epoch (numpy's unsigned 64-bit arithmetic wraps, as splitmix64's does).
    """
    key = _splitmix64(np.array([seed * 1_000_003 + epoch], dtype=np.uint64))
    x = _splitmix64(key + (positions.numpy().astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15))
    return (x >> np.uint64(1)).tolist()  # 63 bits: torch.manual_seed's range


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def build_sampler(name: str, m_per_class: int = 4, args: dict | None = None) -> Sampler:
    """The registered sampler ``name``, given ``m_per_class`` if it takes it, and ``args``."""
    factory = registry.samplers.get(name)
    context = registry.accepted_arguments(factory, {"m_per_class": m_per_class})
    return registry.samplers.create(name, **{**context, **(args or {})})


def epoch_order(
    labels: torch.Tensor,
    seed: int,
    epoch: int,
    sampler: str | Sampler = "random",
    m_per_class: int = 4,
    sampler_args: dict | None = None,
) -> torch.Tensor:
    """The samples of one epoch in order: ``sampler`` (a registered name or built) drawn from ``(seed, epoch)``."""
    if isinstance(sampler, str):
        sampler = build_sampler(sampler, m_per_class, sampler_args)
    return sampler(labels, epoch_generator(seed, epoch, labels.device))


def random_order(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A uniform shuffle of ``range(len(labels))``: every sample once."""
    return torch.randperm(labels.numel(), generator=generator, device=labels.device)


def class_groups(labels: torch.Tensor, generator: torch.Generator, m: int) -> torch.Tensor:
    """``(groups, m)`` sample indices: each row ``m`` samples of one class, rows in class order.

    Each class's samples are shuffled and cut into groups of ``m``; a class whose count is not a
    multiple of ``m`` has its last group filled with the first samples of its own shuffled run (so
    with at least ``m`` samples no group repeats a sample; a class smaller than ``m`` repeats some),
    as pytorch-metric-learning's MPerClassSampler fills small classes. Every sample is in a group.
    """
    device = labels.device
    shuffled = torch.randperm(labels.numel(), generator=generator, device=device)
    by_class = shuffled[torch.sort(labels[shuffled], stable=True).indices]  # random order within each class
    counts = torch.bincount(labels)
    starts = torch.cumsum(counts, 0) - counts
    slots = (counts + m - 1) // m * m  # each class's run, padded to whole groups
    slot_class = torch.repeat_interleave(torch.arange(counts.numel(), device=device), slots)
    slot_start = torch.cumsum(slots, 0) - slots
    position = torch.arange(slot_class.numel(), device=device) - slot_start[slot_class]
    return by_class[starts[slot_class] + position % counts[slot_class]].view(-1, m)


def m_per_class_order(labels: torch.Tensor, generator: torch.Generator, m: int) -> torch.Tensor:
    """Groups of ``m`` samples of one class (see :func:`class_groups`) in shuffled order.

    A batch whose size is a multiple of ``m`` is made of whole groups: every class in it has a
    multiple of ``m`` samples, hence positives for every anchor. The order is longer than the
    dataset by the samples that fill partial groups; two groups of one class may share a batch.
    """
    groups = class_groups(labels, generator, m)
    return groups[torch.randperm(groups.shape[0], generator=generator, device=labels.device)].reshape(-1)


def class_pairs_order(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Genuine pairs (2 samples of one class) dealt round-robin over the classes, in random order per round.

    Consecutive pairs come from different classes while the round lasts, so a batch of ``2k``
    holds one genuine pair for each of ``k`` classes and impostor pairs between every two of
    them: the balanced pairs of the classic Siamese examples, built on the batch.
    """
    pairs = class_groups(labels, generator, 2)
    pair_class = labels[pairs[:, 0]]
    # Rank of each pair within its class (pairs of a class are contiguous in class order).
    counts = torch.bincount(pair_class)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(pair_class.numel(), device=labels.device) - starts[pair_class]
    jitter = torch.rand(pair_class.numel(), generator=generator, device=labels.device)
    return pairs[torch.argsort(rank.double() + jitter.double())].reshape(-1)


def shard(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This process's contiguous part of a global batch (parts differ in size by at most 1)."""
    return torch.tensor_split(batch, world_size)[rank]


def shard_sizes(total: int, world_size: int) -> list[int]:
    """Sizes of the parts :func:`shard` makes of ``total`` items."""
    base, extra = divmod(total, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def local_batches(
    order: torch.Tensor, start: int, global_batch: int, rank: int, world_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(global batch, this process's shard)`` of every step of ``order`` from sample ``start`` on."""
    steps = []
    for begin in range(start, order.numel(), global_batch):
        batch = order[begin : begin + global_batch]
        steps.append((batch, shard(batch, rank, world_size)))
    return steps
