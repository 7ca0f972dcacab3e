"""A dataset's own evaluation protocol: queries searched in a gallery, and metrics per category.

Datasets such as In-Shop mark which test images are queries and which are the gallery they are
searched in (open-metric-learning's ``is_query``/``is_gallery`` columns); leave-one-out over the
whole test set would score another task. Where every test image is both, the protocol is
leave-one-out after all. With a ``category`` per image, the queries of each category are scored
on their own, searched in the whole gallery (as open-metric-learning reports them); in leave-one-out,
in the whole test set (:func:`category_metrics`, also for datasets that mark no queries, such as
Stanford Online Products with its super-categories).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from metriclab.errors import MetricLabError
from metriclab.metrics.retrieval import retrieval_metrics


def query_gallery_metrics(
    embeddings: np.ndarray,
    labels: np.ndarray,
    is_query: np.ndarray,
    is_gallery: np.ndarray,
    categories: Sequence[str] | None = None,
    **search: Any,
) -> dict[str, Any]:
    """``{"query_gallery": metrics, "by_category": {category: metrics}}`` of the marked queries against the gallery.

    ``search`` goes to :func:`metriclab.metrics.retrieval.retrieval_metrics` (ks, metric, knn_k, seed).
    Raises MetricLabError when images are both query and gallery but not all of them are.
    """
    is_query, is_gallery = np.asarray(is_query, dtype=bool), np.asarray(is_gallery, dtype=bool)
    if len(is_query) != len(labels) or len(is_gallery) != len(labels):
        raise MetricLabError(
            f"the dataset marks {len(is_query)} test images as query/gallery but the run has {len(labels)} test "
            "embeddings; re-embed them with `metriclab evaluate RUN --reembed`"
        )
    if not is_query.any() or not is_gallery.any():
        raise MetricLabError("the dataset marks no test image as query or none as gallery; mark both")
    both = is_query & is_gallery
    search = {**search, "clustering": False}
    if both.all():  # every image is searched for among all the others: leave-one-out
        query, gallery = np.flatnonzero(is_query), None
    elif both.any():
        raise MetricLabError(
            f"{int(both.sum())} test images are both query and gallery while others are only one of them; mark "
            "the query and gallery images as two disjoint sets (In-Shop), or every image as both (leave-one-out)"
        )
    else:
        query, gallery = np.flatnonzero(is_query), np.flatnonzero(is_gallery)

    def score(rows: np.ndarray) -> dict[str, float]:
        if gallery is None:
            return retrieval_metrics(embeddings[rows], labels[rows], **search)
        return retrieval_metrics(embeddings[rows], labels[rows], embeddings[gallery], labels[gallery], **search)

    out: dict[str, Any] = {
        "query_gallery": {
            **score(query),
            "queries": len(query),
            "gallery": len(gallery if gallery is not None else query),
        }
    }
    if categories is not None and gallery is not None:
        names = np.asarray([str(c) for c in categories])
        out["by_category"] = {name: score(query[names[query] == name]) for name in sorted(set(names[query]))}
    elif categories is not None:
        out["by_category"] = category_metrics(embeddings, labels, categories, **search)
    return out


def category_metrics(
    embeddings: np.ndarray, labels: np.ndarray, categories: Sequence[str], **search: Any
) -> dict[str, dict[str, float]]:
    """``{category: metrics}`` of the leave-one-out protocol: each category's images searched in the whole test
    set, each leaving itself out, so a category's scores are its images' share of the overall ones.

    ``search`` goes to :func:`metriclab.metrics.retrieval.retrieval_metrics` (ks, metric, knn_k, seed).
    """
    names = np.asarray([str(c) for c in categories])
    if len(names) != len(labels):
        raise MetricLabError(
            f"the dataset gives {len(names)} test images a category but the run has {len(labels)} test embeddings; "
            "re-embed them with `metriclab evaluate RUN --reembed`"
        )
    search = {**search, "clustering": False}
    out = {}
    for name in sorted(set(names)):
        rows = np.flatnonzero(names == name)
        out[name] = retrieval_metrics(embeddings[rows], labels[rows], embeddings, labels, exclude=rows, **search)
    return out
