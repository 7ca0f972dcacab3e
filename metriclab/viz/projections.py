"""2-D projections of embeddings (UMAP, t-SNE, PCA) and scores that say how faithful a projection is.

umap-learn compiles its numba kernels on first use: about 40 s of a 45 s UMAP of 10k points on two
cores. numba's on-disk cache only helps functions declared with ``cache=True``, which most of
umap's kernels are not, so ``umap`` is imported lazily through :func:`import_umap`, which gives each
of its kernels a disk cache in a persistent directory (``$METRICLAB_CACHE/numba`` or
``~/.cache/metriclab/numba``) without changing numba's settings for the rest of the process.
Only the first process pays the compile, and `make setup` pays it at set-up (:func:`compile_umap`).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np

from metriclab.errors import MetricLabError

METHODS = ("umap", "pca", "tsne", "none")
# Raw pixels (784-D for MNIST) are reduced to this many PCA components before UMAP/t-SNE: their
# neighbour search costs time linear in the dimension, and 50 components keep the neighbourhoods
# (most of the pixel variance) at a fraction of the cost. Learned embeddings (<= 128-D) are left alone.
PCA_DIMS = 50
PCA_FIRST_ABOVE = 128
# Trustworthiness needs all pairwise distances (O(n^2) memory), so large inputs are subsampled.
SCORE_SUBSAMPLE = 2000
# Up to this many points UMAP's neighbours come from an exact sklearn search (8 s for 60k x 50 on 2 cores).
EXACT_KNN_MAX = 60_000
# umap-learn optimises the layout for 500 epochs up to 10,000 points and 200 above. The layout is 11 of the
# 12 CPU-seconds of a (compiled) 10k-point UMAP, so from this many points on the large-data 200 epochs are used:
# 10,000 points, the size `metriclab compare` shows, no longer cost 2.5x as much as 10,001.
FEWER_EPOCHS_FROM = 5_000
LARGE_DATA_EPOCHS = 200


@dataclass
class Panel:
    """One projection to show: its title, the (n, 2) points, and the seconds it took to compute.

    ``high_dim`` is the array the points were projected from (for :func:`projection_scores`).
    """

    title: str
    points: np.ndarray
    seconds: float
    high_dim: np.ndarray | None = field(default=None, repr=False)


def numba_cache_dir() -> Path:
    """Where numba's compiled code persists: ``$METRICLAB_CACHE/numba`` or ``~/.cache/metriclab/numba``."""
    root = os.environ.get("METRICLAB_CACHE") or Path.home() / ".cache" / "metriclab"
    return Path(root).expanduser() / "numba"


def _disk_cache(root: Path) -> type:
    """A numba ``FunctionCache`` class that keeps compiled code under ``root`` (numba's own layout below it)."""
    from numba.core.caching import CompileResultCacheImpl, FunctionCache, UserProvidedCacheLocator

    class Locator(UserProvidedCacheLocator):
        # numba's NUMBA_CACHE_DIR locator, with the directory given here instead of read from numba.config,
        # so nothing process-wide changes and code outside umap keeps numba's own caching rules.
        def __init__(self, py_func, py_file) -> None:
            self._py_file, self._lineno = py_file, py_func.__code__.co_firstlineno
            self._cache_path = str(root / self.get_suitable_cache_subpath(py_file))

        @classmethod
        def from_function(cls, py_func, py_file):
            return super(UserProvidedCacheLocator, cls).from_function(py_func, py_file)

    class Impl(CompileResultCacheImpl):
        _locator_classes = [Locator]

    class Cache(FunctionCache):
        _impl_class = Impl

    return Cache


def _cache_kernels(modules: list[ModuleType], root: Path) -> int:
    """Give every numba kernel defined in ``modules`` a disk cache under ``root``; returns how many got one.

    umap declares its kernels with plain ``@numba.njit(...)``, without ``cache=True``. Each kernel (a numba
    dispatcher) gets its own cache object here, before its first compile; numba's global config, ``numba.njit``
    and the environment stay as they are. numba's cache key ignores compile flags, and umap builds a serial
    and a parallel kernel from one function, so only one of such twins is cached: the serial one, which a
    seeded UMAP runs. Kernels compiled at import (explicit signatures) are left alone.
    """
    from numba.core.dispatcher import Dispatcher

    cache = _disk_cache(root)
    kernels: dict[object, Dispatcher] = {}
    for module in modules:
        for value in list(vars(module).values()):
            if not isinstance(value, Dispatcher) or value.overloads or value.py_func.__module__ != module.__name__:
                continue
            twin = kernels.get(value.py_func)
            if twin is None or (twin.targetoptions.get("parallel") and not value.targetoptions.get("parallel")):
                kernels[value.py_func] = value
    for kernel in kernels.values():
        kernel._cache = cache(kernel.py_func)
    return len(kernels)


