"""Shared helpers: run recipes and the CLI the way users do."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
# Small and fast: sklearn's 8x8 digits, a small MLP, two short epochs.
TINY = ["--dataset", "digits", "--encoder-args", "hidden=[32]", "--epochs", "2", "--batch-size", "64"]


def tiny_recipe(output_dir: Path, **overrides):
    """TINY as a Recipe for in-process training on the CPU, writing to ``output_dir``; ``overrides`` win."""
    from metriclab.recipe import Recipe

    fields = {"dataset": "digits", "encoder_args": {"hidden": [32]}, "epochs": 2, "batch_size": 64, "cpu": True}
    return Recipe(**{**fields, "output_dir": str(output_dir), **overrides})


def run_recipe(recipe: str, *args: str, env: dict | None = None, timeout: int = 300, launcher: list | None = None):
    """Run a recipe file as a subprocess; return the CompletedProcess (text output)."""
    command = [*(launcher or [sys.executable]), str(RECIPES / recipe), *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)


def main_in_process(recipe: str, *args: str) -> None:
    """Run a recipe file's ``main`` with ``args`` as its command line, in this process (no interpreter start-up).

    accelerate's process-wide state is reset around it, so each run chooses its own mixed precision.
    Fails the test, with the error shown, if the recipe exits.
    """
    import runpy

    from accelerate.state import AcceleratorState

    from metriclab import main

    recipe_object = runpy.run_path(str(RECIPES / recipe))["recipe"]
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        main(recipe_object, list(args))
    except SystemExit as exit_:
        pytest.fail(f"{recipe} {' '.join(args)} exited with {exit_.code}")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def free_port() -> int:
    """A TCP port that no process listens on now, chosen by the OS (for a launcher's main process)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One finished tiny run of the seed recipe on digits, shared by tests that only read it."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    result = run_recipe("mnist_siamese.py", *TINY, "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture
def make_tiny_recipe(tmp_path):
    """``tiny_recipe`` writing to ``tmp_path / "run"`` unless given another folder."""

    def make(output_dir: Path | None = None, **overrides):
        return tiny_recipe(output_dir or tmp_path / "run", **overrides)

    return make


@pytest.fixture
def register(monkeypatch):
    """``register(kind, name, factory)``: a component in the global registry for this test only; returns ``name``."""
    from metriclab import registry

    registry.load_plugins()  # so that loading them later cannot clash with or drop the test's entry

    def add(kind: str, name: str, factory) -> str:
        reg = registry.registry(kind)
        monkeypatch.setitem(reg._entries, name, registry.Entry(name, reg.kind, factory, "tests"))
        return name

    return add


# -- a small trained run and its model, shared by the tests of embed, search and export ------------------


def cli(*args):
    """``metriclab ARGS...`` through typer's test runner (stdout and stderr apart)."""
    from typer.testing import CliRunner

    from metriclab.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """One tiny 8-D digits run (1 epoch, an MLP), trained in-process once for the inference tests."""
    from metriclab.training.engine import train

    out = tmp_path_factory.mktemp("runs") / "small"
    return train(tiny_recipe(out, name="small", embedding_dim=8, epochs=1, embed_train=False))


@pytest.fixture(scope="session")
def model(small_run):
    import metriclab

    return metriclab.load_model(small_run, device="cpu")


@pytest.fixture(scope="session")
def image_folder(model, tmp_path_factory):
    """30 test digits as PNG files in class sub-folders (file stem = index in the test split)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    items = model.inputs("digits:test")
    for i in range(30):
        (folder / str(items.labels[i])).mkdir(exist_ok=True)
        Image.fromarray(items.images[i, 0].numpy()).save(folder / str(items.labels[i]) / f"{i}.png")
    return folder
