"""Built-in losses against hand-computed values, and contrastive training that really separates digits."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import CosFaceLoss, MultiSimilarityLoss

from metriclab import registry
from metriclab.errors import MetricLabError

# Four 2-D points, two per class, with distances on both sides of a margin of 2.
POINTS = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.5], [3.0, 4.0]])
LABELS = np.array([0, 0, 1, 1])


def hadsell(pairs, margin, norm=2):
    """Hadsell et al.'s per-pair loss averaged over ``pairs``, from the paper's formula."""
    total = 0.0
    for i, j in pairs:
        d = np.linalg.norm(POINTS[i] - POINTS[j], ord=norm)
        total += d**2 if LABELS[i] == LABELS[j] else max(0.0, margin - d) ** 2
    return total / len(pairs)


def tensors():
    return torch.tensor(POINTS, dtype=torch.float64), torch.tensor(LABELS)


def test_contrastive_over_all_pairs_matches_the_formula():
    emb, labels = tensors()
    loss = registry.create("loss", "contrastive", margin=2.0)(emb, labels)
    all_pairs = list(itertools.permutations(range(4), 2))
    assert loss.item() == pytest.approx(hadsell(all_pairs, 2.0))


def test_contrastive_over_mined_pairs_matches_the_formula():
    emb, labels = tensors()
    a1, p, a2, n = [0, 2], [1, 3], [0, 1, 3], [2, 2, 0]
    indices = tuple(torch.tensor(x) for x in (a1, p, a2, n))
    loss = registry.create("loss", "contrastive", margin=2.0)(emb, labels, indices)
    assert loss.item() == pytest.approx(hadsell(list(zip(a1 + a2, p + n, strict=True)), 2.0))


def test_contrastive_with_an_injected_distance():
    emb, labels = tensors()
    manhattan = LpDistance(normalize_embeddings=False, p=1)
    loss = registry.create("loss", "contrastive", margin=3.0, distance=manhattan)(emb, labels)
    assert loss.item() == pytest.approx(hadsell(list(itertools.permutations(range(4), 2)), 3.0, norm=1), rel=1e-5)


def test_contrastive_splits_triplets_into_pairs():
    emb, labels = tensors()
    triplets = (torch.tensor([0, 3]), torch.tensor([1, 2]), torch.tensor([2, 1]))
    loss = registry.create("loss", "contrastive")(emb, labels, triplets)
    assert loss.item() == pytest.approx(hadsell([(0, 1), (3, 2), (0, 2), (3, 1)], 1.0))


def test_contrastive_against_a_second_tower():
    emb, labels = tensors()
    ref = emb + torch.tensor([0.5, 0.0], dtype=torch.float64)
    # A separate labels tensor: pml drops (i, i) pairs only when ref_labels *is* labels (one tower).
    loss = registry.create("loss", "contrastive", margin=2.0)(emb, labels, ref_emb=ref, ref_labels=labels.clone())
    expected = 0.0
    for i, j in itertools.product(range(4), range(4)):  # with a second tower, (i, i) is a real pair
        d = np.linalg.norm(POINTS[i] - (POINTS[j] + [0.5, 0.0]))
        expected += d**2 if LABELS[i] == LABELS[j] else max(0.0, 2.0 - d) ** 2
    assert loss.item() == pytest.approx(expected / 16)


def test_contrastive_gradient_is_finite_for_coincident_points():
    emb = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]], requires_grad=True)
    loss = registry.create("loss", "contrastive")(emb, torch.tensor([0, 0, 1]))
    loss.backward()
    # 2 positive pairs at d=0, 4 negative pairs losing the full margin (up to the safe sqrt's epsilon)
    assert loss.item() == pytest.approx((0 + 0 + 1 + 1 + 1 + 1) / 6, abs=1e-5)
    assert torch.isfinite(emb.grad).all()


def test_triplet_with_given_triplets_matches_the_formula():
    emb, labels = tensors()
    a, p, n = [0, 1, 2, 3], [1, 0, 3, 2], [2, 3, 0, 0]
    indices = tuple(torch.tensor(x) for x in (a, p, n))
    unit = POINTS / np.linalg.norm(POINTS, axis=1, keepdims=True).clip(1e-12)  # pml normalises by default
    hinge = [
        max(0.0, np.linalg.norm(unit[i] - unit[j]) - np.linalg.norm(unit[i] - unit[k]) + 0.2)
        for i, j, k in zip(a, p, n, strict=True)
    ]
    nonzero = [h for h in hinge if h > 0]
    assert 0 < len(nonzero) < len(hinge)  # the example exercises both sides of the hinge
    loss = registry.create("loss", "triplet")(emb, labels, indices)
    assert loss.item() == pytest.approx(np.mean(nonzero))  # pml's default reducer averages non-zero terms


def test_triplet_passes_other_arguments_to_pml():
    emb, labels = tensors()
    a, p, n = [0, 2], [1, 3], [3, 1]
    indices = tuple(torch.tensor(x) for x in (a, p, n))
    loss = registry.create("loss", "triplet", margin=1.0, distance=LpDistance(normalize_embeddings=False))
    hinge = [
        max(0.0, np.linalg.norm(POINTS[i] - POINTS[j]) - np.linalg.norm(POINTS[i] - POINTS[k]) + 1.0)
        for i, j, k in zip(a, p, n, strict=True)
    ]
    assert loss(emb, labels, indices).item() == pytest.approx(np.mean([h for h in hinge if h > 0]))


def test_pml_loss_by_name():
    emb, labels = tensors()
    loss = registry.create("loss", "pml.MultiSimilarityLoss", alpha=3.0)
    assert isinstance(loss, MultiSimilarityLoss)
    assert loss(emb, labels).item() == pytest.approx(MultiSimilarityLoss(alpha=3.0)(emb, labels).item())


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cosface_smooths_the_targets_of_its_margin_logits(smoothing):
    torch.manual_seed(0)
    emb, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    loss = registry.create("loss", "cosface", num_classes=3, embedding_size=4, margin=0.35, scale=30.0,
                           label_smoothing=smoothing)  # fmt: skip
    # CosFace's logits from the paper: scale * (cos(x, w_j) - margin on the true class), then cross-entropy.
    cos = torch.nn.functional.normalize(emb, dim=1) @ torch.nn.functional.normalize(loss.W, dim=0)
    logits = 30.0 * (cos - 0.35 * torch.nn.functional.one_hot(labels, 3))
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=smoothing)
    assert loss(emb, labels).item() == pytest.approx(expected.item(), rel=1e-5)
    if smoothing == 0.0:  # unsmoothed, it is pml's own loss
        pml = CosFaceLoss(num_classes=3, embedding_size=4, margin=0.35, scale=30.0)
        pml.W.data.copy_(loss.W.data)
        assert loss(emb, labels).item() == pytest.approx(pml(emb, labels).item(), rel=1e-6)
    with pytest.raises(MetricLabError, match="label_smoothing must be in"):
        registry.create("loss", "cosface", num_classes=3, embedding_size=4, label_smoothing=1.0)


@pytest.mark.parametrize("name", ["contrastive", "triplet"])
def test_negative_margin_rejected(name):
    with pytest.raises(MetricLabError, match="margin"):
        registry.create("loss", name, margin=-0.1)


def test_contrastive_training_separates_digits():
    from sklearn.datasets import load_digits
    from sklearn.neighbors import KNeighborsClassifier

    torch.manual_seed(0)
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    train_x, train_y, test_x, test_y = images[:1200], labels[:1200], images[1200:], labels[1200:]

    encoder = registry.create("encoder", "mlp", embedding_dim=8, input_shape=(1, 8, 8), hidden=(128,))
    loss_fn = registry.create("loss", "contrastive", margin=1.0)
    miner = registry.create("miner", "random-pairs", pairs_per_sample=4)
    optimizer = registry.create("optimizer", "adam", params=encoder.parameters(), lr=3e-3)

    def held_out_loss() -> float:
        with torch.no_grad():
            return loss_fn(encoder(test_x), test_y).item()

    before = held_out_loss()
    for _ in range(150):
        batch = torch.randint(0, len(train_y), (128,))
        emb = encoder(train_x[batch])
        loss = loss_fn(emb, train_y[batch], miner(emb, train_y[batch]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_out_loss()

    with torch.no_grad():
        knn = KNeighborsClassifier(n_neighbors=1).fit(encoder(train_x).numpy(), train_y.numpy())
        accuracy = knn.score(encoder(test_x).numpy(), test_y.numpy())
    assert after < before / 3
    assert accuracy > 0.8  # chance is 0.1


def test_a_resumed_run_with_a_proxy_loss_ends_as_an_uninterrupted_one(tmp_path):
    """The loss's own parameters (ProxyAnchor's proxies) are in every checkpoint, so a resume continues them."""
    import shutil

    from conftest import tiny_recipe
    from safetensors.torch import load_file

    from metriclab.runs import Run
    from metriclab.training.engine import train

    fields = {"loss": "pml.ProxyAnchorLoss", "miner": None, "embedding_dim": 8, "epochs": 1, "max_steps": 12}
    fields |= {"embed_train": False, "loss_lr": 0.1}
    straight = tmp_path / "straight"
    train(tiny_recipe(straight, checkpoint_every=5, keep_checkpoints=10, **fields))
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    (resumed / "model.safetensors").unlink()
    checkpoint = resumed / "checkpoints" / "step_00000005"
    assert set(load_file(checkpoint / "loss.safetensors")) == {"proxies"}
    train(tiny_recipe(resumed, resume=str(checkpoint), **fields))
    expected, got = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    final = Run.latest_checkpoint_in(straight).name
    assert torch.equal(
        load_file(straight / "checkpoints" / final / "loss.safetensors")["proxies"],
        load_file(resumed / "checkpoints" / final / "loss.safetensors")["proxies"],
    )
