"""Benchmark `backbones`: fine-tuning timm backbones, metriclab vs pytorch-metric-learning's documented loop.

A timm ResNet-18 and a ViT-Tiny (``vit_tiny_patch16_224`` built for 64 px), each with a 64-D linear
embedding head, trained for the same number of steps on MNIST digits at 64x64 px (grey) with the same
loss, miner and optimizer, once through ``metriclab.training.engine.train`` (encoder ``timm:<model>``,
the images resized once when loaded and kept as a tensor) and once by pml's documented loop
(``examples/notebooks/TripletMarginLossMNIST.ipynb``: a torchvision dataset with per-sample transforms,
here ``Resize(64) + ToTensor() + Normalize``, and ``DataLoader(batch_size, shuffle=True)``), the same
registry-built model. Each run is a fresh process; the two implementations alternate.

Run through ``python bench/run.py --only backbones``; ``python bench/backbones.py worker ...`` is one run.
On a GPU (ResNet-50 at 224 px, eager against channels-last + bf16 + compile) nothing has been measured yet.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import WORK, emit, fmt, median, peak_rss_mib, run_child

SIZE = 64
EMBEDDING_DIM = 64
LR = 1e-4
MODELS = {"resnet18": "timm:resnet18", "vit_tiny": "timm:vit_tiny_patch16_224"}
QUICK_MODELS = {"resnet18": "timm:test_resnet", "vit_tiny": "timm:test_vit"}


def _register_dataset(size: int) -> str:
    """Register ``mnist-<size>px``: the MNIST digits metriclab loads, resized once to ``size`` px."""
    import torch
    from torch.nn import functional as F

    from metriclab import registry
    from metriclab.data import Dataset

    name = f"mnist-{size}px"

    def resized(images: torch.Tensor) -> torch.Tensor:
        out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=False)
        return out.round().clamp(0, 255).to(torch.uint8)

    def factory() -> Dataset:
        base = registry.datasets.create("mnist")
        return Dataset(
            name=name,
            train_images=resized(base.train_images),
            train_labels=base.train_labels,
            test_images=resized(base.test_images),
            test_labels=base.test_labels,
            classes=base.classes,
            source=f"{base.source}, resized to {size}x{size}",
        )

    if name not in registry.datasets:
        registry.register_dataset(name, factory)
    return name


def run_metriclab(encoder: str, steps: int, batch_size: int, seed: int, out: Path) -> dict[str, Any]:
    """``steps`` steps of ``encoder`` through ``metriclab.training.engine.train``."""
    import json

    from metriclab.recipe import Recipe
    from metriclab.training.engine import train

    shutil.rmtree(out, ignore_errors=True)
    recipe = Recipe(
        name="bench_backbones",
        dataset=_register_dataset(SIZE),
        encoder=encoder,
        embedding_dim=EMBEDDING_DIM,
        loss="triplet",
        loss_args={"margin": 0.2},
        miner="semi-hard",
        miner_args={"margin": 0.2},
        optimizer="adam",
        lr=LR,
        batch_size=batch_size,
        epochs=1,
        max_steps=steps,
        seed=seed,
        log_every=steps,
        embed_train=False,
        output_dir=str(out),
        cpu=True,
    )
    start = time.perf_counter()
    run_dir = train(recipe)
    wall_s = time.perf_counter() - start
    metrics = json.loads((run_dir / "metrics.json").read_text())["final"]
    samples = metrics["steps"] * batch_size
    return {
        "impl": "metriclab",
        "encoder": encoder,
        "samples": samples,
        "train_s": metrics["train_seconds"],
        "samples_per_s": samples / metrics["train_seconds"],
        "wall_s": wall_s,
        "peak_rss_mib": peak_rss_mib(),
    }


def run_pml(encoder: str, steps: int, batch_size: int, seed: int) -> dict[str, Any]:
    """``steps`` steps of ``encoder`` by pml's documented loop over a torchvision dataset and DataLoader."""
    import torch
    from pytorch_metric_learning import distances, losses, miners, reducers
    from torchvision import transforms

    from bench.train_vs_pml import torchvision_dataset
    from metriclab import registry

    transform = transforms.Compose(
        [transforms.Resize(SIZE), transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]
    )
    with tempfile.TemporaryDirectory() as root:
        train_set, _, _ = torchvision_dataset("mnist", Path(root), transform)
        torch.manual_seed(seed)
        loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True)
        model = registry.encoders.create(encoder, embedding_dim=EMBEDDING_DIM, input_shape=(1, SIZE, SIZE))
        optimizer = torch.optim.Adam(model.parameters(), lr=LR)
        distance = distances.LpDistance()
        loss_func = losses.TripletMarginLoss(margin=0.2, distance=distance, reducer=reducers.ThresholdReducer(low=0))
        mining_func = miners.TripletMarginMiner(margin=0.2, distance=distance, type_of_triplets="semihard")
        start = time.perf_counter()  # from the first batch fetch to the last optimizer step, as the notebook's train()
        model.train()
        samples = 0
        for batch_idx, (data, labels) in enumerate(loader):
            optimizer.zero_grad()
            embeddings = model(data)
            indices_tuple = mining_func(embeddings, labels)
            loss = loss_func(embeddings, labels, indices_tuple)
            loss.backward()
            optimizer.step()
            samples += len(labels)
            if batch_idx + 1 >= steps:
                break
        train_s = time.perf_counter() - start
    return {
        "impl": "pml",
        "encoder": encoder,
        "samples": samples,
        "train_s": train_s,
        "samples_per_s": samples / train_s,
        "wall_s": None,
        "peak_rss_mib": peak_rss_mib(),
    }


