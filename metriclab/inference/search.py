"""Embedding files and nearest-neighbour search: what ``metriclab embed`` writes and ``metriclab search`` reads.

An embedding file holds ``embeddings`` float32 (N, D), ``paths`` (N,) strings, ``labels`` (N,) when
known (integers or strings), a CSV's columns ``split``/``is_query``/``is_gallery``/``category`` and its
crop ``x_1``..``y_2`` (-1 where a row has none) when given, and
``meta`` (JSON: the run, its embedding dimension and metric). ``.npz`` is read with
``allow_pickle=False``; ``.parquet`` (pyarrow, the ``parquet`` extra) has one row per image with the
embedding as a fixed-size list column and ``meta`` in the schema's metadata.

Search is exact by default (:func:`metriclab.metrics.retrieval.knn`: chunked, never a full distance
matrix). :func:`approximate_knn` (faiss, the ``faiss`` extra) is used only when asked for, and reports
its recall@k against the exact search on a sample of queries.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from metriclab.data.images import check_files, report_problems
from metriclab.errors import MetricLabError
from metriclab.inference.inputs import UnreadableImage, crop_boxes
from metriclab.metrics.retrieval import METRICS, knn, matches, retrieval_metrics
from metriclab.runs import write_atomic

EMBEDDING_FILE_VERSION = 1


@dataclass
class EmbeddingSet:
    """Embeddings with their image paths, labels (None when unknown), extra columns and provenance."""

    embeddings: np.ndarray
    paths: np.ndarray
    labels: np.ndarray | None = None
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.embeddings)

    def subset(self, mask: np.ndarray) -> EmbeddingSet:
        """The items where ``mask`` is true (or at the given indices)."""
        labels = None if self.labels is None else self.labels[mask]
        columns = {k: v[mask] for k, v in self.columns.items()}
        return EmbeddingSet(self.embeddings[mask], self.paths[mask], labels, columns, dict(self.meta))

    def boxes(self) -> np.ndarray | None:
        """int64 ``(N, 4)`` crops (x1, y1, x2, y2; -1 where none) the items were embedded with, None without crops."""
        return crop_boxes(self.columns)


def _parquet():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as err:
        raise MetricLabError(
            "Parquet needs pyarrow: pip install 'metriclab[parquet]' (or write .npz, which needs nothing)"
        ) from err
    return pa, pq


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".parquet"):
        raise MetricLabError(f"{path}: embedding files are .npz or .parquet; choose one of these suffixes")
    return suffix


_DATASET_ITEM = re.compile(r"^[^/\\]+:(train|test):\d+$")  # an array dataset's item: 'fashion-mnist:test:7'


def _stored_paths(paths: np.ndarray) -> np.ndarray:
    """Image paths as an embedding file keeps them: absolute, so the file works from any folder (a search's
    figure reads the images, and a query is matched to its own gallery item by path); dataset items as they are."""
    kept = [p if os.path.isabs(p) or _DATASET_ITEM.match(p) else os.path.abspath(p) for p in paths.astype(str)]
    return np.array(kept, dtype=str)


def save_embedding_set(path: str | Path, data: EmbeddingSet) -> Path:
    """Write ``data`` to ``path`` (.npz, or .parquet with pyarrow) atomically; returns the path."""
    path = Path(path)
    suffix = _suffix(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": EMBEDDING_FILE_VERSION, **data.meta, "count": len(data)}
    paths = _stored_paths(data.paths)
    if suffix == ".npz":
        arrays = {"embeddings": data.embeddings.astype(np.float32), "paths": paths}
        if data.labels is not None:
            arrays["labels"] = data.labels
        arrays |= {f"column_{k}": v for k, v in data.columns.items()}
        buffer = io.BytesIO()
        np.savez(buffer, meta=np.array(json.dumps(meta)), **arrays)
        write_atomic(path, buffer.getvalue())
        return path
    pa, pq = _parquet()
    emb = data.embeddings.astype(np.float32)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])
    table = {"path": pa.array(paths), "embedding": vectors}
    if data.labels is not None:
        table["label"] = pa.array(data.labels.tolist())
    table |= {k: pa.array(v.tolist()) for k, v in data.columns.items()}
    out = pa.table(table).replace_schema_metadata({"metriclab": json.dumps(meta)})
    tmp = path.with_name(f".tmp-{path.name}")
    pq.write_table(out, tmp)
    tmp.replace(path)
    return path


def load_embedding_set(path: str | Path) -> EmbeddingSet:
    """Read an embedding file written by :func:`save_embedding_set` (nothing is unpickled)."""
    path = Path(path)
    suffix = _suffix(path)
    if not path.is_file():
        raise MetricLabError(f"{path} does not exist; write it with `metriclab embed RUN INPUT -o {path}`")
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                emb = npz["embeddings"]
                paths = npz["paths"] if "paths" in npz else np.array([f"[{i}]" for i in range(len(emb))])
                labels = npz["labels"] if "labels" in npz else None
                columns = {k[len("column_") :]: npz[k] for k in npz.files if k.startswith("column_")}
                meta = json.loads(str(npz["meta"])) if "meta" in npz else {}
        else:
            _, pq = _parquet()
            table = pq.read_table(path)
            names = table.column_names
            emb = np.array(table.column("embedding").combine_chunks().flatten(), dtype=np.float32)
            emb = emb.reshape(table.num_rows, -1)
            paths = np.array(table.column("path").to_pylist())
            labels = np.array(table.column("label").to_pylist()) if "label" in names else None
            columns = {
                k: np.array(table.column(k).to_pylist()) for k in names if k not in ("path", "embedding", "label")
            }
            raw = (table.schema.metadata or {}).get(b"metriclab", b"{}")
            meta = json.loads(raw)
    except (ValueError, KeyError, OSError) as err:
        raise MetricLabError(
            f"{path} is not an embedding file ({err}); write one with `metriclab embed RUN INPUT -o {path.name}`"
        ) from err
    if emb.ndim != 2 or len(paths) != len(emb) or (labels is not None and len(labels) != len(emb)):
        raise MetricLabError(f"{path}: embeddings {emb.shape}, paths {paths.shape} do not match; re-embed")
    if not np.isfinite(emb).all():
        raise MetricLabError(f"{path} contains NaN or inf embeddings; re-embed with a model that did not diverge")
    return EmbeddingSet(emb.astype(np.float32, copy=False), paths, labels, columns, meta)


def check_compatible(queries: np.ndarray, gallery: EmbeddingSet, expected_dim: int | None, where: str) -> None:
    """A MetricLabError when the gallery is empty or its dimension differs from the queries' (or the model's)."""
    if len(gallery) == 0:
        raise MetricLabError(f"the gallery {where} is empty; embed some images into it first")
    dim = gallery.embeddings.shape[1]
    want = expected_dim if expected_dim is not None else queries.shape[1]
    if dim != want or queries.shape[1] != dim:
        source = gallery.meta.get("run", "another model")
        raise MetricLabError(
            f"the gallery {where} holds {dim}-D embeddings (from {source}) but this model makes {want}-D ones; "
            "re-embed the gallery with this run: `metriclab embed RUN GALLERY -o FILE`"
        )


def check_same_weights(data: EmbeddingSet, model: Any, where: str) -> None:
    """A MetricLabError when the embedding file ``where`` was made with other weights than ``model``'s.

    Its meta names the weights (SHA-256; files written before that: the run's folder, if by absolute path).
    Files from elsewhere, which name neither, are taken as they are.
    """
    made, run = data.meta.get("weights_sha256"), data.meta.get("run")
    if made is not None and model.weights_sha256 is not None:
        same = made == model.weights_sha256
    elif run is not None and os.path.isabs(run):
        same = os.path.realpath(run) == os.path.realpath(model.run.path)
    else:  # made elsewhere, or named by a path relative to a folder unknown here
        return
    if not same:
        raise MetricLabError(
            f"{where} was embedded with the weights of {run or 'another model'} as they were then, not with those "
            f"of {model.run.path} now: distances between two models' embeddings mean nothing; re-embed it "
            f"(`metriclab embed {model.run.path} IMAGES -o FILE`) or search with the run that embedded it"
        )


@dataclass
class SearchResult:
    """Each query's ``k`` nearest gallery items: ``indices`` and ``distances`` ``(Q, k)``, nearest first."""

    indices: np.ndarray
    distances: np.ndarray
    metric: str
    exact: bool = True
    recall: float | None = None  # recall@k of an approximate search against the exact one
    recall_queries: int = 0
    seconds: float = 0.0


def search(
    queries: np.ndarray,
    gallery: EmbeddingSet | np.ndarray,
    k: int,
    metric: str = "euclidean",
    exclude_self: bool = False,
    approximate: str | None = None,
    device: str | None = None,
    exclude: np.ndarray | None = None,
) -> SearchResult:
    """The ``k`` nearest gallery items of each query: exact, or approximate (``"faiss-ivf"``) with its recall@k.

    ``exclude[i]`` (see :func:`own_items`) is a gallery index left out of query ``i``'s results, -1 for none.
    """
    gallery_emb = gallery.embeddings if isinstance(gallery, EmbeddingSet) else np.asarray(gallery)
    if metric not in METRICS:
        raise MetricLabError(f"unknown metric '{metric}'; use one of {', '.join(METRICS)}")
    if k < 1:
        raise MetricLabError(f"k must be at least 1, got {k}")
    if exclude is not None and not (exclude >= 0).any():
        exclude = None
    start = time.perf_counter()
    if approximate is None:
        distances, indices = knn(
            queries, gallery_emb, k, metric=metric, exclude_self=exclude_self, device=device, exclude=exclude
        )
        return SearchResult(indices.cpu().numpy(), distances.cpu().numpy(), metric, seconds=time.perf_counter() - start)
    if approximate != "faiss-ivf":
        raise MetricLabError(f"unknown approximate index '{approximate}'; use faiss-ivf (or none for exact search)")
    return approximate_knn(queries, gallery_emb, k, metric, exclude=exclude)


def own_items(queries: EmbeddingSet, gallery: EmbeddingSet) -> np.ndarray:
    """For each query, the gallery index of the same image (the same path, however written), -1 for none."""
    first: dict[str, int] = {}
    for i, path in enumerate(gallery.paths):
        first.setdefault(os.path.abspath(path), i)
    return np.array([first.get(os.path.abspath(path), -1) for path in queries.paths], dtype=np.int64)


def approximate_knn(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    metric: str,
    nprobe: int = 16,
    recall_sample: int = 1000,
    exclude: np.ndarray | None = None,
) -> SearchResult:
    """faiss ``IndexIVFFlat`` search (sqrt(N) lists trained on 64 points each, ``nprobe`` probed) + recall@k vs exact.

    The recall is measured on up to ``recall_sample`` queries (a fixed random subset) by running
    :func:`metriclab.metrics.retrieval.knn` on them: the fraction of the exact top-k that was found.
    ``exclude`` as in :func:`search`: one more is searched, and the query's own item dropped.
    """
    try:
        import faiss
    except ImportError as err:
        raise MetricLabError("approximate search needs faiss: pip install 'metriclab[faiss]'") from err
    start = time.perf_counter()
    q = np.ascontiguousarray(queries, dtype=np.float32)
    g = np.ascontiguousarray(gallery, dtype=np.float32)
    if metric == "cosine":
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    extra = int(exclude is not None)
    k = min(k, len(g) - extra)
    nlist = max(1, min(int(np.sqrt(len(g))), len(g) // 39))  # faiss wants >= 39 training points per list
    kind = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    quantizer = faiss.IndexFlatIP(g.shape[1]) if metric == "cosine" else faiss.IndexFlatL2(g.shape[1])
    index = faiss.IndexIVFFlat(quantizer, g.shape[1], nlist, kind)
    train = g[np.random.default_rng(0).choice(len(g), min(len(g), 64 * nlist), replace=False)]
    index.train(train)
    index.add(g)
    index.nprobe = min(nprobe, nlist)
    scores, indices = index.search(q, k + extra)
    distances = 1.0 - scores if metric == "cosine" else np.sqrt(np.maximum(scores, 0))
    if extra:  # the k first that are not the query's own item, in order
        order = np.argsort(indices == exclude[:, None], axis=1, kind="stable")[:, :k]
        indices, distances = np.take_along_axis(indices, order, 1), np.take_along_axis(distances, order, 1)
    short = np.flatnonzero((indices < 0).any(axis=1))
    if len(short):  # the probed lists held fewer than k items (faiss pads with -1): those queries are searched exactly
        exact_d, exact_i = knn(
            queries[short], gallery, k, metric=metric, device="cpu", exclude=None if exclude is None else exclude[short]
        )
        indices[short], distances[short] = exact_i.numpy(), exact_d.numpy()
    seconds = time.perf_counter() - start
    sample = np.random.default_rng(0).choice(len(q), min(len(q), recall_sample), replace=False)
    _, exact = knn(
        queries[sample], gallery, k, metric=metric, device="cpu", exclude=None if exclude is None else exclude[sample]
    )
    exact = exact.numpy()
    found = [len(np.intersect1d(indices[i], exact[j])) for j, i in enumerate(sample)]
    recall = float(np.sum(found) / exact.size)
    return SearchResult(indices, distances.astype(np.float32), metric, False, recall, len(sample), seconds)


SKIP_OFFER = ", or pass --skip-unreadable to embed the others"


def embed_inputs(
    model: Any, spec: Any, batch_size: int = 256, progress: Any = None, skip_unreadable: bool | None = None
) -> EmbeddingSet:
    """An :class:`EmbeddingSet` of what ``spec`` names (folder, CSV, DATASET:SPLIT, image files), embedded now.

    Every image file's header is read first: unreadable ones are one error listing them all, before anything is
    embedded, or with ``skip_unreadable`` are left out and listed in the meta (``skipped_unreadable``); ``None``:
    the caller offers no such option. A file whose header reads but whose data does not decode (a truncated JPEG)
    is found only while embedding: it stops there, or with ``skip_unreadable`` is left out and listed alike.
    """
    items = model.inputs(spec)
    skipped: list[str] = []
    if items.images is None and len(items):
        paths = [str(p) for p in items.paths]
        problems = check_files(paths, paths)
        if problems and not skip_unreadable:
            whys = [why[len(paths[i]) + 2 :] for i, why in problems]
            offer = SKIP_OFFER if skip_unreadable is not None else ""
            if len(whys) == 1:
                raise MetricLabError(f"{whys[0]}; replace or remove it{offer}")
            report_problems(items.source, whys, f"replace or remove them{offer}")
        if problems:
            items, _, skipped = _without(items, problems)
    failed: list[tuple[int, str]] | None = [] if skip_unreadable else None
    try:
        emb = model.embed(items, batch_size=batch_size, progress=progress, unreadable=failed)
    except UnreadableImage as err:
        if skip_unreadable is None:
            raise
        raise UnreadableImage(f"{err}{SKIP_OFFER}") from None
    if failed:
        items, keep, dropped = _without(items, failed)
        emb, skipped = emb[keep], skipped + dropped
    meta = {"run": str(model.run.path.resolve()), "embedding_dim": model.embedding_dim, "metric": model.metric}
    meta["weights_sha256"] = model.weights_sha256
    if skipped:
        meta["skipped_unreadable"] = skipped
    return EmbeddingSet(emb, items.paths, items.labels, items.columns, {**meta, "source": items.source})


def _without(items: Any, bad: list[tuple[int, str]]) -> tuple[Any, np.ndarray, list[str]]:
    """``items`` less the ``(index, why)`` of ``bad``, the indices kept and the paths left out; an error when nothing
    is left."""
    if len(bad) == len(items):
        raise MetricLabError(f"none of the {len(items):,} images of {items.source} can be read, e.g. {bad[0][1]}")
    dropped = [i for i, _ in bad]
    keep = np.setdiff1d(np.arange(len(items)), dropped)
    return items.subset(keep), keep, items.paths[dropped].tolist()


def embedding_set(model: Any, spec: Any, batch_size: int = 256, progress: Any = None) -> EmbeddingSet:
    """An embedding file (``.npz``/``.parquet``) or images (embedded now), checked against ``model``: its dimension,
    and a file's weights."""
    one = str(spec) if isinstance(spec, (str, Path)) else None
    if one is None or Path(one).suffix.lower() not in (".npz", ".parquet"):
        data = embed_inputs(model, spec, batch_size, progress)
        check_compatible(data.embeddings, data, model.embedding_dim, one or "given")
        return data
    data = load_embedding_set(one)
    check_compatible(data.embeddings, data, model.embedding_dim, one)
    check_same_weights(data, model, one)
    return data


def search_scores(queries: EmbeddingSet, gallery: EmbeddingSet, k: int, metric: str) -> dict[str, float | int]:
    """precision@1, precision@k, MAP@R and R-precision of labelled queries against a labelled gallery (exact),
    over the ``queries_scored`` queries whose class the gallery holds.

    A query that is a gallery item (the same path; ``queries_in_gallery`` of them) is left out of its own
    ranking, as ``metriclab evaluate`` leaves each test image out of its test set's: it would be found first.
    """
    for name, data in (("queries", queries), ("gallery", gallery)):
        if data.labels is None:
            raise MetricLabError(
                f"scoring needs labels, but the {name} have none; embed a dataset CSV (label column), "
                "a folder of class sub-folders or DATASET:SPLIT"
            )
    own = own_items(queries, gallery)
    held = own >= 0
    scored = int((matches(queries.labels, gallery.labels, own) > 0).sum())
    if scored == 0:
        raise MetricLabError(
            f"none of the {len(queries):,} queries has an item of its class in the gallery (the train and test "
            "splits of a class-disjoint dataset share no class), so there is nothing to score; search a gallery "
            "that holds the queries' classes, or leave out --evaluate"
        )
    ks = sorted({1, k})
    scores = retrieval_metrics(
        queries.embeddings, queries.labels, gallery.embeddings, gallery.labels, ks=ks, metric=metric,
        clustering=False, exclude=own,
    )  # fmt: skip
    out = {key: scores[key] for key in [f"precision@{v}" for v in ks] + ["map@r", "r_precision"]}
    return out | {"queries_scored": scored, "queries_in_gallery": int(held.sum())}
