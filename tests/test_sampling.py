"""Epoch orders and shards: every sample in every epoch, on any number of processes."""

import pytest
import torch

from metriclab.data.sampling import epoch_order, local_batches, shard, shard_sizes
from metriclab.errors import MetricLabError
from metriclab.registry import register_sampler, samplers


def test_random_order_is_a_seeded_permutation():
    labels = torch.arange(103) % 7
    a, b = epoch_order(labels, 0, 1), epoch_order(labels, 0, 1)
    assert torch.equal(a, b) and not torch.equal(a, epoch_order(labels, 0, 2))
    assert torch.equal(a.sort().values, torch.arange(103))


@pytest.mark.parametrize(
    "counts",
    [
        [5, 5, 5, 5],  # 4 classes x 5 samples, m=4: every class ends in a partial group
        [4, 7, 9, 2, 13, 1],  # mixed, including classes smaller than m
        [40] * 10,  # whole groups only
    ],
)
def test_m_per_class_batches_are_whole_groups_of_m(counts):
    m = 4
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    order = epoch_order(labels, 0, 0, sampler="m-per-class", m_per_class=m)
    assert set(order.tolist()) == set(range(labels.numel()))  # every sample is visited
    assert order.numel() == sum(-(-c // m) * m for c in counts)  # partial groups are filled, not shifted
    for batch in order.split(2 * m):
        batch_counts = torch.bincount(labels[batch], minlength=len(counts))
        assert all(c % m == 0 for c in batch_counts.tolist()), batch_counts
    groups = order.view(-1, m)
    assert (labels[groups] == labels[groups[:, :1]]).all()  # each group is one class
    for group in groups[torch.tensor(counts)[labels[groups[:, 0]]] >= m]:  # no repeats where the class has m
        assert group.unique().numel() == m
    assert torch.equal(order, epoch_order(labels, 0, 0, sampler="m-per-class", m_per_class=m))
    assert order.numel() == epoch_order(labels, 0, 1, sampler="m-per-class", m_per_class=m).numel()


def test_class_pairs_batches_hold_one_genuine_pair_per_class():
    labels = torch.arange(200) % 10
    order = epoch_order(labels, 3, 0, sampler="class-pairs")
    assert set(order.tolist()) == set(range(200))
    pairs = order.view(-1, 2)
    assert (labels[pairs[:, 0]] == labels[pairs[:, 1]]).all()
    for batch in pairs.split(10):  # 20 samples: a pair of each of 10 classes within each round
        assert labels[batch[:, 0]].unique().numel() == batch.shape[0]


def test_a_plugin_sampler_is_used_by_name():
    @register_sampler("reversed-test")
    def reversed_sampler(stride: int = 1):
        return lambda labels, generator: torch.arange(labels.numel() - 1, -1, -stride, device=labels.device)

    try:
        assert epoch_order(torch.zeros(5, dtype=torch.long), 0, 0, "reversed-test").tolist() == [4, 3, 2, 1, 0]
        with pytest.raises(MetricLabError, match="random"):
            epoch_order(torch.zeros(5, dtype=torch.long), 0, 0, "randon")
    finally:
        samplers._entries.pop("reversed-test")


def test_shards_cover_each_global_batch_exactly_once():
    for world in (1, 2, 3, 4):
        for size in (1, 7, 64, 65):
            batch = torch.arange(size)
            parts = [shard(batch, r, world) for r in range(world)]
            assert torch.equal(torch.cat(parts), batch)
            assert [p.numel() for p in parts] == shard_sizes(size, world)


def test_processes_see_disjoint_samples_whose_union_is_the_epoch():
    labels = torch.arange(101) % 5
    order = epoch_order(labels, 0, 0, "m-per-class", 4)
    for world in (2, 3):
        seen = [torch.cat([local for _, local in local_batches(order, 0, 16, r, world)]) for r in range(world)]
        assert sum(s.numel() for s in seen) == order.numel()
        assert torch.equal(torch.cat(seen).sort().values, order.sort().values)
        resumed = local_batches(order, 48, 16, 0, world)  # from sample 48 on: step 3 onward
        assert [b.tolist() for b, _ in resumed] == [b.tolist() for b, _ in local_batches(order, 0, 16, 0, world)[3:]]
