"""`metriclab evaluate | visualize | compare` through typer's CliRunner, on tiny real runs."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import one_line_error, tiny_recipe
from PIL import Image, ImageSequence
from rich.console import Console
from typer.testing import CliRunner

from metriclab import registry
from metriclab.cli import app, evaluation_table
from metriclab.data import Dataset
from metriclab.metrics.retrieval import retrieval_metrics, verification_metrics
from metriclab.runs import Run, save_embeddings

runner = CliRunner()


def cli(*args: str, env: dict | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


@pytest.fixture
def run_dir(tiny_run, tmp_path):
    """A private copy of the session's tiny 2-D digits run, free to modify."""
    return shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints"))


@pytest.fixture(scope="module")
def run_8d(tmp_path_factory):
    """A tiny 8-D digits run trained in-process with the engine, evaluated with cosine distance."""
    from metriclab.training.engine import train

    out = tmp_path_factory.mktemp("runs") / "run8d"
    return train(tiny_recipe(out, name="tiny8", embedding_dim=8, metric="cosine"))


# -- evaluate ---------------------------------------------------------------------------------------


def test_evaluate_json_equals_independent_metrics_and_is_saved(run_dir):
    result = cli("evaluate", run_dir, "--ks", "1,3", "--pairs", "2000", "--json")
    assert result.exit_code == 0, result.output
    (out,) = json.loads(result.stdout)
    run = Run(run_dir)
    test, test_labels = run.embeddings("test")
    train, train_labels = run.embeddings("train")
    assert out["metric"] == "euclidean" and out["embeddings"] == "saved" and out["ks"] == [1, 3]
    loo = retrieval_metrics(test, test_labels, ks=(1, 3))
    vs_train = retrieval_metrics(test, test_labels, train, train_labels, ks=(1, 3), clustering=False)
    verification = verification_metrics(test, test_labels, num_pairs=2000)
    saved = run.metrics["evaluations"]["euclidean"]
    for section, expected in (("test_loo", loo), ("test_vs_train", vs_train), ("verification", verification)):
        assert out[section] == pytest.approx(expected), section
        assert saved[section] == pytest.approx(expected), section
    assert {"precision@3", "recall@3", "map@r", "r_precision", "knn_accuracy", "nmi", "ami"} <= set(out["test_loo"])
    assert set(out["verification"]) == {"roc_auc", "eer", "threshold", "verification_accuracy"}
    assert run.metrics["final"]  # what training wrote is kept


def test_evaluate_repeated_k_and_cosine_are_stored_under_the_metric(run_dir):
    result = cli("evaluate", run_dir, "--k", "2", "--k", "1", "--metric", "cosine", "--pairs", "1000", "--json")
    assert result.exit_code == 0, result.output
    (out,) = json.loads(result.stdout)
    assert out["ks"] == [1, 2] and out["key"] == "cosine"
    test, labels = Run(run_dir).embeddings("test")
    expected = retrieval_metrics(test, labels, ks=(1, 2), metric="cosine")
    assert Run(run_dir).metrics["evaluations"]["cosine"]["test_loo"] == pytest.approx(expected)


def test_evaluate_several_runs_side_by_side(run_dir, tmp_path):
    other = shutil.copytree(run_dir, tmp_path / "noisy")
    test, labels = Run(other).embeddings("test")
    noisy = test + np.random.default_rng(0).normal(scale=5 * test.std(), size=test.shape).astype(np.float32)
    save_embeddings(Run(other).embeddings_path("test"), noisy, labels, 2)
    result = cli("evaluate", run_dir, other, "--pairs", "1000")
    assert result.exit_code == 0, result.output
    assert "/run" in result.stdout and "/noisy" in result.stdout and "P@10" in result.stdout
    assert all("evaluations" in Run(p).metrics for p in (run_dir, other))

    results = [json.loads(cli("evaluate", p, "--pairs", "1000", "--json").stdout)[0] for p in (run_dir, other)]
    console = Console(record=True, force_terminal=True, width=200, color_system="truecolor")
    console.print(evaluation_table(results))
    rendered = console.export_text(styles=True)
    best = f"{results[0]['test_loo']['precision@1']:.4f}"  # the clean run beats the noisy one
    worst = f"{results[1]['test_loo']['precision@1']:.4f}"
    assert results[0]["test_loo"]["precision@1"] > results[1]["test_loo"]["precision@1"]
    assert f"\x1b[1;32m{best}" in rendered and f"\x1b[1;32m{worst}" not in rendered


