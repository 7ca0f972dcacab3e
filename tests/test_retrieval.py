"""metriclab.metrics.retrieval against independent computations: pml's AccuracyCalculator, scikit-learn, numpy."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN
from sklearn.metrics import adjusted_mutual_info_score, roc_auc_score
from sklearn.neighbors import KNeighborsClassifier

from metriclab.errors import MetricLabError
from metriclab.metrics import retrieval
from metriclab.metrics.retrieval import (
    _nearest,
    _select_by_topk,
    evaluate_embeddings,
    knn,
    retrieval_metrics,
    sample_pairs,
    verification_metrics,
)

HAS_FAISS = importlib.util.find_spec("faiss") is not None


def blobs(n: int, classes: int, dim: int = 16, spread: float = 1.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping gaussian classes (metrics well away from 0 and 1), float32 like model outputs."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centers = rng.normal(size=(classes, dim))
    return (centers[labels] + spread * rng.normal(size=(n, dim))).astype(np.float32), labels


def awkward_set(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Blobs plus exact duplicates inside a class and one class with a single member."""
    emb, labels = blobs(300, 8, seed=seed)
    emb[10:14] = emb[5]  # four duplicates of item 5, same class
    labels[10:14] = labels[5]
    labels[42] = 99  # a class of one
    return emb, labels


def pairwise(a: np.ndarray, b: np.ndarray, metric: str = "euclidean") -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    if metric == "cosine":
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
        return 1 - a @ b.T
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


