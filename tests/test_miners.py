"""Miners: random-pairs is balanced, label-correct and reproducible; the others return valid tuples."""

from __future__ import annotations

import json

import pytest
import torch
from pytorch_metric_learning import distances
from pytorch_metric_learning import miners as pml_miners

from metriclab import registry
from metriclab.errors import MetricLabError


def random_pairs(**kwargs):
    return registry.create("miner", "random-pairs", **kwargs)


def large_batch(n: int = 3000, classes: int = 10, dim: int = 4):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, dim, generator=generator), torch.randint(0, classes, (n,), generator=generator)


def same_draws(x, y) -> bool:
    return all(torch.equal(u, v) for u, v in zip(x, y, strict=True))


def assert_label_correct(indices, labels, ref_labels=None):
    ref_labels = labels if ref_labels is None else ref_labels
    if len(indices) == 4:
        a1, p, a2, n = indices
        assert (labels[a1] == ref_labels[p]).all() and (labels[a2] != ref_labels[n]).all()
    else:
        a, p, n = indices
        assert (labels[a] == ref_labels[p]).all() and (labels[a] != ref_labels[n]).all()


def test_random_pairs_positive_fraction_labels_and_no_self_pairs():
    emb, labels = large_batch()
    a1, p, a2, n = random_pairs(pairs_per_sample=2, pos_fraction=0.3)(emb, labels)
    assert len(a1) + len(a2) == 2 * len(labels)
    assert len(a1) / (len(a1) + len(a2)) == pytest.approx(0.3, abs=0.02)
    assert torch.bincount(torch.cat([a1, a2]), minlength=len(labels)).eq(2).all()  # every sample anchors twice
    assert_label_correct((a1, p, a2, n), labels)
    assert not (a1 == p).any()


def test_random_pairs_draws_partners_uniformly():
    # Unsorted labels: partners must be found through the label-sorted order and mapped back.
    labels = torch.tensor([1, 0, 1, 2, 1, 0, 1])
    emb = torch.zeros(len(labels), 2)
    miner = random_pairs(pairs_per_sample=50, pos_fraction=0.5)
    pos_counts, neg_counts = torch.zeros(len(labels)), torch.zeros(len(labels))
    for _ in range(40):
        a1, p, a2, n = miner(emb, labels)
        pos_counts += torch.bincount(p[a1 == 2], minlength=len(labels))
        neg_counts += torch.bincount(n[a2 == 2], minlength=len(labels))
    # Anchor 2 (label 1): positives 0, 4, 6 (not itself), negatives 1, 3, 5, each about equally often.
    assert pos_counts[[1, 2, 3, 5]].sum() == 0 and neg_counts[[0, 2, 4, 6]].sum() == 0
    for counts, partners in ((pos_counts, [0, 4, 6]), (neg_counts, [1, 3, 5])):
        share = counts[partners] / counts[partners].sum()
        assert torch.allclose(share, torch.full((3,), 1 / 3), atol=0.05)


def test_random_pairs_falls_back_when_a_kind_of_partner_is_missing():
    emb = torch.zeros(3, 2)
    a1, p, a2, n = random_pairs(pos_fraction=1.0)(emb, torch.tensor([0, 1, 1]))
    assert a1.tolist() == [1, 2] and p.tolist() == [2, 1]  # sample 0 has no positive: it gets a negative
    assert a2.tolist() == [0] and n.tolist() in ([1], [2])
    a1, p, a2, n = random_pairs(pos_fraction=0.0)(emb, torch.tensor([4, 4, 4]))
    assert len(a2) == 0 and len(a1) == 3  # a single-class batch has only positives
    a1, p, a2, n = random_pairs()(emb[:1], torch.tensor([4]))
    assert len(a1) == len(a2) == 0  # nothing to pair with


def test_random_pairs_is_reproducible_from_its_seed():
    emb, labels = large_batch(500)
    first, second = random_pairs(seed=3), random_pairs(seed=3)
    draws_first = [first(emb, labels) for _ in range(2)]
    draws_second = [second(emb, labels) for _ in range(2)]
    assert all(same_draws(x, y) for x, y in zip(draws_first, draws_second, strict=True))
    assert not torch.equal(draws_first[0][1], draws_first[1][1])  # later calls draw anew
    assert not torch.equal(random_pairs(seed=4)(emb, labels)[1], draws_first[0][1])


def test_random_pairs_generator_state_survives_a_checkpoint():
    emb, labels = large_batch(500)
    miner = random_pairs(seed=5)
    miner(emb, labels)
    state = json.loads(json.dumps(miner.state()))  # checkpoints keep it in trainer_state.json
    expected = miner(emb, labels)
    resumed = random_pairs(seed=5)
    resumed.load_state(state)
    assert same_draws(resumed(emb, labels), expected)
    state["device"] = "cuda" if state["device"] == "cpu" else "cpu"
    resumed.load_state(state)
    with pytest.raises(MetricLabError, match="same kind of device"):
        resumed(emb, labels)


