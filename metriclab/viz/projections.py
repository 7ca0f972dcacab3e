"""2-D projections of embeddings (UMAP, t-SNE, PCA) and scores that say how faithful a projection is.

umap-learn compiles its numba kernels on first use: about 40 s of a 45 s UMAP of 10k points on two
cores. numba's on-disk cache only helps functions declared with ``cache=True``, which most of
umap's kernels are not, so ``umap`` is imported lazily through :func:`import_umap`, which gives each
of its kernels a disk cache in a persistent directory (``$METRICLAB_CACHE/numba`` or
``~/.cache/metriclab/numba``) without changing numba's settings for the rest of the process.
Only the first process pays the compile, and `make setup` pays it at set-up (:func:`compile_umap`).
The kernels are also compiled to release the GIL, so :func:`side_by_side` runs independent projections
(the pixels' and each run's, in ``metriclab compare``) in threads, one per core.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
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

    ``high_dim`` is the array the points were projected from (for :func:`projection_scores`);
    ``scores`` are those scores once computed (:func:`projected_panel` does).
    """

    title: str
    points: np.ndarray
    seconds: float
    high_dim: np.ndarray | None = field(default=None, repr=False)
    scores: dict[str, float] | None = None


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


def _prepare_kernels(modules: list[ModuleType], root: Path | None) -> int:
    """Make every numba kernel defined in ``modules`` release the GIL and, given ``root``, cache it on disk there.

    umap declares its kernels with plain ``@numba.njit(...)``: without ``cache=True``, and holding the GIL, so
    two projections in two threads would take turns. Each kernel (a numba dispatcher) is changed here before
    its first compile; numba's global config, ``numba.njit`` and the environment stay as they are. numba's
    cache key ignores compile flags, and umap builds a serial and a parallel kernel from one function, so only
    one of such twins is cached: the serial one, which a seeded UMAP runs. Kernels compiled at import
    (explicit signatures) are left alone. Returns how many kernels were changed.
    """
    from numba.core.dispatcher import Dispatcher

    kernels: dict[object, Dispatcher] = {}
    for module in modules:
        for value in list(vars(module).values()):
            if not isinstance(value, Dispatcher) or value.overloads or value.py_func.__module__ != module.__name__:
                continue
            value.targetoptions["nogil"] = True
            twin = kernels.get(value.py_func)
            if twin is None or (twin.targetoptions.get("parallel") and not value.targetoptions.get("parallel")):
                kernels[value.py_func] = value
    if root is not None:
        cache = _disk_cache(root)
        for kernel in kernels.values():
            kernel._cache = cache(kernel.py_func)
    return len(kernels)


_IMPORTING = threading.Lock()


def import_umap() -> ModuleType:
    """The ``umap`` module, its numba kernels cached on disk so that only the first process compiles them.

    The cache lives in ``$NUMBA_CACHE_DIR`` when that is set, else in :func:`numba_cache_dir`; where neither
    is writable the kernels compile in every process. The kernels release the GIL (:func:`side_by_side`).
    Nothing outside umap's (and pynndescent's) kernels changes, except that umap's own UserWarnings (notices
    about small inputs and skipped features the user cannot act on) are not shown.
    """
    with _IMPORTING:  # threads of side_by_side may ask at once; the second waits for the first's kernels
        return _import_umap()


def _import_umap() -> ModuleType:
    if "umap" in sys.modules:
        return sys.modules["umap"]
    before = set(sys.modules)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # import-time deprecation noise from umap's dependencies
        import umap
    # A filter, not catch_warnings around each fit: projections run in threads, and catch_warnings swaps
    # process-wide state that concurrent threads would restore out of order.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"umap(\.|$)")
    # Kernels compiled without releasing the GIL were cached flat in the directory by earlier versions.
    cache = Path(os.environ.get("NUMBA_CACHE_DIR") or numba_cache_dir()) / "nogil"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        usable = os.access(cache, os.W_OK)
    except OSError:
        usable = False
    new = [sys.modules[name] for name in sorted(set(sys.modules) - before)]
    ours = [m for m in new if m is not None and m.__name__.split(".")[0] in ("umap", "pynndescent")]
    _prepare_kernels(ours, cache if usable else None)
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
    return reducer.fit_transform(x).astype(np.float32)


def _exact_knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, None]:
    from sklearn.neighbors import NearestNeighbors

    # UMAP expects each point as its own first neighbour, which kneighbors(x) on the fitted x gives.
    distances, indices = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(x)
    return indices.astype(np.int32), distances.astype(np.float32), None


def projected_panel(title: str, x: np.ndarray, method: str, labels: np.ndarray | None = None, seed: int = 0) -> Panel:
    """A :class:`Panel` of ``project(x, method, seed)`` with its seconds and, given ``labels``, its scores.

    The unit of work of :func:`side_by_side`.
    """
    start = time.perf_counter()
    points = project(x, method, seed=seed)
    seconds = time.perf_counter() - start
    scores = None if labels is None else projection_scores(points, labels, high_dim=x, seed=seed)
    return Panel(title, points, seconds, high_dim=x, scores=scores)


class _InProcess(Executor):
    """An executor that runs each call at once in this thread (where a second thread would have no core)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as err:  # noqa: BLE001 - handed to the caller through the future, as a pool would
            future.set_exception(err)
        return future


@contextlib.contextmanager
def side_by_side(projections: int) -> Iterator[Executor]:
    """An executor for :func:`projected_panel` calls that runs up to ``projections`` of them at once.

    A seeded UMAP (the reproducible kind) runs on one core, in numba kernels that release the GIL
    (:func:`import_umap`), and sklearn's neighbour search and BLAS release it too, so independent projections
    run in threads, one per core up to one per projection. With one core they run in the calling thread.
    The results are the same either way: each projection is seeded on its own.
    """
    # umap (and the BLAS and OpenMP libraries it loads) first: threadpool_limits only reaches libraries already
    # loaded, and OpenBLAS called with several threads from inside sklearn's OpenMP loops warns that it may hang.
    import_umap()
    workers = min(projections, os.cpu_count() or 1)
    if workers < 2:
        yield _InProcess()
        return
    from threadpoolctl import threadpool_limits

    # BLAS and OpenMP pools are per process: share the cores among the threads instead of each asking for all.
    with threadpool_limits(max(1, (os.cpu_count() or 1) // workers)):
        with ThreadPoolExecutor(workers, thread_name_prefix="projection") as pool:
            yield pool


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