# --- knn -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_knn_equals_brute_force_for_every_chunk_size(metric):
    gallery, _ = blobs(301, 5)
    queries, _ = blobs(37, 5, seed=1)
    expected = np.argsort(pairwise(queries, gallery, metric), axis=1, kind="stable")[:, :10]
    results = [knn(queries, gallery, 10, metric=metric, chunk_size=c) for c in (None, 1, 7, 64)]
    for distances, indices in results:
        np.testing.assert_array_equal(indices.numpy(), expected)
        brute = np.take_along_axis(pairwise(queries, gallery, metric), expected, 1)
        np.testing.assert_allclose(distances.numpy(), brute, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(distances, results[0][0], rtol=1e-5, atol=1e-5)


def test_knn_reports_euclidean_distances_of_large_embeddings_exactly():
    """Embeddings far from the origin (norms ~80): an item's own copy is at 0, not at float32 cancellation's 1e-2."""
    rng = np.random.default_rng(0)
    gallery = (rng.standard_normal((2000, 64)) * 3 + 10).astype(np.float32)
    distances, indices = knn(gallery[:50], gallery, 5)
    assert (indices[:, 0].numpy() == np.arange(50)).all() and (distances[:, 0] == 0).all()
    exact = np.linalg.norm(gallery[:50, None].astype(np.float64) - gallery[indices.numpy()], axis=2)
    np.testing.assert_allclose(distances.numpy(), exact, rtol=1e-6, atol=1e-5)


def test_knn_on_a_gallery_large_enough_to_sample_thresholds():
    gallery, _ = blobs(3001, 5, dim=8)
    queries = gallery[:40]
    d = pairwise(queries, gallery)
    d[np.arange(40), np.arange(40)] = np.inf
    expected = np.argsort(d, axis=1, kind="stable")[:, :25]
    for chunk in (None, 9):
        _, indices = knn(queries, gallery, 25, exclude_self=False, chunk_size=chunk)
        assert np.array_equal(indices[:, 0].numpy(), np.arange(40))
        np.testing.assert_array_equal(indices[:, 1:].numpy(), expected[:, :24])


@pytest.mark.parametrize("tied", [False, True])
def test_both_selection_paths_equal_a_stable_sort(tied):
    # The CPU path selects by a sampled threshold (rows it misjudges are redone); the GPU path uses
    # torch.topk and re-sorts rows whose k-th key is tied. Both run here on CPU tensors.
    rng = np.random.default_rng(1)
    if tied:
        keys = rng.integers(-2, 60, (300, 3000)).astype(np.float32)  # ~50 copies of each value per row
        keys[keys == 0] = rng.choice([-0.0, 0.0], size=int((keys == 0).sum()))  # -0.0 equals 0.0
    else:
        keys = rng.normal(size=(300, 3000)).astype(np.float32)
    need = rng.integers(1, 400, 300)
    expected = np.argsort(keys, axis=1, kind="stable")
    got = _nearest(torch.from_numpy(keys), need)
    for row in range(300):
        np.testing.assert_array_equal(got[row, : need[row]], expected[row, : need[row]])
    by_topk = _select_by_topk(torch.from_numpy(keys), 150)
    np.testing.assert_array_equal(by_topk, expected[:, :150])


def test_rows_whose_sampled_threshold_keeps_too_few_are_redone():
    # The CPU path places each row's threshold from the keys of a fixed random sample of columns. Make
    # the sampled columns the nearest of every row: the first threshold then keeps far fewer than
    # `need` keys, and it must be raised (up to the whole row) rather than return a short ranking.
    rng = np.random.default_rng(2)
    n = 3000
    sampled = np.zeros(n, dtype=bool)
    sampled[np.random.default_rng(0).choice(n, retrieval.SAMPLE, replace=False)] = True
    keys = rng.normal(size=(40, n)).astype(np.float32)
    keys[:, sampled] -= 100
    need = np.concatenate([np.full(20, 600), rng.integers(1, n, 20)])
    got = _nearest(torch.from_numpy(keys), need)
    expected = np.argsort(keys, axis=1, kind="stable")
    for row in range(40):
        np.testing.assert_array_equal(got[row, : need[row]], expected[row, : need[row]])


@pytest.mark.parametrize("case", ["distinct", "tied", "too-few-sampled", "too-many-sampled"])
def test_ranking_sums_from_sorted_codes_equal_those_of_the_full_ranking(case):
    """The CPU metrics keep each row's keys under a sampled threshold, code them with their column and class bit
    and sort the codes: equal keys in column order, -0.0 equal to 0.0; a threshold that kept too few is raised,
    one that kept too many is bisected back, and rows where no threshold fits take the full ranking."""
    from metriclab.metrics.kernels import ranking_sums

    rng = np.random.default_rng(3)
    rows, n, classes = 60, 4003, 6  # not a multiple of 16: the vector kernels' tails run too
    gallery = rng.integers(0, classes, n).astype(np.int32)
    own = rng.integers(0, classes + 1, rows).astype(np.int32)  # class 6 has no gallery item: R = 0
    keys = rng.normal(size=(rows, n)).astype(np.float32)
    columns = retrieval._sample_columns(n)
    if case == "tied":
        keys = np.round(keys * 4).astype(np.float32)  # hundreds of copies of each value
        keys[keys == 0] = rng.choice([-0.0, 0.0], size=int((keys == 0).sum()))
    if case.endswith("sampled"):  # the sampled keys are the nearest (or farthest) of every row
        keys[:, columns] += -100 if case == "too-few-sampled" else 100
    keys[np.arange(rows), rng.integers(0, n, rows)] = np.inf  # leave-one-out's own column
    relevant = np.minimum(np.bincount(gallery, minlength=classes + 1)[own], n - 1)
    top, vote_k = np.array([1, 10, 3], dtype=np.int64), 5
    need = np.maximum(np.maximum(top.max(), vote_k), relevant)
    expected = ranking_sums(gallery[np.argsort(keys, axis=1, kind="stable")], own, relevant, top, vote_k)
    got = retrieval._ranking_sums_on_host(keys, need, gallery, own, relevant, top, vote_k)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)
    assert expected[-1] > 0 and expected[0] > 0


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_gpu_code_path_gives_the_host_results(monkeypatch, metric):
    # On a GPU, keys come from torch.addmm and selection from torch.topk; run that path on CPU tensors.
    emb, labels = awkward_set(seed=4)
    big, _ = blobs(2600, 5, dim=8, seed=4)
    host = retrieval_metrics(emb, labels, metric=metric, clustering=False)
    host_knn = knn(big[:50], big, 20, metric=metric, exclude_self=False)
    monkeypatch.setattr(retrieval, "_on_host", lambda device: False)
    assert retrieval_metrics(emb, labels, metric=metric, clustering=False) == pytest.approx(host, abs=1e-12)
    distances, indices = knn(big[:50], big, 20, metric=metric, exclude_self=False)
    assert torch.equal(indices, host_knn[1])
    torch.testing.assert_close(distances, host_knn[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("intel", [False, True])
def test_both_cpu_product_libraries_give_the_brute_force_neighbours(monkeypatch, intel):
    # Intel CPUs multiply the keys with torch (MKL), others with numpy (OpenBLAS); run both here.
    monkeypatch.setattr(retrieval, "_intel_cpu", lambda: intel)
    products = []
    mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **kw: products.append(1) or mm(*a, **kw))
    threads = torch.get_num_threads()
    gallery, _ = blobs(3001, 5, dim=8, seed=6)
    queries, _ = blobs(60, 5, dim=8, seed=7)
    for metric in ("euclidean", "cosine"):
        d = pairwise(queries, gallery, metric)
        expected = np.argsort(d, axis=1, kind="stable")[:, :30]
        for chunk in (None, 7):
            distances, indices = knn(queries, gallery, 30, metric=metric, chunk_size=chunk)
            np.testing.assert_array_equal(indices.numpy(), expected)
            np.testing.assert_allclose(distances.numpy(), np.take_along_axis(d, expected, 1), rtol=1e-4, atol=1e-4)
    assert bool(products) == (intel and torch.backends.mkl.is_available())
    assert torch.get_num_threads() == threads  # the workers' share of torch's threads is given back


def test_knn_orders_ties_by_index_and_excludes_only_self():
    base = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [5.0, 5.0]], dtype=np.float32)
    gallery = base[[3, 1, 0, 2, 0, 1, 0, 2]]  # 0 at rows 2, 4, 6; 1 at rows 1, 5; 2 at rows 3, 7
    for chunk in (None, 1):
        _, idx = knn(base[[0]], gallery, 8, chunk_size=chunk)
        assert idx.tolist() == [[2, 4, 6, 1, 5, 3, 7, 0]]
        # the k-th place falls inside a tie: the lowest indices win, the same for every chunking
        _, idx = knn(base[[0, 1]], gallery, 2, chunk_size=chunk)
        assert idx.tolist() == [[2, 4], [1, 5]]
        # leave-one-out masks the query's own row, not its duplicates
        dist, idx = knn(gallery, gallery, 3, exclude_self=True, chunk_size=chunk)
        assert idx[4].tolist() == [2, 6, 1]
        assert idx[2].tolist() == [4, 6, 1]
        assert dist[4, :2].tolist() == [0.0, 0.0]
        # exclude: each query's own gallery index (-1: not in the gallery) is skipped, its duplicates are not
        _, idx = knn(base[[0, 1, 3]], gallery, 3, exclude=[4, -1, 0], chunk_size=chunk)
        assert idx.tolist() == [[2, 6, 1], [1, 5, 2], [3, 7, 1]]
    with pytest.raises(MetricLabError, match="one gallery index"):
        knn(base, gallery, 2, exclude=[0, 1])


