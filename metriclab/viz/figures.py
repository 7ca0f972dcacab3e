"""Figures of runs behind ``metriclab visualize`` and ``compare``: runs in, image files (and scores) out.

The same rules as :mod:`metriclab.evaluation`; :mod:`metriclab.inference` rebuilds a run's model, dataset and
embeddings: a run directory is read through :class:`metriclab.runs.Run`, a run's own ``plugins`` list
is never imported (plugins are code; callers load the ones they trust first, ``--plugins``), and
nothing here prints. Slow steps and skipped figures are reported through the ``metriclab.viz.figures``
logger (INFO: what is being done now; WARNING: something the user should know), which the CLI shows
as a status line and notes on stderr. The drawing itself is :mod:`metriclab.viz.plots`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from metriclab.data import Dataset, ImageSource, StreamingDataset, is_streaming
from metriclab.errors import MetricLabError
from metriclab.inference import embed_run, load_run_model, run_dataset, run_embeddings, run_recipe
from metriclab.inference.rebuild import split_labels
from metriclab.recipe import SELECTION_METRICS
from metriclab.runs import Run, strict_json

log = logging.getLogger(__name__)

FIGURES = ("scatter", "thumbnails", "gallery", "animation", "curves")
FIGURE_FORMATS = ("png", "svg", "pdf")
PROJECTIONS = ("umap", "pca", "tsne")


# -- visualize --------------------------------------------------------------------------------------


def _class_names(run: Run) -> list[str] | None:
    return run.config.get("dataset", {}).get("classes")


def _loader(dataset: Dataset | StreamingDataset, split: str):
    """``load(index) -> uint8 array (*index.shape, C, H, W)``: a split's images at any array of indices.

    Files are decoded (test-time transform, in colour) only for the indices asked for.
    """
    if not is_streaming(dataset):
        images = dataset.split(split)[0].numpy()
        return lambda index: images[np.asarray(index, dtype=np.int64)]
    source = ImageSource(dataset, split)

    def load(index: Any) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64)
        return source.take(index.reshape(-1)).numpy().reshape(*index.shape, *dataset.input_shape)

    return load


def _split_images(
    run: Run, data: dict[str, tuple[np.ndarray, np.ndarray] | None]
) -> tuple[Dataset | StreamingDataset | None, dict]:
    """The run's dataset, with ``data`` re-embedded from the weights if the saved embeddings do not fit it.

    Returns ``(None, data)`` with a warning when the images cannot be loaded.
    """
    try:
        dataset = run_dataset(run)
    except MetricLabError as err:
        log.warning("images unavailable, skipping thumbnails and gallery: %s", err)
        return None, data
    fits = all(
        data[split] is None or np.array_equal(split_labels(dataset, split).numpy(), data[split][1])
        for split in ("test", "train")
    )
    if fits:
        return dataset, data
    if not run.weights_path.is_file():
        log.warning("the run's saved embeddings do not match its dataset as it loads now; skipping images")
        return None, data
    log.warning("the saved embeddings do not match dataset '%s' as it loads now; re-embedding it", dataset.name)
    model = load_run_model(run)
    return dataset, {split: embed_run(run, split, dataset, model) for split in ("test", "train")}


def _for_metric(embeddings: np.ndarray, metric: str) -> tuple[np.ndarray, str]:
    """Embeddings as the metric sees them: unit-normalised for cosine (where only directions count)."""
    if metric != "cosine" or embeddings.shape[1] == 2:
        return embeddings, ""
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.maximum(norms, 1e-12), "unit-norm "


def _load_umap() -> None:
    """Import umap, saying why it may take a while (numba compiles its kernels once, then loads them from disk)."""
    from metriclab.viz.projections import import_umap, numba_cache_dir

    log.info("loading UMAP (a machine's first use compiles numba kernels once, cached in %s)", numba_cache_dir())
    import_umap()


def _to_2d(embeddings: np.ndarray, method: str, metric: str, seed: int) -> tuple[np.ndarray, str]:
    """2-D points of the embeddings (as learned when 2-D, else projected with ``method``) and a caption."""
    from metriclab.viz.projections import project

    dims = embeddings.shape[1]
    if dims == 2:
        return embeddings, "learned 2-D"
    x, how = _for_metric(embeddings, metric)
    if method == "umap":
        _load_umap()
    log.info("projecting %d %d-D embeddings to 2-D with %s", len(x), dims, method.upper())
    name = {"umap": "UMAP", "pca": "PCA", "tsne": "t-SNE"}[method]
    return project(x, method, seed=seed), f"{name} of {how}{dims}-D"


def _pick_queries(labels: np.ndarray, wrong: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, int]:
    """Up to ``count`` random test indices cycling through the classes (in random order: of a test set of
    thousands of classes, not the first few), a quarter of them (at least one) among the queries with a ``wrong``
    result when there are such; returns the indices and how many of those."""
    rng = np.random.default_rng(seed)
    failed = rng.permutation(np.flatnonzero(wrong))[: max(1, count // 4)] if count > 1 else np.zeros(0, np.int64)
    order = rng.permutation(np.setdiff1d(np.arange(len(labels)), failed))
    by_class = [order[labels[order] == c] for c in rng.permutation(np.unique(labels))]
    cycled = [group[i] for i in range(max(map(len, by_class))) for group in by_class if i < len(group)]
    picked = np.concatenate([failed, np.asarray(cycled[: count - len(failed)], dtype=np.int64)])
    return np.sort(picked.astype(np.int64)), len(failed)


def _snapshots(run: Run, metric: str, seed: int) -> tuple[list[tuple[str, np.ndarray, np.ndarray]], str]:
    """Every epoch's test snapshot in 2-D, and how they were projected.

    N-D snapshots (unit-normalised for cosine runs) are each centred, then rotated onto the two
    principal axes of the last epoch, so all frames share axes and the motion shown is the embedding's
    own (UMAP or t-SNE per frame would rearrange the picture; the shared-axis PCA cannot).
    """
    epochs = run.snapshot_epochs()
    frames = [(e, *run.embeddings("test", e)) for e in epochs]
    dims = frames[-1][1].shape[1]
    if dims == 2:
        return [(f"epoch {e}", emb, lab) for e, emb, lab in frames], "test set, learned 2-D embedding"
    from sklearn.decomposition import PCA

    centred = []
    for _, emb, _ in frames:
        x, how = _for_metric(emb, metric)
        centred.append(x - x.mean(axis=0))
    axes = PCA(n_components=2, random_state=seed).fit(centred[-1]).components_
    projected = [
        (f"epoch {e}", (x @ axes.T).astype(np.float32), lab) for (e, _, lab), x in zip(frames, centred, strict=True)
    ]
    return projected, f"test set, PCA of {how}{dims}-D on the axes of epoch {epochs[-1]}"


def _as_seen(dataset: Any) -> str:
    """A title's note that images of files are shown as the network saw them (its test-time transform)."""
    if not is_streaming(dataset):
        return ""
    transform = dataset.transforms.get("test", {})
    size = transform.get("args", {}).get("size")
    return f"\nimages as the network sees them: {transform.get('name', 'the test-time transform')}" + (
        f" to {size} px" if size else ""
    )