def test_evaluate_reembeds_from_weights_like_training_did(run_dir):
    run = Run(run_dir)
    saved = {split: run.embeddings(split) for split in ("test", "train")}
    for split in ("test", "train"):
        run.embeddings_path(split).unlink()
    result = cli("evaluate", run_dir, "--pairs", "1000", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["embeddings"] == "embedded from model.safetensors"
    for split in ("test", "train"):  # written back, equal to what training saved
        emb, labels = run.embeddings(split)
        np.testing.assert_array_equal(labels, saved[split][1])
        np.testing.assert_allclose(emb, saved[split][0], rtol=1e-5, atol=1e-5)


def _register(monkeypatch, name: str, size: int) -> None:
    def factory() -> Dataset:
        rng = np.random.default_rng(1)
        images = torch.from_numpy(rng.integers(0, 256, (60, 1, size, size), dtype=np.uint8))
        labels = torch.arange(60) % 3
        return Dataset(name, images[:40], labels[:40], images[40:], labels[40:], ["a", "b", "c"], "test data")

    registry.load_plugins()
    entry = registry.Entry(name, "dataset", factory, "tests")
    monkeypatch.setitem(registry.datasets._entries, name, entry)


def test_evaluate_on_another_dataset_keeps_the_runs_embeddings(run_dir, monkeypatch):
    _register(monkeypatch, "noise-8x8", 8)
    before = Run(run_dir).embeddings_path("test").read_bytes()
    result = cli("evaluate", run_dir, "--dataset", "noise-8x8", "--ks", "1", "--pairs", "200", "--json")
    assert result.exit_code == 0, result.output
    (out,) = json.loads(result.stdout)
    assert out["key"] == "noise-8x8/euclidean" and out["test_size"] == 20 and out["dataset"] == "test data"
    assert "noise-8x8/euclidean" in Run(run_dir).metrics["evaluations"]
    assert Run(run_dir).embeddings_path("test").read_bytes() == before


def _break(run_dir, how: str, monkeypatch) -> list[str]:
    """Damage a run copy; return words the one-line error must contain."""
    run = Run(run_dir)
    if how == "not a run":
        (run_dir / "config.json").unlink()
        return ["not a metriclab run", "config.json"]
    if how == "missing":
        shutil.rmtree(run_dir)
        return ["not a directory"]
    if how == "no embeddings or weights":
        shutil.rmtree(run_dir / "embeddings")
        run.weights_path.unlink()
        return ["neither embeddings", "--resume"]
    if how == "nan embeddings":
        emb, labels = run.embeddings("test")
        emb[3] = np.nan
        save_embeddings(run.embeddings_path("test"), emb, labels, 2)
        return ["NaN", "--reembed"]
    if how == "wrong dimension":
        _, labels = run.embeddings("test")
        save_embeddings(run.embeddings_path("test"), np.ones((len(labels), 3), np.float32), labels, 2)
        return ["3-D", "makes 2-D", "--reembed"]
    if how == "wrong image shape":
        _register(monkeypatch, "noise-28x28", 28)
        return ["1x28x28", "takes 1x8x8", "choose a dataset"]
    if how == "plugin not installed":
        config = json.loads((run_dir / "config.json").read_text())
        config["recipe"]["encoder"] = config["components"]["encoder"]["name"] = "ghost-mlp"
        config["components"]["encoder"]["source"] = "ghostpkg"
        (run_dir / "config.json").write_text(json.dumps(config))
        return ["ghost-mlp", "pip install ghostpkg"]
    raise AssertionError(how)


@pytest.mark.parametrize(
    ("how", "extra"),
    [
        ("not a run", []),
        ("missing", []),
        ("no embeddings or weights", []),
        ("nan embeddings", []),
        ("wrong dimension", []),
        ("wrong image shape", ["--dataset", "noise-28x28"]),
        ("plugin not installed", ["--reembed"]),
    ],
)
def test_evaluate_bad_runs_fail_in_one_line_with_the_fix(run_dir, monkeypatch, how, extra):
    words = _break(run_dir, how, monkeypatch)
    line = one_line_error(cli("evaluate", run_dir, *extra))
    for word in words:
        assert word in line, (word, line)


def test_run_files_get_the_permissions_of_the_umask_like_any_new_file(tiny_run):
    from metriclab.runs import new_file_mode

    for name in ("config.json", "metrics.json", "embeddings/test.npz", "embedding.png", "history.csv"):
        assert (tiny_run / name).stat().st_mode & 0o777 == new_file_mode(), name  # not mkstemp's 0o600


def test_a_folder_of_runs_names_its_newest_run(run_dir):
    older = shutil.copytree(run_dir, run_dir.parent / "recipe" / "20260101-000000")
    newer = shutil.copytree(run_dir, run_dir.parent / "recipe" / "20260102-000000")
    for when, run in enumerate((older, run_dir, newer)):
        os.utime(run / "config.json", (1e9 + when, 1e9 + when))
    for folder in (run_dir.parent, run_dir.parent / "recipe"):
        line = one_line_error(cli("evaluate", folder))
        assert "is not a run but holds" in line and line.endswith(f"the newest: {newer}"), line
    assert "3 runs" in one_line_error(cli("visualize", run_dir.parent))


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["evaluate", "{run}", "--ks", "1,x"], ["--ks", "1,5,10"]),
        (["evaluate", "{run}", "--k", "0"], ["at least 1"]),
        (["evaluate", "{run}", "--metric", "manhattan"], ["euclidean, cosine"]),
        (["visualize", "{run}", "--method", "isomap"], ["umap, pca, tsne"]),
        (["visualize", "{run}", "--format", "jpg"], ["png, svg, pdf"]),
        (["visualize", "{run}", "--only", "heatmap"], ["scatter"]),
        (["compare", "{run}", "--max-points", "3"], ["at least 10"]),
    ],
)
def test_bad_options_fail_in_one_line_with_the_fix(tiny_run, args, words):
    line = one_line_error(cli(*[a.format(run=tiny_run) for a in args]))
    for word in words:
        assert word in line