def test_knn_clamps_k_and_rejects_bad_input():
    emb, _ = blobs(20, 3)
    dist, idx = knn(emb, emb, 50, exclude_self=True)
    assert idx.shape == (20, 19)
    assert not (idx == torch.arange(20)[:, None]).any()
    assert torch.all(dist[:, 1:] >= dist[:, :-1])
    with pytest.raises(MetricLabError, match="dimensions"):
        knn(emb, emb[:, :3], 2)
    with pytest.raises(MetricLabError, match="metric"):
        knn(emb, emb, 2, metric="manhattan")
    for value in (np.nan, np.inf, -np.inf):
        bad = emb.copy()
        bad[3, 1] = value
        with pytest.raises(MetricLabError, match="NaN or inf"):
            knn(bad, emb, 2)
    huge = np.full((20, 3), 3e38, np.float32)  # every entry finite, their float32 sum not: still accepted
    assert not torch.isfinite(torch.from_numpy(huge).sum())
    assert torch.equal(retrieval._embeddings(huge, "huge"), torch.from_numpy(huge))


def test_cosine_and_euclidean_rank_normalized_vectors_alike():
    emb, _ = blobs(250, 6)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    d_euc, i_euc = knn(emb, emb, 15, exclude_self=True)
    d_cos, i_cos = knn(emb, emb, 15, metric="cosine", exclude_self=True)
    assert torch.equal(i_euc, i_cos)
    torch.testing.assert_close(d_euc**2, 2 * d_cos, rtol=1e-4, atol=1e-5)


