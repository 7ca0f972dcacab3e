"""Fused objectives: a miner's ``fuse(loss)`` gives the loss of what it mines, the same value and gradient.

The engine trains with ``components.objective(loss, miner)``, which takes the fused computation
where the miner offers one. Each is compared with pml's way, ``loss(emb, labels, miner(emb, labels))``,
on CPU here and on a GPU too where one is present.
"""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import distances, losses, reducers

from metriclab import registry
from metriclab.training.components import objective

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def batch(n: int, classes: int, dim: int, seed: int, device: str = "cpu"):
    generator = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, dim, generator=generator)
    labels = torch.randint(0, classes, (n,), generator=generator)
    return emb.to(device), labels.to(device)


def value_and_grads(fn, emb, ref=None):
    """``fn(emb, ref)`` and the gradients of it with respect to ``emb`` (and ``ref``)."""
    emb = emb.detach().clone().requires_grad_(True)
    ref = None if ref is None else ref.detach().clone().requires_grad_(True)
    value = fn(emb, ref)
    value.backward()
    return value.detach(), emb.grad, None if ref is None else ref.grad


def assert_same(got, want):
    for g, w in zip(got, want, strict=True):
        if g is None or w is None:  # pml returns a zero loss detached from a tensor that got no gradient
            assert (g if w is None else w) is None or not (g if w is None else w).any()
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


# -- random pairs + contrastive ------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pairs_per_sample,pos_fraction", [(1, 0.5), (2, 0.5), (3, 0.2), (2, 1.0), (1, 0.0)])
@pytest.mark.parametrize("second_tower", [False, True])
def test_random_pairs_fused_equals_mine_then_loss(device, pairs_per_sample, pos_fraction, second_tower):
    emb, labels = batch(96, 7, 3, seed=pairs_per_sample, device=device)
    labels[0] = 99  # a class of one sample: it has no positive partner
    ref = torch.randn_like(emb) if second_tower else None
    ref_labels = labels.clone() if second_tower else None
    loss = registry.create("loss", "contrastive", margin=1.5)
    args = {"pairs_per_sample": pairs_per_sample, "pos_fraction": pos_fraction, "seed": 3}
    fused_miner, miner = (registry.create("miner", "random-pairs", **args) for _ in range(2))
    fused = fused_miner.fuse(loss)
    assert fused is not None
    for _ in range(3):  # successive calls keep drawing the same pairs as the unfused miner
        got = value_and_grads(lambda e, r: fused(e, labels, r, ref_labels), emb, ref)
        want = value_and_grads(lambda e, r: loss(e, labels, miner(e, labels, r, ref_labels), r, ref_labels), emb, ref)
        assert_same(got, want)
    assert torch.equal(fused_miner.draw(labels, labels)[1], miner.draw(labels, labels)[1])


def test_random_pairs_fused_with_a_single_class_has_only_positive_pairs():
    emb, _ = batch(32, 1, 2, seed=0)
    labels = torch.zeros(32, dtype=torch.long)
    loss = registry.create("loss", "contrastive")
    fused = registry.create("miner", "random-pairs", pos_fraction=0.0).fuse(loss)
    want = loss(emb, labels, registry.create("miner", "random-pairs", pos_fraction=0.0)(emb, labels))
    torch.testing.assert_close(fused(emb, labels), want)


@pytest.mark.parametrize(
    "loss",
    [
        lambda: registry.create("loss", "contrastive", reducer=reducers.AvgNonZeroReducer()),
        lambda: registry.create("loss", "pml.ContrastiveLoss"),
        lambda: registry.create("loss", "triplet"),
    ],
)
def test_random_pairs_offers_no_fusion_to_other_losses(loss):
    assert registry.create("miner", "random-pairs").fuse(loss()) is None


def test_subclasses_that_change_the_loss_or_the_mining_are_not_fused():
    from metriclab_plugins.losses import ContrastiveLoss
    from metriclab_plugins.miners import RandomPairsMiner, TripletMarginMiner

    class DoubledLoss(ContrastiveLoss):
        def forward(self, *args, **kwargs):
            return 2 * super().forward(*args, **kwargs)

    class NoNegatives(RandomPairsMiner):
        def mine(self, *args):
            a1, p, _, _ = super().mine(*args)
            return a1, p, a1[:0], p[:0]

    class Reversed(TripletMarginMiner):
        def mine(self, *args):
            return tuple(x.flip(0) for x in super().mine(*args))

    emb, labels = batch(40, 4, 3, seed=0)
    doubled, plain = DoubledLoss(), ContrastiveLoss()
    assert registry.create("miner", "random-pairs").fuse(doubled) is None
    assert NoNegatives().fuse(plain) is None
    assert Reversed(type_of_triplets="semihard").fuse(registry.create("loss", "triplet")) is None
    want = doubled(emb, labels, registry.create("miner", "random-pairs")(emb, labels))
    assert torch.equal(objective(doubled, registry.create("miner", "random-pairs"))(emb, labels), want)


