"""Figures of embeddings, retrievals and training curves: arrays in, one file written, its path returned.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot, so no
display is needed and nothing accumulates in pyplot's global figure list. The file format follows the
path's suffix: ``.png`` (the default when there is none), ``.svg`` or ``.pdf``; animations are ``.gif``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import textwrap
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.animation import PillowWriter
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.offsetbox import AnnotationBbox, OffsetImage
from PIL import Image

from metriclab.errors import MetricLabError
from metriclab.runs import temporary_beside
from metriclab.viz.projections import Panel

log = logging.getLogger(__name__)

FIGURE_FORMATS = (".png", ".svg", ".pdf")
DPI = 120
THUMB_INCHES = 0.36


LEGEND_MAX = 40  # classes a legend lists; more are only counted (SOP's test set has 11,316)
LEGEND_NAME = 28  # characters of a class name in a legend; longer names end in an ellipsis


def _short(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, ending in an ellipsis where cut (long class names)."""
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "\u2026"


def _wrapped(title: str, width: int) -> str:
    """``title`` with each line wrapped at ``width`` characters, so a long run name is not clipped."""
    return "\n".join(textwrap.fill(line, width, break_long_words=True) or line for line in title.split("\n"))


def _palette(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """``(n_classes, 4)`` colours by class index: the classes among ``labels`` share the whole palette (a
    class-disjoint test set's classes are as distinct as any), the others are grey."""
    present = np.unique(np.asarray(labels, dtype=np.int64))
    colors = np.tile(np.array([0.6, 0.6, 0.6, 1.0]), (n_classes, 1))
    colors[present] = class_colors(len(present))
    return colors


def class_colors(n_classes: int) -> np.ndarray:
    """``(n_classes, 4)`` RGBA colours that stay distinct: tab10 up to 10 classes, tab20 up to 20."""
    if n_classes <= 10:
        return colormaps["tab10"](np.arange(n_classes))
    if n_classes <= 20:
        return colormaps["tab20"](np.arange(n_classes))
    return colormaps["turbo"](np.linspace(0.05, 0.95, n_classes))


def _output(path: str | Path, formats: Sequence[str] = FIGURE_FORMATS) -> Path:
    path = Path(path)
    if path.suffix == "":
        path = path.with_suffix(formats[0])
    if path.suffix.lower() not in formats:
        raise MetricLabError(
            f"cannot write a figure as '{path.suffix}' ({path}); use a path ending in {', '.join(formats)}"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file where a folder should be, a read-only mount, ...
        raise MetricLabError(
            f"cannot create the folder {path.parent} for {path.name} ({err.strerror}: {err.filename}); "
            "choose another output folder"
        ) from err
    return path


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """A temporary path next to ``path`` to write to, renamed to ``path`` when complete, removed on failure.

    So a full disk or a crash never leaves a half-written or empty figure behind.
    """
    handle, tmp = temporary_beside(path, suffix=path.suffix)  # the suffix tells matplotlib the format
    os.close(handle)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise MetricLabError(
            f"could not write figure {path} ({err.strerror or err}); free disk space or choose another output folder"
        ) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    with _atomic(path) as tmp, _glyphs_noted(path):
        fig.savefig(tmp, dpi=DPI, facecolor="white", format=path.suffix[1:].lower())
    return path


@contextlib.contextmanager
def _glyphs_noted(path: Path) -> Iterator[None]:
    """One log line for the characters no installed font has (drawn as boxes), instead of a warning each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    missing = set()
    for warning in caught:
        if glyph := re.match(r"Glyph (\d+) .*missing from", str(warning.message)):
            missing.add(chr(int(glyph.group(1))))
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if missing:
        log.warning(
            "%s: %d characters (%s) are in no font matplotlib uses and show as boxes; install a font that has them "
            "(e.g. Noto Sans CJK) and add it to matplotlib's font.sans-serif",
            path,
            len(missing),
            "".join(sorted(missing)[:12]),
        )


def _labels_and_names(labels: np.ndarray, class_names: Sequence[str] | None, n: int) -> tuple[np.ndarray, list[str]]:
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if len(labels) != n:
        raise MetricLabError(f"got {len(labels)} labels for {n} points; pass one label per point")
    if len(labels) and labels.min() < 0:
        raise MetricLabError("labels must be class indices >= 0; map them to 0..n_classes-1 first")
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    if class_names is None:
        class_names = [str(i) for i in range(n_classes)]
    elif len(class_names) < n_classes:
        raise MetricLabError(f"labels go up to {n_classes - 1} but only {len(class_names)} class names were given")
    return labels, [str(c) for c in class_names]


def _points(points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise MetricLabError(
            f"points must have shape (n, 2) but have {points.shape}; project them first (viz.projections.project)"
        )
    return points


def _marker_style(n: int) -> dict:
    # Thousands of points need small, translucent markers so dense clusters show their density.
    return {"s": float(np.clip(8000 / max(n, 1), 2.5, 30)), "alpha": 0.85 if n <= 1000 else 0.6, "linewidths": 0}


def _draw_points(ax, points: np.ndarray, labels: np.ndarray, colors: np.ndarray, **style) -> None:
    # Random drawing order, so the last class drawn does not hide the others where clusters overlap.
    order = np.random.default_rng(0).permutation(len(points))
    ax.scatter(points[order, 0], points[order, 1], c=colors[labels[order]], **{**_marker_style(len(points)), **style})
    ax.set_aspect("equal", adjustable="datalim")
    ax.tick_params(labelsize=7)


def _legend(class_names: Sequence[str], colors: np.ndarray, labels: np.ndarray, limit: int = LEGEND_NAME) -> dict:
    """Legend arguments: one entry per class among ``labels`` (a class-disjoint test set shows its own, names cut
    to ``limit`` characters), or only their count where there are more than ``LEGEND_MAX``."""
    present = np.unique(np.asarray(labels, dtype=np.int64))
    if len(present) > LEGEND_MAX:
        return {"handles": [], "title": f"{len(present):,} classes\n(too many to list)"}
    handles = [
        Line2D([], [], linestyle="", marker="o", markersize=7, markerfacecolor=colors[i], markeredgewidth=0,
               label=_short(class_names[i], limit))
        for i in present
    ]  # fmt: skip
    return {"handles": handles, "title": "class", "fontsize": 10 if len(present) <= 20 else 8}


def _figure_legend(fig: Figure, class_names: Sequence[str], colors: np.ndarray, labels: np.ndarray) -> None:
    # Outside the axes, so it never covers points.
    fig.legend(**_legend(class_names, colors, labels), loc="outside right upper", frameon=False)


def scatter(
    points: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str] | None,
    path: str | Path,
    title: str = "2-D embedding",
) -> Path:
    """Write a 2-D scatter of ``points`` coloured by class, legend outside; returns the path written."""
    points = _points(points)
    labels, class_names = _labels_and_names(labels, class_names, len(points))
    path = _output(path)
    colors = _palette(labels, len(class_names))
    fig = _figure(8.5, 7)
    ax = fig.subplots()
    _draw_points(ax, points, labels, colors)
    ax.set_title(_wrapped(title, 60))
    _figure_legend(fig, class_names, colors, labels)
    return _save(fig, path)


def _to_rgb01(images: np.ndarray, index: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """``images[index]`` as ``(m, H, W)`` grayscale or ``(m, H, W, 3)`` colour floats in [0, 1].

    The scale comes from the whole array (uint8 or floats, any range), so every image shares it;
    only the selected images are converted to floats (60k MNIST digits as float64 would take 370 MB).
    """
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
        images = images.transpose(0, 2, 3, 1)  # (n, C, H, W) as torch stores them
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
        raise MetricLabError(f"images must be (n, H, W), (n, 1|3, H, W) or (n, H, W, 3), got shape {images.shape}")
    low, high = min(float(images.min(initial=0)), 0.0), max(float(images.max(initial=1)), 1.0)
    selected = (images if index is None else images[np.asarray(index, dtype=np.int64)]).astype(np.float64)
    return (selected - low) / (high - low)


def _tinted(image: np.ndarray, color: np.ndarray) -> np.ndarray:
    # Grayscale digits are drawn as ink of the class colour on white; colour images keep their colours.
    if image.ndim == 3:
        return image
    return 1.0 - image[..., None] * (1.0 - np.asarray(color[:3])[None, None, :])


def _spread_out(positions: np.ndarray, min_gap: float, limit: int, seed: int = 0) -> list[int]:
    """Indices of up to ``limit`` positions, in random order, no two closer than ``min_gap`` on x or on y."""
    kept: list[int] = []
    for i in np.random.default_rng(seed).permutation(len(positions)):
        if len(kept) >= limit:
            break
        # Chebyshev distance: square thumbnails overlap only when close on both axes.
        if not kept or np.abs(positions[kept] - positions[i]).max(axis=1).min() >= min_gap:
            kept.append(int(i))
    return kept


def thumbnail_scatter(
    points: np.ndarray,
    images: np.ndarray | Callable[[list[int]], np.ndarray],
    labels: np.ndarray,
    class_names: Sequence[str] | None,
    path: str | Path,
    max_images: int = 250,
    title: str = "Embedding with sample images",
) -> Path:
    """Write a scatter with image thumbnails at their points, spaced not to overlap; returns the path.

    ``images`` is an array of every point's image, or a function loading the images at given indices
    (for images streamed from files: only the thumbnails drawn are decoded). All points are drawn faintly;
    thumbnails of a fixed-seed random subset are added, skipping any that
    would overlap one already drawn, each tinted and framed in its class colour.
    """
    points = _points(points)
    labels, class_names = _labels_and_names(labels, class_names, len(points))
    if not callable(images) and len(images) != len(points):
        raise MetricLabError(f"got {len(images)} images for {len(points)} points; pass the images that were embedded")
    path = _output(path)
    colors = _palette(labels, len(class_names))
    fig = _figure(10, 9)
    ax = fig.subplots()
    _draw_points(ax, points, labels, colors, alpha=0.35)
    ax.set_title(_wrapped(title, 70))
    _figure_legend(fig, class_names, colors, labels)

    # Place thumbnails in display pixels of the final layout, so "no overlap" holds on the page.
    with warnings.catch_warnings():  # missing glyphs are noted once, when the figure is saved
        warnings.filterwarnings("ignore", message="Glyph .* missing from")
        fig.draw_without_rendering()
    pixels = ax.transData.transform(points)
    thumb_px = THUMB_INCHES * DPI
    # OffsetImage draws one image pixel as zoom points (1/72 inch) at any dpi.
    chosen = _spread_out(pixels, thumb_px * 1.08, max_images)
    thumbnails = _to_rgb01(images(chosen)) if callable(images) else _to_rgb01(images, chosen)
    zoom = THUMB_INCHES * 72 / max(thumbnails.shape[1:3])
    for i, image in zip(chosen, thumbnails, strict=True):
        color = colors[labels[i]]
        box = OffsetImage(_tinted(image, color), zoom=zoom, interpolation="nearest")
        frame = {"edgecolor": color, "linewidth": 1.0, "facecolor": "white"}
        thumb = AnnotationBbox(box, points[i], frameon=True, pad=0.05, bboxprops=frame)
        thumb.set_in_layout(False)  # a thumbnail at the edge must not make the layout shrink the axes
        ax.add_artist(thumb)
    return _save(fig, path)


def retrieval_gallery(
    query_images: np.ndarray,
    query_labels: np.ndarray,
    result_images: np.ndarray,
    result_labels: np.ndarray,
    path: str | Path,
    class_names: Sequence[str] | None = None,
    title: str = "Nearest neighbours of each query",
    judged: bool = True,
) -> Path:
    """Write a grid: one row per query, the query then its top-k results framed green (same class) or red.

    ``result_images`` has shape ``(queries, k, ...)`` and ``result_labels`` ``(queries, k)``; returns the path.
    Without ``judged`` (the queries' or the gallery's classes unknown), every frame is plain.
    """
    queries = _to_rgb01(query_images)
    query_labels = np.asarray(query_labels).reshape(-1).astype(np.int64)
    result_images = np.asarray(result_images)
    result_labels = np.asarray(result_labels).astype(np.int64)
    if result_labels.ndim != 2 or result_images.shape[:2] != result_labels.shape:
        raise MetricLabError(
            f"result_images {result_images.shape} and result_labels {result_labels.shape} must be (queries, k, ...) "
            "and (queries, k); pass the top-k results of each query"
        )
    n_queries, k = result_labels.shape
    if len(queries) != n_queries or len(query_labels) != n_queries:
        raise MetricLabError(f"got {len(queries)} query images, {len(query_labels)} labels and {n_queries} result rows")
    results = _to_rgb01(result_images.reshape(n_queries * k, *result_images.shape[2:]))
    names = [str(c) for c in class_names] if class_names is not None else None
    path = _output(path)

    def name(label: int) -> str:
        return names[label] if names is not None and 0 <= label < len(names) else str(label)

    fig = _figure(1.15 * (k + 1) + 0.6, 1.3 * n_queries + 0.6)
    axes = np.asarray(fig.subplots(n_queries, k + 1, squeeze=False))
    for row in range(n_queries):
        cells = [(queries[row], query_labels[row], None)]
        cells += [
            (
                results[row * k + j],
                result_labels[row, j],
                result_labels[row, j] == query_labels[row] if judged else None,
            )
            for j in range(k)
        ]
        for col, (image, label, correct) in enumerate(cells):
            ax = axes[row, col]
            ax.imshow(image, cmap="gray_r" if image.ndim == 2 else None, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            edge = "black" if correct is None else ("tab:green" if correct else "tab:red")
            for spine in ax.spines.values():
                spine.set_edgecolor(edge)
                spine.set_linewidth(1.5 if correct is None else 3.5)
            # A mark as well as a colour, for readers who cannot tell green from red.
            mark = "" if correct is None else (" \u2713" if correct else " \u2717")
            ax.set_xlabel(_short(name(label), 15) + mark, fontsize=8, color=edge, labelpad=2)
            if row == 0:
                ax.set_title("query" if col == 0 else f"#{col}", fontsize=9)
    key = "\n(green \u2713 = same class as the query, red \u2717 = different class)" if judged else ""
    fig.suptitle(_wrapped(title, int(12 * (k + 1))) + key, fontsize=10)
    return _save(fig, path)


def _robust_limits(all_points: np.ndarray, box_ratio: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """Axis limits holding 99% of the points, widened so one data unit is as long on x as on y."""
    # Percentiles rather than min/max: a few far outliers would otherwise squash every frame.
    low, high = np.percentile(all_points, [0.5, 99.5], axis=0)
    center, half = (low + high) / 2, np.maximum((high - low) * 0.54, 1e-9)
    if half[0] / half[1] < box_ratio:  # box_ratio = axes width / height
        half[0] = half[1] * box_ratio
    else:
        half[1] = half[0] / box_ratio
    return (center[0] - half[0], center[0] + half[0]), (center[1] - half[1], center[1] + half[1])


class _FixedPaletteWriter(PillowWriter):
    """PillowWriter whose GIF frames share one palette made from the class colours.

    GIF frames hold 256 colours; Pillow's per-frame adaptive palettes shift the class colours from
    frame to frame (and away from the legend), so every frame is mapped to the same palette instead.
    """

    def __init__(self, colors: np.ndarray, fps: float) -> None:
        super().__init__(fps=fps)
        # The colours drawn (those of the classes shown), each blended with white for antialiased edges as far as
        # 224 entries allow, plus a gray ramp for text and axes; past 224 classes, hues nearest in the ramp.
        colors = np.unique(np.asarray(colors)[:, :3], axis=0)
        colors = colors[np.linspace(0, len(colors) - 1, min(len(colors), 224)).round().astype(int)]
        shades = next(t for t in ((1.0, 0.7, 0.45, 0.25), (1.0, 0.45), (1.0,)) if len(colors) * len(t) <= 224)
        blends = [1 - t * (1 - c) for c in colors for t in shades]
        grays = [np.full(3, g) for g in np.linspace(0, 1, 32)]  # coarse: Pillow matches colours at ~5 bits
        palette = (np.clip(np.array(blends + grays), 0, 1) * 255).round().astype(np.uint8)
        self._palette = Image.new("P", (1, 1))
        self._palette.putpalette(palette.reshape(-1).tolist())

    def finish(self) -> None:
        self._frames = [
            frame.convert("RGB").quantize(palette=self._palette, dither=Image.Dither.NONE) for frame in self._frames
        ]
        super().finish()


def animate_embeddings(
    snapshots: Sequence[tuple[str, np.ndarray, np.ndarray]],
    class_names: Sequence[str] | None,
    path: str | Path,
    title: str = "Embedding during training",
    fps: float = 2.0,
) -> Path:
    """Write a GIF with one frame per ``(name, points, labels)`` snapshot, on fixed axes; returns the path."""
    if not snapshots:
        raise MetricLabError("no snapshots to animate; record embeddings at one or more epochs first")
    frames = [(str(name), _points(p), np.asarray(lab)) for name, p, lab in snapshots]
    max_label = max((int(lab.max()) for _, _, lab in frames if lab.size), default=0)
    names = [str(c) for c in class_names] if class_names is not None else [str(i) for i in range(max_label + 1)]
    every = np.concatenate([lab.reshape(-1) for _, _, lab in frames])
    colors = _palette(every, len(names))
    path = _output(path, (".gif",))

    # A fixed layout (not constrained): every frame must keep the same axes position and image size.
    width, height, box = 8.0, 6.5, (0.08, 0.07, 0.72, 0.85)  # left, bottom, width, height in figure fractions
    fig = _figure(width, height, layout=None)
    ax = fig.add_axes(box)
    xlim, ylim = _robust_limits(np.concatenate([p for _, p, _ in frames]), box[2] * width / (box[3] * height))
    legend = {**_legend(names, colors, every, limit=16), "fontsize": 8}  # 1.5 inches beside the fixed axes
    fig.legend(**legend, loc="upper left", bbox_to_anchor=(0.81, 0.92), frameon=False)
    # Opaque markers: translucent overlaps would create colours the GIF palette does not hold.
    style = {"alpha": 1.0, "s": max(_marker_style(max(len(p) for _, p, _ in frames))["s"], 3.0)}
    writer = _FixedPaletteWriter(colors[np.unique(every.astype(np.int64))], fps=fps)
    with _atomic(path) as tmp, _glyphs_noted(path), writer.saving(fig, str(tmp), dpi=100):
        for name, points, labels in frames:
            labels, _ = _labels_and_names(labels, names, len(points))
            ax.clear()
            _draw_points(ax, points, labels, colors, **style)
            # Limits are already in equal proportion; fixing them (aspect auto) keeps every frame alike.
            ax.set_aspect("auto")
            ax.set_xlim(*xlim)
            ax.set_ylim(*ylim)
            ax.set_title(_wrapped(f"{title}: {name}", 80), fontsize=10)
            writer.grab_frame()
    return path


def curves(
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    title: str = "Training curves",
    xlabel: str = "epoch",
    mark: tuple[float, str] | None = None,
) -> Path:
    """Write line plots of ``{name: [(x, y), ...]}``; returns the path.

    Series named ``"group/name"`` share the subplot ``group`` (e.g. ``loss/train`` and ``loss/val``); any
    other name gets its own subplot. A positive series spanning over two decades gets a log scale.
    ``mark = (x, label)`` draws a labelled dashed line at ``x`` in every subplot (e.g. the epoch kept).
    """
    if not series:
        raise MetricLabError("no curves to plot; pass at least one series of (x, y) points")
    groups: dict[str, dict[str, np.ndarray]] = {}
    for name, values in series.items():
        group, _, member = name.partition("/") if "/" in name else (name, "", name)
        values = np.asarray(values, dtype=np.float64).reshape(-1, 2) if len(values) else np.zeros((0, 2))
        groups.setdefault(group, {})[member] = values
    path = _output(path)
    cols = min(3, len(groups))
    rows = -(-len(groups) // cols)
    fig = _figure(4.2 * cols, 3.2 * rows + 0.4)
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False)).reshape(-1)
    for ax, (group, members) in zip(axes, groups.items(), strict=False):
        for member, values in members.items():
            marker = "o" if len(values) <= 30 else None
            ax.plot(values[:, 0], values[:, 1], marker=marker, markersize=3, label=member)
        ys = np.concatenate([v[:, 1] for v in members.values()])
        if ys.size and ys.min() > 0 and ys.max() / ys.min() > 100:
            ax.set_yscale("log")
        ax.set_title(group)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        marked = mark is not None and ys.size > 0
        if marked:
            ax.axvline(mark[0], color="0.35", linestyle="--", linewidth=1, label=mark[1])
        if len(members) > 1 or marked:
            ax.legend(fontsize=8)
        if not ys.size:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="gray")
            ax.set_xticks([])
            ax.set_yticks([])
    for ax in axes[len(groups) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    return _save(fig, path)


def _score_line(scores: Mapping[str, float]) -> str:
    short = {"knn_accuracy": "5-NN acc", "trustworthiness": "trust", "silhouette": "silhouette"}
    return "  ".join(f"{short.get(k, k)} {v:.2f}" for k, v in scores.items())


def panels(
    panels: Sequence[Panel],
    labels: np.ndarray,
    class_names: Sequence[str] | None,
    path: str | Path,
    scores: Sequence[Mapping[str, float]] | None = None,
    title: str = "Projections compared",
) -> Path:
    """Write one scatter per panel side by side, titled with method and (given) scores; returns the path.

    ``scores`` (e.g. from :func:`metriclab.viz.projections.projection_scores`) lines up with ``panels``.
    """
    if not panels:
        raise MetricLabError("no panels to draw; pass the result of compare_projections")
    if scores is not None and len(scores) != len(panels):
        raise MetricLabError(f"got {len(scores)} score sets for {len(panels)} panels; pass one per panel or none")
    labels, names = _labels_and_names(labels, class_names, len(_points(panels[0].points)))
    colors = _palette(labels, len(names))
    path = _output(path)
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = _figure(4.6 * cols + 1.4, 4.6 * rows + 0.5)
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False)).reshape(-1)
    for i, (ax, panel) in enumerate(zip(axes, panels, strict=False)):
        points = _points(panel.points)
        if len(points) != len(labels):
            raise MetricLabError(f"panel '{panel.title}' has {len(points)} points for {len(labels)} labels")
        _draw_points(ax, points, labels, colors)
        # Seconds are in the command's table, not here: the same command must draw the same figure.
        lines = [panel.title] + ([] if panel.seconds > 0 else ["(2-D already: no projection)"])
        lines += [_score_line(scores[i])] if scores is not None else []
        ax.set_title("\n".join(lines), fontsize=9)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    _figure_legend(fig, names, colors, labels)
    fig.suptitle(title)
    return _save(fig, path)
