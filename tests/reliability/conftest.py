"""Shared runs and helpers of the reliability suite.

Every fault test continues or repeats one recipe configuration (``FAULT``) and compares the
result with one uninterrupted run of it (the session fixture ``baseline``).
"""

from __future__ import annotations

import os
import random
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RECIPES, ROOT, free_port, run_recipe
from safetensors.torch import load_file

from metriclab.runs import Run

PLUGIN = Path(__file__).with_name("faulty_plugin.py")
RECIPE = "mnist_siamese.py"
# Digits, a small MLP, 3 epochs of 22 steps, a checkpoint every 4 steps; SGD so that 2 processes
# and 1 process agree to float precision. The loss is the built-in contrastive loss wrapped by the
# test plugin, which can sleep (to make a run slow enough to interrupt) or fail on chosen calls.
FAULT = [
    *["--dataset", "digits", "--encoder-args", "hidden=[32]", "--embedding-dim", "4", "--epochs", "3"],
    *["--batch-size", "64", "--optimizer", "sgd", "--lr", "0.05", "--no-embed-train"],
    *["--loss", "faulty-contrastive", "--plugins", str(PLUGIN), "--checkpoint-every", "4"],
]
# Wide enough that rich never wraps a message (paths included) in captured output.
ENV = {"COLUMNS": "400"}


def launcher(processes: int) -> list[str]:
    """``accelerate launch`` with ``processes`` gloo processes on CPU."""
    port = str(free_port())
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--main_process_port", port]  # fmt: skip


def run_fault_recipe(*args: str, launch: list[str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the FAULT configuration (plus ``args``) as a subprocess."""
    return run_recipe(RECIPE, *FAULT, *args, env=ENV, launcher=launch, timeout=timeout)


def start_fault_recipe(out: Path, *args: str, launch: list[str] | None = None) -> tuple[subprocess.Popen, Path]:
    """Start the FAULT configuration in the background, slowed to ~30 ms per step; returns it and its log.

    It runs in a session of its own, so ``os.killpg`` reaches the launcher and its workers at once,
    as a Ctrl-C in a terminal does.
    """
    log = out.parent / f"{out.name}.log"
    command = [*(launch or [sys.executable]), str(RECIPES / RECIPE), *FAULT, "--loss-args", "delay=0.03", *args]
    with log.open("w") as handle:
        process = subprocess.Popen(
            [*command, "--output-dir", str(out)],
            cwd=ROOT,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **ENV},
            start_new_session=True,
        )
    return process, log


def wait_for_first_checkpoint(process: subprocess.Popen, out: Path, log: Path, timeout: float = 180) -> None:
    """Poll until ``out`` holds a complete checkpoint; fail if the run ends or hangs first."""
    deadline = time.monotonic() + timeout
    while Run.latest_checkpoint_in(out) is None:
        if process.poll() is not None:
            pytest.fail(f"run ended (exit {process.returncode}) before a checkpoint:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no checkpoint after {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


def train_in_process(capsys, *argv: str) -> tuple[int, str]:
    """Run the seed recipe's entry point in this process; return (exit code, stderr)."""
    from metriclab import main

    recipe = runpy.run_path(str(RECIPES / RECIPE))["recipe"]
    capsys.readouterr()
    columns = os.environ.get("COLUMNS")
    os.environ.update(ENV)  # read by the progress reporter's console when training starts
    try:
        main(recipe, list(argv))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    return code, capsys.readouterr().err


def one_line(text: str) -> str:
    """``text`` with runs of whitespace (rich's line wrapping included) collapsed to one space."""
    return " ".join(text.split())


def assert_same_result(run: Path, reference: Path, atol: float = 1e-5) -> None:
    """Final weights, test embeddings and final metrics of ``run`` equal ``reference``'s within ``atol``."""
    weights, expected = load_file(run / "model.safetensors"), load_file(reference / "model.safetensors")
    assert weights.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(weights[key], expected[key], rtol=0, atol=atol, msg=key)
    embeddings, labels = Run(run).embeddings("test")
    expected_embeddings, expected_labels = Run(reference).embeddings("test")
    assert (labels == expected_labels).all()
    np.testing.assert_allclose(embeddings, expected_embeddings, rtol=0, atol=10 * atol)
    final, expected_final = Run(run).metrics["final"], Run(reference).metrics["final"]
    assert final["steps"] == expected_final["steps"]
    for metric in ("precision@1", "map@r"):
        assert final["test_loo"][metric] == pytest.approx(expected_final["test_loo"][metric], abs=0.01)


@pytest.fixture(scope="session")
def baseline(tmp_path_factory) -> Path:
    """The FAULT configuration run to the end without interruption."""
    out = tmp_path_factory.mktemp("reliability") / "baseline"
    result = run_fault_recipe("--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def interrupt(process: subprocess.Popen, how: int, rng: random.Random, most: float) -> float:
    """Wait a random moment up to ``most`` seconds, then send signal ``how`` to the process and its
    children (all of its session); return the wait."""
    wait = rng.uniform(0, most)
    time.sleep(wait)
    os.killpg(process.pid, how)
    return wait


SIGKILL, SIGINT, SIGTERM = signal.SIGKILL, signal.SIGINT, signal.SIGTERM
