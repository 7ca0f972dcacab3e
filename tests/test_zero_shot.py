"""Under the class-disjoint protocol the train split is no gallery for the test queries."""

from __future__ import annotations

import numpy as np

from metriclab.metrics.retrieval import evaluate_embeddings


def test_train_gallery_is_searched_only_when_it_shares_classes_with_the_test_set():
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(40, 4)).astype(np.float32), rng.normal(size=(30, 4)).astype(np.float32)
    train_labels, test_labels = np.repeat(np.arange(4), 10), np.repeat(np.arange(3), 10)
    shared = evaluate_embeddings(train, train_labels, test, test_labels, num_pairs=100, clustering=False)
    assert "test_vs_train" in shared
    disjoint = evaluate_embeddings(train, train_labels + 10, test, test_labels, num_pairs=100, clustering=False)
    assert "test_vs_train" not in disjoint  # zero-shot: no query has a match among the train classes
    assert disjoint["test_loo"] == shared["test_loo"]
