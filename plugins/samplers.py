"""Built-in samplers: the order in which an epoch visits the training samples.

Contract for sampler plugins: a factory registered with ``@register_sampler(name)`` takes keyword
arguments (``m_per_class`` is supplied from the recipe if the factory names it) and returns a callable
``(labels, generator) -> order``: a 1-D int64 tensor of indices into ``labels`` on the labels' device,
drawn only from ``generator`` (seeded from the run's seed and the epoch, identical on every process),
with the same length every epoch. The engine cuts the order into global batches and each process takes
its shard, on the resident and the streaming data path alike. See ``docs/components.md``.
"""

from __future__ import annotations

from functools import partial

from metriclab.data.sampling import Sampler, class_pairs_order, m_per_class_order, random_order
from metriclab.errors import MetricLabError
from metriclab.registry import register_sampler


@register_sampler("random")
def random() -> Sampler:
    """A uniform shuffle: every sample once per epoch."""
    return random_order


@register_sampler("m-per-class")
def m_per_class(m_per_class: int = 4) -> Sampler:
    """Shuffled groups of ``m_per_class`` samples of one class; partial groups are filled from their class.

    With a batch size that is a multiple of m, every batch holds whole groups, so every class in it
    has positives (the sampler of pytorch-metric-learning's MPerClassSampler, as one tensor operation).
    """
    if m_per_class < 1:
        raise MetricLabError(f"sampler 'm-per-class': m_per_class must be at least 1, got {m_per_class}")
    return partial(m_per_class_order, m=m_per_class)


@register_sampler("class-pairs")
def class_pairs() -> Sampler:
    """One genuine pair per class dealt round-robin, so a batch pairs many classes (classic Siamese batches)."""
    return class_pairs_order
