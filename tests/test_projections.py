"""Projections keep their shapes and structure; scores tell separated classes from random labels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from metriclab.errors import MetricLabError
from metriclab.viz.projections import numba_cache_dir, project, projected_panel, projection_scores, side_by_side


def blobs(n: int = 300, dims: int = 10, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    centres = rng.normal(size=(classes, dims)) * 10
    return (centres[labels] + rng.normal(size=(n, dims))).astype(np.float32), labels


@pytest.fixture(autouse=True)
def one_openmp_thread():
    """t-SNE's OpenMP threads spin while they wait: on a busy machine one thread is many times faster."""
    with threadpool_limits(1, user_api="openmp"):
        yield


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_project_reduces_to_two_dims_and_keeps_classes_apart(method):
    x, labels = blobs(120)
    points = project(x, method, seed=0)
    assert points.shape == (120, 2) and points.dtype == np.float32 and np.isfinite(points).all()
    assert projection_scores(points, labels)["knn_accuracy"] > 0.95


def test_project_flattens_images():
    images = np.random.default_rng(0).random((50, 1, 8, 8))
    assert project(images, "pca").shape == (50, 2)


def linear_fit_residual(x: np.ndarray, points: np.ndarray) -> float:
    """Share of ``points``' variance that no affine map of ``x`` explains (0 for PCA, large for t-SNE/UMAP)."""
    design = np.hstack([x, np.ones((len(x), 1))]).astype(np.float64)
    target = points.astype(np.float64)
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    return float(((design @ coef - target) ** 2).sum() / ((target - target.mean(0)) ** 2).sum())


def test_pca_projects_onto_the_two_leading_principal_axes():
    x, _ = blobs(120)
    points = project(x, "pca", seed=0)
    # numpy's eigen-decomposition of the covariance, not sklearn: each axis up to its sign.
    _, vectors = np.linalg.eigh(np.cov(x.astype(np.float64), rowvar=False))
    expected = (x - x.mean(0)) @ vectors[:, ::-1][:, :2]
    for axis in range(2):
        error = min(np.abs(points[:, axis] - s * expected[:, axis]).max() for s in (1, -1))
        assert error < 1e-3 * np.abs(expected[:, axis]).max()


def test_tsne_is_a_nonlinear_embedding_and_reproducible():
    x = np.random.default_rng(0).normal(size=(120, 10)).astype(np.float32)  # no clusters to dominate the fit
    points = project(x, "tsne", seed=3)
    assert linear_fit_residual(x, points) > 0.1  # PCA, or any linear map, leaves ~0
    assert linear_fit_residual(x, project(x, "pca", seed=0)) < 1e-6
    assert np.array_equal(points, project(x, "tsne", seed=3))


@pytest.mark.parametrize("method", ["none", "pca", "tsne", "umap"])
def test_two_dimensional_input_is_returned_as_is(method, monkeypatch):
    # Off-centre and skewed, so that any projection method that ran would move the points.
    x = np.random.default_rng(0).normal(size=(30, 2)) * [5.0, 0.2] + [100.0, -40.0]
    assert not np.allclose(project(np.hstack([x, x[:, :1]]), "pca")[:, :2], x)
    for module, name in [("sklearn.decomposition", "PCA"), ("sklearn.manifold", "TSNE")]:
        monkeypatch.setattr(f"{module}.{name}", lambda *a, _n=name, **k: pytest.fail(f"{_n} ran on 2-D input"))
    monkeypatch.setattr("metriclab.viz.projections.import_umap", lambda: pytest.fail("UMAP ran on 2-D input"))
    points = project(x, method)
    assert np.allclose(points, x) and points is not x


def test_project_explains_impossible_requests():
    with pytest.raises(MetricLabError, match="'umap', 'tsne' or 'pca'"):
        project(np.zeros((30, 5)), "none")
    with pytest.raises(MetricLabError, match="choose one of"):
        project(np.zeros((30, 5)), "isomap")
    with pytest.raises(MetricLabError, match="at least 4"):
        project(np.zeros((3, 5)), "pca")


def test_scores_separate_clusters_from_random_labels():
    points, labels = blobs(400, dims=2, classes=4)
    good = projection_scores(points, labels, high_dim=points)
    assert good["knn_accuracy"] > 0.95 and good["silhouette"] > 0.5 and good["trustworthiness"] > 0.99
    shuffled = np.random.default_rng(1).permutation(labels)
    bad = projection_scores(points, shuffled)
    assert bad["knn_accuracy"] < 0.45 and bad["silhouette"] < 0.1 and "trustworthiness" not in bad
    unrelated = np.random.default_rng(2).normal(size=(400, 20))
    assert projection_scores(points, labels, high_dim=unrelated)["trustworthiness"] < 0.7


def test_scores_subsample_large_inputs_and_check_lengths():
    points, labels = blobs(2500, dims=2, classes=5)
    scores = projection_scores(points, labels, high_dim=points)
    assert set(scores) == {"knn_accuracy", "silhouette", "trustworthiness"} and scores["trustworthiness"] > 0.99
    with pytest.raises(MetricLabError, match="high_dim"):
        projection_scores(points, labels, high_dim=points[:10])


def test_numba_cache_dir_follows_metriclab_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("METRICLAB_CACHE", str(tmp_path))
    assert numba_cache_dir() == tmp_path / "numba"
    monkeypatch.delenv("METRICLAB_CACHE")
    assert numba_cache_dir() == numba_cache_dir().home() / ".cache" / "metriclab" / "numba"


