"""Benchmark `loader`: streaming JPEG folders, against torchvision's ImageFolder + DataLoader.

1. Throughput (images/s) of one pass over a folder of JPEGs, decoded and augmented
   (random-resized-crop + flip) to 224 px and to 64 px: metriclab's image source (torchvision.io decoding
   in DataLoader workers fed index batches) against ``torchvision.datasets.ImageFolder`` (PIL decoding)
   + ``DataLoader`` with the same transforms, batch size and workers, interleaved. Where the time goes:
   decoding alone and the transform alone, per image, in one process.
2. Peak memory (RSS) of one training epoch on 2,000 against 20,000 images: the training process and its
   largest worker.
3. End-to-end samples/s of ``recipes/image_folder.py`` (its small ConvNet at 64 px).

The JPEGs are Fashion-MNIST products (``/usr/share/datasets/fashion-mnist``) or, without it, scikit-learn's
digits: tinted, upscaled to photo-like sizes around 300 x 260 px and saved at quality 90.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.measure import ROOT, WORK, emit, fmt, load, median, peak_memory, run_child

DATA = WORK / "jpegs"
FASHION = Path("/usr/share/datasets/fashion-mnist")


def _source_images(n: int) -> tuple[np.ndarray, np.ndarray, str]:
    """``(uint8 (n, H, W) grey images, labels, where from)``: Fashion-MNIST when installed, else digits."""
    if (FASHION / "train-images-idx3-ubyte.gz").exists() or (FASHION / "train-images-idx3-ubyte").exists():
        from metriclab.data import load_idx_dataset

        data = load_idx_dataset("fashion-mnist", FASHION, [str(i) for i in range(10)], ("",))
        images, labels = data.train_images[:, 0].numpy(), data.train_labels.numpy()
        where = "Fashion-MNIST"
    else:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images, labels = np.rint(bunch.images * 255 / 16).astype(np.uint8), bunch.target
        where = "scikit-learn digits"
    index = np.arange(n) % len(labels)
    return images[index], labels[index], where


def write_jpegs(root: Path, n: int, classes: int = 10, side: int = 300) -> str:
    """Write ``n`` JPEGs as ``root/<class>/<i>.jpg`` (kept between runs); returns where the pixels came from."""
    from PIL import Image

    marker = root / "done.json"
    if marker.exists():
        return json.loads(marker.read_text())["source"]
    images, labels, where = _source_images(n)
    rng = np.random.default_rng(0)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / f"{int(label) % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        rgb = (image[..., None] * rng.uniform(0.4, 1.0, 3)).astype(np.uint8)
        size = (int(side * rng.uniform(0.9, 1.1)), int(side * rng.uniform(0.75, 0.95)))
        Image.fromarray(rgb).resize(size, Image.BILINEAR).save(folder / f"{i:06d}.jpg", quality=90)
    marker.write_text(json.dumps({"source": where, "n": n}))
    return where


# -- children ------------------------------------------------------------------------------------


def _throughput(root: Path, impl: str, size: int, workers: int, batch: int, limit: int) -> dict[str, Any]:
    import torch
    from metriclab_plugins.transforms import random_resized_crop
    from torchvision.transforms import v2

    transform = random_resized_crop(size)
    if impl == "metriclab":
        from metriclab.data import ImageSource, load_dataset
        from metriclab.recipe import Recipe

        # Nearly every image in the train split, so both sides read the same number of files.
        split = {"split": "images", "train_fraction": 0.99}
        recipe = Recipe(dataset="image-folder", data_dir=str(root), dataset_args=split)
        dataset = load_dataset(recipe)
        dataset.train_transform = transform
        order = torch.randperm(len(dataset.train), generator=torch.Generator().manual_seed(0))[:limit]
        stream = ImageSource(dataset, "train", augment=True, num_workers=workers)(list(order.split(batch)))
    else:
        import torchvision

        pipeline = v2.Compose([v2.PILToTensor(), transform])  # the same crop and flip, on PIL's decoding
        folder = torchvision.datasets.ImageFolder(str(root), transform=pipeline)
        subset = torch.utils.data.Subset(folder, torch.randperm(len(folder))[:limit].tolist())
        stream = iter(torch.utils.data.DataLoader(subset, batch_size=batch, num_workers=workers, shuffle=False))
    start = time.perf_counter()
    seen, first = 0, None
    for images in stream:
        images = images[0] if isinstance(images, list) else images
        seen += images.shape[0]
        first = first if first is not None else time.perf_counter() - start
    seconds = time.perf_counter() - start
    return {"images": seen, "seconds": seconds, "images_per_s": seen / seconds, "first_batch_s": first}


def _where_time_goes(root: Path, size: int, count: int = 200) -> dict[str, Any]:
    """Per-image milliseconds of decoding (torchvision.io, PIL) and of the transform, in this process."""
    import torch
    from metriclab_plugins.transforms import random_resized_crop
    from PIL import Image
    from torchvision.transforms import v2

    from metriclab.data.images import decode

    torch.set_num_threads(1)  # as in a DataLoader worker
    paths = sorted(root.rglob("*.jpg"))[:count]
    transform = random_resized_crop(size)
    out = {}
    start = time.perf_counter()
    decoded = [decode(str(p)) for p in paths]
    out["decode_torchvision_ms"] = (time.perf_counter() - start) / len(paths) * 1000
    start = time.perf_counter()
    for p in paths:
        with Image.open(p) as image:
            v2.functional.pil_to_tensor(image.convert("RGB"))
    out["decode_pil_ms"] = (time.perf_counter() - start) / len(paths) * 1000
    start = time.perf_counter()
    for image in decoded:
        transform(image)
    out["transform_ms"] = (time.perf_counter() - start) / len(paths) * 1000
    out["pixels"] = list(decoded[0].shape)
    return out


def _epoch_memory(root: Path, size: int) -> dict[str, Any]:
    """Peak RSS of one training epoch (training process, and its largest DataLoader worker)."""
    from metriclab.recipe import Recipe
    from metriclab.training.engine import train

    recipe = Recipe(
        name="loader_memory",
        dataset="image-folder",
        data_dir=str(root),
        image_size=size,
        encoder="convnet",
        encoder_args={"channels": [8, 16, 32]},
        embedding_dim=16,
        loss="triplet",
        miner="semi-hard",
        sampler="m-per-class",
        batch_size=64,
        epochs=1,
        embed_train=False,
        cpu=True,
        output_dir=str(WORK / "loader-runs" / f"memory-{root.name}-{time.time_ns()}"),
    )
    with peak_memory() as memory:
        start = time.perf_counter()
        run = train(recipe)
        seconds = time.perf_counter() - start
    final = json.loads((run / "metrics.json").read_text())["final"]
    worker_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {**memory, "worker_peak_mib": worker_kib / 1024, "seconds": seconds, "train_seconds": final["train_seconds"]}


SIZES = (224, 64)


def work(argv: list[str] | None = None) -> dict[str, Any]:
    """Child: ``throughput ROOT WORKERS BATCH LIMIT REPEATS``, ``where ROOT`` or ``memory ROOT SIZE``.

    ``throughput`` measures both implementations at both sizes in this one process, interleaved (each pass
    starts its own DataLoader workers), so imports are paid once and the load changes under both alike.
    """
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=("throughput", "where", "memory"))
    parser.add_argument("root", type=Path)
    parser.add_argument("rest", nargs="*")
    args = parser.parse_args(argv)
    if args.command == "throughput":
        workers, batch, limit, repeats = (int(x) for x in args.rest)
        passes = []
        for repeat in range(repeats):
            for size in SIZES:
                for impl in ("metriclab", "torchvision"):
                    before = load()
                    result = _throughput(args.root, impl, size, workers, batch, limit)
                    passes.append({"impl": impl, "size": size, "repeat": repeat, "load_before": before, **result})
                    passes[-1]["load_after"] = load()
        return {"passes": passes}
    if args.command == "where":
        return {str(size): _where_time_goes(args.root, size) for size in SIZES}
    return _epoch_memory(args.root, int(args.rest[0]))


# -- the section ---------------------------------------------------------------------------------


def run(quick: bool = False, reuse: bool = False) -> tuple[str, dict[str, Any]]:
    """Measure, and return the BENCHMARKS.md section and the raw results."""
    small, large = (200, 600) if quick else (2_000, 20_000)
    where = write_jpegs(DATA / f"n{small}", small)
    write_jpegs(DATA / f"n{large}", large)
    workers, batch, repeats = 2, 64, 1 if quick else 3
    limit = int(small * 0.95)  # the same files for both: metriclab's train split holds 99% of them
    results: dict[str, Any] = {"throughput": [], "where": {}, "memory": {}, "recipe": None}
    args = ["python", "bench/loader.py", "throughput", str(DATA / f"n{small}"), str(workers), str(batch)]
    results["throughput"] = run_child([*args, str(limit), str(repeats)], inline=quick, reuse=reuse)["passes"]
    where_args = ["python", "bench/loader.py", "where", str(DATA / f"n{small}")]
    results["where"] = run_child(where_args, inline=quick, reuse=reuse)
    for n in (small, large):
        results["memory"][n] = run_child(
            ["python", "bench/loader.py", "memory", str(DATA / f"n{n}"), "32"], reuse=reuse
        )
    recipe_dir = WORK / "loader-runs" / f"recipe-{time.time_ns()}"
    command = [
        "python",
        "recipes/image_folder.py",
        "--data-dir",
        str(DATA / f"n{small}"),
        "--image-size",
        "64",
        "--epochs",
        "1",
        "--no-embed-train",
        "--cpu",
        "--output-dir",
        str(recipe_dir),
    ]
    before = load()
    start = time.perf_counter()
    import subprocess

    proc = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    rows = [line.split(",") for line in (recipe_dir / "history.csv").read_text().splitlines()]
    header, body = rows[0], rows[1:]
    final = json.loads((recipe_dir / "metrics.json").read_text())["final"]
    train_images = json.loads((recipe_dir / "config.json").read_text())["dataset"]["train_size"]
    results["recipe"] = {
        "command": " ".join(command[:-2]),
        "wall_s": wall,
        "train_seconds": final["train_seconds"],
        "train_images": train_images,
        "samples_per_s_logged": [float(r[header.index("samples_per_s")]) for r in body],
        "precision@1": final["test_loo"]["precision@1"],
        "load": f"{before} -> {load()}",
    }
    return _section(results, where, small, large, workers, batch, quick), results


def _cpu() -> str:
    from bench.measure import machine

    return machine()["cpu"]


def _commit() -> str:
    import subprocess

    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return (out.stdout.strip() or "unknown") + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def _section(results, where, small, large, workers, batch, quick) -> str:
    lines = [
        "## Streaming image folders (loader)",
        "",
        f"`python bench/run.py --only loader` at commit {_commit()} on {_cpu()}. Data: {small:,} and {large:,} JPEGs "
        f"(quality 90, about 300 x 255 px, 10 class folders) written from {where}. CPU only: the GPU part "
        "(whether the loader keeps a ResNet-50 at 224 px busy; decoding on the GPU with "
        "`torchvision.io.decode_jpeg(device='cuda')`) was not measured on this machine.",
        "",
        f"### Throughput: one pass over {int(small * 0.95):,} of the JPEGs, {workers} workers, batches of {batch}",
        "",
        "Decoded, random-resized-crop (+ flip) to the size, collated; images/s over the whole pass (first batch "
        "included, so worker start-up counts). metriclab: `ImageSource` (torchvision.io decoding in DataLoader "
        "workers fed index batches); torchvision: `ImageFolder` (PIL decoding) + `DataLoader`, the same transform.",
        "",
        "| size | metriclab images/s | torchvision ImageFolder images/s | ratio | loads (before -> after) |",
        "|---|---|---|---|---|",
    ]
    for size in SIZES:
        ours = [r for r in results["throughput"] if r["size"] == size and r["impl"] == "metriclab"]
        theirs = [r for r in results["throughput"] if r["size"] == size and r["impl"] == "torchvision"]
        a, b = median([r["images_per_s"] for r in ours]), median([r["images_per_s"] for r in theirs])
        loads = "; ".join(f"{r['load_before']} -> {r['load_after']}" for r in ours + theirs)
        lines.append(f"| {size} px | {fmt(a)} | {fmt(b)} | {a / b:.2f}x | {loads} |")
    lines += [
        "",
        f"Median of {len(ours)} interleaved passes each (all in one process, each pass starting its own workers). "
        "Where the time goes, per image in one process (one thread, as in a worker):",
        "",
        "| size | decode, torchvision.io (ms) | decode, PIL (ms) | random-resized-crop + flip (ms) |",
        "|---|---|---|---|",
    ]
    for size in SIZES:
        w = results["where"][str(size)]
        lines.append(
            f"| {size} px | {w['decode_torchvision_ms']:.2f} | {w['decode_pil_ms']:.2f} | {w['transform_ms']:.2f} |"
        )
    w = results["where"]["224"]
    lines += [
        "",
        f"At 224 px a worker spends {w['decode_torchvision_ms']:.1f} ms decoding an image with torchvision.io "
        f"(libjpeg-turbo, straight into a tensor) and {w['transform_ms']:.1f} ms cropping and resizing it; "
        f"Pillow's decoding, ImageFolder's default loader, took {w['decode_pil_ms']:.1f} ms: the decoder is the "
        "difference between the two loaders. The first batch (worker start-up) took "
        f"{median([r['first_batch_s'] for r in results['throughput'] if r['impl'] == 'metriclab']):.1f} s.",
    ]
    lines += [
        "",
        "### Peak memory of one training epoch",
        "",
        "Tiny ConvNet (channels 8-16-32) at 32 px, m-per-class batches of 64, 1 epoch, no train embedding, "
        "so the loader and the bookkeeping dominate. Peak RSS (VmHWM) of the training process during `train()`, "
        "and of its largest DataLoader worker (whose RSS counts the pages it shares with the training process).",
        "",
        "| images | training process peak (MiB) | added by the run (MiB) | largest worker (MiB) | seconds | load |",
        "|---|---|---|---|---|---|",
    ]
    for n, m in results["memory"].items():
        lines.append(
            f"| {int(n):,} | {fmt(m['peak_mib'])} | {fmt(m['added_mib'])} | {fmt(m['worker_peak_mib'])} | "
            f"{fmt(m['seconds'])} | {m['load_before']} -> {m['load_after']} |"
        )
    r = results["recipe"]
    lines += [
        "",
        "### End to end: recipes/image_folder.py",
        "",
        f"`{r['command']}` ({r['train_images']:,} train images, the recipe's ConvNet at 64 px, triplet + semi-hard, "
        f"m-per-class): {r['train_images'] / r['train_seconds']:.1f} samples/s over the epoch's training time "
        f"({r['train_seconds']:.1f} s; logged windows: "
        f"{', '.join(f'{x:.0f}' for x in r['samples_per_s_logged'])} samples/s), {r['wall_s']:.0f} s wall "
        f"with start-up and evaluation; test precision@1 {r['precision@1']:.3f} after one epoch; load {r['load']}.",
    ]
    if quick:
        lines += ["", "**--quick: tiny sizes, not results.**"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("throughput", "where", "memory"):
        emit(work(sys.argv[1:]))
    else:
        text, _ = run(quick="--quick" in sys.argv)
        print(text)
