"""Each figure function writes a valid, non-empty image in the format its path asks for."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageSequence

from metriclab.errors import MetricLabError
from metriclab.viz import plots
from metriclab.viz.projections import Panel

N_CLASSES = 10
NAMES = [f"digit {i}" for i in range(N_CLASSES)]
GREEN, RED = (44, 160, 44), (214, 39, 40)  # matplotlib's tab:green and tab:red


def clusters(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % N_CLASSES
    angles = labels * 2 * np.pi / N_CLASSES
    centres = np.stack([np.cos(angles), np.sin(angles)], axis=1) * 10
    return centres + rng.normal(size=(n, 2)), labels


def digits(n: int, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size), dtype=np.uint8)


def pixels_near(path, color, tolerance: int = 12) -> int:
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int((np.abs(rgb - np.array(color)).max(axis=2) <= tolerance).sum())


def test_scatter_writes_png_with_every_class_colour(tmp_path):
    points, labels = clusters()
    out = plots.scatter(points, labels, NAMES, tmp_path / "scatter.png", title="synthetic (test): PCA")
    image = Image.open(out)
    assert out == tmp_path / "scatter.png" and image.format == "PNG"
    assert image.size == (int(8.5 * plots.DPI), int(7 * plots.DPI))
    for color in plots.class_colors(N_CLASSES):  # the legend markers are drawn opaque in each class colour
        assert pixels_near(out, (np.asarray(color[:3]) * 255).round(), tolerance=3) > 10


@pytest.mark.parametrize(("suffix", "magic"), [(".svg", b"<?xml"), (".pdf", b"%PDF")])
def test_scatter_honours_vector_suffix(tmp_path, suffix, magic):
    points, labels = clusters()
    out = plots.scatter(points, labels, NAMES, tmp_path / f"scatter{suffix}")
    assert out.suffix == suffix and out.read_bytes().startswith(magic)


def test_png_is_default_and_unknown_suffix_is_refused(tmp_path):
    points, labels = clusters()
    out = plots.scatter(points, labels, None, tmp_path / "sub" / "scatter")
    assert out == tmp_path / "sub" / "scatter.png" and Image.open(out).format == "PNG"
    with pytest.raises(MetricLabError, match=r"\.png"):
        plots.scatter(points, labels, None, tmp_path / "scatter.jpg")


def test_scatter_rejects_points_that_are_not_2d(tmp_path):
    with pytest.raises(MetricLabError, match="project"):
        plots.scatter(np.zeros((20, 3)), np.zeros(20, dtype=int), None, tmp_path / "x.png")
    with pytest.raises(MetricLabError, match="class names"):
        plots.scatter(np.zeros((20, 2)), np.full(20, 5), ["a", "b"], tmp_path / "x.png")


def test_thumbnail_scatter_draws_thumbnails(tmp_path):
    points, labels = clusters()
    images = digits(len(points))
    bare = plots.thumbnail_scatter(points, images, labels, NAMES, tmp_path / "bare.png", max_images=0)
    out = plots.thumbnail_scatter(points, images[:, None], labels, NAMES, tmp_path / "thumbs.png", max_images=40)
    assert Image.open(out).format == "PNG" and Image.open(out).size == Image.open(bare).size
    # Thumbnails are opaque squares; they change far more pixels than the faint points do.
    changed = (np.asarray(Image.open(out).convert("L")) != np.asarray(Image.open(bare).convert("L"))).mean()
    assert changed > 0.05


def test_thumbnails_are_spread_out():
    positions = np.random.default_rng(0).uniform(0, 100, size=(2000, 2))
    chosen = plots._spread_out(positions, min_gap=10, limit=500)
    assert 20 < len(chosen) < 500
    gaps = np.abs(positions[chosen][:, None] - positions[chosen][None]).max(axis=2)
    assert gaps[~np.eye(len(chosen), dtype=bool)].min() >= 10
    assert len(plots._spread_out(positions, min_gap=10, limit=7)) == 7


def test_retrieval_gallery_frames_correct_green_and_wrong_red(tmp_path, monkeypatch):
    queries, query_labels = digits(3, 28), np.array([0, 1, 2])
    results = digits(15, 28, seed=1).reshape(3, 5, 28, 28)
    right = np.repeat(query_labels[:, None], 5, axis=1)
    good = plots.retrieval_gallery(queries, query_labels, results, right, tmp_path / "good.png", class_names=NAMES)
    wrong = right.copy()
    wrong[1, 2] = 7
    bad = plots.retrieval_gallery(queries, query_labels, results, wrong, tmp_path / "bad.png", class_names=NAMES)
    width, height = Image.open(good).size
    assert width > height  # 6 columns, 3 rows
    assert pixels_near(good, GREEN) > 1000 and pixels_near(good, RED) == 0
    assert pixels_near(bad, RED) > 100
    unknown = plots.retrieval_gallery(
        queries, query_labels, results, wrong, tmp_path / "unknown.png", class_names=NAMES, judged=False
    )  # classes unknown (search of unlabelled images): plain frames
    assert pixels_near(unknown, RED) == 0 and pixels_near(unknown, GREEN) == 0
    titles, original = [], plots.Figure.suptitle  # and no key to colours that are not drawn
    monkeypatch.setattr(
        plots.Figure, "suptitle", lambda fig, text, **kw: titles.append(text) or original(fig, text, **kw)
    )
    plots.retrieval_gallery(queries, query_labels, results, wrong, tmp_path / "u2.png", judged=False)
    plots.retrieval_gallery(queries, query_labels, results, wrong, tmp_path / "j2.png")
    assert "green" not in titles[0] and "green" in titles[1]


def test_retrieval_gallery_accepts_colour_images_and_checks_shapes(tmp_path):
    rng = np.random.default_rng(0)
    queries, results = rng.random((2, 3, 16, 16)), rng.random((2, 4, 3, 16, 16))
    out = plots.retrieval_gallery(queries, [0, 1], results, np.zeros((2, 4), dtype=int), tmp_path / "colour.png")
    assert Image.open(out).format == "PNG"
    with pytest.raises(MetricLabError, match="queries, k"):
        plots.retrieval_gallery(queries, [0, 1], results, np.zeros((2, 3), dtype=int), tmp_path / "x.png")


def test_animation_has_one_frame_per_snapshot_on_fixed_axes(tmp_path):
    points, labels = clusters()
    snapshots = [(f"epoch {e}", points * (e + 1) / 3, labels) for e in range(3)]
    out = plots.animate_embeddings(snapshots, NAMES, tmp_path / "training")
    image = Image.open(out)
    assert out.suffix == ".gif" and image.format == "GIF" and image.n_frames == 3
    frames = [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)]
    assert len({f.shape for f in frames}) == 1 and not np.array_equal(frames[0], frames[2])
    # All frames share one small palette holding the exact class colours, so a class keeps its legend colour.
    used = np.unique(np.concatenate([f.reshape(-1, 3) for f in frames]), axis=0)
    assert len(used) <= 4 * N_CLASSES + 32
    for color in plots.class_colors(N_CLASSES):
        assert (np.abs(used - (np.asarray(color[:3]) * 255).round()).max(axis=1) == 0).any()
    with pytest.raises(MetricLabError, match="gif"):
        plots.animate_embeddings(snapshots, NAMES, tmp_path / "training.png")


@pytest.mark.parametrize("n_classes, shown", [(100, range(50, 100)), (300, range(300))], ids=["disjoint", "many"])
def test_animation_keeps_the_colours_of_the_classes_it_shows(tmp_path, n_classes, shown):
    """A class-disjoint test set (classes 50-99 of 100) is drawn in its scatter colours, not in grey."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.array(shown), 4)
    points = rng.standard_normal((len(labels), 2)) + labels[:, None] * 0.1
    names = [f"class {i}" for i in range(n_classes)]
    out = plots.animate_embeddings([("a", points, labels), ("b", points * 2, labels)], names, tmp_path / "t.gif")
    frames = [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(Image.open(out))]
    used = np.unique(np.concatenate([f.reshape(-1, 3) for f in frames]), axis=0)
    colours = (plots._palette(labels, n_classes)[np.unique(labels), :3] * 255).round()
    found = [(np.abs(used - c).max(axis=1) <= (0 if n_classes <= 224 else 40)).any() for c in colours]
    assert all(found), f"{found.count(False)} of {len(colours)} class colours missing from the GIF"


