"""`metriclab search`, embedding files, approximate search and evaluation on several processes."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, cli, one_line_error

from metriclab.errors import MetricLabError
from metriclab.evaluation.processes import evaluate_in_processes
from metriclab.inference.search import EmbeddingSet, load_embedding_set, save_embedding_set, search, search_scores
from metriclab.metrics.retrieval import evaluate_embeddings, knn, retrieval_metrics


@pytest.fixture(scope="module")
def gallery_file(small_run, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("gallery") / "test.npz"
    result = cli("embed", small_run, "digits:test", "-o", out)
    assert result.exit_code == 0, result.output
    return out


def test_search_results_equal_knn_on_the_same_embeddings(small_run, model, image_folder, gallery_file):  # noqa: F811
    paths = sorted(str(p) for p in image_folder.rglob("*.png"))[:4]
    result = cli("search", small_run, *paths, "--gallery", gallery_file, "-k", "5", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    gallery = load_embedding_set(gallery_file)
    distances, indices = knn(model.embed(paths), gallery.embeddings, 5, metric=model.metric)
    assert [q["query"] for q in out["queries"]] == paths
    assert [[r["index"] for r in q["results"]] for q in out["queries"]] == indices.tolist()
    got = np.array([[r["distance"] for r in q["results"]] for q in out["queries"]])
    np.testing.assert_allclose(got, distances.numpy(), rtol=1e-6)
    assert [[r["path"] for r in q["results"]] for q in out["queries"]] == gallery.paths[indices.numpy()].tolist()
    assert [[r["label"] for r in q["results"]] for q in out["queries"]] == gallery.labels[indices.numpy()].tolist()
    # each query image is in the gallery (it is a test digit): found first, at distance 0
    assert [q["results"][0]["path"] for q in out["queries"]] == [f"digits:test:{p.split('/')[-1][:-4]}" for p in paths]


def test_search_table_figure_and_scores(small_run, gallery_file, tmp_path):  # noqa: F811
    figure = tmp_path / "gallery.png"
    result = cli(
        "search",
        small_run,
        "digits:train",
        "--gallery",
        gallery_file,
        "-k",
        "3",
        "--figure",
        figure,
        "--evaluate",
        "--json",
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert len(out["queries"]) == 1347 and str(figure) in result.stderr and figure.stat().st_size > 5000
    queries, gallery = load_embedding_set(gallery_file), None  # the scores equal retrieval_metrics on the same sets
    gallery = queries
    train = json.loads(cli("embed", small_run, "digits:train", "-o", tmp_path / "train.npz", "--json").stdout)
    assert train["count"] == 1347
    train = load_embedding_set(tmp_path / "train.npz")
    expected = retrieval_metrics(
        train.embeddings,
        train.labels,
        gallery.embeddings,
        gallery.labels,
        ks=(1, 3),
        metric=out["metric"],
        clustering=False,
    )
    assert out["scores"]["map@r"] == expected["map@r"] and out["scores"]["precision@3"] == expected["precision@3"]
    table = cli("search", small_run, tmp_path / "train.npz", "--gallery", gallery_file, "-k", "2")
    assert table.exit_code == 0 and "digits:test:" in table.stdout and "distance" in table.stdout


@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_embedding_files_round_trip(tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow", reason="Parquet needs the parquet extra (pyarrow)")
    rng = np.random.default_rng(0)
    data = EmbeddingSet(
        rng.normal(size=(7, 3)).astype(np.float32),
        np.array([f"img{i}.png" for i in range(7)]),
        np.array(list("abcabca")),
        {"split": np.array(["train"] * 7), "is_query": np.arange(7) % 2 == 0},
        {"run": "r", "embedding_dim": 3},
    )
    back = load_embedding_set(save_embedding_set(tmp_path / f"e{suffix}", data))
    np.testing.assert_array_equal(back.embeddings, data.embeddings)
    # relative paths are kept absolute, so the file can be used from another folder
    assert list(back.paths) == [os.path.abspath(p) for p in data.paths] and list(back.labels) == list(data.labels)
    assert list(back.columns["is_query"]) == list(data.columns["is_query"]) and back.meta["run"] == "r"


def test_a_gallery_embedded_with_other_weights_is_refused(small_run, gallery_file, image_folder, tmp_path):  # noqa: F811
    import shutil

    from safetensors.torch import load_file, save_file

    query = str(next(image_folder.rglob("*.png")))
    moved = shutil.copytree(small_run, tmp_path / "moved")  # the same weights elsewhere: the file still fits
    assert cli("search", moved, query, "--gallery", gallery_file).exit_code == 0
    weights = load_file(moved / "model.safetensors")
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}, moved / "model.safetensors")
    line = one_line_error(cli("search", moved, query, "--gallery", gallery_file))
    assert f"embedded with the weights of {small_run}" in line and "re-embed" in line
    old = load_embedding_set(gallery_file)  # a file written before embedding files named their weights
    old.meta.pop("weights_sha256")
    save_embedding_set(tmp_path / "old.npz", old)
    assert "embedded with the weights" in one_line_error(cli("search", moved, query, "--gallery", tmp_path / "old.npz"))
    assert cli("search", small_run, query, "--gallery", tmp_path / "old.npz").exit_code == 0
    old.meta = {}  # made elsewhere: nothing to compare
    save_embedding_set(tmp_path / "foreign.npz", old)
    assert cli("search", moved, query, "--gallery", tmp_path / "foreign.npz").exit_code == 0


def test_bad_galleries_fail_in_one_line(small_run, gallery_file, image_folder, tmp_path):  # noqa: F811
    query = str(next(image_folder.rglob("*.png")))
    other = EmbeddingSet(np.zeros((4, 5), np.float32), np.array(list("abcd")), meta={"run": "runs/other"})
    save_embedding_set(tmp_path / "other.npz", other)
    line = one_line_error(cli("search", small_run, query, "--gallery", tmp_path / "other.npz"))
    assert "5-D" in line and "8-D" in line and "re-embed" in line
    save_embedding_set(tmp_path / "empty.npz", EmbeddingSet(np.zeros((0, 8), np.float32), np.array([], dtype=str)))
    assert "is empty" in one_line_error(cli("search", small_run, query, "--gallery", tmp_path / "empty.npz"))
    unlabelled = load_embedding_set(gallery_file)
    unlabelled.labels = None
    save_embedding_set(tmp_path / "unlabelled.npz", unlabelled)
    line = one_line_error(
        cli("search", small_run, "digits:train", "--gallery", tmp_path / "unlabelled.npz", "--evaluate")
    )
    assert "needs labels" in line and "gallery" in line
    (tmp_path / "wrong.npz").write_bytes(b"junk")
    assert "not an embedding file" in one_line_error(
        cli("search", small_run, query, "--gallery", tmp_path / "wrong.npz")
    )
    assert "does not exist" in one_line_error(cli("search", small_run, query, "--gallery", tmp_path / "none.npz"))
    (tmp_path / "q.png").write_bytes(b"\x89PNG broken")
    line = one_line_error(cli("search", small_run, tmp_path / "q.png", "--gallery", gallery_file))
    assert "not a readable image" in line


def test_approximate_search_reports_its_recall_against_exact():
    pytest.importorskip("faiss", reason="approximate search needs the faiss extra (faiss-cpu)")
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(4000, 16)).astype(np.float32)
    queries = rng.normal(size=(300, 16)).astype(np.float32)
    exact = search(queries, gallery, 10, "euclidean")
    approx = search(queries, gallery, 10, "euclidean", approximate="faiss-ivf")
    assert exact.exact and not approx.exact and approx.recall_queries == 300
    found = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(approx.indices, exact.indices, strict=True)])
    assert approx.recall == pytest.approx(found)
    assert 0.5 < approx.recall <= 1.0
    with pytest.raises(MetricLabError, match="faiss-ivf"):
        search(queries, gallery, 10, approximate="hnsw")
    # a k beyond what the probed lists hold: faiss pads with -1, and those queries are searched exactly
    wide = search(queries[:20], gallery, 1500, "euclidean", approximate="faiss-ivf")
    assert (wide.indices >= 0).all()
    np.testing.assert_array_equal(wide.indices, search(queries[:20], gallery, 1500, "euclidean").indices)


def _clustered(n, classes, dim, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centers = rng.normal(size=(classes, dim)).astype(np.float32)
    emb = centers[labels] + 1.5 * rng.normal(size=(n, dim)).astype(np.float32)
    emb[5] = emb[6]  # an exact duplicate: ties are broken by index in every process
    return emb, labels


@pytest.mark.slow  # two spawned processes import torch: ~15 s idle, 40 s on a loaded machine
def test_two_processes_equal_one_exactly():
    test, test_labels = _clustered(700, 12, 8, 0)
    train, train_labels = _clustered(1500, 12, 8, 1)
    options = {"ks": (1, 5), "metric": "cosine", "num_pairs": 2000, "chunk_size": 64}
    one = evaluate_embeddings(train, train_labels, test, test_labels, **options)
    two = evaluate_in_processes(2, train, train_labels, test, test_labels, **options)
    assert two == one  # every float equal, not close


def _launcher(processes: int) -> list[str]:
    port = str(random.randint(20000, 40000))
    flags = ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", port]
    return [sys.executable, "-m", "accelerate.commands.launch", *flags]


@pytest.mark.slow
def test_accelerate_launch_evaluate_equals_one_process(small_run, tmp_path):  # noqa: F811
    import shutil

    run = shutil.copytree(small_run, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints"))
    single = cli("evaluate", run, "--json", "--pairs", "2000")
    assert single.exit_code == 0, single.output
    command = [*_launcher(2), "-m", "metriclab", "evaluate", str(run), "--json", "--pairs", "2000"]
    launched = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert launched.returncode == 0, launched.stderr[-3000:]
    (one,), (two,) = json.loads(single.stdout), json.loads(launched.stdout)  # rank 0 alone prints
    assert two["processes"] == 2 and one["processes"] == 1
    for section in ("test_loo", "test_vs_train", "verification"):
        assert two[section] == one[section]
    local = cli("evaluate", run, "--json", "--pairs", "2000", "--processes", "2")
    assert local.exit_code == 0, local.output
    assert {k: v for k, v in json.loads(local.stdout)[0].items() if k in ("test_loo", "verification")} == {
        k: one[k] for k in ("test_loo", "verification")
    }


def test_sharded_knn_equals_one_process_and_bounded_chunks():
    from metriclab.metrics import retrieval

    threads = torch.get_num_threads()
    emb, _ = _clustered(500, 5, 4, 2)
    d1, i1 = knn(emb, emb, 7, exclude_self=True, chunk_size=40)
    d2, i2 = knn(emb, emb, 7, exclude_self=True, chunk_size=40, distributed=True)  # no group: one process
    assert torch.equal(i1, i2) and torch.equal(d1, d2)
    # the chunk grid does not depend on the thread count, so every process cuts the queries alike
    rows = retrieval._chunk_rows(1_000_000, 10, None)
    torch.set_num_threads(1)
    try:
        assert retrieval._chunk_rows(1_000_000, 10, None) == rows
    finally:
        torch.set_num_threads(threads)


def test_each_process_ranks_a_contiguous_share_of_the_chunks(monkeypatch):
    from metriclab.metrics import retrieval

    shares = []
    for rank in range(3):
        monkeypatch.setattr(retrieval, "_process_group", lambda rank=rank: (rank, 3))
        shares.append(retrieval._chunks(1000, 64, distributed=True))
    assert [len(s) for s in shares] == [6, 6, 4]
    assert [b for s in shares for b in s] == retrieval._chunks(1000, 64)


@pytest.mark.slow
def test_quick_search_benchmark_agrees_across_libraries(tmp_path, monkeypatch):
    pytest.importorskip("faiss", reason="the search benchmark compares with faiss-cpu (the faiss extra)")
    monkeypatch.setenv("METRICLAB_BENCH_DIR", str(tmp_path))
    monkeypatch.syspath_prepend(str(ROOT))
    for name in [m for m in sys.modules if m == "bench" or m.startswith("bench.")]:
        monkeypatch.delitem(sys.modules, name)
    import importlib

    search_bench = importlib.import_module("bench.search")
    text, results = search_bench.run(quick=True, log=lambda line: None)
    for case in ("fmnist", "sop", "million"):
        rows = results[case]
        for impl in ("faiss", "pml"):  # same rankings; the sums differ in the last float digits
            assert rows[impl]["map@r"] == pytest.approx(rows["metriclab"]["map@r"], abs=1e-6)
            assert rows[impl]["precision@1"] == pytest.approx(rows["metriclab"]["precision@1"], abs=1e-9)
        assert all(rows[i]["peak_rss_mib"] > 0 for i in rows)
    assert text.count("| metriclab |") == 3 and "fastest" in text


def test_evaluate_can_leave_clustering_out(small_run, tmp_path):  # noqa: F811
    import shutil

    run = shutil.copytree(small_run, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints"))
    (without,) = json.loads(cli("evaluate", run, "--json", "--pairs", "2000", "--no-clustering").stdout)
    (with_,) = json.loads(cli("evaluate", run, "--json", "--pairs", "2000").stdout)  # 450 x 10: on by default
    assert "nmi" not in without["test_loo"] and "nmi" in with_["test_loo"]
    assert without["test_loo"]["map@r"] == with_["test_loo"]["map@r"]


def corners(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` random corners of the cube {-1, 1}^64 and then their ``n`` opposites, as float32: every product, norm
    (8) and unit vector (+-1/8) is exact, and so is the gallery's mean the euclidean search centres by (0). Two
    searches then agree bit for bit whatever order a matrix product sums in: BLAS libraries choose that order by
    the matrix's shape (MKL and OpenBLAS on AMD CPUs do), so with other points a gallery searched in blocks would
    differ from whole rows in the last bit of some distances, and ties would not be ties.
    """
    half = rng.choice(np.array([-1.0, 1.0], np.float32), (n, 64))
    return np.concatenate([half, -half])


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_knn_of_a_gallery_searched_in_blocks_equals_one_block(monkeypatch, metric, exclude_self):
    from metriclab.metrics import retrieval

    rng = np.random.default_rng(0)
    gallery = corners(rng, 2502)  # 5,004 points
    gallery[[10, 20, 2512, 2522]] = gallery[[4000, 21, 1498, 2523]]  # duplicates across blocks: ties broken by index
    queries = gallery if exclude_self else gallery[:700]
    whole = knn(queries, gallery, 9, metric=metric, exclude_self=exclude_self, chunk_size=64, device="cpu")
    monkeypatch.setattr(retrieval, "GALLERY_BLOCK", 1000)
    searched = []
    blocked = retrieval._nearest_in_blocks
    monkeypatch.setattr(retrieval, "_nearest_in_blocks", lambda *a: searched.append(a[4]) or blocked(*a))
    blocks = knn(queries, gallery, 9, metric=metric, exclude_self=exclude_self, chunk_size=64, device="cpu")
    assert set(searched) == {1000}  # blocks of 1,000 columns
    assert torch.equal(whole[1], blocks[1]) and torch.equal(whole[0], blocks[0])
    if exclude_self:
        assert not (blocks[1] == torch.arange(len(gallery))[:, None]).any()


