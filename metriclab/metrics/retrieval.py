"""Retrieval and verification metrics on embeddings: arrays in, dicts of floats out.

Exact nearest neighbours, one chunk of queries at a time, so the full query x gallery
distance matrix never exists (all chunks in flight share ``CHUNK_BYTES``). Ranking is
deterministic: by distance, exactly equal distances (duplicates) by gallery index.

Conventions (shared with pytorch-metric-learning's ``AccuracyCalculator``, whose
``precision_at_1``, ``mean_average_precision_at_r`` and ``r_precision`` these metrics equal):

* Leave-one-out (no gallery given): each query is searched among the other queries; its own
  entry is masked, duplicates of it are not.
* ``R`` of a query is the number of gallery items of its class (minus itself in
  leave-one-out). Queries with ``R = 0`` ("lone" queries: a class with a single member in
  leave-one-out, or absent from the gallery) are excluded from every ranking metric
  (precision@k, recall@k, MAP@R, R-precision), as AccuracyCalculator excludes them; a
  metric is NaN when every query is lone. ``knn_accuracy`` is a classifier's accuracy and
  counts every query (a lone query is always misclassified).
* A ``k`` larger than the gallery (minus the query itself in leave-one-out) is clamped to
  the gallery size: ``precision@k`` then divides by the clamped ``k``.

How: keys (``|g|^2 - 2 q.g`` on centred data, or ``-cos``) are float32 matrix products, on
the GPU with torch when the embeddings live there (or one is present), on CPU with torch's MKL on
Intel CPUs and numpy's OpenBLAS elsewhere (twice MKL's speed on AMD), into a buffer each worker
thread keeps. The ``k`` (or, for MAP@R, ``R``) nearest are then
selected: on GPU by ``torch.topk``; on CPU by :mod:`metriclab.metrics.ranking` (compiled by numba, loaded
as native code by :mod:`metriclab.metrics.kernels`: a per-row threshold placed from a sample of 512 keys,
then a bucket sort of the keys under it), with
chunks processed on worker threads. The metrics are then summed from the ranked classes by a
compiled loop. On the CPU, the metrics skip the full ranking: they need only whether each position
holds the query's class, so each of a row's keys under the threshold becomes a float64 that sorts
by (key, gallery index) and carries that bit, numpy sorts them, and one pass sums the metrics. Chunks
of whole rows are sized so that their keys stay in the cache. A gallery above ``GALLERY_BLOCK`` items
is searched in blocks of that many columns by ``knn``, and by the metrics when no query needs more
than ``BLOCKED_NEED`` neighbours (blocks of ``SMALL_BLOCK`` above that size when none needs more than
``SMALL_NEED``): each block's nearest are kept and merged by (key, index), so blocks give the same
neighbours as whole rows. Distances are
exact up to float32 rounding of the expansion (about 1e-6 of the squared norms), so the chunk size
may change them in the last digits.

Speed: see BENCHMARKS.md (``eval``): on a 2-core Xeon, 10k x 10k leave-one-out and 10k
queries x 60k gallery (MAP@R ranks R ~ 1,000 and ~6,000 items per query) against
``AccuracyCalculator(k="max_bin_count")`` at equal precision@1 and MAP@R.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from metriclab.errors import MetricLabError
from metriclab.metrics import kernels

METRICS = ("euclidean", "cosine")
# Memory for the chunks in flight (keys, candidates, labels); small enough for any laptop or GPU.
CHUNK_BYTES = 256 * 2**20
SAMPLE = 512  # keys per row sampled to place the selection threshold
MAX_WORKERS = 4
# The CPU reads each chunk's key rows again after the product writes them: for 64-D embeddings, chunks of ~12 MiB
# of keys were read back from the cache, larger ones from memory (10k x 60k MAP@R: 48-row chunks 1.06 s, 124 rows
# 1.26 s; 10k x 10k leave-one-out: 256-384 rows 0.16 s, 745 rows 0.19 s; 2-core Xeon). Wider embeddings want
# proportionally larger chunks: a product re-packs its whole gallery operand for each chunk, and that grows with the
# width (60k leave-one-out, R ~ 10: 128-D best at 104-208 rows, 8.1-8.2 s against 9.2 s at 52; 256-D at 160-208
# rows, 11.2 s against 16.4 s at 52).
CACHED_KEY_BYTES = 12 * 2**20  # per 64 dimensions
MIN_CACHED_ROWS = 32
GALLERY_BLOCK = 1 << 16  # gallery columns per product on the CPU (larger galleries are searched in blocks)
BLOCKED_NEED = 1024  # `retrieval_metrics` searches a large gallery in blocks when no query needs more neighbours
# The metrics of queries that need few neighbours each (R of a product catalogue) search galleries above SMALL_BLOCK
# in blocks of that many columns, in chunks whose keys stay in the cache: 60k leave-one-out, R ~ 10, 4.0 s against
# 4.6 s in whole rows (64-D) and 6.2 s against 8.0 s (128-D); R ~ 30: 4.7 s against 5.6 s; R ~ 100: 5.4 s against
# 5.0 s; 10k x 1M, R ~ 10: 16.2 s against 18.2 s in blocks of GALLERY_BLOCK (2-core Xeon).
SMALL_BLOCK = 1 << 14
SMALL_NEED = 64


def _embeddings(x: Any, name: str, device: torch.device | None = None) -> torch.Tensor:
    """``x`` as a 2-D float32 tensor on ``device`` (its own device when None)."""
    t = torch.as_tensor(x).detach()
    if t.ndim != 2 or t.shape[0] == 0:
        raise MetricLabError(f"{name} must be a non-empty 2-D array (N, D), got shape {tuple(t.shape)}")
    t = t.to(device=device if device is not None else t.device, dtype=torch.float32)
    # a finite sum proves every entry finite (0.4 ms for 60k x 64, the mask 7 ms); only NaN, inf or overflow look
    if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
        raise MetricLabError(f"{name} contains NaN or inf; check the model's outputs before evaluating")
    return t


def _labels(x: Any, n: int, name: str) -> np.ndarray:
    """``x`` as a 1-D numpy array of length ``n`` (any comparable label type)."""
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim != 1 or len(arr) != n:
        raise MetricLabError(f"{name} must be 1-D with one label per embedding ({n}), got shape {arr.shape}")
    return arr


def _device(x: Any, device: str | torch.device | None) -> torch.device:
    """The device to compute on: as given, else a CUDA tensor's own, else CUDA if present, else CPU."""
    if device is not None:
        return torch.device(device)
    if isinstance(x, torch.Tensor) and x.is_cuda:
        return x.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise MetricLabError(f"unknown metric '{metric}'; use one of {', '.join(METRICS)}")