def _curve_series(run: Run) -> dict[str, list[tuple[float, float]]]:
    history = run.history()
    series: dict[str, list[tuple[float, float]]] = {}
    if history:
        series["training loss"] = [(row["epoch"], row["loss"]) for row in history if math.isfinite(row["loss"])]
        rates = [(row["epoch"], row["lr"]) for row in history]
        if len({lr for _, lr in rates}) > 1:  # a constant learning rate is not worth a panel
            series["learning rate"] = rates
    epochs = run.metrics.get("epochs", [])
    protocol = epochs[-1].get("protocol", "leave-one-out") if epochs else None  # runs before it was recorded: LOO
    how = "queries vs gallery" if protocol == "query/gallery" else "leave-one-out"
    for key, label in (("precision@1", "precision@1"), ("map@r", "MAP@R")):
        points = [(row["epoch"], row[key]) for row in epochs if row.get(key) is not None]
        if points:
            series[f"test retrieval ({how})/{label}"] = points
    return series


def visualize_run(
    run: Run,
    method: str = "umap",
    formats: Sequence[str] = ("png",),
    output_dir: str | Path | None = None,
    figures: Sequence[str] = FIGURES,
    queries: int = 8,
    k: int = 5,
    max_thumbnails: int = 250,
    seed: int = 0,
) -> list[Path]:
    """Write the run's figures (scatter, thumbnails, gallery, GIF animation, curves) and return their paths.

    Figures go to ``output_dir`` (default ``RUN/figures``) in each of ``formats``; the animation is a GIF.
    N-D embeddings are shown through ``method`` (umap, pca or tsne), named in the titles.
    """
    from metriclab.viz import plots

    if method not in PROJECTIONS:
        raise MetricLabError(f"unknown projection method '{method}'; use one of {', '.join(PROJECTIONS)}")
    bad = [f for f in formats if f not in FIGURE_FORMATS]
    if bad or not formats:
        raise MetricLabError(f"unknown figure format {', '.join(bad)}; use one or more of {', '.join(FIGURE_FORMATS)}")
    unknown = [f for f in figures if f not in FIGURES]
    if unknown:
        raise MetricLabError(f"unknown figure {', '.join(unknown)}; choose from {', '.join(FIGURES)}")
    if k < 1 or queries < 1:
        raise MetricLabError(f"--k and --queries must be at least 1, got k={k}, queries={queries}")
    out = Path(output_dir) if output_dir is not None else run.path / "figures"
    names, title = _class_names(run), run.name
    metric = run_recipe(run).metric
    written: list[Path] = []

    def save(draw, stem: str, *args, **kwargs) -> None:
        for fmt in formats:
            written.append(draw(*args, path=out / f"{stem}.{fmt}", **kwargs))

    needs_embeddings = {"scatter", "thumbnails", "gallery"} & set(figures)
    data: dict = {}
    if needs_embeddings:
        data, _ = run_embeddings(run)
    dataset = None
    if {"thumbnails", "gallery"} & set(figures):
        dataset, data = _split_images(run, data)
    points = how = None
    if {"scatter", "thumbnails"} & set(figures):
        points, how = _to_2d(data["test"][0], method, metric, seed)
    test_labels = data["test"][1] if data else None

    if "scatter" in figures:
        log.info("drawing the embedding scatter")
        save(plots.scatter, "embedding", points, test_labels, names, title=f"{title}: test embedding ({how})")
    if "thumbnails" in figures and dataset is not None:
        log.info("drawing the thumbnail scatter")
        save(
            plots.thumbnail_scatter,
            "thumbnails",
            points,
            dataset.test_images.numpy() if not is_streaming(dataset) else _loader(dataset, "test"),
            test_labels,
            names,
            max_images=max_thumbnails,
            title=f"{title}: test images at their embedding ({how}){_as_seen(dataset)}",
        )
    if "gallery" in figures and dataset is not None:
        written += _gallery(run, data, dataset, metric, queries, k, seed, formats, out, names)
    if "animation" in figures:
        epochs = run.snapshot_epochs()
        if len(epochs) < 2:
            log.warning("%s has %d epoch snapshot(s); an animation needs two, skipping it", run.path, len(epochs))
        else:
            log.info("animating %d epoch snapshots", len(epochs))
            frames, how_frames = _snapshots(run, metric, seed)
            gif = plots.animate_embeddings(
                frames, names, out / "training.gif", title=f"{how_frames}\n{title}", fps=max(1.0, len(frames) / 8)
            )
            written.append(gif)
    if "curves" in figures:
        series = _curve_series(run)
        if not series:
            log.warning("%s has no history.csv or per-epoch metrics yet; skipping the curves", run.path)
        else:
            kept = run.metrics.get("final", {}).get("kept_epoch")
            shown = SELECTION_METRICS.get(kept["by"], kept["by"]) if kept else ""
            mark = (kept["epoch"], f"kept: epoch {kept['epoch']} (best {shown})") if kept else None
            save(plots.curves, "curves", series, title=f"{title}: training curves", mark=mark)
    return written


