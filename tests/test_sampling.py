"""Epoch orders and shards: every sample once per epoch, on any number of processes."""

import torch

from metriclab.data.sampling import epoch_order, shard, shard_sizes


def test_random_order_is_a_seeded_permutation():
    labels = torch.arange(103) % 7
    a, b = epoch_order(labels, 0, 1), epoch_order(labels, 0, 1)
    assert torch.equal(a, b) and not torch.equal(a, epoch_order(labels, 0, 2))
    assert torch.equal(a.sort().values, torch.arange(103))


def test_m_per_class_batches_are_whole_groups_of_m():
    labels = torch.arange(400) % 10
    order = epoch_order(labels, 0, 0, sampler="m-per-class", m_per_class=4)
    assert torch.equal(order.sort().values, torch.arange(400))
    for batch in order.split(32):
        counts = torch.bincount(labels[batch], minlength=10)
        assert all(c % 4 == 0 for c in counts.tolist()) and (counts > 0).sum() >= 2


def test_shards_cover_each_global_batch_exactly_once():
    for world in (1, 2, 3, 4):
        for size in (1, 7, 64, 65):
            batch = torch.arange(size)
            parts = [shard(batch, r, world) for r in range(world)]
            assert torch.equal(torch.cat(parts), batch)
            assert [p.numel() for p in parts] == shard_sizes(size, world)