def test_animation_limits_ignore_outliers():
    points = np.random.default_rng(0).uniform(0, 1, size=(1000, 2))
    points[0] = [1e6, -1e6]
    (x0, x1), (y0, y1) = plots._robust_limits(points, box_ratio=2.0)
    assert -1 < x0 < 0.2 and 0.8 < x1 < 2 and -1 < y0 < 0.2 and 0.8 < y1 < 2
    assert (x1 - x0) == pytest.approx(2.0 * (y1 - y0))  # one data unit as long on both axes


def test_curves_group_series_by_prefix(tmp_path):
    epochs = np.arange(1, 11)
    series = {
        "loss/train": list(zip(epochs, 1 / epochs, strict=True)),
        "loss/val": list(zip(epochs, 1.2 / epochs, strict=True)),
        "precision_at_1": list(zip(epochs, 1 - 0.5 / epochs, strict=True)),
    }
    two = plots.curves(series, tmp_path / "curves.png", title="run: curves")
    three = plots.curves({**series, "lr": [(1, 0.1), (2, 0.01)]}, tmp_path / "curves3.pdf")
    assert Image.open(two).format == "PNG" and Image.open(two).size[0] == int(2 * 4.2 * plots.DPI)
    assert three.read_bytes().startswith(b"%PDF")
    with pytest.raises(MetricLabError):
        plots.curves({}, tmp_path / "none.png")