@pytest.mark.parametrize("block", ["GALLERY_BLOCK", "SMALL_BLOCK"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("leave_one_out", [False, True])
def test_retrieval_metrics_of_a_gallery_searched_in_blocks_equal_whole_rows(monkeypatch, metric, leave_one_out, block):
    from metriclab.metrics import retrieval

    rng = np.random.default_rng(0)
    # 600 distinct points repeated across the 5,004 items, 3 points to a class, a third of the copies relabelled:
    # ties everywhere, within and across blocks, broken by index, with labels that differ among the tied.
    half = rng.integers(0, 300, 2502)
    point = np.concatenate([half, half + 300])  # each point's opposite too (see corners)
    gallery = corners(rng, 300)[point]
    labels = np.where(rng.random(5004) < 1 / 3, rng.integers(0, 200, 5004), point % 200)
    args = (gallery, labels) if leave_one_out else (gallery[:700], labels[:700], gallery, labels)
    kwargs = {"ks": (1, 3, 10), "metric": metric, "clustering": False, "chunk_size": 64, "device": "cpu"}
    monkeypatch.setattr(retrieval, block, 1000)  # blocks of 1,000 columns for the needs below
    monkeypatch.setattr(retrieval, "BLOCKED_NEED", 0)
    monkeypatch.setattr(retrieval, "SMALL_NEED", 0)
    whole = retrieval.retrieval_metrics(*args, **kwargs)  # whole rows, ranked by sorted codes
    monkeypatch.setattr(retrieval, "BLOCKED_NEED" if block == "GALLERY_BLOCK" else "SMALL_NEED", 1024)
    searched = []
    blocked = retrieval._nearest_in_blocks
    monkeypatch.setattr(retrieval, "_nearest_in_blocks", lambda *a: searched.append(a[4]) or blocked(*a))
    blocks = retrieval.retrieval_metrics(*args, **kwargs)
    assert set(searched) == {1000}  # the blocked path ran, in blocks of 1,000 columns
    assert whole.keys() == blocks.keys()
    for key, value in whole.items():  # the same counts; sums may differ in their last bit (order of addition)
        assert blocks[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert 0.05 < whole["precision@1"] < 0.95  # the ties made the order matter


def test_search_does_not_import_scikit_learn(small_run, gallery_file):  # noqa: F811
    """scikit-learn takes ~1.3 s to import and only evaluation's clustering and verification use it."""
    args = ["search", small_run, gallery_file, "--gallery", gallery_file, "-k", "3", "--json"]
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "metriclab", *map(str, args)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(json.loads(result.stdout)["queries"]) == len(load_embedding_set(gallery_file).embeddings)
    lines = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    imported = {line.rsplit("|", 1)[1].strip() for line in lines}
    assert "torch" in imported and "metriclab.metrics.retrieval" in imported
    assert not {name for name in imported if name.split(".")[0] == "sklearn"}


def test_scores_count_the_queries_whose_class_the_gallery_holds():
    """Queries of classes the gallery lacks (class-disjoint splits) are left out of the scores, and said so."""
    rng = np.random.default_rng(0)

    def items(n: int, labels: list[int]) -> EmbeddingSet:
        return EmbeddingSet(rng.normal(size=(n, 4)).astype(np.float32), np.arange(n).astype(str), np.array(labels))

    gallery = items(40, [0] * 20 + [1] * 20)
    scores = search_scores(items(6, [0, 1, 2, 2, 2, 1]), gallery, 3, "euclidean")
    assert scores["queries_scored"] == 3 and 0 <= scores["map@r"] <= 1
    with pytest.raises(MetricLabError, match="none of the 2 queries has an item of its class in the gallery"):
        search_scores(items(2, [2, 3]), gallery, 3, "euclidean")


def test_queries_that_are_gallery_items_are_left_out_of_their_own_ranking():
    """Searching a set in itself scores what leave-one-out scores, not a trivial precision@1 of 1."""
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(4), 10)
    embeddings = (labels[:, None] + rng.normal(scale=1.5, size=(40, 3))).astype(np.float32)
    whole = EmbeddingSet(embeddings, np.array([f"img/{i}.png" for i in range(40)]), labels)
    scores = search_scores(whole, whole, 5, "euclidean")
    loo = retrieval_metrics(embeddings, labels, ks=(1, 5), clustering=False)
    assert scores["queries_in_gallery"] == 40 and scores["queries_scored"] == 40
    assert scores["precision@1"] == loo["precision@1"] < 1 and scores["map@r"] == loo["map@r"]
    # some queries in the gallery, one not: each as if its own item were not there
    picked = np.array([3, 17, 25])
    queries = EmbeddingSet(
        np.concatenate([embeddings[picked], embeddings[:1] + 0.5]),
        np.array([*whole.paths[picked], "elsewhere.png"]),
        np.concatenate([labels[picked], labels[:1]]),
    )
    got = search_scores(queries, whole, 5, "euclidean")
    assert got["queries_in_gallery"] == 3 and got["queries_scored"] == 4
    alone = []
    for i in range(len(queries)):
        keep = np.arange(40) != (picked[i] if i < len(picked) else -1)
        alone.append(
            retrieval_metrics(
                queries.embeddings[i : i + 1], queries.labels[i : i + 1], embeddings[keep], labels[keep], ks=(1, 5),
                clustering=False,
            )
        )  # fmt: skip
    for key in ("precision@1", "precision@5", "map@r", "r_precision"):
        assert got[key] == pytest.approx(np.mean([a[key] for a in alone]), abs=1e-12)


def test_search_evaluate_leaves_each_querys_own_image_out_of_its_results_too(small_run, gallery_file):  # noqa: F811
    """The results listed are the ranking scored: a query that is a gallery image is not its own first result."""
    args = ["search", small_run, gallery_file, "--gallery", gallery_file, "-k", "2", "--json"]
    shown = json.loads(cli(*args).stdout)
    assert all(q["query"] == q["results"][0]["path"] for q in shown["queries"])  # without --evaluate: found first
    scored = json.loads(cli(*args, "--evaluate").stdout)
    assert scored["own_items_left_out"] == len(scored["queries"]) > 0
    assert all(q["query"] not in [r["path"] for r in q["results"]] for q in scored["queries"])
    assert [q["results"][0]["path"] for q in scored["queries"]] == [q["results"][1]["path"] for q in shown["queries"]]


def test_a_truncated_jpeg_found_while_embedding_is_left_out_with_skip_unreadable(small_run, image_folder, tmp_path):  # noqa: F811
    """A JPEG cut short keeps a header that verifies, so only decoding finds it, batches into the run: without the
    option the error names it and offers the option; with it, the file is listed and every other row is the image's
    own embedding."""
    import shutil

    from PIL import Image

    folder = shutil.copytree(image_folder, tmp_path / "photos")
    clean = cli("embed", small_run, folder, "-o", tmp_path / "clean.npz")
    assert clean.exit_code == 0, clean.output
    first = sorted(p for p in folder.iterdir())[0]
    whole = tmp_path / "whole.jpg"
    Image.open(next(first.glob("*.png"))).convert("RGB").resize((64, 64)).save(whole, quality=95)
    cut = first / "cut.jpg"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with Image.open(cut) as opened:
        opened.verify()  # the header check passes it
    stopped = cli("embed", small_run, folder, "-o", tmp_path / "all.npz", "--batch-size", "4")
    line = " ".join(stopped.output.split())
    assert stopped.exit_code == 2 and "cut.jpg is not a readable image" in line and "--skip-unreadable" in line
    assert not (tmp_path / "all.npz").exists()
    kept = cli("embed", small_run, folder, "-o", tmp_path / "kept.npz", "--batch-size", "4", "--skip-unreadable")
    assert kept.exit_code == 0, kept.output
    data, before = load_embedding_set(tmp_path / "kept.npz"), load_embedding_set(tmp_path / "clean.npz")
    assert [Path(p).name for p in data.meta["skipped_unreadable"]] == ["cut.jpg"]
    assert data.paths.tolist() == before.paths.tolist()
    np.testing.assert_allclose(data.embeddings, before.embeddings, atol=1e-5)


def test_embed_checks_every_file_first_and_can_leave_out_unreadable_ones(small_run, image_folder, tmp_path):  # noqa: F811
    import shutil

    folder = shutil.copytree(image_folder, tmp_path / "photos")
    first, second = sorted(p for p in folder.iterdir())[:2]
    (first / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (second / "cut.png").write_bytes(next(second.glob("*.png")).read_bytes()[:60])
    stopped = cli("embed", small_run, folder, "-o", tmp_path / "all.npz")
    line = " ".join(stopped.output.split())
    assert stopped.exit_code == 2 and "2 problems" in line and "broken.png" in line and "cut.png" in line
    assert "--skip-unreadable" in line and not (tmp_path / "all.npz").exists()
    kept = cli("embed", small_run, folder, "-o", tmp_path / "kept.npz", "--skip-unreadable", "--json")
    assert kept.exit_code == 0, kept.output
    summary, data = json.loads(kept.stdout), load_embedding_set(tmp_path / "kept.npz")
    assert summary["count"] == len(data) == 30 and len(summary["skipped_unreadable"]) == 2
    assert sorted(Path(p).name for p in data.meta["skipped_unreadable"]) == ["broken.png", "cut.png"]
    nothing = tmp_path / "nothing" / "a"
    nothing.mkdir(parents=True)
    shutil.copy(first / "broken.png", nothing / "broken.png")
    empty = cli("embed", small_run, nothing.parent, "-o", tmp_path / "none.npz", "--skip-unreadable")
    assert empty.exit_code == 2 and "none of the 1 images" in " ".join(empty.output.split())