def import_umap() -> ModuleType:
    """The ``umap`` module, its numba kernels cached on disk so that only the first process compiles them.

    The cache lives in ``$NUMBA_CACHE_DIR`` when that is set, else in :func:`numba_cache_dir`; where neither
    is writable the kernels compile in every process. Nothing outside umap's (and pynndescent's) kernels changes.
    """
    if "umap" in sys.modules:
        return sys.modules["umap"]
    before = set(sys.modules)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # import-time deprecation noise from umap's dependencies
        import umap
    cache = Path(os.environ.get("NUMBA_CACHE_DIR") or numba_cache_dir())
    try:
        cache.mkdir(parents=True, exist_ok=True)
        usable = os.access(cache, os.W_OK)
    except OSError:
        usable = False
    if usable:
        new = [sys.modules[name] for name in sorted(set(sys.modules) - before)]
        _cache_kernels([m for m in new if m is not None and m.__name__.split(".")[0] in ("umap", "pynndescent")], cache)
    return umap


def compile_umap(seed: int = 0) -> float:
    """Seconds spent compiling umap's kernels into the disk cache (or loading them when already there).

    Projects a small random point set through the same code path as :func:`project`, so the first real
    projection in any later process loads compiled code instead of compiling it. ``make setup`` runs it.
    """
    start = time.perf_counter()
    x = np.random.default_rng(seed).normal(size=(300, 16)).astype(np.float32)
    project(x, "umap", seed=seed)
    return time.perf_counter() - start


def _as_matrix(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim < 2:
        raise MetricLabError(
            f"{what} must have shape (n, dims) or (n, ...) but has shape {x.shape}; pass one row per sample"
        )
    return x.reshape(len(x), -1).astype(np.float32, copy=False)


def project(embeddings: np.ndarray, method: str = "umap", seed: int = 0, n_components: int = 2) -> np.ndarray:
    """``(n, n_components)`` float32 points of ``embeddings`` (any ``(n, ...)`` array) by ``method``.

    Input that already has ``n_components`` dimensions is returned as is: there is nothing to reduce,
    and its own axes are the learned ones. ``"none"`` accepts only such input.
    """
    if method not in METHODS:
        raise MetricLabError(f"unknown projection method '{method}'; choose one of {', '.join(METHODS)}")
    x = _as_matrix(embeddings, "embeddings")
    n, dims = x.shape
    if dims == n_components:
        return x.copy()
    if method == "none" or dims < n_components:
        raise MetricLabError(
            f"embeddings have {dims} dimensions, cannot show them as {n_components}-D without a projection; "
            f"use method 'umap', 'tsne' or 'pca'"
            + (" on embeddings with more dimensions" if dims < n_components else "")
        )
    if n < 4:
        raise MetricLabError(f"cannot project only {n} points; pass at least 4")
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=n_components, random_state=seed).fit_transform(x).astype(np.float32)
    if dims > PCA_FIRST_ABOVE:
        from sklearn.decomposition import PCA

        x = PCA(n_components=min(PCA_DIMS, n), random_state=seed).fit_transform(x)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
        tsne = TSNE(n_components=n_components, perplexity=perplexity, init="pca", random_state=seed)
        return tsne.fit_transform(x).astype(np.float32)
    umap = import_umap()
    n_neighbors = min(15, n - 1)
    # pynndescent's neighbour search takes the metric as a function argument, which numba cannot cache,
    # so it recompiles in every process (~30 s). An exact search with sklearn (BLAS) takes seconds up to
    # MNIST size and keeps UMAP's remaining kernels, all cached, as the only numba code that runs.
    knn = _exact_knn(x, n_neighbors) if n <= EXACT_KNN_MAX else (None, None, None)
    # A fixed random_state makes UMAP reproducible and single-threaded; n_jobs=1 says so without a warning.
    reducer = umap.UMAP(
        n_components=n_components,
        n_neighbors=n_neighbors,
        n_epochs=LARGE_DATA_EPOCHS if n >= FEWER_EPOCHS_FROM else None,
        random_state=seed,
        n_jobs=1,
        precomputed_knn=knn,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small-n spectral-init and numba notices the user cannot act on
        return reducer.fit_transform(x).astype(np.float32)


def _exact_knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, None]:
    from sklearn.neighbors import NearestNeighbors

    # UMAP expects each point as its own first neighbour, which kneighbors(x) on the fitted x gives.
    distances, indices = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(x)
    return indices.astype(np.int32), distances.astype(np.float32), None


