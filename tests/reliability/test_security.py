"""What is trusted: weights are safetensors, every other file loads weights-only, nothing in a
run directory is unpickled, and plugins come only from entry points and paths a user names."""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from safetensors import safe_open

from metriclab.errors import MetricLabError
from metriclab.models import load_weights
from metriclab.runs import Run

from .conftest import FAULT, RECIPE, one_line, train_in_process


class Payload:
    """Unpickling this creates ``marker``: the stand-in for arbitrary code in a planted file."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_the_payload_runs_when_unpickled(tmp_path):
    """The control: the planted files below would create their marker if anything unpickled them."""
    marker = tmp_path / "pwned"
    torch.save(Payload(marker), tmp_path / "evil.bin")
    torch.load(tmp_path / "evil.bin", weights_only=False).close()
    assert marker.exists()


def test_weights_are_safetensors(baseline):
    for path in [baseline / "model.safetensors", *(c / "model.safetensors" for c in Run.checkpoints_in(baseline))]:
        with safe_open(str(path), "pt") as handle:
            assert any(key.startswith("towers.0.") for key in handle.keys())
    assert not list(baseline.rglob("*.pt")) and not list(baseline.rglob("pytorch_model*"))
    # The rest of a checkpoint: accelerate's torch files (loaded weights-only) and JSON; the seed recipe's
    # learning-rate schedule is one of those torch files.
    names = {p.name for c in Run.checkpoints_in(baseline) for p in c.iterdir()}
    torch_files = {"optimizer.bin", "scheduler.bin", "random_states_0.pkl"}
    assert names == {"model.safetensors", "trainer_state.json", *torch_files}


@pytest.mark.parametrize(
    ("planted", "words"),
    [
        ("optimizer.bin", ["refused to load checkpoint", "not a weights-only torch file", "tampered"]),
        ("random_states_0.pkl", ["refused to load checkpoint", "not a weights-only torch file", "tampered"]),
        ("scheduler.bin", ["refused to load checkpoint", "not a weights-only torch file", "tampered"]),
        ("model.safetensors", ["cannot read checkpoint", "header", "damaged"]),
    ],
)
def test_a_planted_pickle_in_a_checkpoint_is_refused(tmp_path, capsys, baseline, planted, words):
    run = tmp_path / "run"
    shutil.copytree(baseline, run)
    checkpoint = Run.latest_checkpoint_in(run)
    marker = tmp_path / "pwned"
    if planted.endswith(".safetensors"):
        (checkpoint / planted).write_bytes(pickle.dumps(Payload(marker)))
    else:
        torch.save(Payload(marker), checkpoint / planted)
    code, err = train_in_process(capsys, *FAULT, "--resume", str(run))
    assert code == 2, err[-3000:]
    text = one_line(err)
    assert "Traceback" not in text and str(checkpoint) in text
    for word in words:
        assert word in text
    assert not marker.exists()


def test_planted_embeddings_are_refused(tmp_path, baseline):
    run = tmp_path / "run"
    shutil.copytree(baseline, run)
    marker = tmp_path / "pwned"
    objects = np.array([Payload(marker)], dtype=object)
    np.savez(run / "embeddings" / "test.npz", embeddings=objects, labels=np.zeros(1, dtype=np.int64))
    with pytest.raises(MetricLabError, match="not a valid embeddings file"):
        Run(run).embeddings("test")
    assert not marker.exists()


def test_planted_final_weights_are_refused(tmp_path, baseline):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(MetricLabError, match="not a readable safetensors file"):
        load_weights(torch.nn.Linear(2, 2), path)
    assert not marker.exists()


def test_a_recipe_imports_nothing_from_the_current_directory(tmp_path):
    """A working directory full of plausible plugin modules: only the file the user names is imported."""
    cwd = tmp_path / "project"
    (cwd / "plugins").mkdir(parents=True)
    for module, name in [
        ("plugins/__init__.py", "plugins"),
        ("metriclab_plugins.py", "metriclab_plugins"),
        ("evil.py", "evil"),
        ("named.py", "named"),
    ]:
        (cwd / module).write_text(f"open({str(tmp_path / f'imported-{name}')!r}, 'w').close()\n")
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / RECIPE), "--dataset", "digits", "--encoder-args", "hidden=[8]"]
        + ["--epochs", "1", "--max-steps", "2", "--no-embed-train", "--plugins", "named.py", "--output-dir", str(out)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    imported = sorted(p.name for p in tmp_path.glob("imported-*"))
    assert imported == ["imported-named"]  # the control: the named path is imported, nothing else
    assert Run(out).config["components"]["loss"]["source"] == "metriclab"


@pytest.mark.parametrize(
    ("planted", "args", "words"),
    [
        ("embeddings/test.npz", [], ["not a valid embeddings file"]),
        ("model.safetensors", ["--reembed"], ["not a readable safetensors file"]),
    ],
    ids=["embeddings", "weights"],
)
def test_evaluate_refuses_planted_files(tmp_path, baseline, planted, args, words):
    from typer.testing import CliRunner

    from metriclab.cli import app

    run = tmp_path / "run"
    shutil.copytree(baseline, run)
    marker = tmp_path / "pwned"
    if planted.endswith(".npz"):
        np.savez(run / planted, embeddings=np.array([Payload(marker)], dtype=object), labels=np.zeros(1, dtype=int))
    else:
        (run / planted).write_bytes(pickle.dumps(Payload(marker)))
    result = CliRunner().invoke(app, ["evaluate", str(run), *args])
    assert result.exit_code == 2, result.output
    assert all(word in one_line(result.output) for word in words), result.output
    assert "Traceback" not in result.output
    assert not marker.exists()


def test_a_runs_own_plugin_list_is_not_imported_by_the_cli(tmp_path):
    """A run directory may come from someone else: its recipe.plugins are named, never run, until --plugins."""
    from typer.testing import CliRunner

    from metriclab.cli import app

    marker = tmp_path / "plugin-ran"
    plugin = tmp_path / "their_plugin.py"
    plugin.write_text(
        "import pathlib, torch\n"
        "from metriclab.registry import register_encoder\n"
        f"pathlib.Path({str(marker)!r}).touch()\n"
        "@register_encoder('their-linear')\n"
        "def their_linear(*, embedding_dim, input_shape):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, embedding_dim))\n"
    )
    run = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "recipes" / "mnist_siamese.py"),
            "--dataset",
            "digits",
            "--epochs",
            "1",
            "--encoder",
            "their-linear",
            "--plugins",
            str(plugin),
            "--output-dir",
            str(run),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    marker.unlink()
    shutil.rmtree(run / "embeddings")  # force re-embedding, which needs the encoder
    refused = CliRunner().invoke(app, ["evaluate", str(run)])
    assert refused.exit_code == 2 and "--plugins" in refused.output
    assert not marker.exists()
    allowed = CliRunner().invoke(app, ["evaluate", str(run), "--plugins", str(plugin), "--json"])
    assert allowed.exit_code == 0, allowed.output
    assert marker.exists()
