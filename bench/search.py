"""Benchmark `search`: metriclab's exact search + metrics vs faiss-cpu's exact flat indexes and AccuracyCalculator.

Three sizes, each on the same embeddings for every implementation, each call in a fresh process:

* ``fmnist``: 10,000 queries x 60,000 gallery, 10 classes, 64-D, cosine (a Fashion-MNIST test-vs-train evaluation);
  MAP@R ranks R ~ 6,000 items per query.
* ``sop``: 120,000 embeddings leave-one-out, 12,000 classes of ~10 (Stanford Online Products' size), 128-D, cosine.
* ``million``: 10,000 queries x 1,000,000 gallery, 100,000 classes of ~10 (a product catalogue), 64-D, euclidean,
  top-10.

Implementations: ``metriclab`` = ``retrieval_metrics(..., ks=(1, 10), clustering=False)`` (exact; chunked, never a
full distance matrix); ``faiss`` = ``IndexFlatIP`` (cosine, normalised) or ``IndexFlatL2`` exact search for the
``max(10, R)`` nearest, then the same metric sums in numpy; ``pml`` = ``AccuracyCalculator(k="max_bin_count")`` with
its default ``FaissKNN`` search (L2 on normalised embeddings for cosine). Embeddings are generated (seeded):
class centres on a sphere, Gaussian noise, and 12% of the items placed at another class's centre, so that
precision@1 and MAP@R are in the range of trained models (0.8-0.9 and 0.7-0.8) rather than 0 or 1.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.measure import WORK, emit, fmt, load, peak_memory, run_child

CASES = {
    # name: (queries, gallery (0 = leave-one-out), classes, dim, metric)
    "fmnist": (10_000, 60_000, 10, 64, "cosine"),
    "sop": (120_000, 0, 12_000, 128, "cosine"),
    "million": (10_000, 1_000_000, 100_000, 64, "euclidean"),
}
QUICK = {
    "fmnist": (500, 3_000, 10, 16, "cosine"),
    "sop": (3_000, 0, 300, 16, "cosine"),
    "million": (300, 20_000, 2_000, 16, "euclidean"),
}
IMPLS = ("metriclab", "faiss", "pml")
TIMEOUT = 1800  # seconds per call; AccuracyCalculator at 120k leave-one-out can take longer on a busy machine
TOLERANCE = 1e-3  # faiss and pml order near-equal distances by their own float32 sums


def _items(rng: np.random.Generator, centers: np.ndarray, n: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, len(centers), n)
    placed = labels.copy()
    moved = rng.random(n) < 0.12  # confusable items: sitting with another class
    placed[moved] = rng.integers(0, len(centers), int(moved.sum()))
    noise = rng.standard_normal((n, centers.shape[1]), dtype=np.float32)
    return centers[placed] + spread * noise, labels


def embeddings(case: str, quick: bool) -> Path:
    """The case's embeddings as an .npz (generated once, seeded), under the benchmark's scratch folder."""
    n_query, n_gallery, classes, dim, _ = (QUICK if quick else CASES)[case]
    path = WORK / f"search-{case}{'-quick' if quick else ''}.npz"
    if path.exists():
        return path
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((classes, dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    spread = 0.45 / np.sqrt(dim)  # within-class distance ~0.64 against ~1.41 between centres
    query, query_labels = _items(rng, centers, n_query, spread)
    arrays = {"query": query, "query_labels": query_labels}
    if n_gallery:
        arrays["gallery"], arrays["gallery_labels"] = _items(rng, centers, n_gallery, spread)
    WORK.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def _sums(neighbour_labels: np.ndarray, query_labels: np.ndarray, relevant: np.ndarray) -> dict[str, float]:
    """precision@1, precision@10 and MAP@R from each query's ranked neighbour labels (AccuracyCalculator's rules)."""
    found = relevant > 0
    same = neighbour_labels == query_labels[:, None]
    width = same.shape[1]
    positions = np.arange(1, width + 1)
    within = positions[None, :] <= relevant[:, None]
    hits = np.cumsum(same, axis=1)
    ap = np.sum(same * within * hits / positions, axis=1) / np.maximum(relevant, 1)
    return {
        "precision@1": float(same[found, 0].mean()),
        "precision@10": float(same[found, : min(10, width)].mean()),
        "map@r": float(ap[found].mean()),
    }


def _measure(impl: str, case: str, path: Path) -> dict[str, Any]:
    data = np.load(path)
    query, query_labels = data["query"], data["query_labels"]
    loo = "gallery" not in data
    gallery, gallery_labels = (query, query_labels) if loo else (data["gallery"], data["gallery_labels"])
    metric = (QUICK if "quick" in path.name else CASES)[case][4]
    start = time.perf_counter()
    if impl == "metriclab":
        import metriclab.metrics.kernels  # noqa: F401
        from metriclab.metrics.retrieval import retrieval_metrics
    elif impl == "faiss":
        import faiss
    elif impl == "approximate":
        from metriclab.inference.search import approximate_knn
    else:
        import torch
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    imports = time.perf_counter() - start
    with peak_memory() as memory:
        start = time.perf_counter()
        if impl == "metriclab":
            g = None if loo else gallery
            gl = None if loo else gallery_labels
            out = retrieval_metrics(query, query_labels, g, gl, ks=(1, 10), metric=metric, clustering=False)
            scores = {k: out[k] for k in ("precision@1", "precision@10", "map@r")}
        elif impl == "approximate":  # index build + search, then recall@10 against exact search on 1,000 queries
            result = approximate_knn(query, gallery, 10, metric)
            scores = {"recall@10_vs_exact": result.recall, "search_s": result.seconds}
            scores["precision@1"] = float((gallery_labels[result.indices[:, 0]] == query_labels).mean())
        else:
            q, g = query, gallery
            if metric == "cosine":
                q = query / np.linalg.norm(query, axis=1, keepdims=True)
                g = q if loo else gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
            if impl == "faiss":
                _, ids = np.unique(np.concatenate([query_labels, gallery_labels]), return_inverse=True)
                counts = np.bincount(ids[len(query) :] if not loo else ids[: len(query)])
                relevant = counts[ids[: len(query)]] - int(loo)
                width = max(10, int(relevant.max()))
                index = faiss.IndexFlatIP(g.shape[1]) if metric == "cosine" else faiss.IndexFlatL2(g.shape[1])
                index.add(np.ascontiguousarray(g))
                _, found = index.search(np.ascontiguousarray(q), width + int(loo))
                if loo:  # drop each query's own row (wherever equal distances put it)
                    own = found == np.arange(len(q))[:, None]
                    own[own.sum(1) == 0, -1] = True
                    found = found[~own].reshape(len(q), width)
                scores = _sums(gallery_labels[found], query_labels, relevant)
            else:
                calculator = AccuracyCalculator(
                    include=("precision_at_1", "mean_average_precision_at_r"),
                    k="max_bin_count",
                    device=torch.device("cpu"),
                )
                tq, tql = torch.from_numpy(q), torch.from_numpy(query_labels)
                tg, tgl = torch.from_numpy(np.ascontiguousarray(g)), torch.from_numpy(gallery_labels)
                out = calculator.get_accuracy(tq, tql, tg, tgl, ref_includes_query=loo)
                scores = {"precision@1": out["precision_at_1"], "map@r": out["mean_average_precision_at_r"]}
        seconds = time.perf_counter() - start
    return {
        "impl": impl,
        "case": case,
        "import_s": imports,
        "seconds": seconds,
        "peak_rss_mib": memory["peak_mib"],
        "added_rss_mib": memory["added_mib"],
        **{k: float(v) for k, v in scores.items()},
    }


def _machine() -> str:
    from bench.measure import machine

    info = machine()
    return f"{info['cpu']}, torch {info['torch']}, numba {info['numba']}, faiss-cpu {_version('faiss-cpu')}"


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _description() -> list[str]:
    """The module docstring's cases and implementations, as Markdown."""
    body = (__doc__ or "").split("\n\n", 1)[1]
    paragraphs = [" ".join(line.strip() for line in p.splitlines()) for p in body.split("\n\n")]
    out = []
    for p in paragraphs:
        out += [f"* {item.strip()}" for item in p.split("* ")[1:]] + [""] if p.startswith("* ") else [p]
    return out