# --- retrieval metrics ------------------------------------------------------------------------------


def pml_accuracy(query, query_labels, reference=None, reference_labels=None, metric="euclidean", default_knn=False):
    knn_func = None
    if not default_knn:
        distance = CosineSimilarity() if metric == "cosine" else LpDistance(normalize_embeddings=False)
        knn_func = CustomKNN(distance)
    calculator = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
        k="max_bin_count",
        device=torch.device("cpu"),
        knn_func=knn_func,
    )
    ref_includes_query = reference is None
    return calculator.get_accuracy(
        query,
        query_labels,
        query if reference is None else reference,
        query_labels if reference is None else reference_labels,
        ref_includes_query=ref_includes_query,
    )


SETTINGS = [  # (metric, pml's default knn_func)
    pytest.param("euclidean", False, id="euclidean-CustomKNN"),
    pytest.param("cosine", False, id="cosine-CustomKNN"),
    # The default knn_func is FaissKNN (euclidean IndexFlatL2): it needs faiss, which metriclab does not depend on.
    pytest.param(
        "euclidean",
        True,
        id="euclidean-default-faiss",
        marks=pytest.mark.skipif(not HAS_FAISS, reason="faiss is not installed"),
    ),
]


@pytest.mark.parametrize(("metric", "default_knn"), SETTINGS)
def test_leave_one_out_equals_accuracy_calculator(metric, default_knn):
    emb, labels = awkward_set()
    ours = retrieval_metrics(emb, labels, metric=metric, clustering=False)
    theirs = pml_accuracy(emb, labels, metric=metric, default_knn=default_knn)
    assert ours["precision@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-12)
    assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-12)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-12)
    assert 0.2 < ours["map@r"] < 0.9  # a set where the metrics can disagree


@pytest.mark.parametrize(("metric", "default_knn"), SETTINGS)
def test_query_vs_gallery_equals_accuracy_calculator(metric, default_knn):
    emb, labels = awkward_set(seed=3)
    queries, q_labels, gallery, g_labels = emb[:120], labels[:120].copy(), emb[120:], labels[120:]
    q_labels[:3] = 77  # a query class the gallery lacks: lone, excluded on both sides
    ours = retrieval_metrics(queries, q_labels, gallery, g_labels, metric=metric, clustering=False)
    theirs = pml_accuracy(queries, q_labels, gallery, g_labels, metric=metric, default_knn=default_knn)
    assert ours["precision@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-12)
    assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-12)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-12)


def brute_force_precision_recall(queries, q_labels, gallery, g_labels, ks, leave_one_out):
    d = pairwise(queries, gallery)
    if leave_one_out:
        np.fill_diagonal(d, np.inf)
    order = np.argsort(d, axis=1, kind="stable")[:, : len(gallery) - leave_one_out]
    same = g_labels[order] == q_labels[:, None]
    has_match = same.any(1)  # R > 0: the lone queries are left out
    out = {}
    for k in ks:
        top = same[has_match, :k]
        out[f"precision@{k}"] = top.sum(1).mean() / top.shape[1]
        out[f"recall@{k}"] = top.any(1).mean()
    return out


