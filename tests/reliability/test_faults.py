"""Faults: a killed or interrupted run loses nothing, a diverging loss stops (or is skipped)
clearly, and a failing process ends a multi-process run instead of hanging it."""

from __future__ import annotations

import json
import random
import re
import shutil
import time

import numpy as np
import pytest
from safetensors.torch import load_file

from metriclab.errors import MetricLabError
from metriclab.runs import Run

from .conftest import (
    FAULT,
    PLUGIN,
    SIGINT,
    SIGKILL,
    SIGTERM,
    assert_same_result,
    interrupt,
    launcher,
    one_line,
    run_fault_recipe,
    start_fault_recipe,
    train_in_process,
    wait_for_first_checkpoint,
)


# Each interruption waits a random moment after the first checkpoint, drawn from a fixed seed so that
# a failure names a wait that can be tried again (the run's own speed still varies from run to run).
@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, baseline):
    seed = 1
    out = tmp_path / "killed"
    process, log = start_fault_recipe(out)
    wait_for_first_checkpoint(process, out, log)
    waited = interrupt(process, SIGKILL, random.Random(seed), most=0.6)
    process.wait(timeout=60)
    context = f"(kill {waited:.3f} s after the first checkpoint, seed {seed})"
    assert not (out / "model.safetensors").exists(), f"the run finished before the kill {context}"
    last = Run.latest_checkpoint_in(out)

    # What a kill at a worse moment leaves: a checkpoint still under its temporary name (even
    # with its trainer_state.json), a step folder without one, half a history row.
    folder = out / "checkpoints"
    shutil.copytree(last, folder / ".tmp-step_99999999")
    (folder / "step_99999998").mkdir()
    shutil.copy(last / "model.safetensors", folder / "step_99999998")
    with (out / "history.csv").open("a") as handle:
        handle.write("1,0.0")  # a row cut short: steps before the checkpoint are otherwise kept
    assert Run.latest_checkpoint_in(out) == last

    result = run_fault_recipe("--resume", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resumed from {last}" in one_line(result.stderr), context
    assert_same_result(out, baseline)
    # The finished run is as tidy as an uninterrupted one: no temporary checkpoint, the
    # complete ones pruned to --keep-checkpoints (2), the loss curve whole and in order.
    assert not list(folder.glob(".tmp-*"))
    assert [p.name for p in Run.checkpoints_in(out)] == [p.name for p in Run.checkpoints_in(baseline)]
    steps = [row["step"] for row in Run(out).history()]
    assert steps == [row["step"] for row in Run(baseline).history()], context
    epochs = [(e["epoch"], e["step"], round(e["map@r"], 4)) for e in Run(out).metrics["epochs"]]
    assert epochs == [(e["epoch"], e["step"], round(e["map@r"], 4)) for e in Run(baseline).metrics["epochs"]]


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(SIGINT, 130), (SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_sigint_writes_a_checkpoint_says_how_to_resume_and_the_resume_completes(tmp_path, baseline, signum, code):
    seed = int(signum)
    out = tmp_path / "interrupted"
    process, log = start_fault_recipe(out)
    wait_for_first_checkpoint(process, out, log)
    interrupt(process, signum, random.Random(seed), most=0.3)
    assert process.wait(timeout=120) == code, log.read_text()[-3000:]
    text = one_line(log.read_text())
    assert "Traceback" not in text
    stopped = re.search(r"Stopped at step (\d+); checkpoint (\S+)\. Resume with: --resume (\S+)", text)
    assert stopped, text[-2000:]
    step, checkpoint, resume = int(stopped.group(1)), stopped.group(2), stopped.group(3)
    assert resume == str(out)
    assert Run.latest_checkpoint_in(out).name == f"step_{step:08d}" and checkpoint.endswith(f"step_{step:08d}")
    assert json.loads((out / checkpoint / "trainer_state.json").read_text())["state"]["step"] == step
    assert not (out / "model.safetensors").exists()

    result = run_fault_recipe("--resume", resume)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"(epoch {step // 22 + 1}, step {step})" in one_line(result.stderr), f"seed {seed}"
    assert_same_result(out, baseline)


@pytest.mark.slow
def test_ctrl_c_on_two_processes_then_resume_on_one_matches_one_process(tmp_path, baseline):
    """2 processes x 32, stopped by Ctrl-C, then 1 process x 64: the same global batch, hence the same run.

    Both processes stop after the same step (or the gloo collectives would hang), and the
    checkpoint's position is counted in samples, so any process count can continue it.
    """
    seed = 3
    out = tmp_path / "two-then-one"
    process, log = start_fault_recipe(out, "--batch-size", "32", launch=launcher(2))
    wait_for_first_checkpoint(process, out, log)
    interrupt(process, SIGINT, random.Random(seed), most=0.3)
    assert process.wait(timeout=120) != 0  # the launcher reports the signal
    text = one_line(log.read_text())
    stopped = re.search(r"Stopped at step (\d+); checkpoint (\S+)\.", text)
    assert stopped, text[-3000:]
    step = int(stopped.group(1))
    assert json.loads((out / "config.json").read_text())["num_processes"] == 2
    assert Run.latest_checkpoint_in(out).name == f"step_{step:08d}", f"seed {seed}"
    state = json.loads((Run.latest_checkpoint_in(out) / "trainer_state.json").read_text())["state"]
    assert (state["epoch"], state["position"]) == (step // 22, step % 22 * 64)

    result = run_fault_recipe("--resume", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"step {step})" in result.stderr
    # gloo all-reduce sums in another order than one process does: float noise, nothing more.
    assert_same_result(out, baseline, atol=1e-4)


def test_a_half_written_checkpoint_is_never_the_latest(tmp_path, capsys):
    run = tmp_path / "run"
    folder = run / "checkpoints"
    for name, complete in [("step_00000004", True), ("step_00000008", False), (".tmp-step_00000012", True)]:
        (folder / name).mkdir(parents=True)
        if complete:
            (folder / name / "trainer_state.json").write_text('{"state": {}}')
    assert Run.latest_checkpoint_in(run) == folder / "step_00000004"
    assert Run.checkpoints_in(run) == [folder / "step_00000004"]
    # Named explicitly, a temporary checkpoint is refused too.
    code, err = train_in_process(capsys, "--dataset", "digits", "--resume", str(folder / ".tmp-step_00000012"))
    assert code == 2 and "never completed" in err and "Traceback" not in err


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_nonfinite_loss_stops_naming_step_loss_and_lr(tmp_path, capsys, value):
    out = tmp_path / "run"
    args = ["--loss-args", "bad_calls=[7]", f"value={value}", "--epochs", "1", "--output-dir", str(out)]
    code, err = train_in_process(capsys, *FAULT, *args, "--scheduler", "none")  # the lr stays the one given
    assert code == 2, err[-3000:]
    text = one_line(err)
    assert "Traceback" not in text
    assert f"the loss became {value} at step 7 (epoch 1, lr 0.05)" in text
    assert "--on-nonfinite skip" in text
    # Checkpoints come every 4 steps and the loss is checked every 50: the step-8 checkpoint would
    # hold the poisoned weights, so it is not written; the last one is from before step 7.
    last = Run.latest_checkpoint_in(out)
    assert last.name == "step_00000004" and str(last) in text
    assert all(np.isfinite(w.numpy()).all() for w in load_file(last / "model.safetensors").values())
    assert not (out / "model.safetensors").exists()


def test_skip_policy_skips_nonfinite_steps_and_completes(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--loss-args", "bad_calls=[3,5]", "--on-nonfinite", "skip", "--epochs", "1", "--output-dir", str(out)]
    code, err = train_in_process(capsys, *FAULT, *args)
    assert code == 0, err[-3000:]
    # One applied NaN step would have made every weight NaN, and the test embeddings with them.
    weights = load_file(out / "model.safetensors")
    assert all(np.isfinite(w.numpy()).all() for w in weights.values())
    embeddings, _ = Run(out).embeddings("test")
    assert np.isfinite(embeddings).all()
    assert Run(out).metrics["final"]["steps"] == 22


@pytest.mark.slow
def test_one_failing_process_ends_all_processes(tmp_path):
    out = tmp_path / "run"
    start = time.monotonic()
    result = run_fault_recipe(
        "--batch-size", "32", "--loss-args", "raise_at=3", "raise_rank=1", "--output-dir", str(out),
        launch=launcher(2), timeout=240,
    )  # fmt: skip
    assert result.returncode != 0
    assert "planted failure on rank 1" in result.stderr
    # Ended by the launcher as soon as rank 1 died, not by gloo's 30-minute collective timeout.
    assert time.monotonic() - start < 200
    assert not (out / "model.safetensors").exists()


def test_resume_refuses_a_directory_without_checkpoints(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = train_in_process(capsys, "--dataset", "digits", "--resume", str(tmp_path / "empty"))
    assert code == 2 and "no complete checkpoint" in err and "Traceback" not in err


def test_plugin_file_is_loaded_once_per_process():
    """Two trainings in one process (as the tests above do) must not register the plugin twice."""
    from metriclab import registry

    registry.load_plugin(str(PLUGIN))
    registry.load_plugin(str(PLUGIN))
    assert "faulty-contrastive" in registry.losses
    with pytest.raises(MetricLabError, match="already registered"):
        registry.losses.register("faulty-contrastive", lambda: None)


def test_a_run_killed_after_its_last_checkpoint_resumes_to_the_end_and_tidies_up(tmp_path, make_tiny_recipe):
    from metriclab.training.engine import train

    out = tmp_path / "run"
    train(make_tiny_recipe(out, epochs=1))
    # What a kill between the last checkpoint and the final weights leaves, plus an unfinished checkpoint.
    (out / "model.safetensors").unlink()
    last = Run.latest_checkpoint_in(out)
    shutil.copytree(last, out / "checkpoints" / ".tmp-step_99999999")
    train(make_tiny_recipe(out, epochs=1, resume=str(out)))
    assert (out / "model.safetensors").is_file()
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert Run.latest_checkpoint_in(out) == last