def _call(args: list[str], log, quick: bool, reuse: bool) -> dict[str, Any]:
    """One timed child process; a call past ``TIMEOUT`` is recorded (and saved for ``--reuse``) as timed out."""
    import hashlib
    import json
    import subprocess

    from bench.measure import RUNS

    before = load()
    try:
        return run_child(args, log=log, inline=quick, reuse=reuse, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        result = {"failed": f"timed out after {TIMEOUT:,} s"}
    except RuntimeError as err:  # the child died: -9 is the kernel's out-of-memory killer on Linux
        if "failed (-9)" in str(err):
            result = {"failed": "killed (out of memory)"}
        elif asked := re.search(r"tried to allocate (\d+) bytes", str(err)):  # torch refused one allocation
            result = {"failed": f"out of memory (one allocation of {int(asked.group(1)) / 2**30:,.0f} GiB refused)"}
        else:
            result = {"failed": "failed"}
    result |= {"load_before": before, "measured": time.strftime("%Y-%m-%d %H:%M")}
    saved = RUNS / (hashlib.sha1(json.dumps(list(args)).encode()).hexdigest()[:16] + ".json")
    RUNS.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(result))  # as run_child saves a result, so --reuse does not run it again
    log(f"  {' '.join(args[1:6])}... {result['failed']}")
    return result