def test_precision_and_recall_at_k_equal_brute_force_with_clamped_k():
    emb, labels = awkward_set(seed=5)
    ks = (1, 3, 10, 1000)  # 1000 exceeds the gallery: clamped
    for args, loo in (((emb, labels), True), ((emb[:100], labels[:100], emb[100:], labels[100:]), False)):
        ours = retrieval_metrics(*args, ks=ks, clustering=False, chunk_size=16)
        expected = brute_force_precision_recall(*(args if not loo else (emb, labels, emb, labels)), ks, loo)
        for key, value in expected.items():
            assert ours[key] == pytest.approx(value, abs=1e-12), key
    assert ours["recall@1000"] == 1.0


def test_chunking_does_not_change_the_metrics():
    emb, labels = awkward_set(seed=2)
    whole = retrieval_metrics(emb, labels, clustering=False)
    chunked = retrieval_metrics(emb, labels, clustering=False, chunk_size=3)
    assert chunked == pytest.approx(whole, abs=1e-12)  # only the summation order differs


def test_knn_accuracy_equals_sklearn_vote_with_ties_to_the_nearest():
    emb, labels = blobs(240, 6, seed=4)
    # uniform votes, and a tie between labels goes to the one holding the nearer neighbour
    weights = lambda dist: np.ones_like(dist) + 1e-3 * 0.5 ** np.arange(dist.shape[1])  # noqa: E731
    for k in (4, 5):
        d = pairwise(emb, emb)
        np.fill_diagonal(d, d.max() * 10)  # leave-one-out: the query itself is never among its k nearest
        clf = KNeighborsClassifier(n_neighbors=k, weights=weights, metric="precomputed").fit(d, labels)
        ours = retrieval_metrics(emb, labels, knn_k=k, clustering=False)["knn_accuracy"]
        assert ours == pytest.approx(np.mean(clf.predict(d) == labels), abs=1e-12)
        clf = KNeighborsClassifier(n_neighbors=k, weights=weights, algorithm="brute").fit(emb[80:], labels[80:])
        ours = retrieval_metrics(emb[:80], labels[:80], emb[80:], labels[80:], knn_k=k, clustering=False)
        assert ours["knn_accuracy"] == pytest.approx(np.mean(clf.predict(emb[:80]) == labels[:80]), abs=1e-12)


def entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_nmi_and_ami_score_the_clusters_the_embedding_makes():
    """Five far-apart tight clusters of 60 points; cluster c holds 0, 6, 12, 18 or 30 points of class c + 1.

    KMeans with one cluster per class can only find the five clusters, so the expected scores follow from
    the known partition: NMI from its contingency table in numpy, AMI from scikit-learn's formula.
    """
    rng = np.random.default_rng(3)
    clusters = np.repeat(np.arange(5), 60)
    moved = np.array([0, 6, 12, 18, 30])[clusters]  # classes of unequal sizes: 30 to 72 points
    labels = np.where(np.arange(300) % 60 < 60 - moved, clusters, (clusters + 1) % 5)
    emb = (100 * np.eye(16)[clusters] + 0.1 * rng.normal(size=(300, 16))).astype(np.float32)
    order = rng.permutation(300)  # classes and clusters interleaved, as in a real test set
    emb, labels, clusters = emb[order], labels[order], clusters[order]
    table = np.zeros((5, 5))
    np.add.at(table, (labels, clusters), 1)
    joint = table / table.sum()
    outer = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
    mutual_information = float((joint[joint > 0] * np.log(joint[joint > 0] / outer[joint > 0])).sum())
    nmi = mutual_information / ((entropy(table.sum(1)) + entropy(table.sum(0))) / 2)  # arithmetic normalisation
    assert 0.3 < nmi < 0.9
    ours = retrieval_metrics(emb, labels, seed=7, kmeans_n_init=3)
    assert ours["nmi"] == pytest.approx(nmi, abs=1e-9)
    assert ours["ami"] == pytest.approx(adjusted_mutual_info_score(labels, clusters), abs=1e-9)
    assert ours["ami"] < ours["nmi"]  # chance agreement is discounted
    # Queries against a gallery cluster the queries only.
    gallery = retrieval_metrics(emb, labels, emb[::-1] + 1, labels[::-1], seed=7, kmeans_n_init=3)
    assert gallery["nmi"] == pytest.approx(nmi, abs=1e-9)


