"""A dataset's own evaluation protocol: queries searched in a gallery, and metrics per category.

Datasets such as In-Shop mark which test images are queries and which are the gallery they are
searched in (open-metric-learning's ``is_query``/``is_gallery`` columns); leave-one-out over the
whole test set would score another task. A query that is also a gallery image is left out of its
own ranking: where every test image is both, the protocol is leave-one-out after all, and
gallery-only images beside such queries are distractors (open-metric-learning's convention). With a
``category`` per image, the queries of each category are scored on their own, searched in the whole
gallery (as open-metric-learning reports them; :func:`category_metrics` for datasets that mark no
queries, such as Stanford Online Products with its super-categories).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from metriclab.errors import MetricLabError
from metriclab.metrics.retrieval import matches, retrieval_metrics


def protocol_metrics(
    embeddings: np.ndarray,
    labels: np.ndarray,
    is_query: np.ndarray | None,
    is_gallery: np.ndarray | None,
    categories: Sequence[str] | None,
    **search: Any,
) -> dict[str, Any]:
    """A test set's scores by its dataset's own protocol: :func:`query_gallery_metrics` where it marks queries and
    gallery, :func:`category_metrics` (as ``by_category``) where it only has categories, else nothing (``{}``).
    """
    if is_query is not None and is_gallery is not None:
        return query_gallery_metrics(embeddings, labels, is_query, is_gallery, categories, **search)
    if categories is not None:
        return {"by_category": category_metrics(embeddings, labels, categories, **search)}
    return {}


def query_gallery_metrics(
    embeddings: np.ndarray,
    labels: np.ndarray,
    is_query: np.ndarray,
    is_gallery: np.ndarray,
    categories: Sequence[str] | None = None,
    **search: Any,
) -> dict[str, Any]:
    """``{"query_gallery": metrics, "by_category": {category: metrics}}`` of the marked queries against the gallery.

    A query that is also a gallery image is left out of its own ranking, as open-metric-learning does: with every
    image both, this is leave-one-out; with some gallery-only images, they are distractors. ``queries_scored``
    counts the queries whose class the gallery holds (the ranking metrics' queries). ``search`` goes to
    :func:`metriclab.metrics.retrieval.retrieval_metrics` (ks, metric, knn_k, seed).
    """
    is_query, is_gallery = np.asarray(is_query, dtype=bool), np.asarray(is_gallery, dtype=bool)
    if len(is_query) != len(labels) or len(is_gallery) != len(labels):
        raise MetricLabError(
            f"the dataset marks {len(is_query)} test images as query/gallery but the run has {len(labels)} test "
            "embeddings; re-embed them with `metriclab evaluate RUN --reembed`"
        )
    if not is_query.any() or not is_gallery.any():
        raise MetricLabError("the dataset marks no test image as query or none as gallery; mark both")
    query, gallery = np.flatnonzero(is_query), np.flatnonzero(is_gallery)
    out: dict[str, Any] = {
        "query_gallery": {**_scores(embeddings, labels, query, gallery, search), "gallery": len(gallery)}
    }
    if out["query_gallery"]["queries_scored"] == 0:
        raise MetricLabError(
            f"none of the dataset's {len(query)} queries has an image of its class in the gallery (besides itself), "
            "so there is nothing to score; mark as gallery images of the queries' classes"
        )
    if categories is not None:
        names = _names(categories, labels)
        out["by_category"] = {
            name: _scores(embeddings, labels, query[names[query] == name], gallery, search)
            for name in sorted(set(names[query]))
        }
    return out


def _scores(
    embeddings: np.ndarray, labels: np.ndarray, query: np.ndarray, gallery: np.ndarray, search: dict[str, Any]
) -> dict[str, Any]:
    """Metrics of test images ``query`` searched in test images ``gallery``, each query without its own image."""
    own, found = _matched(np.asarray(labels), query, gallery)
    search = {**search, "clustering": False}
    if len(gallery) == len(labels) and len(query) == len(labels):  # leave-one-out over the whole test set
        scores = retrieval_metrics(embeddings, labels, **search)
    else:
        scores = retrieval_metrics(
            embeddings[query], labels[query], embeddings[gallery], labels[gallery], exclude=own, **search
        )
    return {**scores, "queries": len(query), "queries_scored": found}


def own_positions(n: int, query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Each of test images ``query``'s position among test images ``gallery`` (of ``n``), -1 where not one of them:
    the ``exclude`` of :func:`metriclab.metrics.retrieval.retrieval_metrics`."""
    position = np.full(n, -1, dtype=np.int64)
    position[gallery] = np.arange(len(gallery))
    return position[query]


def queries_with_matches(labels: np.ndarray, is_query: np.ndarray, is_gallery: np.ndarray) -> int:
    """How many marked queries have an image of their class in the marked gallery, besides themselves."""
    return _matched(np.asarray(labels), np.flatnonzero(is_query), np.flatnonzero(is_gallery))[1]


def _matched(labels: np.ndarray, query: np.ndarray, gallery: np.ndarray) -> tuple[np.ndarray, int]:
    """``(own, found)``: each query's position in the gallery (:func:`own_positions`), and how many queries have
    a gallery image of their class besides themselves (the ranking metrics' queries)."""
    own = own_positions(len(labels), query, gallery)
    return own, int((matches(labels[query], labels[gallery], own) > 0).sum())


def _names(categories: Sequence[str], labels: np.ndarray) -> np.ndarray:
    names = np.asarray([str(c) for c in categories])
    if len(names) != len(labels):
        raise MetricLabError(
            f"the dataset gives {len(names)} test images a category but the run has {len(labels)} test embeddings; "
            "re-embed them with `metriclab evaluate RUN --reembed`"
        )
    return names


def category_metrics(
    embeddings: np.ndarray, labels: np.ndarray, categories: Sequence[str], **search: Any
) -> dict[str, dict[str, float]]:
    """``{category: metrics}`` of the leave-one-out protocol: each category's images searched in the whole test
    set, each leaving itself out, so a category's scores are its images' share of the overall ones.

    ``search`` goes to :func:`metriclab.metrics.retrieval.retrieval_metrics` (ks, metric, knn_k, seed).
    """
    names = _names(categories, labels)
    everything = np.arange(len(labels))
    return {
        name: _scores(embeddings, labels, np.flatnonzero(names == name), everything, search)
        for name in sorted(set(names))
    }