def run(quick: bool = False, log=print, reuse: bool = False) -> tuple[str, dict[str, Any]]:
    """Run every case with every implementation; return the Markdown section and the raw results.

    ``reuse`` takes a call's saved result instead of running it again (``bench/run.py --reuse``).
    """
    cases = QUICK if quick else CASES
    results: dict[str, Any] = {}
    lines = [
        "## search: exact search at catalogue scale, metriclab vs faiss-cpu and pml's AccuracyCalculator",
        "",
        f"Machine: {_machine()}.",
        "",
        *_description(),
        "",
        "Each cell is one fresh process: imports, then one call, timed; peak RSS is the process's high-water mark "
        "during the call (reset just before it; the embeddings themselves are loaded before) and added RSS what the "
        "call added to it. The metrics of the three must agree (|difference| <= 1e-3: faiss and pml break near-ties "
        "by their own float sums).",
        "",
        "| case | implementation | seconds | imports s | peak RSS MiB | added RSS MiB | precision@1 | precision@10 "
        "| MAP@R | load before |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    approximate_rows: list[str] = []
    for case, (n_query, n_gallery, classes, dim, metric) in cases.items():
        path = embeddings(case, quick)
        size = (
            f"{n_query:,} leave-one-out" if not n_gallery else f"{n_query:,} x {n_gallery:,}"
        ) + f", {classes:,} classes, {dim}-D, {metric}"
        rows = {}
        for impl in IMPLS:
            args = ["python", "bench/search.py", "worker", impl, case, str(path)]
            rows[impl] = _call(args, log, quick, reuse)
        for impl in IMPLS:
            r = rows[impl]
            if "failed" in r:
                lines.append(f"| {size} | {impl} | {r['failed']} | | | | | | | {r['load_before']} |")
                continue
            for key in ("precision@1", "map@r"):
                a, b = r[key], rows["metriclab"][key]
                assert abs(a - b) <= TOLERANCE, f"{case} {key}: {impl} {a} != metriclab {b}"
            lines.append(
                f"| {size} | {impl} | {fmt(r['seconds'], 2)} | {fmt(r['import_s'], 2)} | {fmt(r['peak_rss_mib'], 0)} "
                f"| {fmt(r['added_rss_mib'], 0)} | {r['precision@1']:.4f} | "
                f"{r['precision@10']:.4f} | {r['map@r']:.4f} | {r['load_before']} |"
                if "precision@10" in r
                else f"| {size} | {impl} | {fmt(r['seconds'], 2)} | {fmt(r['import_s'], 2)} | "
                f"{fmt(r['peak_rss_mib'], 0)} | {fmt(r['added_rss_mib'], 0)} | {r['precision@1']:.4f} | - | "
                f"{r['map@r']:.4f} | {r['load_before']} |"
            )
        if n_gallery >= 10 * n_query:  # the big gallery: faiss IVF through `metriclab search --approximate` too
            args = ["python", "bench/search.py", "worker", "approximate", case, str(path)]
            approx = _call(args, log, quick, reuse)
            results[f"{case}-approximate"] = approx
            if "failed" in approx:
                row = f"| {size} | {approx['failed']} | | | | {approx['load_before']} |"
            else:
                row = (
                    f"| {size} | {fmt(approx['seconds'], 2)} | {fmt(approx['search_s'], 2)} | "
                    f"{approx['recall@10_vs_exact']:.4f} | {fmt(approx['peak_rss_mib'], 0)} | {approx['load_before']} |"
                )
            approximate_rows.append(row)
        done = [i for i in IMPLS if "failed" not in rows[i]]
        fastest = min(done, key=lambda i: rows[i]["seconds"]) if done else "none"
        ratios = ", ".join(
            f"{i} {rows[i]['failed']}"
            if "failed" in rows[i]
            else f"{i} {rows[i]['seconds'] / rows['metriclab']['seconds']:.2f}x metriclab's time"
            for i in IMPLS[1:]
        )
        verdicts.append(f"{case}: fastest {fastest}; {ratios}")
        results[case] = rows
    if approximate_rows:
        lines += [
            "",
            "Approximate search, only when asked for (`metriclab search --approximate`, "
            "`metriclab.inference.search.approximate_knn`): faiss `IndexIVFFlat` (sqrt(N) lists, 16 probed), top-10; "
            "seconds = the whole call (training the index, adding, searching, and the exact search of 1,000 "
            "queries that measures its recall@10).",
            "",
            "| case | seconds | index + search s | recall@10 vs exact | peak RSS MiB | load before |",
            "|---|---|---|---|---|---|",
            *approximate_rows,
        ]
    lines += ["", "Summary (seconds relative to metriclab's; above 1 = slower than metriclab):"]
    lines += [f"- {v}" for v in verdicts]
    lines += ["", f"_Load at the end: {load()}._"]
    return "\n".join(lines) + "\n", results


def work(argv: list[str] | None = None) -> dict[str, Any]:
    """``worker IMPL CASE PATH``: one timed call; returns its result."""
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker")
    worker.add_argument("impl", choices=(*IMPLS, "approximate"))
    worker.add_argument("case", choices=list(CASES))
    worker.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    return _measure(args.impl, args.case, args.path)


if __name__ == "__main__":
    emit(work())