def _on_host(device: torch.device) -> bool:
    """Whether keys are computed and selected with numpy on the CPU, rather than with torch on ``device``."""
    return device.type == "cpu"


def _workers() -> int:
    """Chunks processed at once: numpy releases the GIL, so threads use the cores torch may use."""
    return max(1, min(torch.get_num_threads(), MAX_WORKERS))


def _chunk_rows(n_gallery: int, k: int, chunk_size: int | None, dim: int | None = None) -> int:
    """Queries per chunk: ``chunk_size`` if given, else as many as fit in ``CHUNK_BYTES``; with ``dim`` (the CPU
    selects from whole key rows of ``dim``-D embeddings), no more than ``CACHED_KEY_BYTES`` of keys per 64-D."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise MetricLabError(f"chunk_size must be a positive integer, got {chunk_size}")
        return int(chunk_size)
    # per query: a key row (8 bytes a column leaves room for the GPU path's copies of tied rows), plus
    # ~100 bytes per kept neighbour (top-k values, columns, codes, the ranked classes); one chunk per worker
    # is alive at once. Sized for the machine's cores, not this process's threads, so the chunks (and the
    # float32 products, whose rounding may depend on a product's shape) are the same in every process.
    workers = max(1, min(os.cpu_count() or 1, MAX_WORKERS))
    rows = max(1, CHUNK_BYTES // workers // (8 * n_gallery + 100 * k))
    if dim is None:
        return rows
    return min(rows, max(MIN_CACHED_ROWS, CACHED_KEY_BYTES * max(dim, 64) // 64 // (4 * n_gallery)))


def _host_block(n_gallery: int, need: int) -> int:
    """Gallery columns the CPU multiplies and ranks at once for the metrics of queries needing ``need`` neighbours
    each (``n_gallery``: whole rows). Blocks keep each block's nearest, merged exactly by (key, index)."""
    if need <= SMALL_NEED and n_gallery > SMALL_BLOCK:
        return SMALL_BLOCK
    return GALLERY_BLOCK if need <= BLOCKED_NEED and n_gallery > GALLERY_BLOCK else n_gallery


