"""Evaluation of a run behind ``metriclab evaluate``: a run directory in, metrics out (and into metrics.json).

The run's embeddings come from :mod:`metriclab.inference` (saved, or embedded from the weights); the
scores from :func:`metriclab.metrics.retrieval.evaluate_embeddings`, the same code that scores a run at
the end of training. Nothing here prints; slow steps are reported through the ``metriclab`` loggers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from metriclab.data import is_streaming
from metriclab.errors import MetricLabError
from metriclab.evaluation.processes import evaluate_in_processes, launched_group, launched_world
from metriclab.inference import run_dataset, run_embeddings, run_recipe
from metriclab.metrics.protocol import protocol_metrics
from metriclab.metrics.retrieval import METRICS, evaluate_embeddings
from metriclab.runs import Run, strict_json

log = logging.getLogger(__name__)
CLUSTERING_LIMIT = 10_000 * 1_000  # test items x classes above which k-means is skipped unless asked for


def evaluate_run(
    run: Run,
    ks: Sequence[int] = (1, 5, 10),
    metric: str | None = None,
    reembed: bool = False,
    dataset: str | None = None,
    data_dir: str | None = None,
    knn_k: int = 5,
    num_pairs: int = 20000,
    seed: int = 0,
    save: bool = True,
    processes: int = 1,
    clustering: bool | None = None,
    dataset_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """All retrieval and verification metrics of a run (see ``retrieval.evaluate_embeddings``), saved to metrics.json.

    A dataset that marks query and gallery images (``is_query``/``is_gallery`` of a CSV) is also scored
    on its own protocol: ``query_gallery`` and, with categories, ``by_category`` (:mod:`metriclab.metrics.protocol`).

    ``metric`` defaults to the recipe's. The result is stored as ``metrics.json["evaluations"][key]``
    with ``key`` the metric, or ``"<dataset>/<metric>"`` for another dataset; NaN becomes None.
    The queries are ranked on ``processes`` local processes, or on the processes of a launcher
    (``accelerate launch -m metriclab evaluate``), where only rank 0 saves: see
    :mod:`metriclab.evaluation.processes`. The scores equal one process's exactly. ``clustering``
    (NMI/AMI by k-means, one cluster per class) defaults to on unless the test set has more than
    ``CLUSTERING_LIMIT`` items x classes (Stanford Online Products' 60k x 11k would take hours).
    """
    metric = metric or run_recipe(run).metric
    if metric not in METRICS:
        raise MetricLabError(f"unknown metric '{metric}'; use one of {', '.join(METRICS)}")
    if not ks or any(int(k) < 1 for k in ks):
        raise MetricLabError(f"k values must be positive integers, got {list(ks)}; pass e.g. --ks 1,5,10")
    start = time.perf_counter()
    own = dataset is None and data_dir is None and not dataset_args
    described = run.config.get("dataset", {})
    # Loaded once, where it is needed: another dataset (or folder, or arguments) to embed, or the test files of one
    # scored on its own query/gallery protocol or per category (the run's saved embeddings need no dataset).
    needed = not own or described.get("protocol") == "query/gallery" or described.get("categories")
    loaded = run_dataset(run, dataset, data_dir, dataset_args) if needed else None
    data, info = run_embeddings(run, reembed, dataset, data_dir, dataset_args, loaded=loaded)
    test_emb, test_labels = data["test"]
    train_emb, train_labels = data["train"] if data["train"] is not None else (None, None)
    log.info("computing retrieval and verification metrics on %d test embeddings (%s)", len(test_labels), metric)
    if clustering is None:
        classes = len(np.unique(test_labels))
        clustering = len(test_labels) * classes <= CLUSTERING_LIMIT
        if not clustering:
            log.warning(
                "NMI/AMI skipped: k-means of %d points into %d clusters is slow; pass --clustering to compute them",
                len(test_labels),
                classes,
            )
    options = {"ks": ks, "metric": metric, "knn_k": knn_k, "num_pairs": num_pairs, "seed": seed}
    options["clustering"] = clustering
    rank, world = launched_group() if launched_world() > 1 else (0, 1)
    if world > 1:
        scores = evaluate_embeddings(train_emb, train_labels, test_emb, test_labels, **options, distributed=True)
    else:
        scores = evaluate_in_processes(processes, train_emb, train_labels, test_emb, test_labels, **options)
        world = processes
    files = loaded.files("test") if loaded is not None and is_streaming(loaded) else None
    search = {"ks": ks, "metric": metric, "knn_k": knn_k, "seed": seed}
    if files is not None:  # the dataset's own protocol: In-Shop's queries in its gallery, SOP's categories
        scores |= protocol_metrics(test_emb, test_labels, *files.marks(), files.categories, **search)
    recipe = run_recipe(run)
    key = metric if own else f"{dataset or recipe.dataset}/{metric}"
    record = {
        "metric": metric,
        "ks": [int(k) for k in ks],
        "knn_k": knn_k,
        "num_pairs": num_pairs,
        "seed": seed,
        **info,
        "test_size": len(test_labels),
        "train_size": None if train_labels is None else len(train_labels),
        **scores,
        "seconds": round(time.perf_counter() - start, 3),
        "processes": world,
        "evaluated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    record = strict_json(record)
    if save and rank == 0:
        run.update_metrics("evaluations", {**run.metrics.get("evaluations", {}), key: record})
    return {"run": str(run.path), "name": run.name, "key": key, "rank": rank, **record}
