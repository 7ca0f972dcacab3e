"""Benchmark `eval`: ``metrics.retrieval.retrieval_metrics`` vs pytorch-metric-learning's ``AccuracyCalculator``.

Same embeddings, same metric (cosine), leave-one-out on the test set (10k x 10k) and test queries against
the train set (10k x 60k); seconds and peak memory of each call, each in a fresh process, and the
precision@1 / MAP@R of the two must be equal. Embeddings come from the last full-size metriclab training
run of `train_vs_pml` when it exists, else from a seeded random-but-clustered 64-D set.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.measure import emit, fmt, median, peak_memory, run_child
from bench.train_vs_pml import TRAINED_RUN, WORK

TOLERANCE = 1e-6  # both compute in float32; equal rankings give equal metrics up to summation order
# Generated classes are dense (thousands of points at nearly equal distances): float32 rounding then swaps a few
# near-equal neighbours between the two implementations.
TOLERANCE_GENERATED = 1e-5


def embeddings(quick: bool) -> tuple[Path, str]:
    """An .npz with query/reference embeddings and labels, and a sentence saying where they came from."""
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / ("eval-quick.npz" if quick else "eval.npz")
    test, train = TRAINED_RUN / "embeddings" / "test.npz", TRAINED_RUN / "embeddings" / "train.npz"
    if not quick and test.exists() and train.exists():
        q, r = np.load(test), np.load(train)
        keys = {k for k in q.files}
        emb_key = "embeddings" if "embeddings" in keys else q.files[0]
        np.savez(
            path,
            query=q[emb_key],
            query_labels=q["labels"],
            reference=r[emb_key],
            reference_labels=r["labels"],
        )
        recipe = json.loads((TRAINED_RUN / "config.json").read_text())["recipe"]
        source = (
            f"real embeddings: the 64-D test ({len(q['labels']):,}) and train ({len(r['labels']):,}) embeddings of "
            f"the metriclab Fashion-MNIST run in {TRAINED_RUN} (recipe `{recipe['name']}`, {recipe['epochs']} "
            "epoch(s); written by `train_vs_pml`, or put there by hand)"
        )
        return path, source
    if quick:  # tiny and well separated: proves the suite runs, with exactly equal metrics
        rng = np.random.default_rng(0)
        centers = rng.normal(size=(10, 64)).astype(np.float32)
        q_labels, r_labels = rng.integers(0, 10, 500), rng.integers(0, 10, 3000)
        np.savez(
            path,
            query=centers[q_labels] + 1.2 * rng.normal(size=(500, 64)).astype(np.float32),
            query_labels=q_labels,
            reference=centers[r_labels] + 1.2 * rng.normal(size=(3000, 64)).astype(np.float32),
            reference_labels=r_labels,
        )
        return path, "random-but-clustered 64-D set (10 Gaussian classes, seed 0): 500 queries, 3,000 reference"
    n_query, n_ref, dim = 10_000, 60_000, 64
    from bench.search import _items

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((10, dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    spread = 0.45 / np.sqrt(dim)
    query, query_labels = _items(rng, centers, n_query, spread)
    reference, reference_labels = _items(rng, centers, n_ref, spread)
    np.savez(path, query=query, query_labels=query_labels, reference=reference, reference_labels=reference_labels)
    return (
        path,
        f"generated 64-D embeddings standing in for Fashion-MNIST's (no Fashion-MNIST run here): 10 classes "
        f"(centres on a sphere, Gaussian noise, 12% of items at another class's centre, seed 0), "
        f"{n_query:,} queries, {n_ref:,} reference",
    )


def _measure(impl: str, mode: str, path: Path, calls: int = 2) -> dict[str, Any]:
    """Time the implementation's imports, then ``calls`` evaluation calls in this process; peak RSS of the first.

    The first call in a fresh process is the headline: it includes one-time costs (loading metriclab's
    compiled kernels, torch's first-use initialisation); later calls are what an evaluation at every
    epoch end costs.
    """
    import torch

    data = np.load(path)
    query, query_labels = data["query"], data["query_labels"]
    reference = data["reference"] if mode == "ref" else None
    reference_labels = data["reference_labels"] if mode == "ref" else None
    start = time.perf_counter()
    if impl == "metriclab":
        import metriclab.metrics.kernels  # noqa: F401
        from metriclab.metrics.retrieval import retrieval_metrics

        def evaluate() -> tuple[float, float]:
            scores = retrieval_metrics(
                query, query_labels, reference, reference_labels, ks=(1,), metric="cosine", clustering=False
            )
            return scores["precision@1"], scores["map@r"]
    else:
        from pytorch_metric_learning.distances import CosineSimilarity
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
        from pytorch_metric_learning.utils.inference import CustomKNN

        # pml's torch CustomKNN does the search here; its default FaissKNN is compared in bench/search.py.
        calculator = AccuracyCalculator(
            include=("precision_at_1", "mean_average_precision_at_r"),
            k=None if impl == "pml-default" else "max_bin_count",  # None: AccuracyCalculator's default
            device=torch.device("cpu"),
            knn_func=CustomKNN(CosineSimilarity()),
        )
        q, ql = torch.from_numpy(query), torch.from_numpy(query_labels)

        def evaluate() -> tuple[float, float]:
            if reference is None:
                scores = calculator.get_accuracy(q, ql, q, ql, ref_includes_query=True)
            else:
                r, rl = torch.from_numpy(reference), torch.from_numpy(reference_labels)
                scores = calculator.get_accuracy(q, ql, r, rl, ref_includes_query=False)
            return scores["precision_at_1"], scores["mean_average_precision_at_r"]

    import_seconds = time.perf_counter() - start
    seconds, cpu = [], []
    for call in range(calls):
        with peak_memory() as call_memory:
            start, cpu_start = time.perf_counter(), time.process_time()
            p1, mapr = evaluate()
            seconds.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
        if call == 0:
            memory = call_memory
    return {
        "impl": impl,
        "mode": mode,
        "import_s": import_seconds,
        "seconds": seconds[0],
        "later_s": seconds[1:],
        "cpu_s": cpu,
        "peak_rss_mib": memory["peak_mib"],
        "added_rss_mib": memory["added_mib"],
        "precision@1": float(p1),
        "map@r": float(mapr),
        "threads": torch.get_num_threads(),
    }


def _cpu(rows: list[dict[str, Any]]) -> str:
    """Median process CPU seconds of the first and of the later calls: what the call costs whatever the load."""
    first = median([r["cpu_s"][0] for r in rows if r.get("cpu_s")])
    later = median([c for r in rows for c in (r.get("cpu_s") or [])[1:]])
    return f"{fmt(first, 2)} / {fmt(later, 2)}"


def run(quick: bool = False, log=print) -> tuple[str, dict[str, Any]]:
    """Run the benchmark; return its Markdown section and the raw results."""
    WORK.mkdir(parents=True, exist_ok=True)
    path, source = embeddings(quick)
    tolerance = TOLERANCE_GENERATED if source.startswith("generated") else TOLERANCE
    # 10k x 60k takes about a minute per pml call on 2 loaded cores: 2 runs there, 3 for leave-one-out.
    repeats = {"loo": 1, "ref": 1} if quick else {"loo": 3, "ref": 2}
    data = np.load(path)
    sizes = {"loo": f"{len(data['query']):,} x {len(data['query']):,} leave-one-out"}
    sizes["ref"] = f"{len(data['query']):,} queries x {len(data['reference']):,} reference"
    results: dict[str, Any] = {"source": source}
    lines = [
        "## eval: metriclab.metrics.retrieval vs pytorch-metric-learning's AccuracyCalculator",
        "",
        f"Embeddings: {source}. Metric: cosine. pml: `AccuracyCalculator(include=(precision_at_1, "
        "mean_average_precision_at_r), k='max_bin_count', knn_func=CustomKNN(CosineSimilarity()))` on CPU "
        "(its default faiss search is compared in the `search` section); *pml-default* is the same with "
        "AccuracyCalculator's default `k=None` (every reference item ranked), leave-one-out only. "
        "metriclab: `retrieval_metrics(..., ks=(1,), "
        "metric='cosine', clustering=False)`, which also returns recall@1, R-precision and k-NN accuracy. "
        f"Each run is a fresh process, {repeats['loo']} (leave-one-out) and {repeats['ref']} (vs reference) "
        "run(s) each, interleaved. A run times the implementation's imports (torch already imported), then its "
        "**first call**, which carries one-time costs (loading metriclab's compiled kernels, ~0.05 s without numba; "
        "threadpoolctl's library scan; torch's first-use set-up), then a **second call** in the same process, "
        "which is what each later evaluation (every epoch end, the second search of `metriclab evaluate`) costs. "
        "Peak memory = the process's peak RSS during the first call (kernel high-water mark reset just before it) "
        "and what that call added to the RSS before it. CPU s = the process's CPU time during a call (all threads): "
        "on a shared machine it shows what a call costs when wall times are inflated by other jobs. "
        "The benchmark asserts equal precision@1 and MAP@R "
        f"(|difference| <= {tolerance:g}).",
        "",
        "| size | implementation | 1st call s (median) | runs (s) | 2nd call s (median) | imports s "
        "| peak RSS MiB | added RSS MiB | precision@1 | MAP@R | load before | CPU s, 1st / 2nd call (median) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary = []
    for mode in ("loo", "ref"):
        rows: dict[str, list[dict[str, Any]]] = {"pml": [], "metriclab": []}
        for i in range(repeats[mode]):
            for impl in ("pml", "metriclab") if i % 2 == 0 else ("metriclab", "pml"):
                rows[impl].append(
                    run_child(["python", "bench/evaluation.py", "worker", impl, mode, str(path)], log=log, inline=quick)
                )
        if mode == "loo":  # its default k ranks the whole reference set: one run of one call, only at this size
            args = ["python", "bench/evaluation.py", "worker", "pml-default", mode, str(path), "--calls", "1"]
            rows["pml-default"] = [run_child(args, log=log, inline=quick)]
        for impl in rows:
            for key in ("precision@1", "map@r"):
                a, b = rows[impl][0][key], rows["metriclab"][0][key]
                assert abs(a - b) <= tolerance, f"{mode} {key}: AccuracyCalculator ({impl}) {a} != metriclab {b}"
        results[mode] = rows
        med, later = {}, {}
        for impl in rows:
            rs = rows[impl]
            med[impl] = median([r["seconds"] for r in rs])
            seconds_later = [s for r in rs for s in r["later_s"]]
            later[impl] = median(seconds_later) if seconds_later else None
            peak, added, imports = (median([r[k] for r in rs]) for k in ("peak_rss_mib", "added_rss_mib", "import_s"))
            lines.append(
                f"| {sizes[mode]} | {impl} | {fmt(med[impl], 2)} | {', '.join(fmt(r['seconds'], 2) for r in rs)} "
                f"| {fmt(later[impl], 2)} | {fmt(imports, 2)} | {fmt(peak, 0)} | {fmt(added, 0)} "
                f"| {rs[0]['precision@1']:.6f} | {rs[0]['map@r']:.6f} | {', '.join(r['load_before'] for r in rs)} "
                f"| {_cpu(rs)} |"
            )
        summary.append(
            f"{sizes[mode]}: **{med['pml'] / med['metriclab']:.1f}x faster** than AccuracyCalculator with "
            f"k='max_bin_count' on the first call, {later['pml'] / later['metriclab']:.1f}x on the second"
        )
        if "pml-default" in med:
            summary.append(
                f"{sizes[mode]}: **{med['pml-default'] / med['metriclab']:.1f}x faster** than AccuracyCalculator "
                "with its default k=None (first calls)"
            )
    lines += ["", "Speed-up (median pml s / median metriclab s), target >= 5x; equal results asserted:"]
    lines += [f"- {s}" for s in summary]
    return "\n".join(lines) + "\n", results


def work(argv: list[str] | None = None) -> dict[str, Any]:
    """``worker IMPL MODE PATH``: one timed evaluation; returns its result."""
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker")
    worker.add_argument("impl", choices=("pml", "pml-default", "metriclab"))
    worker.add_argument("mode", choices=("loo", "ref"))
    worker.add_argument("path", type=Path)
    worker.add_argument("--calls", type=int, default=2, help="evaluation calls in this process (the first is timed)")
    args = parser.parse_args(argv)
    return _measure(args.impl, args.mode, args.path, args.calls)


if __name__ == "__main__":
    emit(work())