KERNELS = """
import numba


def _total(x):
    s = 0.0
    for v in x:
        s += v
    return s


total = numba.njit(_total)
total_parallel = numba.njit(_total, parallel=True)
"""

# A fresh process: load the kernels module, give it metriclab's disk cache, call it, report what numba did.
CACHED_CALL = """
import importlib.util, json, os, sys
from pathlib import Path
import numba, numpy as np
njit, config_dir = numba.njit, numba.config.CACHE_DIR
from metriclab.viz.projections import _prepare_kernels
spec = importlib.util.spec_from_file_location("kernels", sys.argv[1])
kernels = sys.modules["kernels"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kernels)
count = _prepare_kernels([kernels], Path(sys.argv[2]))
kernels.total(np.arange(4.0))
print(json.dumps({
    "count": count,
    "hits": sum(kernels.total.stats.cache_hits.values()),
    "misses": sum(kernels.total.stats.cache_misses.values()),
    "parallel": type(kernels.total_parallel._cache).__name__,
    "nogil": [kernels.total.targetoptions.get("nogil"), kernels.total_parallel.targetoptions.get("nogil")],
    "untouched": numba.njit is njit and numba.config.CACHE_DIR == config_dir and "NUMBA_CACHE_DIR" not in os.environ,
}))
"""


def test_kernel_disk_cache_is_per_kernel_and_persists(tmp_path):
    """Compiled code goes to the given directory and the next process loads it; kernels release the GIL; numba's
    settings stay as they were."""
    module = tmp_path / "kernels.py"
    module.write_text(KERNELS)
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}

    def run() -> dict:
        args = [sys.executable, "-c", CACHED_CALL, str(module), str(cache)]
        done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = run()
    expected = {"count": 1, "hits": 0, "misses": 1, "parallel": "NullCache", "nogil": [True, True], "untouched": True}
    assert first == expected
    assert list(cache.rglob("kernels._total-*.nbc")), "nothing was written to the cache directory"
    assert run()["hits"] == 1  # a new process loads the compiled kernel instead of compiling it


# UMAP below: about 30 s the first time on a machine (numba compiles umap's kernels into the cache in
# numba_cache_dir()), a few seconds on later runs; marked slow, and the data are kept small.


@pytest.mark.slow
def test_import_umap_caches_its_kernels_on_disk(tmp_path):
    """In a fresh process, umap's kernels get a disk cache, serial/parallel twins excepted; numba is left alone."""
    script = """
import json, os, numba
from numba.core.caching import FunctionCache
njit, config_dir = numba.njit, numba.config.CACHE_DIR
from metriclab.viz.projections import import_umap, numba_cache_dir
umap = import_umap()
from umap import layouts, umap_

def cache(kernel):
    found = kernel._cache
    return found._cache_path.startswith(str(numba_cache_dir())) if isinstance(found, FunctionCache) else None

print(json.dumps({
    "untouched": numba.njit is njit and numba.config.CACHE_DIR == config_dir and "NUMBA_CACHE_DIR" not in os.environ,
    "smooth_knn_dist": cache(umap_.smooth_knn_dist),
    "serial_layout": cache(layouts._nb_optimize_layout_euclidean_single_epoch),
    "parallel_layout": cache(layouts._nb_optimize_layout_euclidean_single_epoch_parallel),
}))
"""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"} | {"METRICLAB_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {"untouched": True, "smooth_knn_dist": True, "serial_layout": True, "parallel_layout": None}


@pytest.mark.slow
def test_umap_projects_high_dimensional_pixels():
    x, labels = blobs(300, dims=784)  # above PCA_FIRST_ABOVE: goes through PCA to 50 dims first
    points = project(x, "umap", seed=0)
    assert points.shape == (300, 2) and np.isfinite(points).all()
    assert projection_scores(points, labels)["knn_accuracy"] > 0.95
    assert np.array_equal(points, project(x, "umap", seed=0))


@pytest.mark.slow
def test_side_by_side_projections_equal_one_after_another(monkeypatch):
    """Projections run in threads give the same panels, points and scores as in one thread, in the order asked."""
    pixels, labels = blobs(400, dims=64)
    embedding = pixels[:, :8] * 0.5
    jobs = [("pixels", pixels, "umap"), ("embedding", embedding, "umap"), ("pca", embedding, "pca")]
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    with side_by_side(len(jobs)) as pool:
        assert not isinstance(pool, ThreadPoolExecutor)
        alone = [pool.submit(projected_panel, *job, labels, 0).result() for job in jobs]
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with side_by_side(len(jobs)) as pool:
        assert isinstance(pool, ThreadPoolExecutor)
        futures = [pool.submit(projected_panel, *job, labels, 0) for job in jobs]
        together = [future.result() for future in futures]
    assert [p.title for p in together] == ["pixels", "embedding", "pca"]
    for one, other in zip(alone, together, strict=True):
        assert np.array_equal(one.points, other.points) and one.scores == other.scores
        assert one.points.shape == (400, 2) and one.seconds > 0 and one.scores["knn_accuracy"] > 0.9
    with side_by_side(1) as pool, pytest.raises(MetricLabError, match="at least 4"):
        pool.submit(projected_panel, "few", pixels[:3], "umap", None, 0).result()