def test_separated_classes_score_perfectly():
    emb, labels = blobs(200, 4, spread=0.01)
    emb = emb * 10
    out = evaluate_embeddings(emb, labels, emb, labels, num_pairs=400)
    for section in ("test_loo", "test_vs_train"):
        assert out[section]["precision@1"] == 1.0
        assert out[section]["map@r"] == pytest.approx(1.0)
        assert out[section]["knn_accuracy"] == 1.0
    assert out["test_loo"]["nmi"] == pytest.approx(1.0)
    assert out["verification"]["roc_auc"] == 1.0
    assert out["verification"]["eer"] == 0.0
    assert out["verification"]["verification_accuracy"] == 1.0


def test_every_query_lone_gives_nan():
    emb, _ = blobs(10, 2)
    out = retrieval_metrics(emb, np.arange(10), clustering=False)
    assert np.isnan(out["map@r"]) and np.isnan(out["precision@1"])
    assert out["knn_accuracy"] == 0.0


# --- verification -----------------------------------------------------------------------------------


def test_sample_pairs_is_balanced_valid_and_deterministic():
    _, labels = awkward_set()
    first, second, same = sample_pairs(labels, 1000, seed=1)
    assert same.sum() == 500 and (~same).sum() == 500
    assert np.all((labels[first] == labels[second]) == same)
    assert np.all(first != second)
    assert np.all(labels[first[same]] != 99)  # the class of one cannot form a positive pair
    again = sample_pairs(torch.as_tensor(labels), 1000, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip((first, second, same), again, strict=True))
    assert not np.array_equal(first, sample_pairs(labels, 1000, seed=2)[0])
    with pytest.raises(MetricLabError, match="two classes"):
        sample_pairs(np.zeros(5, dtype=int), 10)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_verification_equals_sklearn_and_brute_force(metric):
    emb, labels = blobs(300, 8, seed=6)
    out = verification_metrics(torch.as_tensor(emb), labels, metric=metric, num_pairs=600, seed=3)
    first, second, same = sample_pairs(labels, 600, seed=3)
    d = np.diag(pairwise(emb[first], emb[second], metric))
    assert out["roc_auc"] == pytest.approx(roc_auc_score(same, -d), abs=1e-12)
    # equal error rate: where false accepts meet false rejects, within one pair's step
    cuts = np.sort(d)
    far = np.array([(d[~same] <= t).mean() for t in cuts])
    frr = np.array([(d[same] > t).mean() for t in cuts])
    assert out["eer"] == pytest.approx(np.min(np.maximum(far, frr)), abs=2 / 300)
    # threshold: best accuracy on the first half of positives and of negatives, scored on the rest
    fit = np.zeros(600, dtype=bool)
    fit[:150] = fit[300:450] = True
    best = max(np.mean((d[fit] <= t) == same[fit]) for t in np.concatenate([[-1.0], cuts]))
    assert np.mean((d[fit] <= out["threshold"]) == same[fit]) == best
    assert out["verification_accuracy"] == np.mean((d[~fit] <= out["threshold"]) == same[~fit])
    assert 0.6 < out["verification_accuracy"] < 0.95


def test_verification_rejects_bad_splits():
    emb, labels = blobs(50, 3)
    with pytest.raises(MetricLabError, match="holdout_fraction"):
        verification_metrics(emb, labels, holdout_fraction=1.0)
    with pytest.raises(MetricLabError, match="num_pairs"):
        verification_metrics(emb, labels, num_pairs=2)


# --- evaluate_embeddings -----------------------------------------------------------------------------