def run(quick: bool = False, log=print) -> tuple[str, dict[str, Any]]:
    """Run the benchmark; return its Markdown section and the raw results."""
    WORK.mkdir(parents=True, exist_ok=True)
    models = QUICK_MODELS if quick else MODELS
    steps, batch_size, repeats = (2, 16, 1) if quick else (20, 64, 2)
    results: dict[str, Any] = {}
    lines = [
        "## backbones: fine-tuning timm backbones, metriclab vs the documented pml loop",
        "",
        f"timm ResNet-18 and ViT-Tiny (`vit_tiny_patch16_224` built for {SIZE} px), random initialisation (no "
        f"network here), {EMBEDDING_DIM}-D linear head, on the MNIST digits metriclab loads (the 5k subset without "
        f"a network) at {SIZE}x{SIZE} grey; triplet loss margin 0.2, semi-hard TripletMarginMiner margin 0.2, Adam "
        f"lr {LR:g}, batch {batch_size}, {steps} steps (the first included in both), one fresh process per run, "
        "the order alternating. *pml* = the `TripletMarginLossMNIST.ipynb` loop: torchvision `MNIST` from idx "
        f"files with per-sample `Resize({SIZE}) + ToTensor() + Normalize`, `DataLoader(shuffle=True)`, the same "
        "registry-built model. *metriclab* = `train()` with `encoder=timm:<model>`, the images resized once when "
        "loaded and indexed on the device (samples/s from its step clock). samples/s = training samples / "
        "seconds from the first batch to the last optimizer step.",
        "",
        "| model | implementation | run | samples/s | training s | peak RSS MiB | load before -> after |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, encoder in models.items():
        rows: dict[str, list[dict[str, Any]]] = {"pml": [], "metriclab": []}
        for i in range(repeats):
            for impl in ("pml", "metriclab") if i % 2 == 0 else ("metriclab", "pml"):
                args = ["python", "bench/backbones.py", "worker", impl, encoder, "--steps", str(steps)]
                args += ["--batch-size", str(batch_size), "--seed", str(i)]
                if impl == "metriclab":
                    args += ["--output-dir", str(WORK / f"backbones-{label}")]
                result = run_child(args, log=log, inline=quick)
                rows[impl].append(result)
                lines.append(
                    f"| {encoder} | {impl} | {i + 1} | {fmt(result['samples_per_s'])} | {fmt(result['train_s'], 2)} "
                    f"| {fmt(result['peak_rss_mib'], 0)} | {result['load_before']} -> {result['load_after']} |"
                )
        results[label] = rows
    lines += [
        "",
        "Medians:",
        "",
        "| model | pml samples/s | metriclab samples/s | metriclab / pml |",
        "|---|---|---|---|",
    ]
    for label, rows in results.items():
        pml = median([r["samples_per_s"] for r in rows["pml"]])
        ours = median([r["samples_per_s"] for r in rows["metriclab"]])
        lines.append(f"| {models[label]} | {fmt(pml)} | {fmt(ours)} | {ours / pml:.2f}x |")
    lines += [
        "",
        "GPU (ResNet-50 at 224 px, eager against channels-last + bf16 + `torch.compile`): not measured on this "
        "machine (no GPU).",
    ]
    return "\n".join(lines), results


def work(argv: list[str] | None = None) -> dict[str, Any]:
    """``worker IMPL ENCODER``: one run in this process; returns its result."""
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker")
    worker.add_argument("impl", choices=("pml", "metriclab"))
    worker.add_argument("encoder")
    worker.add_argument("--steps", type=int, default=20)
    worker.add_argument("--batch-size", type=int, default=64)
    worker.add_argument("--seed", type=int, default=0)
    worker.add_argument("--output-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.impl == "pml":
        return run_pml(args.encoder, args.steps, args.batch_size, args.seed)
    out = args.output_dir or Path(tempfile.mkdtemp(prefix="metriclab-bench-")) / "run"
    return run_metriclab(args.encoder, args.steps, args.batch_size, args.seed, out)


if __name__ == "__main__":
    emit(work())