def test_every_command_has_help():
    for command in ("evaluate", "visualize", "compare"):
        result = cli(command, "--help")
        assert result.exit_code == 0 and "--json" in result.output and "Usage" in result.output


def test_every_option_help_is_shown_whole():
    """Rich markup reads an unescaped ``[default: ...]`` as a tag and drops it from the help."""
    from typer.main import get_command

    group = get_command(app)
    checked = 0
    for name, command in group.commands.items():
        result = cli(name, "--help")
        assert result.exit_code == 0, result.output
        shown = " ".join(result.output.replace("\u2502", " ").split())  # the panel's borders out, lines joined
        for param in command.params:
            text = getattr(param, "help", None)
            if text:
                assert " ".join(text.replace("\\[", "[").split()) in shown, (name, param.name)
                checked += "[" in text
    assert checked >= 5  # the bracketed defaults of evaluate, visualize, compare, search and export


# -- visualize --------------------------------------------------------------------------------------


def test_visualize_writes_every_figure_as_valid_images(run_dir):
    result = cli("visualize", run_dir, "--method", "pca", "--queries", "3", "--k", "4", "--json")
    assert result.exit_code == 0, result.output
    files = json.loads(result.stdout)["files"]
    names = sorted(p.rsplit("/", 1)[1] for p in files)
    assert names == ["curves.png", "embedding.png", "gallery.png", "thumbnails.png", "training.gif"]
    for path in files:
        assert path.startswith(str(run_dir / "figures"))
        with Image.open(path) as image:
            image.verify()
    with Image.open(run_dir / "figures" / "training.gif") as gif:
        assert sum(1 for _ in ImageSequence.Iterator(gif)) == len(Run(run_dir).snapshot_epochs()) == 2
    with Image.open(run_dir / "figures" / "gallery.png") as gallery:  # 3 query rows of 1 + 4 images
        assert gallery.size[1] < gallery.size[0] * 1.2


