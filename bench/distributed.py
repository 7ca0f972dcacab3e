"""Benchmark `distributed`: 1 vs 2 CPU processes (gloo, ``accelerate launch``) on the Fashion-MNIST recipe.

Per process count: samples/s and seconds per step of ``metriclab.training.engine.train`` at the same global batch
(256), an epoch's time extrapolated from the measured steps, and the share of a step spent in the
cross-process embedding gather (``metriclab.training.distributed.gather_with_grad``, timed by wrapping the
engine's reference to it from here; the library is not edited). A second measurement times the gather
alone (both processes released together by a barrier), without the wait for a slower peer that the
in-training number includes. Training on a GPU is the `gpu` benchmark's.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import emit, fmt, median, peak_rss_mib, run_child
from bench.train_vs_pml import WORK, fashion_recipe


def _train(dataset: str, global_batch: int, max_steps: int, warmup: int, output_dir: Path) -> dict[str, Any]:
    """Train ``max_steps`` steps under the launcher; time each step and each gather in it."""
    import torch
    from accelerate import PartialState

    import metriclab.training.engine as engine
    from metriclab.data import load_dataset

    state = PartialState(cpu=True)
    world, rank = state.num_processes, state.process_index
    step_times: list[float] = []
    gather_times: list[float] = []
    original_gather, original_step = engine.gather_with_grad, engine._Trainer._step

    def timed_gather(*args, **kwargs):
        start = time.perf_counter()
        out = original_gather(*args, **kwargs)
        gather_times.append(time.perf_counter() - start)
        return out

    def timed_step(self, batch, images=None):
        start = time.perf_counter()
        out = original_step(self, batch, images)
        step_times.append(time.perf_counter() - start)  # CPU ops are synchronous: this is the step's time
        return out

    engine.gather_with_grad, engine._Trainer._step = timed_gather, timed_step
    recipe = fashion_recipe(
        dataset=dataset,
        epochs=1,
        batch_size=global_batch // world,
        max_steps=max_steps,
        output_dir=str(output_dir),
        embed_train=False,
        cpu=True,
    )
    engine.train(recipe)
    steps = step_times[warmup:]
    gathers = gather_times[warmup:] if gather_times else [0.0] * len(steps)
    n_train = len(load_dataset(recipe).train_labels)
    step_s = statistics.median(steps)
    return {
        "rank": rank,
        "world": world,
        "threads": torch.get_num_threads(),
        "global_batch": global_batch,
        "timed_steps": len(steps),
        "step_s": step_s,
        "gather_s": statistics.median(gathers),
        "gather_share": sum(gathers) / sum(steps),
        "samples_per_s": global_batch / step_s,
        "epoch_s_extrapolated": -(-n_train // global_batch) * step_s,
        "peak_rss_mib": peak_rss_mib(),
    }


def _gather_alone(global_batch: int, calls: int) -> dict[str, Any]:
    """Median seconds of one ``gather_with_grad`` of a (global_batch/world, 64) shard, peers released together."""
    import torch
    from accelerate import Accelerator

    from metriclab.data.sampling import shard_sizes
    from metriclab.training.distributed import gather_with_grad

    acc = Accelerator(cpu=True)
    local = torch.randn(shard_sizes(global_batch, acc.num_processes)[acc.process_index], 64, requires_grad=True)
    times = []
    for i in range(calls + 5):
        acc.wait_for_everyone()
        start = time.perf_counter()
        gather_with_grad(local, global_batch, acc).sum().backward()
        if i >= 5:
            times.append(time.perf_counter() - start)
    result = {"rank": acc.process_index, "world": acc.num_processes, "gather_alone_s": statistics.median(times)}
    acc.end_training()  # destroys the process group: exiting with gloo's threads alive sometimes aborts
    return result


def work(argv: list[str] | None = None) -> dict[str, Any]:
    """``worker train DATASET BATCH STEPS WARMUP OUT`` or ``worker gather BATCH CALLS`` (under accelerate launch)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=("worker",))
    parser.add_argument("mode", choices=("train", "gather"))
    parser.add_argument("rest", nargs="*")
    args = parser.parse_args(argv)
    if args.mode == "train":
        dataset, batch, steps, warmup, out = args.rest
        return _train(dataset, int(batch), int(steps), int(warmup), Path(out))
    batch, calls = args.rest
    return _gather_alone(int(batch), int(calls))


def _launch(processes: int, *worker_args: str) -> list[str]:
    flags = ["--num_processes", str(processes)]
    if processes > 1:
        flags = ["--multi_gpu", *flags, "--main_process_port", str(random.randint(20000, 40000))]
    return ["python", "-m", "accelerate.commands.launch", *flags, "bench/distributed.py", "worker", *worker_args]


def run(quick: bool = False, log=print) -> tuple[str, dict[str, Any]]:
    """Run the benchmark; return its Markdown section and the raw results."""
    dataset, batch, steps, warmup, calls = ("digits", 64, 4, 1, 20) if quick else ("fashion-mnist", 256, 30, 3, 200)
    results: dict[str, Any] = {}
    lines = [
        "## distributed: 1 vs 2 CPU processes (gloo)",
        "",
        f"`recipes/fashion_mnist_triplet.py` on {dataset} through `metriclab.training.engine.train` under "
        f"`python -m accelerate.commands.launch [--multi_gpu] --num_processes N`, global batch {batch} "
        f"(per-process batch {batch}/N, global mining on), {steps} steps of which the first {warmup} are warm-up "
        "and not counted; medians over the counted steps. Time per epoch = steps per epoch x median step "
        f"(extrapolated from {steps - warmup} steps, not a full epoch). Both processes share the same 2 cores.",
        "",
        "| processes | torch threads/process | s per step | samples/s | epoch s (extrapolated) "
        "| gather s per step (in training) | gather share of step | gather alone s | peak RSS MiB/process "
        "| load before |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for processes in (1, 2):
        out = WORK / f"distributed-{processes}"
        shutil.rmtree(out, ignore_errors=True)  # the engine never overwrites a run directory
        trained = run_child(
            _launch(processes, "train", dataset, str(batch), str(steps), str(warmup), str(out)), log=log
        )
        ranks = trained.get("processes", [trained])
        alone = run_child(_launch(processes, "gather", str(batch), str(calls)), log=log)
        alone_ranks = alone.get("processes", [alone])
        results[processes] = {"train": trained, "gather": alone}
        # The slowest process sets the pace of a synchronous step.
        step = max(r["step_s"] for r in ranks)
        lines.append(
            f"| {processes} | {ranks[0]['threads']} | {fmt(step, 3)} | {fmt(batch / step)} "
            f"| {fmt(max(r['epoch_s_extrapolated'] for r in ranks))} "
            f"| {fmt(median([r['gather_s'] for r in ranks]), 4)} "
            f"| {median([r['gather_share'] for r in ranks]):.1%} "
            f"| {fmt(median([r['gather_alone_s'] for r in alone_ranks]), 5)} "
            f"| {fmt(max(r['peak_rss_mib'] for r in ranks), 0)} | {trained['load_before']} |"
        )
    lines += [
        "",
        "`gather alone`: median of "
        f"{calls} calls of `gather_with_grad` on a (batch/N, 64) shard plus its backward, both processes "
        "released by a barrier; with 1 process it returns the shard itself (no communication). The in-training "
        "gather time also includes waiting for the slower process to arrive. Training on a GPU is measured in the "
        "`gpu` section.",
    ]
    return "\n".join(lines) + "\n", results


if __name__ == "__main__":
    emit(work())