def _timed(title: str, x: np.ndarray, method: str, seed: int) -> Panel:
    start = time.perf_counter()
    points = project(x, method, seed=seed)
    return Panel(title, points, time.perf_counter() - start, high_dim=x)


def compare_projections(pixels: np.ndarray, embeddings: np.ndarray, labels: np.ndarray, seed: int = 0) -> list[Panel]:
    """Panels comparing the learned embedding with an unsupervised UMAP of the raw pixels.

    Always UMAP of the pixels; then the embedding itself when it is 2-D, otherwise UMAP and PCA of it
    (PCA of a 2-D embedding would only rotate it). The first UMAP in a process includes numba's load time.
    """
    pixels, embeddings = _as_matrix(pixels, "pixels"), _as_matrix(embeddings, "embeddings")
    if not len(pixels) == len(embeddings) == len(np.asarray(labels)):
        raise MetricLabError(
            f"pixels ({len(pixels)}), embeddings ({len(embeddings)}) and labels ({len(np.asarray(labels))}) "
            "must describe the same samples; pass the same split for all three"
        )
    dims = embeddings.shape[1]
    panels = [_timed(f"UMAP of raw pixels ({pixels.shape[1]}-D)", pixels, "umap", seed)]
    if dims == 2:
        panels.append(Panel("Learned embedding (2-D)", embeddings.copy(), 0.0, high_dim=embeddings))
    else:
        panels.append(_timed(f"UMAP of learned embedding ({dims}-D)", embeddings, "umap", seed))
        panels.append(_timed(f"PCA of learned embedding ({dims}-D)", embeddings, "pca", seed))
    return panels


def projection_scores(
    points: np.ndarray, labels: np.ndarray, high_dim: np.ndarray | None = None, seed: int = 0
) -> dict[str, float]:
    """``knn_accuracy`` (5-NN, 5-fold CV in 2-D), ``silhouette`` and, given ``high_dim``, ``trustworthiness``.

    Large inputs are scored on a fixed-seed subsample of ``SCORE_SUBSAMPLE`` points for the O(n^2) scores.
    """
    from sklearn.manifold import trustworthiness
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import KFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    points, labels = _as_matrix(points, "points"), np.asarray(labels).reshape(-1)
    n = len(points)
    if n != len(labels) or n < 10:
        raise MetricLabError(f"need at least 10 points with one label each, got {n} points and {len(labels)} labels")
    folds = KFold(n_splits=5, shuffle=True, random_state=seed)
    knn = KNeighborsClassifier(n_neighbors=5)
    scores = {"knn_accuracy": float(cross_val_score(knn, points, labels, cv=folds).mean())}
    rng = np.random.default_rng(seed)
    subset = np.sort(rng.choice(n, SCORE_SUBSAMPLE, replace=False)) if n > SCORE_SUBSAMPLE else np.arange(n)
    n_classes = len(np.unique(labels[subset]))
    # Silhouette is undefined for one cluster or one point per cluster.
    if 2 <= n_classes < len(subset):
        scores["silhouette"] = float(silhouette_score(points[subset], labels[subset]))
    else:
        scores["silhouette"] = float("nan")
    if high_dim is not None:
        high = _as_matrix(high_dim, "high_dim")
        if len(high) != n:
            raise MetricLabError(f"high_dim has {len(high)} rows but points has {n}; pass the array that was projected")
        k = min(5, len(subset) // 2 - 1)
        scores["trustworthiness"] = float(trustworthiness(high[subset], points[subset], n_neighbors=k))
    return scores