def test_visualize_n_d_run_in_vector_formats_to_a_chosen_folder(run_8d, tmp_path):
    out = tmp_path / "figs"
    args = ["visualize", run_8d, "--method", "pca", "--format", "svg", "--format", "pdf", "--output-dir", out]
    result = cli(*args, "--only", "scatter", "--only", "animation")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["embedding.pdf", "embedding.svg", "training.gif"]
    assert (out / "embedding.svg").read_bytes().lstrip().startswith(b"<?xml")
    assert "PCA of unit-norm 8-D" in (out / "embedding.svg").read_text()
    assert (out / "embedding.pdf").read_bytes().startswith(b"%PDF")
    assert f"wrote {out / 'training.gif'}" in result.stdout


def test_visualize_show_needs_a_display(run_dir, monkeypatch):
    opened = []
    monkeypatch.setattr("typer.launch", lambda path, **_: opened.append(path))
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr("sys.platform", "linux")
    result = cli("visualize", run_dir, "--only", "curves", "--show")
    assert result.exit_code == 0 and "no display" in result.stderr and not opened
    monkeypatch.setenv("DISPLAY", ":0")
    result = cli("visualize", run_dir, "--only", "curves", "--show")
    assert result.exit_code == 0 and opened == [str(run_dir / "figures" / "curves.png")]


# -- compare (the one test that runs UMAP) ----------------------------------------------------------


@pytest.mark.slow  # UMAP: ~5 s once numba's kernels are cached on disk, ~40 s on the very first run
def test_compare_two_runs_on_the_same_points(run_dir, run_8d, tmp_path):
    out = tmp_path / "cmp.png"
    result = cli("compare", run_dir, run_8d, "--max-points", "150", "--output", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["figure"] == str(out)
    with Image.open(out) as image:
        image.verify()
    rows = report["rows"]
    assert [r["projection"] for r in rows] == [
        "UMAP of 64-D",
        "learned 2-D",
        "UMAP of unit-norm 8-D",
        "PCA of unit-norm 8-D",
    ]
    assert rows[0]["run"] == "raw pixels" and rows[1]["seconds"] is None and rows[1]["trustworthiness"] is None
    for row in rows:
        assert 0 <= row["knn_accuracy"] <= 1 and -1 <= row["silhouette"] <= 1
    for row in (rows[0], rows[2], rows[3]):
        assert row["seconds"] > 0 and 0 <= row["trustworthiness"] <= 1
    assert rows[0]["knn_accuracy"] > 0.5  # UMAP of digit pixels separates the classes well

    table = cli("compare", run_dir, "--max-points", "150", "--output", tmp_path / "one.png")
    assert table.exit_code == 0 and "raw pixels" in table.stdout and "5-NN acc" in table.stdout


# -- plugins / version ----------------------------------------------------------------------------


def test_plugins_lists_components_by_kind_with_their_package():
    result = cli("plugins", "losses", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    contrastive = rows["contrastive"]
    assert (contrastive["kind"], contrastive["source"]) == ("loss", "metriclab")
    assert contrastive["description"].startswith("Hadsell, Chopra & LeCun (2006)")
    assert contrastive["arguments"]["margin"] == 1.0 and "squared" in contrastive["arguments"]
    assert rows["pml.ContrastiveLoss"]["description"] == ""  # not nn.Module's docstring, which it inherits
    assert {r["kind"] for r in rows.values()} == {"loss"}
    names = {r["name"] for r in json.loads(cli("plugins", "pml.*Loss", "--json").stdout)}
    assert {"pml.MultiSimilarityLoss", "pml.TripletMarginLoss"} <= names
    table = cli("plugins")
    assert table.exit_code == 0 and "random-pairs" in table.stdout and "fashion-mnist" in table.stdout


def test_plugins_with_no_match_and_version():
    result = cli("plugins", "nothing-like-this")
    assert result.exit_code == 2 and "metriclab plugins" in result.output
    version = cli("--version")
    assert version.exit_code == 0 and version.stdout.strip().startswith("metriclab ")
