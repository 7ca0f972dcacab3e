"""Benchmark `ttq`: training seconds to a test precision@1 of 0.85 on Fashion-MNIST, and the curve to it.

Three contenders, each in a fresh process per seed, interleaved (the order rotates per seed) so machine
load hits all alike: pytorch-metric-learning's documented loop (``bench.train_vs_pml.run_pml``, up to two
epochs, stopped once it has reached the target), the reference recipe ``recipes/fashion_mnist_triplet.py``
and the fast recipe ``recipes/fashion_mnist_fast.py``, both through ``metriclab.training.engine.train`` with their own
epochs and schedules. Test precision@1 (leave-one-out, cosine, 64-D) is scored every few steps: pml's
loop pauses its clock while scoring; metriclab writes a checkpoint outside its clock and scores it after
the run (``bench.train_vs_pml.checkpoint_curve``). Seconds are training seconds only.

Run through ``python bench/run.py --only ttq``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import ROOT, WORK, fmt, median, rotated, run_child

TARGET = 0.85
SEEDS = 3


@dataclasses.dataclass(frozen=True)
class Contender:
    """One way of training: the worker's ``impl``, its recipe file, epochs (0: the recipe's own), scoring interval."""

    label: str
    impl: str
    recipe: str | None
    epochs: int
    eval_every: int


def contenders(quick: bool) -> list[Contender]:
    """The three contenders (``quick``: tiny ones on sklearn digits that only prove the benchmark runs)."""
    reference, fast = "recipes/fashion_mnist_triplet.py", "recipes/fashion_mnist_fast.py"
    if quick:
        return [
            Contender("pytorch-metric-learning loop", "pml", None, 1, 1),
            Contender("metriclab reference recipe", "metriclab", reference, 1, 1),
            Contender("metriclab fast recipe", "metriclab", fast, 1, 1),
        ]
    return [
        Contender("pytorch-metric-learning loop (2 epochs, Adam 1e-3, batch 256)", "pml", None, 2, 20),
        Contender(f"metriclab reference recipe (`{reference}`)", "metriclab", reference, 0, 20),
        Contender(f"metriclab fast recipe (`{fast}`)", "metriclab", fast, 0, 10),
    ]


def _reached(curve: list, target: float) -> tuple[float, int] | None:
    """(training seconds, step) of the first scored point at or above ``target``; None if never."""
    return next(((seconds, step) for seconds, step, p1 in curve if p1 >= target), None)


def run(quick: bool = False, repeats: int | None = None, reuse: bool = False, log=print) -> tuple[str, dict[str, Any]]:
    """Run every contender over the seeds; return the Markdown section and the raw results."""
    WORK.mkdir(parents=True, exist_ok=True)
    dataset = "digits" if quick else "fashion-mnist"
    seeds = 1 if quick else (repeats or SEEDS)
    target = 0.3 if quick else TARGET
    entries = contenders(quick)
    rows: dict[str, list[dict[str, Any]]] = {c.label: [] for c in entries}
    for seed in range(seeds):
        for c in rotated(entries, seed):
            args = ["python", "bench/train_vs_pml.py", "worker", c.impl, dataset, "--seed", str(seed)]
            args += ["--eval-every", str(c.eval_every), "--epochs", str(c.epochs)]
            if c.impl == "pml":  # its clock pauses while it scores, so it can stop where the curve ends
                args += ["--stop-at", str(target)]
            if c.impl == "metriclab":
                args += ["--recipe", str(ROOT / c.recipe), "--batch-size", "0"]
                args += ["--output-dir", str(WORK / "ttq" / f"{Path(c.recipe).stem}-{seed}")]
            args += ["--batch-size", "32", "--max-steps", "3"] if quick else []
            result = run_child(args, log=log, inline=quick, reuse=reuse)
            result["seed"] = seed
            rows[c.label].append(result)
    return _section(entries, rows, target, dataset, quick), {"target": target, "rows": rows}


def _section(entries: list[Contender], rows: dict[str, list[dict[str, Any]]], target: float, dataset: str, quick: bool):
    what = "sklearn digits, 3 steps (--quick: proves the benchmark runs; not a result)" if quick else dataset
    lines = [
        f"## ttq: time to test precision@1 {target:.2f} ({what})",
        "",
        "Training seconds until the test precision@1 (leave-one-out on the 10k test set, cosine, 64-D) first "
        f"reaches {target:.2f}, for pytorch-metric-learning's documented loop (as in `train_vs_pml`; up to two epochs, "
        "stopped at the first score at or above the target, so its 'whole run' and 'final' columns are at that point), "
        "the reference recipe `recipes/fashion_mnist_triplet.py` and the fast recipe `recipes/fashion_mnist_fast.py` "
        "(each with its own epochs and schedule, through `metriclab.training.engine.train`). One fresh process per "
        "run, the order rotated per seed. Scored every few steps (see the curve); pml's loop pauses its clock "
        "while scoring, metriclab writes a checkpoint outside its clock and scores it after the run.",
        "",
        f"| contender | seed | seconds to {target:.2f} (step) | training s, whole run | final precision@1 | "
        "final MAP@R | load before -> after |",
        "|---|---|---|---|---|---|---|",
    ]
    summary = []
    for c in entries:
        times = []
        for r in rows[c.label]:
            hit = _reached(r.get("curve", []), target)
            times.append(hit[0] if hit else None)
            cell = f"{hit[0]:.1f} ({hit[1]})" if hit else "not reached"
            lines.append(
                f"| {c.label} | {r['seed']} | {cell} | {fmt(r['train_s'], 2)} | {r['precision@1']:.4f} | "
                f"{r['map@r']:.4f} | {r['load_before']} -> {r['load_after']} |"
            )
        reached = [t for t in times if t is not None]
        med = median(reached) if len(reached) == len(times) else None
        summary.append((c, med, len(reached), len(times)))
    lines += ["", f"| contender | median seconds to {target:.2f} | runs that reached it |", "|---|---|---|"]
    for c, med, hit, n in summary:
        lines.append(f"| {c.label} | {'-' if med is None else f'{med:.1f}'} | {hit} of {n} |")
    lines += ["", "The curves (median over seeds at each scored step: training seconds, test precision@1):", ""]
    for c in entries:
        lines += [f"- {c.label}: {_curve_text(rows[c.label])}"]
    return "\n".join(lines) + "\n"


def _curve_text(runs: list[dict[str, Any]], most: int = 14) -> str:
    """``step: s / p@1`` at the steps every run scored, thinned to at most ``most`` points."""
    curves = [{step: (s, p1) for s, step, p1 in r.get("curve", [])} for r in runs]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    if not steps:
        return "no scored points"
    stride = max(1, -(-len(steps) // most))
    picked = steps[::stride] + ([steps[-1]] if (len(steps) - 1) % stride else [])
    points = []
    for step in picked:
        seconds = median([c[step][0] for c in curves])
        p1 = median([c[step][1] for c in curves])
        points.append(f"{step}: {seconds:.1f} s / {p1:.3f}")
    return ", ".join(points)