# -- semi-hard (TripletMarginMiner) + triplet -------------------------------------------------------

DISTANCES = {
    "lp-normalized": distances.LpDistance,
    "lp-raw": lambda: distances.LpDistance(normalize_embeddings=False),
    "cosine": distances.CosineSimilarity,
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("type_of_triplets", ["semihard", "hard", "all", "easy"])
@pytest.mark.parametrize("distance", list(DISTANCES))
@pytest.mark.parametrize("second_tower", [False, True])
def test_triplet_dense_loss_equals_mine_then_loss(device, type_of_triplets, distance, second_tower):
    emb, labels = batch(64, 5, 8, seed=len(type_of_triplets), device=device)
    ref = torch.randn_like(emb) if second_tower else None
    ref_labels = labels.clone() if second_tower else None
    margin = 0.1 if distance == "cosine" else 0.2
    loss = registry.create("loss", "triplet", margin=margin, distance=DISTANCES[distance]())
    miner = registry.create("miner", "triplet-margin", margin=margin, type_of_triplets=type_of_triplets)
    miner.distance = DISTANCES[distance]()
    assert miner.fuse(loss) is not None
    got = value_and_grads(lambda e, r: miner.dense_loss(loss, e, labels, r, ref_labels), emb, ref)
    want = value_and_grads(lambda e, r: loss(e, labels, miner(e, labels, r, ref_labels), r, ref_labels), emb, ref)
    assert got[0] > 0 or type_of_triplets == "easy"  # easy triplets are past the margin: zero loss
    assert_same(got, want)


def spy(monkeypatch, miner, calls: list[str]) -> None:
    """Record in ``calls`` each time ``miner`` scores every triplet densely or mines."""
    for name, label in (("dense_loss", "dense"), ("mine", "mine")):
        method = getattr(miner, name)
        monkeypatch.setattr(miner, name, lambda *a, _m=method, _l=label, **k: calls.append(_l) or _m(*a, **k))


@pytest.mark.parametrize("device", DEVICES)
def test_triplet_fused_objective_runs_dense_on_gpus_and_mines_elsewhere(device, monkeypatch):
    emb, labels = batch(64, 4, 8, seed=0, device=device)
    loss = registry.create("loss", "triplet")
    miner, reference = registry.create("miner", "semi-hard"), registry.create("miner", "semi-hard")
    calls = []
    spy(monkeypatch, miner, calls)
    fused = objective(loss, miner)
    got = value_and_grads(lambda e, r: fused(e, labels), emb)
    # Which path ran is the point here: the dense computation itself is compared with mining above.
    assert calls == (["dense"] if device == "cuda" else ["mine"])
    want = value_and_grads(lambda e, r: loss(e, labels, reference(e, labels)), emb)
    assert_same(got, want)
    if device == "cuda":  # a batch too large to score densely is mined on a GPU too
        calls.clear()
        monkeypatch.setattr("metriclab_plugins.miners.DENSE_LIMIT", len(emb) ** 3 - 1)
        assert_same(value_and_grads(lambda e, r: fused(e, labels), emb), want)
        assert calls == ["mine"]


def test_triplet_dense_loss_with_nothing_to_mine_is_zero_with_zero_gradient():
    emb, _ = batch(16, 1, 4, seed=0)
    labels = torch.zeros(16, dtype=torch.long)  # no negatives at all
    loss, miner = registry.create("loss", "triplet"), registry.create("miner", "semi-hard")
    value, grad, _ = value_and_grads(lambda e, r: miner.dense_loss(loss, e, labels), emb)
    assert value == 0 and torch.count_nonzero(grad) == 0


@pytest.mark.parametrize(
    "loss",
    [
        lambda: losses.TripletMarginLoss(margin=0.2, swap=True),
        lambda: losses.TripletMarginLoss(margin=0.2, smooth_loss=True),
        lambda: losses.TripletMarginLoss(margin=0.2, reducer=reducers.MeanReducer()),
        lambda: losses.TripletMarginLoss(margin=0.2, distance=distances.CosineSimilarity()),
        lambda: losses.MarginLoss(),
    ],
)
def test_triplet_miner_offers_no_fusion_it_cannot_keep_exact(loss):
    assert registry.create("miner", "semi-hard").fuse(loss()) is None


# -- what the engine calls ------------------------------------------------------------------------


def test_objective_without_fusion_mines_then_calls_the_loss():
    emb, labels = batch(40, 4, 3, seed=0)
    loss = registry.create("loss", "pml.ContrastiveLoss")
    miner = registry.create("miner", "batch-hard")  # offers no fusion
    assert torch.equal(objective(loss, miner)(emb, labels), loss(emb, labels, miner(emb, labels)))
    assert torch.equal(objective(loss, None)(emb, labels), loss(emb, labels))