def test_panels_draws_one_axes_per_panel(tmp_path):
    points, labels = clusters()
    panels = [Panel("UMAP of raw pixels (64-D)", points, 1.5), Panel("Learned embedding (2-D)", -points, 0.0)]
    scores = [{"knn_accuracy": 0.9, "trustworthiness": 0.8, "silhouette": 0.5}] * 2
    svg = plots.panels(panels, labels, NAMES, tmp_path / "compare.svg", scores=scores)
    assert svg.read_bytes().startswith(b"<?xml")
    plain = plots.panels(panels, labels, NAMES, tmp_path / "plain.png")
    scored = plots.panels(panels, labels, NAMES, tmp_path / "scored.png", scores=scores)
    assert Image.open(plain).size[0] == int((4.6 * 2 + 1.4) * plots.DPI)
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(scored)))  # scores in titles
    with pytest.raises(MetricLabError, match="score"):
        plots.panels(panels, labels, NAMES, tmp_path / "x.png", scores=scores[:1])


@pytest.mark.parametrize("n_classes, present, listed", [(10, [5, 6, 7, 8, 9], "c5 c6 c7 c8 c9"), (60, range(60), None)])
def test_the_legend_lists_the_classes_drawn_and_counts_too_many(tmp_path, monkeypatch, n_classes, present, listed):
    """A class-disjoint test set's figure lists its own classes in distinct colours, not the train classes;
    thousands are counted."""
    from matplotlib.figure import Figure

    legends = []
    save = Figure.savefig

    def keep(fig, *args, **kwargs):
        legends.extend(fig.legends)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    labels = np.repeat(np.array(list(present)), 4)
    points = np.random.default_rng(0).normal(size=(len(labels), 2))
    plots.scatter(points, labels, [f"c{i}" for i in range(n_classes)], tmp_path / "s.png")
    (legend,) = legends
    if listed is None:
        assert not legend.texts and legend.get_title().get_text() == "60 classes\n(too many to list)"
    else:
        assert " ".join(t.get_text() for t in legend.texts) == listed and legend.get_title().get_text() == "class"
        # the classes drawn share the whole palette: five test classes of ten get tab10's first five colours
        faces = [handle.get_markerfacecolor() for handle in legend.legend_handles]
        np.testing.assert_allclose(faces, plots.class_colors(len(set(present))))


def test_gallery_queries_come_from_random_classes_of_a_many_class_test_set():
    from metriclab.viz.figures import _pick_queries

    labels = np.repeat(np.arange(250, 750), 4)  # 500 classes of 4, like a product catalogue's test split
    chosen, failed = _pick_queries(labels, np.zeros(len(labels), dtype=bool), 8, seed=0)
    classes = labels[chosen]
    assert failed == 0 and len(set(classes)) == 8 and classes.max() - classes.min() > 100  # not 250..257
    wrong = np.zeros(len(labels), dtype=bool)
    wrong[::7] = True
    chosen, failed = _pick_queries(labels, wrong, 8, seed=0)
    assert len(chosen) == 8 and failed == 2 and wrong[chosen].sum() >= 2 and len(set(labels[chosen])) == 8
    assert np.array_equal(chosen, _pick_queries(labels, wrong, 8, seed=0)[0])
