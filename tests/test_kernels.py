"""metriclab.metrics.kernels: the ranking kernels as a native object, loaded without numba, equal to numba's."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from metriclab.metrics import kernels, retrieval


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """Kernel objects go to (and are looked up in) a fresh folder; the kernels in use are restored after."""
    monkeypatch.setattr(kernels, "_cache_dirs", lambda: [tmp_path])
    monkeypatch.setattr(kernels, "_table", None)
    return tmp_path


def everything(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every kernel's output on awkward rows: ties, -0.0 beside 0.0, +inf, rows not a multiple of 16 long."""
    rows, n, classes = 50, 3001, 6
    keys = np.round(rng.normal(size=(rows, n)) * 3).astype(np.float32)
    keys[keys == 0] = rng.choice([-0.0, 0.0], size=int((keys == 0).sum()))
    keys[np.arange(rows), rng.integers(0, n, rows)] = np.inf
    gallery = rng.integers(0, classes, n).astype(np.int32)
    own = rng.integers(0, classes, rows).astype(np.int32)
    relevant = np.bincount(gallery, minlength=classes)[own].astype(np.int64)
    top, vote_k = np.array([1, 5, 10], dtype=np.int64), 5
    need = np.maximum(10, relevant)
    out = {"sums": retrieval._ranking_sums_on_host(keys, need, gallery, own, relevant, top, vote_k)}
    out["nearest"] = retrieval._nearest(torch.from_numpy(keys), np.full(rows, 300))
    out["topk"] = retrieval._select_by_topk(torch.from_numpy(keys), 40)  # codes of the GPU path's top-k
    neighbours = gallery[np.argsort(keys, axis=1, kind="stable")]
    out["ranking_sums"] = kernels.ranking_sums(neighbours, own, relevant, top, vote_k)
    return out


def test_the_native_object_computes_what_numba_computes(cache, monkeypatch):
    path = kernels.build()
    assert path is not None and path.parent == cache
    native = kernels._load(*kernels._stored(kernels._key()))
    assert native is not None, "the object links to something this process lacks"
    results = {}
    for name, table in (("native", native), ("numba", kernels._dispatchers())):
        monkeypatch.setattr(kernels, "_table", table)
        results[name] = everything(np.random.default_rng(0))
    assert results["native"].keys() == results["numba"].keys()
    for key, value in results["native"].items():
        np.testing.assert_array_equal(value, results["numba"][key], err_msg=key)
    assert results["native"]["sums"][0] > 0


def test_the_object_is_compiled_afresh_not_from_numba_s_cache(cache, monkeypatch):
    """numba stamps a cached kernel with ranking.py only: an edit of simd.py (the kernels' vector code) would leave it
    stale while the object's key (which hashes simd.py) names the new code. So a build never reads that cache."""
    from numba.core.caching import FunctionCache

    from metriclab.metrics import ranking

    def stale(*args, **kwargs):
        raise AssertionError("the build read numba's on-disk cache")

    monkeypatch.setattr(FunctionCache, "load_overload", stale)
    assert kernels.build() is not None
    assert isinstance(ranking._keep._cache, FunctionCache)  # the dispatchers' own caches are given back


def test_a_fresh_process_ranks_without_importing_numba():
    assert kernels.native(), "the native object did not build or load here (x86-64 Linux)"
    script = """
import json, sys
import numpy as np
from metriclab.metrics import kernels
from metriclab.metrics.retrieval import knn, retrieval_metrics
rng = np.random.default_rng(0)
x, y = rng.normal(size=(3000, 8)).astype(np.float32), rng.integers(0, 5, 3000)
scores = retrieval_metrics(x, y, metric="cosine", clustering=False)
print(json.dumps({"native": kernels.native(), "numba": "numba" in sys.modules, "map@r": scores["map@r"],
                  "knn": knn(x[:5], x, 3)[1].tolist()}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["native"] and not out["numba"]
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(3000, 8)).astype(np.float32), rng.integers(0, 5, 3000)
    assert out["map@r"] == retrieval.retrieval_metrics(x, y, metric="cosine", clustering=False)["map@r"]
    assert out["knn"] == retrieval.knn(x[:5], x, 3)[1].tolist()


def test_a_damaged_object_is_built_again(cache):
    key = kernels._key()
    path = kernels.build(key)
    path.write_bytes(path.read_bytes()[:-64])  # as a full disk or a killed copy would leave it
    assert kernels._stored(key) is None  # LLVM would crash on it: never loaded
    assert kernels.native()
    assert kernels._stored(key) is not None


def test_numba_runs_the_kernels_when_asked_and_where_no_object_can_be_kept(cache, monkeypatch):
    monkeypatch.setenv("METRICLAB_NATIVE_KERNELS", "0")
    assert not kernels.native()
    monkeypatch.delenv("METRICLAB_NATIVE_KERNELS")
    monkeypatch.setattr(kernels, "_table", None)
    monkeypatch.setattr(kernels, "_cache_dirs", lambda: [cache / "file" / "not-a-folder"])
    (cache / "file").write_text("")
    assert not kernels.native()
    values = np.array([[2.0, -0.0, 0.0, 1.0]], np.float32)
    assert np.argsort(kernels.codes(values, np.arange(4)[None]), axis=1).tolist() == [[1, 2, 3, 0]]


def test_the_native_kernels_refuse_arrays_they_would_misread(cache):
    kernels.build()
    native = kernels._load(*kernels._stored(kernels._key()))
    values, columns = np.zeros((2, 3), np.float32), np.zeros((2, 3), np.int64)
    with pytest.raises(TypeError, match="C-contiguous 2-D float32"):
        native["codes"](values.astype(np.float64), columns, np.empty((2, 3), np.int64))
    with pytest.raises(TypeError, match="argument 2"):
        native["codes"](values, columns, np.empty((3, 2), np.int64).T)