def test_evaluate_embeddings_sections_and_input_types():
    train, train_labels = blobs(200, 5, seed=8)
    test, test_labels = blobs(100, 5, seed=9)
    from_numpy = evaluate_embeddings(train, train_labels, test, test_labels, ks=(1, 5), num_pairs=500)
    from_torch = evaluate_embeddings(
        torch.as_tensor(train),
        torch.as_tensor(train_labels),
        torch.as_tensor(test),
        torch.as_tensor(test_labels),
        ks=(1, 5),
        num_pairs=500,
    )
    assert from_numpy == from_torch
    assert set(from_numpy) == {"test_loo", "test_vs_train", "verification"}
    assert from_numpy["test_vs_train"] == retrieval_metrics(
        test, test_labels, train, train_labels, ks=(1, 5), clustering=False
    )
    assert "nmi" in from_numpy["test_loo"] and "nmi" not in from_numpy["test_vs_train"]
    assert all(isinstance(v, float) for section in from_numpy.values() for v in section.values())
    without_train = evaluate_embeddings(None, None, test, test_labels, ks=(1, 5), num_pairs=500)
    assert set(without_train) == {"test_loo", "verification"}
    assert without_train["test_loo"] == from_numpy["test_loo"]


def test_scores_do_not_depend_on_the_threads_a_process_has():
    """One thread (a process of `evaluate --processes N`) scores bit for bit as two: its products run on one BLAS
    thread as each worker's do, since a product's rounding can depend on the threads sharing it (OpenBLAS, AMD)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 20000)
    emb = (rng.standard_normal((20000, 64)) + labels[:, None] * 0.3).astype(np.float32)
    before, scores = torch.get_num_threads(), []
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            scores.append(retrieval_metrics(emb[:2000], labels[:2000], emb, labels, ks=(1,), clustering=False))
    finally:
        torch.set_num_threads(before)
    assert scores[0] == scores[1]


def test_a_test_set_of_one_class_is_scored_without_pair_verification():
    """A folder's test split can hold a single class: no negative pairs exist, so verification is left out."""
    test, _ = blobs(30, 1, seed=3)
    out = evaluate_embeddings(None, None, test, np.zeros(30, dtype=np.int64), ks=(1,), num_pairs=100)
    assert set(out) == {"test_loo"} and out["test_loo"]["precision@1"] == 1.0


# What numba compiles for an AVX2 CPU without AVX-512 (Haswell's features): the table-driven packing of the kernels.
AVX2_ONLY = "+avx,+avx2,+bmi,+bmi2,+cx16,+f16c,+fma,+lzcnt,+movbe,+popcnt,+sse4.2,+ssse3"


@pytest.mark.slow  # compiles every ranking kernel twice more (generic, AVX2): ~60 s
def test_every_cpu_path_of_the_ranking_kernels_gives_the_same_results(tmp_path):
    """The vector kernels pack kept lanes by AVX-512's compress or, on AVX2 CPUs, by a permutation table; a CPU with
    neither runs plain loops (NUMBA_CPU_NAME=generic). Each path, through numba's dispatchers and the native object,
    must rank as the host does (ties, tails of rows not a multiple of 16, both metrics)."""
    script = """
import json, sys
import numpy as np
from metriclab.metrics import kernels, simd
from metriclab.metrics.retrieval import knn, retrieval_metrics
rng = np.random.default_rng(0)
x = np.round(rng.normal(size=(3001, 8)) * 2).astype(np.float32)  # many equal distances
y = rng.integers(0, 5, 3001)
out = {"paths": [simd.AVX512, simd.AVX2], "knn": knn(x[:40], x, 9)[1].tolist(), "native": kernels.native()}
for metric in ("cosine", "euclidean"):
    out[metric] = retrieval_metrics(x, y, x[::2], y[::2], metric=metric, clustering=False)
print(json.dumps(out))
"""

    def run(env: dict[str, str]) -> dict:
        done = subprocess.run([sys.executable, "-c", script], env=os.environ | env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.splitlines()[-1])

    host = run({})
    avx512, avx2 = host.pop("paths")
    paths = {"generic": ("generic", "")} | ({"avx2": ("haswell", AVX2_ONLY)} if avx2 else {})
    for name, (cpu, features) in paths.items():
        cache = tmp_path / name
        env = {"NUMBA_CPU_NAME": cpu, "NUMBA_CPU_FEATURES": features, "NUMBA_CACHE_DIR": str(cache)}
        other = run(env | {"METRICLAB_CACHE": str(cache)})
        assert other.pop("paths") == [False, name == "avx2"], name
        assert other == host, name