def _chunks(n: int, rows: int, distributed: bool = False) -> list[tuple[int, int]]:
    """``(start, stop)`` of each chunk of ``rows`` of ``range(n)``; with ``distributed``, this process's share.

    A process's share is a contiguous run of whole chunks of the same grid as one process would use
    (rank order = chunk order), so gathering the per-chunk sums reproduces one process's sums exactly.
    """
    bounds = [(start, min(start + rows, n)) for start in range(0, n, rows)]
    rank, world = _process_group() if distributed else (0, 1)
    per = -(-len(bounds) // world)
    return bounds[rank * per : (rank + 1) * per]


def _process_group() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised torch.distributed process group (``(0, 1)`` without one)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gathered(local: list[np.ndarray], distributed: bool) -> list[np.ndarray]:
    """Every process's ``local`` list, concatenated in rank order (``local`` itself in one process)."""
    _, world = _process_group() if distributed else (0, 1)
    if world == 1:
        return local
    everyone: list[Any] = [None] * world
    torch.distributed.all_gather_object(everyone, local)
    return [part for shard in everyone for part in shard]


def _in_parallel(fn: Callable[[int, int], Any], n: int, rows: int, distributed: bool = False) -> list[Any]:
    """``fn(start, stop)`` for each chunk of ``rows`` of ``range(n)`` (this process's share), in order, on threads."""
    bounds = _chunks(n, rows, distributed)
    starts, stops = [b[0] for b in bounds], [b[1] for b in bounds]
    workers = _workers()
    if workers == 1:  # one BLAS thread too: a product's rounding may depend on how many threads share it (OpenBLAS
        with threadpool_limits(limits=1, user_api="blas"):  # on AMD CPUs), and the scores must not
            return [fn(start, stop) for start, stop in zip(starts, stops, strict=True)]
    # Each worker multiplies its own chunk and selects from it while the keys are fresh in cache; one BLAS
    # thread per worker keeps the busy threads at the core count (2 cores, 10k x 60k MAP@R: 1.4 s this way,
    # 1.6 s with the products on a producer thread, 4.2 s when OpenBLAS's own threads fought the workers).
    # (torch's products: each worker's share of torch's threads, so 16 cores run 4 workers of 4 threads.)
    with (
        _torch_threads(max(1, torch.get_num_threads() // workers)),
        ThreadPoolExecutor(workers) as pool,
        threadpool_limits(limits=1, user_api="blas"),
    ):
        return list(pool.map(fn, starts, stops))


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` inside the block, and back after it."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.cache
def _intel_cpu() -> bool:
    """Whether this machine's CPU is Intel's: the CPU keys are then torch's (MKL) products, else numpy's (OpenBLAS)."""
    try:
        with open("/proc/cpuinfo") as f:
            return "GenuineIntel" in f.read(4096)
    except OSError:
        return "Intel" in platform.processor()


_scratch = threading.local()


def _buffer(name: str, rows: int, width: int, dtype: type = np.float64) -> np.ndarray:
    """A ``(rows, width)`` array for ``name`` (valid until this thread asks for ``name`` again): this thread's from the
    last time when large enough.

    A fresh array per chunk costs a page fault per 4 kB: about a fifth of the ranking for the codes; for the keys,
    MKL's lead over OpenBLAS (10k x 60k x 64 products into fresh arrays took 0.41-0.43 s against 0.29 s).
    """
    held = getattr(_scratch, name, None)
    if held is None or held.size < rows * width or held.dtype != dtype:
        held = np.empty(rows * width, dtype)
        setattr(_scratch, name, held)
    return held[: rows * width].reshape(rows, width)


def _searcher(
    queries: torch.Tensor, gallery: torch.Tensor, metric: str, exclude: np.ndarray | None
) -> Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """A function ``(start, stop) -> (query_chunk, keys)``; smaller key = nearer, in the order of the distance.

    The chunk is returned as searched (normalised or centred), so ``keys + |chunk|^2`` is the
    squared euclidean distance and ``keys + 1`` the cosine distance. ``exclude[i]``, a gallery index (-1: none),
    gets an infinite key in query ``i``'s row: leave-one-out excludes each query itself.
    """
    if metric == "cosine":
        queries = torch.nn.functional.normalize(queries, dim=1)
        gallery = torch.nn.functional.normalize(gallery, dim=1)
        factor, offset = -1.0, None  # key = -q.g
    else:
        # Distances are translation-invariant; centring shrinks the norms that |q|^2 + |g|^2 - 2 q.g cancels.
        center = gallery.mean(0)
        queries, gallery = queries - center, gallery - center
        factor, offset = -2.0, (gallery * gallery).sum(1)  # key = |g|^2 - 2 q.g; |q|^2 is constant per row
    on_cpu = _on_host(queries.device)
    n_gallery = len(gallery)
    scaled = scaled_t = None
    if on_cpu:
        # A contiguous (D, N) copy multiplies 10-25% faster than the transposed view (Xeon, chunks of 64-256 rows).
        # Scaled in place: the only gallery copy kept (a 1M x 64 gallery is 256 MB).
        scaled_t = gallery.t().contiguous()  # torch's blocked transpose: 4x numpy's (60k x 64: 8 ms against 32 ms)
        scaled_t *= factor
    else:
        scaled = factor * gallery
    del gallery
    # Each worker thread's keys go to its own buffer (valid until its next search). On a Xeon, torch's MKL then
    # multiplies 10k x 60k x 64 in 0.29 s against 0.40 s for numpy's OpenBLAS (2 threads); on AMD EPYC, OpenBLAS
    # was twice as fast as MKL.
    with_mkl = on_cpu and _intel_cpu() and torch.backends.mkl.is_available()

    def search(start: int, stop: int, lo: int = 0, hi: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = queries[start:stop]
        hi = n_gallery if hi is None else hi
        if on_cpu:
            keys = torch.from_numpy(_buffer("keys", len(chunk), hi - lo, np.float32))
            if with_mkl:
                torch.mm(chunk, scaled_t[:, lo:hi], out=keys)
            else:
                np.matmul(chunk.numpy(), scaled_t[:, lo:hi].numpy(), out=keys.numpy())
            if offset is not None:
                keys += offset[lo:hi]
        else:
            block = scaled[lo:hi]
            keys = chunk @ block.T if offset is None else torch.addmm(offset[lo:hi], chunk, block.T)
        if exclude is not None:
            columns = torch.from_numpy(exclude[start:stop]).to(keys.device)
            rows = torch.nonzero((columns >= lo) & (columns < hi)).flatten()
            keys[rows, columns[rows] - lo] = float("inf")
        return chunk, keys

    return search


@functools.cache
def _sample_columns(n: int) -> np.ndarray:
    """The ``SAMPLE`` columns (sorted, fixed random) of ``n`` whose keys place each row's selection threshold."""
    columns = np.sort(np.random.default_rng(0).choice(n, SAMPLE, replace=False))
    columns.flags.writeable = False
    return columns


def _thresholds(keys: np.ndarray, need: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(sample, rank)``: each row's sorted keys at the :func:`_sample_columns` and the rank among them of the
    row's first threshold.

    The threshold is a little above the row's expected ``need``-th key; the few rows it leaves short have
    it raised by the kernels. No sample (take the whole row) for short rows.
    """
    m, n = keys.shape
    if n <= 4 * SAMPLE:
        return np.empty((m, 0), dtype=np.float32), np.ones(m, dtype=np.int64)
    columns = _sample_columns(n)
    # np.sort of short rows runs in SIMD registers: cheaper than a partition of a longer sample
    sample = np.sort(keys[:, columns], axis=1)
    expect = need * (len(columns) / n)
    return sample, np.ceil(expect + 2 * np.sqrt(expect) + 2).astype(np.int64)  # ~2 sigma above the expectation


def _select_by_threshold(keys: np.ndarray, need: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``values`` at each row's ``need`` smallest keys, by key then column (CPU path, :mod:`metriclab.metrics.kernels`).

    Each row's threshold starts from a fixed random sample of its columns (:func:`_thresholds`). Keys equal
    to the last one kept are all candidates, so ties are resolved exactly by the sort.
    """
    sample, rank = _thresholds(keys, need)
    return kernels.nearest(keys, sample, rank, need, values, int(need.max()))


def _ranking_sums_on_host(
    keys: np.ndarray, need: np.ndarray, classes: np.ndarray, own: np.ndarray, relevant: np.ndarray,
    top: np.ndarray, vote_k: int,
) -> np.ndarray:  # fmt: skip
    """:func:`metriclab.metrics.ranking.ranking_sums` of the rows of ``keys``, without ranking their neighbours.

    The metrics need only whether each ranked position holds the query's class, and the classes of the
    ``vote_k`` nearest: each row's candidates (keys under a threshold placed from a sample of its keys)
    become float64 codes that sort by (key, column) and end in that bit
    (:func:`metriclab.metrics.ranking.class_codes`), numpy sorts them, and one pass sums each row
    (:func:`metriclab.metrics.ranking.sorted_sums`). Rows whose candidates overflow the buffer take the
    full ranking. The sums are the same.
    """
    need = need.astype(np.int64)
    sample, rank = _thresholds(keys, need)
    rows = len(keys)
    # rows with more candidates than need * 1.5 + 64 take the full ranking; + LANES: room for vector stores
    codes = _buffer("codes", rows, int(need.max()) * 3 // 2 + 64 + kernels.LANES)
    counts = np.zeros(rows, np.int64)
    kernels.class_codes(keys, sample, rank, need, classes, own, codes.view(np.int64), counts)
    codes[:, : max(int(counts.max()), 1)].sort(axis=1)  # each row's codes, then +inf
    skipped = np.zeros(rows, dtype=bool)
    sums = np.zeros(2 * len(top) + 3)
    kernels.sorted_sums(codes.view(np.int64), counts, classes, own, relevant, top, vote_k, sums, skipped)
    if skipped.any():
        left = np.flatnonzero(skipped)
        neighbours = kernels.nearest(keys[left], sample[left], rank[left], need[left], classes, int(need[left].max()))
        sums += kernels.ranking_sums(neighbours, own[left], relevant[left], top, vote_k)
    return sums


def _select_by_topk(keys: torch.Tensor, k: int) -> np.ndarray:
    """Columns of each row's ``k`` smallest keys via ``torch.topk`` on the keys' device (GPU path)."""
    n = keys.shape[1]
    kk = min(k + 1, n)
    values, columns = torch.topk(keys, kk, dim=1, largest=False, sorted=False)
    codes = np.sort(kernels.codes(values.cpu().numpy(), columns.cpu().numpy()), axis=1)
    # topk chooses among keys equal to the k-th arbitrarily: such rows are sorted whole
    tied = np.flatnonzero(codes[:, k] >> 32 == codes[:, k - 1] >> 32) if kk > k else []
    if len(tied):
        whole = keys[torch.as_tensor(tied, device=keys.device)].cpu().numpy()
        codes[tied] = np.sort(kernels.codes(whole, np.broadcast_to(np.arange(n), whole.shape)), axis=1)[:, :kk]
    return codes[:, :k] & 0xFFFFFFFF


def _nearest(keys: torch.Tensor, need: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
    """Columns (or ``values`` of them) of each row's ``need[row]`` smallest keys, by key then column.

    Shape ``(rows, need.max())``; entries past a row's own ``need`` are unspecified (but valid).
    """
    if values is None:
        values = np.arange(keys.shape[1])
    if _on_host(keys.device):
        return _select_by_threshold(keys.numpy(), need, values)
    return values[_select_by_topk(keys, int(need.max()))]


def _nearest_in_blocks(
    search: Callable[..., tuple[torch.Tensor, torch.Tensor]], start: int, stop: int, n_gallery: int, block: int, k: int
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """``(chunk, keys, columns)`` of the ``k`` nearest of queries ``start:stop``, the gallery searched ``block`` columns
    at a time (CPU): each block's ``k`` best, merged by (key, column), so the result equals one whole-row search.
    """
    found_keys, found_columns = [], []
    for lo in range(0, n_gallery, block):
        chunk, keys = search(start, stop, lo, min(lo + block, n_gallery))
        columns = _nearest(keys, np.full(len(keys), min(k, keys.shape[1])))
        found_keys.append(np.take_along_axis(keys.numpy(), columns, axis=1))
        found_columns.append(columns.astype(np.int64) + lo)
    merged_keys, merged_columns = np.concatenate(found_keys, axis=1), np.concatenate(found_columns, axis=1)
    order = np.argsort(kernels.codes(merged_keys, merged_columns), axis=1)[:, :k]
    return chunk, np.take_along_axis(merged_keys, order, axis=1), np.take_along_axis(merged_columns, order, axis=1)


def knn(
    queries: Any,
    gallery: Any,
    k: int,
    metric: str = "euclidean",
    exclude_self: bool = False,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    distributed: bool = False,
    exclude: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``(distances, indices)`` of each query's ``k`` nearest gallery items, shape ``(Q, k)``.

    Rows are sorted by distance, equal distances by gallery index. ``exclude[i]``, as in
    :func:`retrieval_metrics`, is the gallery index of query ``i``'s own item (-1: none), skipped;
    ``exclude_self`` is leave-one-out (``queries`` is ``gallery``): each query's own row index.
    ``k`` is clamped to the gallery size (minus one where an item is excluded). Euclidean
    distances are L2, cosine distances ``1 - cos``. Computed on ``device`` (default: a CUDA
    tensor's device, else CUDA when available, else CPU) in chunks of ``chunk_size``
    queries (default: sized to ``CHUNK_BYTES``); results are on that device. With ``distributed``
    (an initialised torch.distributed group), each process searches its share of the queries and
    every process returns all results, gathered.
    """
    _check_metric(metric)
    dev = _device(queries, device)
    q, g = _embeddings(queries, "queries", dev), _embeddings(gallery, "gallery", dev)
    if q.shape[1] != g.shape[1]:
        raise MetricLabError(f"queries have {q.shape[1]} dimensions but the gallery {g.shape[1]}; embed both alike")
    if exclude_self and len(q) != len(g):
        raise MetricLabError("exclude_self needs queries and gallery to be the same set; pass the same array twice")
    exclude = np.arange(len(q)) if exclude_self else _exclusions(exclude, len(q), len(g))
    k = min(int(k), len(g) - int(exclude is not None))
    if k < 1:
        raise MetricLabError("k must be >= 1 and the gallery must hold at least one other item")
    # A gallery larger than GALLERY_BLOCK is searched block by block, each chunk of queries keeping its k best
    # of every block: the chunks stay large (a product re-packs its whole gallery operand, so 16-query chunks of a
    # 1M gallery spent more time packing than multiplying) and the k-best lists merge exactly by (key, index).
    # (Blocks of SMALL_BLOCK were slower here: 10k x 60k top-10 0.73-0.78 s against 0.62-0.65 s in whole rows.)
    block = len(g) if len(g) <= GALLERY_BLOCK or not _on_host(dev) else GALLERY_BLOCK
    rows = _chunk_rows(block, k, chunk_size, dim=q.shape[1] if _on_host(dev) and block == len(g) else None)

    search = _searcher(q, g, metric, exclude)

    def best(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if block == len(g):
            chunk, keys = search(start, stop)
            index = torch.from_numpy(_nearest(keys, np.full(len(keys), k))).to(dev)
            return chunk, keys.gather(1, index), index
        chunk, values, columns = _nearest_in_blocks(search, start, stop, len(g), block, k)
        return chunk, torch.from_numpy(values), torch.from_numpy(columns)

    def select(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk, values, index = best(start, stop)
        if metric == "cosine":  # 1 - cos, which rounding takes a little below 0 for an item's own copy
            return (values + 1.0).clamp_(min=0), index
        # The keys rank by |g|^2 - 2 q.g, whose float32 cancellation leaves ~1e-2 between embeddings of norm ~20
        # (an image's own copy at 0.007): the k distances reported are computed directly, |q - g|, and the k
        # re-sorted by them (equal ones stay in index order).
        distances, order = torch.sort(_direct_distances(q, g, start, index.to(g.device)), dim=1, stable=True)
        return distances, index.gather(1, order.to(index.device))

    parts = _gathered(_in_parallel(select, len(q), rows, distributed), distributed)
    return torch.cat([d for d, _ in parts]).to(dev), torch.cat([i for _, i in parts]).to(dev)


DIRECT_BYTES = 1 << 22  # bytes of (rows, k, D) differences held at once for the euclidean distances knn reports


def _direct_distances(q: torch.Tensor, g: torch.Tensor, start: int, found: torch.Tensor) -> torch.Tensor:
    """``|q[start + i] - g[found[i, j]]|`` as ``(rows, k)``, a few rows at a time through one reused buffer (fresh
    (rows, k, D) tensors on worker threads made glibc's per-thread arenas grow to gigabytes at k = 500)."""
    n, k = found.shape
    dim = g.shape[1]
    rows = max(1, min(n, DIRECT_BYTES // (4 * k * dim)))
    buffer = torch.empty(rows * k, dim, dtype=g.dtype, device=g.device)
    out = torch.empty(n, k, dtype=g.dtype, device=g.device)
    for lo in range(0, n, rows):
        hi = min(lo + rows, n)
        part = buffer[: (hi - lo) * k]
        torch.index_select(g, 0, found[lo:hi].reshape(-1), out=part)
        differences = part.view(hi - lo, k, dim).sub_(q[start + lo : start + hi, None, :])
        torch.linalg.vector_norm(differences, dim=2, out=out[lo:hi])
    return out


def _exclusions(exclude: Sequence[int] | None, n_queries: int, n_gallery: int) -> np.ndarray | None:
    """``exclude`` as int64, checked to hold one gallery index (or -1) per query; None where it excludes nothing."""
    if exclude is None:
        return None
    exclude = np.asarray(exclude, dtype=np.int64)
    if exclude.shape != (n_queries,) or not ((exclude >= -1) & (exclude < n_gallery)).all():
        raise MetricLabError(f"exclude must hold one gallery index (or -1) per query: {n_queries} in [-1, {n_gallery})")
    return exclude if (exclude >= 0).any() else None


def _class_ids(query_labels: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    """int32 class ids of the queries' then the gallery's labels, shared by both."""
    _, ids = np.unique(np.concatenate([query_labels, gallery_labels]), return_inverse=True)
    return ids.astype(np.int32)


def _relevant(q_ids: np.ndarray, g_ids: np.ndarray, exclude: np.ndarray | None) -> np.ndarray:
    counts = np.bincount(g_ids, minlength=max(int(q_ids.max(initial=0)), int(g_ids.max(initial=0))) + 1)[q_ids]
    if exclude is not None:
        own = exclude >= 0
        counts[own] -= g_ids[exclude[own]] == q_ids[own]
    return counts


def matches(query_labels: Any, gallery_labels: Any, exclude: Sequence[int] | None = None) -> np.ndarray:
    """``R`` of each query: its class's gallery items, less its own (``exclude``, as in :func:`retrieval_metrics`).

    The ranking metrics score the queries whose ``R`` is above 0.
    """
    q_lab = _labels(query_labels, len(query_labels), "query_labels")
    g_lab = _labels(gallery_labels, len(gallery_labels), "gallery_labels")
    ids = _class_ids(q_lab, g_lab)
    own = None if exclude is None else np.asarray(exclude, dtype=np.int64)
    return _relevant(ids[: len(q_lab)], ids[len(q_lab) :], own)


def retrieval_metrics(
    query_emb: Any,
    query_labels: Any,
    gallery_emb: Any = None,
    gallery_labels: Any = None,
    ks: Sequence[int] = (1, 5, 10),
    metric: str = "euclidean",
    knn_k: int = 5,
    clustering: bool = True,
    seed: int = 0,
    kmeans_n_init: int = 3,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    distributed: bool = False,
    exclude: Sequence[int] | None = None,
) -> dict[str, float]:
    """Ranking, k-NN and clustering metrics of queries against a gallery, as a dict of floats.

    Keys: ``precision@k`` (same-class fraction of the top k) and ``recall@k`` (fraction of
    queries with a same-class item in the top k) for each k in ``ks``, ``map@r`` (MAP@R of
    Musgrave et al., 2020), ``r_precision``, ``knn_accuracy`` (majority vote of the
    ``knn_k`` nearest, ties to the nearest), and with ``clustering`` ``nmi`` and ``ami`` of
    sklearn ``KMeans`` on the queries (one cluster per query class, ``n_init`` and ``seed``
    fixed). Without a gallery the queries are searched leave-one-out among themselves. Lone
    queries (R = 0) are left out of the ranking metrics and a ``k`` beyond the gallery is
    clamped: see the module docstring. With ``distributed`` and an initialised torch.distributed
    process group, each process ranks its share of the queries and every process returns the
    same result, identical to one process's (clustering is computed by rank 0 only). ``exclude[i]`` is the
    gallery index of query ``i``'s own item (-1 where the gallery does not hold it), left out of its ranking as
    leave-one-out leaves out each query.
    """
    _check_metric(metric)
    if (gallery_emb is None) != (gallery_labels is None):
        raise MetricLabError("pass gallery_emb and gallery_labels together, or neither for leave-one-out")
    if not ks or any(int(k) < 1 for k in ks) or knn_k < 1:
        raise MetricLabError(f"ks and knn_k must be positive integers, got ks={tuple(ks)}, knn_k={knn_k}")
    dev = _device(query_emb, device)
    q = _embeddings(query_emb, "query_emb", dev)
    q_lab = _labels(query_labels, len(q), "query_labels")
    loo = gallery_emb is None
    g = q if loo else _embeddings(gallery_emb, "gallery_emb", dev)
    g_lab = q_lab if loo else _labels(gallery_labels, len(g), "gallery_labels")
    if q.shape[1] != g.shape[1]:
        raise MetricLabError(f"queries have {q.shape[1]} dimensions but the gallery {g.shape[1]}; embed both alike")
    exclude = np.arange(len(q)) if loo else _exclusions(exclude, len(q), len(g))
    n_ref = len(g) - int(exclude is not None)
    if n_ref < 1:
        raise MetricLabError("leave-one-out needs at least two embeddings")

    ids = _class_ids(q_lab, g_lab)
    q_ids, g_ids = ids[: len(q)], ids[len(q) :]
    relevant = _relevant(q_ids, g_ids, exclude)
    top = [min(int(k), n_ref) for k in ks]
    vote_k = min(knn_k, n_ref)
    need = np.maximum(max(*top, vote_k), relevant)
    # A large gallery whose queries need few neighbours each (R of ~10 in a product catalogue) is searched in
    # blocks, as `knn` does (_host_block): whole rows of a 1M gallery left chunks of 16 queries, whose products spent
    # their time re-packing the gallery. Many neighbours (R of thousands) keep whole rows and the coded ranking.
    most = int(need.max())
    block = _host_block(len(g), most) if _on_host(dev) else len(g)
    blocked = block < len(g)
    cached = _on_host(dev) and block in (len(g), SMALL_BLOCK)
    rows = _chunk_rows(block, most, chunk_size, dim=q.shape[1] if cached else None)

    search = _searcher(q, g, metric, exclude)

    # The GPU (if any) computes keys and selects; the bookkeeping on the ranked classes runs compiled on the host.
    ks_clamped = np.array(top, dtype=np.int64)

    def score(start: int, stop: int) -> np.ndarray:
        span = slice(start, stop)
        if blocked:
            *_, columns = _nearest_in_blocks(search, start, stop, len(g), block, most)
            return kernels.ranking_sums(g_ids[columns], q_ids[span], relevant[span], ks_clamped, vote_k)
        _, keys = search(start, stop)
        if _on_host(keys.device):
            own, rel = q_ids[span], relevant[span]
            return _ranking_sums_on_host(keys.numpy(), need[span], g_ids, own, rel, ks_clamped, vote_k)
        neighbours = _nearest(keys, need[span], g_ids)
        return kernels.ranking_sums(neighbours, q_ids[span], relevant[span], ks_clamped, vote_k)

    parts = _gathered(_in_parallel(score, len(q), rows, distributed), distributed)
    *sums, correct = np.sum(parts, axis=0)
    sums = np.array(sums)

    n_found = int((relevant > 0).sum())
    means = (sums / n_found).tolist() if n_found else [float("nan")] * len(sums)
    out = {f"precision@{k}": means[j] for j, k in enumerate(ks)}
    out |= {f"recall@{k}": means[len(ks) + j] for j, k in enumerate(ks)}
    out |= {"map@r": means[-2], "r_precision": means[-1], "knn_accuracy": float(correct) / len(q)}
    if clustering and (not distributed or _process_group()[0] == 0):
        out |= _clustering_scores(q.cpu().numpy(), ids[: len(q)], seed, kmeans_n_init)
    return out


def _clustering_scores(emb: np.ndarray, labels: np.ndarray, seed: int, n_init: int) -> dict[str, float]:
    """NMI and AMI between ``labels`` and KMeans clusters, one cluster per class."""
    from sklearn.cluster import KMeans  # scikit-learn is imported where it is used: importing it takes ~1.3 s
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    clusters = KMeans(n_clusters=len(np.unique(labels)), n_init=n_init, random_state=seed).fit_predict(emb)
    return {
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
        "ami": float(adjusted_mutual_info_score(labels, clusters)),
    }


def sample_pairs(labels: Any, num_pairs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic ``(first, second, same)`` index pairs: ``num_pairs // 2`` positives, then as many negatives.

    Positive pairs join two different items of one class, negative pairs items of two
    classes; pairs are drawn uniformly with replacement over the first item, then the second.
    """
    lab = _labels(labels, len(labels), "labels")
    _, ids, counts = np.unique(lab, return_inverse=True, return_counts=True)
    if len(counts) < 2 or counts.max() < 2:
        raise MetricLabError("pair verification needs two classes and a class with two items; evaluate more data")
    rng = np.random.default_rng(seed)
    order = np.argsort(ids, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.empty(len(ids), dtype=np.int64)
    position[order] = np.arange(len(ids)) - starts[ids[order]]  # rank of each item inside its class
    half = num_pairs // 2
    # positives: a second item of the anchor's class, skipping the anchor's own slot
    first = rng.choice(np.flatnonzero(counts[ids] >= 2), size=half)
    c = ids[first]
    slot = rng.integers(0, counts[c] - 1)
    pos_second = order[starts[c] + slot + (slot >= position[first])]
    # negatives: an item outside the anchor's class block of the class-sorted order
    neg_first = rng.integers(0, len(ids), size=half)
    c = ids[neg_first]
    slot = rng.integers(0, len(ids) - counts[c])
    neg_second = order[slot + counts[c] * (slot >= starts[c])]
    same = np.concatenate([np.ones(half, dtype=bool), np.zeros(half, dtype=bool)])
    return np.concatenate([first, neg_first]), np.concatenate([pos_second, neg_second]), same


def _equal_error_rate(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Where false accepts equal false rejects on the ROC curve ``(fpr, tpr)``, linearly interpolated."""
    gap = (1 - tpr) - fpr  # falls from 1 to -1 as the threshold loosens
    i = int(np.argmax(gap <= 0))
    t = gap[i - 1] / (gap[i - 1] - gap[i])
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def _best_threshold(same: np.ndarray, distances: np.ndarray) -> float:
    """The distance threshold (same class iff distance <= it) with the best accuracy on these pairs."""
    from sklearn.metrics import roc_curve

    fpr, tpr, scores = roc_curve(same, -distances, drop_intermediate=False)
    positives = same.sum()
    accuracy = tpr * positives + (1 - fpr) * (len(same) - positives)
    best = int(np.argmax(accuracy))
    cuts = -scores  # ascending distances; cuts[0] = -inf accepts nothing
    if best == 0:
        return float(np.nextafter(cuts[1], -np.inf))
    if best == len(cuts) - 1:
        return float(cuts[best])
    return float((cuts[best] + cuts[best + 1]) / 2)  # midway to the next distance generalises better


def verification_metrics(
    emb: Any,
    labels: Any,
    metric: str = "euclidean",
    num_pairs: int = 20000,
    seed: int = 0,
    holdout_fraction: float = 0.5,
) -> dict[str, float]:
    """Pair verification ("same class?") on balanced sampled pairs: ``roc_auc``, ``eer``, ``threshold``, accuracy.

    Pairs come from :func:`sample_pairs`. ``roc_auc`` and ``eer`` (equal error rate) use
    all pairs; ``threshold`` is the distance with the best accuracy on the first
    ``1 - holdout_fraction`` of the positive and of the negative pairs, and
    ``verification_accuracy`` is its accuracy on the remaining, held-out pairs.
    """
    from sklearn.metrics import auc, roc_curve

    _check_metric(metric)
    if not 0 < holdout_fraction < 1:
        raise MetricLabError(f"holdout_fraction must lie strictly between 0 and 1, got {holdout_fraction}")
    x = _embeddings(emb, "emb")
    half = num_pairs // 2
    fit = int(round(half * (1 - holdout_fraction)))
    if not 0 < fit < half:
        raise MetricLabError(f"num_pairs={num_pairs} leaves a split half empty; sample more pairs")
    first, second, same = sample_pairs(_labels(labels, len(x), "labels"), num_pairs, seed)
    a, b = x[torch.as_tensor(first, device=x.device)].double(), x[torch.as_tensor(second, device=x.device)].double()
    if metric == "cosine":
        distances = 1 - torch.nn.functional.cosine_similarity(a, b, dim=1)
    else:
        distances = torch.linalg.vector_norm(a - b, dim=1)
    d = distances.cpu().numpy()
    in_fit = np.zeros(len(same), dtype=bool)
    in_fit[:fit] = in_fit[half : half + fit] = True
    threshold = _best_threshold(same[in_fit], d[in_fit])
    held = ~in_fit
    fpr, tpr, _ = roc_curve(same, -d)  # all pairs' ROC curve: its area and its equal error rate
    return {
        "roc_auc": float(auc(fpr, tpr)),
        "eer": _equal_error_rate(fpr, tpr),
        "threshold": threshold,
        "verification_accuracy": float(np.mean((d[held] <= threshold) == same[held])),
    }


def evaluate_embeddings(
    train_emb: Any,
    train_labels: Any,
    test_emb: Any,
    test_labels: Any,
    ks: Sequence[int] = (1, 5, 10),
    metric: str = "euclidean",
    knn_k: int = 5,
    num_pairs: int = 20000,
    seed: int = 0,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    distributed: bool = False,
    clustering: bool = True,
) -> dict[str, dict[str, float]]:
    """All metrics of a test set: ``{"test_loo", "test_vs_train", "verification"}`` dicts of floats.

    ``test_loo`` searches the test set leave-one-out (with NMI/AMI), ``test_vs_train``
    searches the test queries in the train gallery (only when ``train_emb`` is given and shares classes;
    clustering is not repeated there), and ``verification`` scores test pairs (when there are pairs of the same
    class and of two classes). ``distributed``: see
    :func:`retrieval_metrics`; ``clustering=False`` leaves NMI/AMI out (k-means is slow with many classes).
    """
    search = {"ks": ks, "metric": metric, "knn_k": knn_k, "seed": seed, "chunk_size": chunk_size, "device": device}
    search["distributed"] = distributed
    out = {"test_loo": retrieval_metrics(test_emb, test_labels, clustering=clustering, **search)}
    # Test queries in the train gallery only where they share classes: under the class-disjoint (zero-shot)
    # protocol of CUB, Cars196 and SOP no query has a match there, and every score would be zero.
    shared = train_emb is not None and bool(np.isin(np.asarray(test_labels), np.asarray(train_labels)).any())
    if shared:
        gallery = {"gallery_emb": train_emb, "gallery_labels": train_labels, "clustering": False}
        out["test_vs_train"] = retrieval_metrics(test_emb, test_labels, **gallery, **search)
    counts = np.unique(np.asarray(test_labels), return_counts=True)[1]
    if len(counts) > 1 and counts.max() > 1:  # pairs of both kinds exist (a test set of one class has no negatives)
        out["verification"] = verification_metrics(test_emb, test_labels, metric=metric, num_pairs=num_pairs, seed=seed)
    return out