def _gallery(run, data, dataset, metric, queries, k, seed, formats, out, names) -> list[Path]:
    from metriclab.metrics.protocol import own_positions
    from metriclab.metrics.retrieval import knn
    from metriclab.viz import plots

    test_emb, test_labels = data["test"]
    asked = np.arange(len(test_labels))  # the test images searched for
    is_query, is_gallery = dataset.files("test").marks() if is_streaming(dataset) else (None, None)
    if is_query is not None:  # the dataset's own protocol (In-Shop): its queries in its gallery
        asked, shelf = np.flatnonzero(is_query), np.flatnonzero(is_gallery)
        gallery_emb, gallery_labels = test_emb[shelf], test_labels[shelf]
        test_images, where = _loader(dataset, "test"), "dataset's gallery"

        def gallery_images(index: np.ndarray) -> np.ndarray:
            return test_images(shelf[index])

        log.info("retrieving the top %d of the dataset's %d queries in its gallery", k, len(asked))
        # a query that is also a gallery image is left out of its own results, as its scores leave it out
        own = own_positions(len(test_labels), asked, shelf)
        index = knn(test_emb[asked], gallery_emb, k, metric=metric, exclude=own)[1].cpu().numpy()
    else:
        # The train set is a gallery only where it holds the test classes (not in class-disjoint protocols).
        if data.get("train") is not None and np.isin(test_labels, data["train"][1]).mean() >= 0.5:
            gallery_emb, gallery_labels = data["train"]
            gallery_images, exclude_self, where = _loader(dataset, "train"), False, "train set"
        else:  # search the test set itself, leaving each query out
            gallery_emb, gallery_labels = test_emb, test_labels
            gallery_images, exclude_self, where = _loader(dataset, "test"), True, "test set (leave-one-out)"
        log.info("retrieving the top %d of %d test queries in the %s", k, len(test_labels), where)
        _, index = knn(test_emb, gallery_emb, k, metric=metric, exclude_self=exclude_self)
        index = index.cpu().numpy()
    wrong = (gallery_labels[index] != test_labels[asked][:, None]).any(axis=1)
    chosen, failed = _pick_queries(test_labels[asked], wrong, queries, seed)
    index = index[chosen]
    title = (
        f"{run.name}: top {index.shape[1]} in the {where}, {metric} distance\n"
        f"{len(chosen)} random test queries, {failed} of them drawn from the {wrong.mean():.0%} "
        f"with another class among their top {index.shape[1]}{_as_seen(dataset)}"
    )
    return [
        plots.retrieval_gallery(
            _loader(dataset, "test")(asked[chosen]),
            test_labels[asked[chosen]],
            gallery_images(index),
            gallery_labels[index],
            out / f"gallery.{fmt}",
            class_names=names,
            title=title,
        )
        for fmt in formats
    ]