def test_random_pairs_against_a_second_tower():
    emb, labels = large_batch(200)
    ref_labels = (labels + 1) % 10  # a different labelling, so partners must come from the reference set
    indices = random_pairs()(emb, labels, emb.flip(0), ref_labels)
    assert_label_correct(indices, labels, ref_labels)
    assert len(indices[0]) > 0 and len(indices[2]) > 0


@pytest.mark.parametrize("kwargs", [{"pos_fraction": 1.5}, {"pos_fraction": -0.1}, {"pairs_per_sample": 0}])
def test_random_pairs_rejects_bad_arguments(kwargs):
    with pytest.raises(MetricLabError):
        random_pairs(**kwargs)


@pytest.mark.parametrize("name", ["all-pairs", "all-triplets", "batch-hard", "semi-hard", "hard"])
def test_builtin_miners_return_valid_tuples(name):
    emb, labels = large_batch(40, classes=4)
    indices = registry.create("miner", name)(emb, labels)
    assert len(indices) in (3, 4)
    assert len(indices[0]) > 0
    assert_label_correct(indices, labels)


def test_all_pairs_and_triplets_are_complete():
    labels = torch.tensor([0, 0, 1, 1, 1])
    emb = torch.zeros(5, 2)
    a1, p, a2, n = registry.create("miner", "all-pairs")(emb, labels)
    assert len(a1) == 2 * 1 + 3 * 2 and len(a2) == 2 * 3 * 2
    a, p, n = registry.create("miner", "all-triplets")(emb, labels)
    assert len(a) == 2 * (1 * 3) + 3 * (2 * 2)


def test_pml_miners_are_registered_and_work():
    emb, labels = large_batch(40, classes=4)
    names = registry.list_components("miner", "pml.*")
    assert "pml.MultiSimilarityMiner" in names and "pml.BatchHardMiner" in names
    indices = registry.create("miner", "pml.MultiSimilarityMiner", epsilon=0.5)(emb, labels)
    assert len(indices) == 4
    assert_label_correct(indices, labels)


def sorted_triplet_codes(indices, n_ref: int) -> torch.Tensor:
    a, p, n = indices
    return torch.sort((a * n_ref + p) * n_ref + n).values


TRIPLET_TYPES = ["semihard", "hard", "all", "easy"]
DISTANCES = pytest.mark.parametrize(
    "distance",
    [
        distances.LpDistance(),
        distances.CosineSimilarity(),
        distances.LpDistance(normalize_embeddings=False, power=2),
    ],
    ids=["normalised-l2", "cosine", "squared-l2"],
)


def assert_same_triplets_as_pml(type_of_triplets, distance, trials: range) -> None:
    """Random batches (sizes 2-119, 1-7 classes, spread or clustered, with or without ``ref_emb``), 3 margins each."""
    generator = torch.Generator().manual_seed(3)
    for trial in range(trials.stop):
        size = int(torch.randint(2, 120, (), generator=generator))
        classes = int(torch.randint(1, 8, (), generator=generator))
        # clustered embeddings put many triplets near the margin, where rounding could flip a decision
        emb = torch.randn(size, 6, generator=generator) * (0.05 if trial % 2 else 1.0)
        labels = torch.randint(0, classes, (size,), generator=generator)
        if trial not in trials:
            continue
        ref = (emb.flip(0), labels.flip(0)) if trial % 3 == 0 else (None, None)
        for margin in (0.0, 0.2, 1.0):
            kwargs = {"margin": margin, "type_of_triplets": type_of_triplets, "distance": distance}
            ours = registry.create("miner", "triplet-margin", **kwargs)(emb, labels, *ref)
            theirs = pml_miners.TripletMarginMiner(**kwargs)(emb, labels, *ref)
            assert torch.equal(sorted_triplet_codes(ours, size), sorted_triplet_codes(theirs, size))


@pytest.mark.parametrize("type_of_triplets", TRIPLET_TYPES)
@DISTANCES
def test_triplet_margin_miner_keeps_exactly_pmls_triplets(type_of_triplets, distance):
    # Trials 0-3 cover spread and clustered batches, with and without ref_emb.
    assert_same_triplets_as_pml(type_of_triplets, distance, range(4))


@pytest.mark.slow
@pytest.mark.parametrize("type_of_triplets", TRIPLET_TYPES)
@DISTANCES
def test_triplet_margin_miner_keeps_exactly_pmls_triplets_on_more_batches(type_of_triplets, distance):
    assert_same_triplets_as_pml(type_of_triplets, distance, range(4, 12))


def test_semi_hard_and_hard_use_the_fast_miner_and_keep_pmls_stats():
    emb, labels = large_batch(64, classes=5, dim=8)
    miner = registry.create("miner", "semi-hard", margin=0.3, collect_stats=True)
    assert type(miner).__module__ == "metriclab_plugins.miners"
    reference = pml_miners.TripletMarginMiner(margin=0.3, type_of_triplets="semihard", collect_stats=True)
    miner(emb, labels)
    reference(emb, labels)
    assert miner.num_triplets == reference.num_triplets > 0
    for stat in ("pos_pair_dist", "neg_pair_dist", "avg_triplet_margin"):
        assert getattr(miner, stat) == pytest.approx(getattr(reference, stat), abs=1e-5)
    assert registry.create("miner", "hard").type_of_triplets == "hard"
