"""Benchmark `quality`: what each Fashion-MNIST recipe reaches in its own 5 epochs, over seeds.

Each recipe runs as written (its epochs, batch size, schedule and precision) in a fresh process per seed,
through ``metriclab.training.engine.train`` (``bench.train_vs_pml.run_metriclab``); the recipes take turns, so
machine load hits all alike. Reported: test precision@1 and MAP@R (leave-one-out on the 10k test set, cosine,
64-D) and the engine's training seconds. The seconds depend on the load; the scores do not (a seed's run
repeats its scores exactly on the same CPU).

Run through ``python bench/run.py --only quality``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import ROOT, WORK, fmt, median, rotated, run_child

RECIPES = ("recipes/fashion_mnist_triplet.py", "recipes/fashion_mnist_cosface.py")
SEEDS = 3
TARGET = 0.92
# For scale (a classifier's test accuracy, so only roughly comparable with a leave-one-out precision@1):
# the benchmark table of Fashion-MNIST's README (github.com/zalandoresearch/fashion-mnist).
PUBLISHED = '0.899 for "AlexNet with Triplet loss" in the benchmark table of Fashion-MNIST\'s own README'


def run(quick: bool = False, repeats: int | None = None, reuse: bool = False, log=print) -> tuple[str, dict[str, Any]]:
    """Train every recipe over the seeds; return the Markdown section and the raw results."""
    WORK.mkdir(parents=True, exist_ok=True)
    dataset = "digits" if quick else "fashion-mnist"
    seeds = 1 if quick else (repeats or SEEDS)
    rows: dict[str, list[dict[str, Any]]] = {recipe: [] for recipe in RECIPES}
    for seed in range(seeds):
        for recipe in rotated(RECIPES, seed):
            args = ["python", "bench/train_vs_pml.py", "worker", "metriclab", dataset, "--seed", str(seed)]
            args += ["--recipe", str(ROOT / recipe), "--epochs", "0", "--batch-size", "0"]
            args += ["--output-dir", str(WORK / "quality" / f"{Path(recipe).stem}-{seed}")]
            args += ["--max-steps", "3"] if quick else []
            result = run_child(args, log=log, inline=quick, reuse=reuse)
            result["seed"] = seed
            rows[recipe].append(result)
    return _section(rows, dataset, quick), {"rows": rows}


def _section(rows: dict[str, list[dict[str, Any]]], dataset: str, quick: bool) -> str:
    what = "sklearn digits, 3 steps (--quick: proves the benchmark runs; not a result)" if quick else dataset
    lines = [
        f"## quality: each recipe's own epochs ({what})",
        "",
        "Each recipe as written (its epochs, batch size, schedule and `mixed_precision`), one fresh process per "
        "seed, the recipes taking turns. Test precision@1 and MAP@R: leave-one-out on the test set, cosine, 64-D. "
        "Training seconds are the engine's clock (steps only) and depend on the machine's load; the scores do not. "
        "`train()` seconds add what a run does around its steps (loading the data, building the model, each "
        "epoch's test embeddings and scores, checkpoints, the train split's embeddings and the run's files); "
        "process seconds add starting Python and the imports: the wait of `python RECIPE`.",
        "",
        "| recipe | seed | precision@1 | MAP@R | training s | `train()` s | process s | load before -> after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for recipe, results in rows.items():
        for r in results:
            lines.append(
                f"| `{recipe}` | {r['seed']} | {r['precision@1']:.4f} | {r['map@r']:.4f} | {fmt(r['train_s'], 1)} | "
                f"{fmt(r.get('wall_s'), 1)} | {fmt(r.get('process_wall_s'), 1)} | "
                f"{r['load_before']} -> {r['load_after']} |"
            )
    lines += [
        "",
        f"| recipe | mean precision@1 | seeds at or above {TARGET} | mean MAP@R | median training s | "
        "median process s |",
        "|---|---|---|---|---|---|",
    ]
    for recipe, results in rows.items():
        p1, map_at_r = [r["precision@1"] for r in results], [r["map@r"] for r in results]
        seconds = median([r["train_s"] for r in results])
        waits = [r["process_wall_s"] for r in results if r.get("process_wall_s") is not None]
        lines.append(
            f"| `{recipe}` | {sum(p1) / len(p1):.4f} | {sum(p >= TARGET for p in p1)} of {len(p1)} | "
            f"{sum(map_at_r) / len(map_at_r):.4f} | {fmt(seconds, 1)} | {fmt(median(waits), 1)} |"
        )
    lines += ["", f"Published, for scale: {PUBLISHED}."]
    return "\n".join(lines) + "\n"