# -- compare ----------------------------------------------------------------------------------------

BASELINE_SIDE = 16  # photos are compared at 16x16 pixels: 768 values for UMAP instead of 150,528 at 224 px


def _pixels(dataset: Dataset | StreamingDataset, index: np.ndarray) -> tuple[np.ndarray, str]:
    """``(float32 (n, D) pixels of the test images at index, what they are)`` for the unsupervised baseline."""
    if not is_streaming(dataset):
        return dataset.test_images.numpy()[index].reshape(len(index), -1).astype(np.float32), "raw pixels"
    import torch

    images = torch.from_numpy(_loader(dataset, "test")(index)).float()
    small = torch.nn.functional.interpolate(images, size=(BASELINE_SIDE, BASELINE_SIDE), mode="area")
    return small.reshape(len(index), -1).numpy(), f"{BASELINE_SIDE}x{BASELINE_SIDE} pixels"


def compare_runs(
    runs: Sequence[Run], max_points: int = 10000, output: str | Path | None = None, seed: int = 0
) -> tuple[Path, list[dict[str, Any]]]:
    """One figure comparing the runs' 2-D views of the same test points with a UMAP of the raw pixels.

    Panels: UMAP of the pixels (once), then per run its 2-D embedding as learned, or UMAP and PCA of
    its N-D embedding. Returns the figure's path (default ``first run/figures/compare.png``) and one
    row per panel: run, projection, seconds, ``knn_accuracy`` (5-NN in 2-D), ``trustworthiness``
    (None where nothing was projected), ``silhouette``.
    """
    from metriclab.viz import plots
    from metriclab.viz.projections import Panel, numba_cache_dir, projected_panel, projection_scores, side_by_side

    if not runs:
        raise MetricLabError("pass at least one run directory to compare")
    if max_points < 10:
        raise MetricLabError(f"--max-points must be at least 10, got {max_points}")
    loaded = [(run, run_embeddings(run)[0]["test"]) for run in runs]
    first_run, (_, all_labels) = loaded[0]
    for run, (_, other) in loaded[1:]:
        if not np.array_equal(other, all_labels):
            raise MetricLabError(
                f"{run.path} was tested on other data than {first_run.path} ({len(other)} vs {len(all_labels)} test "
                "labels); compare runs trained on the same dataset, or compare them one at a time"
            )
    rng = np.random.default_rng(seed)
    n = len(all_labels)
    subset = np.sort(rng.choice(n, max_points, replace=False)) if n > max_points else None
    pick = (lambda a: a[subset]) if subset is not None else (lambda a: a)
    labels = pick(all_labels)
    # (run, view, a Panel or the (title, points, method) to project), in the figure's order after the pixels.
    views: list[tuple[str, str, Any]] = []
    for run, (emb, _) in loaded:
        emb, how = _for_metric(pick(emb), run_recipe(run).metric)
        dims = emb.shape[1]
        if dims == 2:  # the learned plane itself; a projection would only rotate it
            panel = Panel(f"{run.name}\nlearned 2-D embedding", emb, 0.0)
            panel.scores = projection_scores(emb, labels, seed=seed)
            views.append((run.name, "learned 2-D", panel))
        else:
            for method in ("umap", "pca"):
                view = f"{method.upper()} of {how}{dims}-D"
                views.append((run.name, view, (f"{run.name}\n{view} learned embedding", emb, method)))
    umaps = 1 + sum(1 for *_, task in views if isinstance(task, tuple) and task[2] == "umap")
    log.info(
        "projecting %d points (a machine's first UMAP compiles numba kernels once, cached in %s)",
        len(labels),
        numba_cache_dir(),
    )
    with side_by_side(umaps) as pool:
        # The embeddings are on hand: their projections start while the dataset's pixels load.
        pending = [
            (name, view, task if isinstance(task, Panel) else pool.submit(projected_panel, *task, labels, seed))
            for name, view, task in views
        ]
        dataset = run_dataset(first_run)
        if not np.array_equal(split_labels(dataset, "test").numpy(), all_labels):
            raise MetricLabError(
                f"the test embeddings of {first_run.path} do not match dataset '{dataset.name}' as it loads "
                f"now; re-embed them with `metriclab evaluate {first_run.path} --reembed`"
            )
        pixels, what = _pixels(dataset, subset if subset is not None else np.arange(n))
        dims = pixels.shape[1]
        title = f"UMAP of {what} ({dims}-D)"
        pending.insert(
            0, (what, f"UMAP of {dims}-D", pool.submit(projected_panel, title, pixels, "umap", labels, seed))
        )
        log.info("projecting and scoring %d views", len(pending))
        shown = [(name, view, job if isinstance(job, Panel) else job.result()) for name, view, job in pending]
    rows, scores = [], []
    for name, view, panel in shown:
        scores.append(panel.scores)
        rows.append(
            {
                "run": name,
                "projection": view,
                "seconds": round(panel.seconds, 3) if panel.seconds > 0 else None,
                "knn_accuracy": panel.scores["knn_accuracy"],
                "trustworthiness": panel.scores.get("trustworthiness"),
                "silhouette": panel.scores["silhouette"],
            }
        )
    path = Path(output) if output is not None else first_run.path / "figures" / "compare.png"
    if path.is_dir():  # a folder to write into
        path = path / "compare.png"
    log.info("drawing %d panels", len(shown))
    figure = plots.panels(
        [panel for _, _, panel in shown],
        labels,
        _class_names(first_run),
        path,
        scores=scores,
        title=f"{len(labels)} test points of {dataset.name}: pixels vs learned embeddings",
    )
    return figure, strict_json(rows)
