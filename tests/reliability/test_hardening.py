"""Faults and damaged files end in one line naming the file, the real cause and what to do (exit 2),
and leave nothing half-written; recipe flags, plugin paths and the plugins command do what they say."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from accelerate import Accelerator
from safetensors.torch import load_file
from typer.testing import CliRunner

from metriclab.recipe import Recipe
from metriclab.runs import Run

from .conftest import FAULT, ROOT, one_line, train_in_process
from .test_bad_input import DIGITS, MNIST_FROM, assert_user_error, idx_dir  # noqa: F401 - idx_dir is a fixture
from .test_contracts import BROKEN


def cli(*args: str):
    """Run the ``metriclab`` CLI in this process; return typer's Result."""
    from metriclab.cli import app

    return CliRunner().invoke(app, list(args), env={"COLUMNS": "400"})


def assert_cli_error(result, *words: str) -> None:
    """Exit 2, one line, no traceback, holding every one of ``words``."""
    assert result.exit_code == 2, result.output[-3000:]
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for word in words:
        assert word in lines[0], (word, lines[0])


def assert_training_error(code: int, err: str, *words: str) -> None:
    """Exit 2 with one error line holding every one of ``words`` (after the progress bar), no traceback."""
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    text = one_line(err)
    assert text.count("error: ") == 1, text
    message = text.split("error: ", 1)[1]
    for word in words:
        assert word in message, (word, message)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished tiny run (2 epochs, so it has epoch snapshots and history), trained in this process."""
    from metriclab.training.engine import train

    out = tmp_path_factory.mktemp("hardening") / "finished"
    recipe = Recipe(dataset="digits", encoder_args={"hidden": [16]}, epochs=2, max_steps=4, log_every=1, cpu=True,
                    output_dir=str(out))  # fmt: skip
    assert train(recipe) == out
    return out


@pytest.fixture
def run_copy(tmp_path, finished_run) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


# -- messages that name the real cause ----------------------------------------------------------------


def test_an_error_in_a_factorys_own_code_keeps_its_cause(tmp_path, capsys):
    base = [a for a in DIGITS if a not in ("--encoder-args", "hidden=[16]")]
    code, err = train_in_process(capsys, *base, "--encoder", "buggy-encoder", "--plugins", str(BROKEN),
                                 "--output-dir", str(tmp_path / "run"))  # fmt: skip
    assert_user_error(code, err, "encoder 'buggy-encoder'", f"from {BROKEN}", "TypeError", "--debug")
    assert "check each value's type" not in err


def test_debug_shows_the_factorys_own_error_as_the_cause(tmp_path, capsys):
    from metriclab.errors import MetricLabError

    base = [a for a in DIGITS if a not in ("--encoder-args", "hidden=[16]")]
    with pytest.raises(MetricLabError) as raised:
        train_in_process(capsys, *base, "--encoder", "buggy-encoder", "--plugins", str(BROKEN), "--debug",
                         "--output-dir", str(tmp_path / "run"))  # fmt: skip
    assert isinstance(raised.value.__cause__, TypeError)
    assert raised.value.__cause__.__traceback__ is not None


def test_an_error_of_a_value_handed_on_is_still_the_users(tmp_path, capsys):
    code, err = train_in_process(capsys, *DIGITS, "--optimizer-args", "weight_decay=abc")
    assert_user_error(code, err, "optimizer 'adam' rejected its arguments", "check each value's type")


def test_an_os_error_outside_the_run_directory_is_not_blamed_on_it(tmp_path, capsys, monkeypatch):
    import metriclab.training.engine

    cache = tmp_path / "cache" / "train-images"

    def unreadable(recipe):
        raise PermissionError(errno.EACCES, "Permission denied", str(cache))

    monkeypatch.setattr(metriclab.training.engine, "load_dataset", unreadable)
    code, err = train_in_process(capsys, *DIGITS, "--output-dir", str(tmp_path / "run"))
    assert_user_error(code, err, f"Permission denied: {cache}", "that location")
    assert "output location" not in err


def _checkpointed_run(tmp_path, capsys) -> Path:
    out = tmp_path / "run"
    code, err = train_in_process(capsys, *DIGITS, "--output-dir", str(out))
    assert code == 0, err[-3000:]
    return out


def test_a_failure_while_resuming_keeps_its_real_cause(tmp_path, capsys, monkeypatch):
    out = _checkpointed_run(tmp_path, capsys)

    def broken(self, *args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(Accelerator, "load_state", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        train_in_process(capsys, *DIGITS, "--resume", str(out))


def test_resume_names_a_mismatch_and_a_damaged_file_for_what_they_are(tmp_path, capsys):
    out = _checkpointed_run(tmp_path, capsys)
    code, err = train_in_process(capsys, *DIGITS, "--embedding-dim", "3", "--resume", str(out))
    notice, error = err.strip().splitlines()  # the changed option, then the one-line error
    assert "differ from its start: embedding_dim 3 (started with 2)" in notice
    assert_user_error(code, error, "does not fit the model", "resume with the options the run was started with")
    checkpoint = Run.latest_checkpoint_in(out)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    code, err = train_in_process(capsys, *DIGITS, "--resume", str(out))
    assert_user_error(code, err, f"cannot read checkpoint {checkpoint}", "damaged", "earlier checkpoint")
    assert "options the run was started with" not in err


def test_a_resume_with_other_options_names_each_before_it_trains(tmp_path, capsys):
    out = _checkpointed_run(tmp_path, capsys)
    code, err = train_in_process(capsys, *DIGITS, "--resume", str(out))
    assert code == 0, err[-3000:]
    assert "differ from its start" not in err
    code, err = train_in_process(capsys, *DIGITS, "--lr", "0.5", "--encoder-args", "hidden=[8]", "--resume", str(out))
    text = " ".join(err.split())
    assert (
        "options that differ from its start: encoder_args {'hidden': [8]} (started with {'hidden': [16]}); lr 0.5"
        in text
    )
    assert f"--config {out / 'config.json'}" in text
    # the narrower network: the checkpoint's check still stops it
    assert_user_error(code, err.strip().splitlines()[-1], "does not fit the model")


def test_a_resume_without_the_plugin_a_run_was_trained_with_names_the_package(tmp_path, capsys):
    out = _checkpointed_run(tmp_path, capsys)
    config = json.loads((out / "config.json").read_text())
    config["recipe"]["loss"] = config["components"]["loss"]["name"] = "ghost-loss"
    config["components"]["loss"]["source"] = "ghostpkg"
    (out / "config.json").write_text(json.dumps(config))
    code, err = train_in_process(capsys, *DIGITS, "--loss", "ghost-loss", "--resume", str(out))
    assert_user_error(code, err, "trained with loss 'ghost-loss' from 'ghostpkg'", "pip install ghostpkg")


def test_a_trainer_state_field_of_the_wrong_type_is_named(tmp_path, capsys):
    out = _checkpointed_run(tmp_path, capsys)
    state = Run.latest_checkpoint_in(out) / "trainer_state.json"
    saved = json.loads(state.read_text())
    saved["state"]["step"] = "2"
    state.write_text(json.dumps(saved))
    code, err = train_in_process(capsys, *DIGITS, "--resume", str(out))
    assert_user_error(code, err, str(state), "'step' is '2'", "earlier checkpoint")


# -- recipe flags, plugin paths, the plugins command ----------------------------------------------------


def test_dataset_args_data_dir_is_the_folder_read_and_recorded(tmp_path, capsys, idx_dir):  # noqa: F811
    config = tmp_path / "recipe.json"
    config.write_text(json.dumps({"dataset": "mnist", "data_dir": str(tmp_path / "elsewhere")}))
    out = tmp_path / "run"
    code, err = train_in_process(capsys, "--config", str(config), *MNIST_FROM[2:], "--dataset-args",
                                 f"data_dir={idx_dir}", "download=false", "--output-dir", str(out))  # fmt: skip
    assert code == 0, err[-3000:]
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["recipe"]["data_dir"] == str(idx_dir)
    assert str(idx_dir) in recorded["dataset"]["source"]


def test_a_plugin_file_is_recorded_by_absolute_path(tmp_path, capsys, monkeypatch):
    (tmp_path / "my_plugin.py").write_text(
        "from metriclab_plugins.losses import ContrastiveLoss\n"
        "from metriclab.registry import register_loss\n"
        "register_loss('recorded-path-contrastive', ContrastiveLoss)\n"
    )
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    args = ["--loss", "recorded-path-contrastive", "--plugins", "my_plugin.py", "--output-dir", str(out)]
    code, err = train_in_process(capsys, *DIGITS, *args)
    assert code == 0, err[-3000:]
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["recipe"]["plugins"] == [str(tmp_path / "my_plugin.py")]
    monkeypatch.chdir(ROOT)  # from elsewhere, the recorded path still names the file
    assert cli("evaluate", str(out), "--plugins", recorded["recipe"]["plugins"][0]).exit_code == 0


def test_the_plugins_command_lists_a_plugin_file():
    result = cli("plugins", "--plugins", str(BROKEN), "--json")
    assert result.exit_code == 0, result.output
    names = {row["name"]: row["source"] for row in json.loads(result.output)}
    assert names["broken-miner"] == str(BROKEN) and "contrastive" in names


@pytest.mark.parametrize("word", ["encoder", "encoders", "loss", "losses", "miner", "miners", "dataset", "datasets",
                                  "optimizer", "optimizers", "Losses"])  # fmt: skip
def test_the_plugins_command_takes_every_kind_singular_and_plural(word):
    result = cli("plugins", word, "--json")
    assert result.exit_code == 0, result.output
    kinds = {row["kind"] for row in json.loads(result.output)}
    assert kinds == ({"loss"} if word.lower() in ("loss", "losses") else {word.lower().removesuffix("s")})


@pytest.mark.slow  # a fresh interpreter importing torch: seconds
def test_python_dash_m_metriclab_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "metriclab", "plugins", "losses", "--json"], capture_output=True,
                            text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "contrastive" in {row["name"] for row in json.loads(result.stdout)}


def test_none_clears_a_field_set_by_the_recipe_or_config(tmp_path):
    config = tmp_path / "recipe.json"
    Recipe(max_steps=5, data_dir="/data", miner="random-pairs", log_with="tensorboard", resume="latest").to_json(config)
    recipe = Recipe().with_overrides(["--config", str(config), "--max-steps", "none", "--data-dir", "none",
                                      "--miner", "none", "--log-with", "null", "--resume", "none"])  # fmt: skip
    assert (recipe.max_steps, recipe.data_dir, recipe.miner, recipe.log_with, recipe.resume) == (None,) * 5
    assert Recipe(max_steps=5).with_overrides(["--max-steps", "7"]).max_steps == 7


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--lr", "inf"], ["lr must be a finite number > 0, got inf"]),
        (["--lr", "nan"], ["lr must be a finite number > 0, got nan"]),
        (["--loss-args", "margin=Infinity"], ["loss_args margin must be a finite number, got inf"]),
    ],
    ids=["lr-inf", "lr-nan", "margin-infinity"],
)
def test_non_finite_numbers_are_refused(tmp_path, capsys, args, words):
    code, err = train_in_process(capsys, *DIGITS, *args, "--output-dir", str(tmp_path / "run"))
    assert_user_error(code, err, *words)


# -- faults while training --------------------------------------------------------------------------


def test_weights_are_checked_finite_before_a_checkpoint_is_called_good(tmp_path, capsys):
    out = tmp_path / "run"
    # Step 6's loss is finite but its update makes every weight NaN; step 7's loss is then NaN.
    args = ["--loss-args", "nan_grad_calls=[6]", "--epochs", "1", "--checkpoint-every", "2", "--output-dir", str(out)]
    code, err = train_in_process(capsys, *FAULT, *args)
    last = Run.latest_checkpoint_in(out)
    assert_training_error(code, err, "NaN or inf at step 6", "lower --lr", f"Last good checkpoint: {last}")
    assert last.name == "step_00000004"
    for checkpoint in Run.checkpoints_in(out):
        assert all(np.isfinite(w.numpy()).all() for w in load_file(checkpoint / "model.safetensors").values())


def test_skip_mode_with_a_diverged_model_names_the_step_and_the_fix(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--loss-args", "nan_grad_calls=[3]", "--on-nonfinite", "skip", "--epochs", "1", "--output-dir", str(out)]
    code, err = train_in_process(capsys, *FAULT, *args)
    assert_training_error(code, err, "NaN or inf at step", "lower --lr")
    assert "query_emb" not in err


@pytest.mark.parametrize(
    "failure",
    [
        "safetensors",
        "torch",
    ],
)
def test_a_full_disk_in_safetensors_or_torch_while_checkpointing(tmp_path, capsys, monkeypatch, failure):
    from safetensors import SafetensorError

    out = tmp_path / "run"
    original = Accelerator.save_state
    calls = []

    def save_state(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:  # the disk fills up halfway through the second checkpoint, as ENOSPC reads there
            Path(output_dir, "model.safetensors").write_bytes(b"\0" * 100)
            if failure == "safetensors":
                raise SafetensorError(
                    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on '
                    'device" })'
                )
            raise RuntimeError(
                "[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file data/0: file "
                "write failed"
            )
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    code, err = train_in_process(capsys, *FAULT, "--epochs", "1", "--output-dir", str(out))
    good = out / "checkpoints" / "step_00000004"
    assert_training_error(code, err, f"could not write checkpoint {out / 'checkpoints' / 'step_00000008'}",
                      f"Last good checkpoint (intact): {good}", f"--resume {out}")  # fmt: skip
    assert Run.checkpoints_in(out) == [good]
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_a_new_run_that_fails_before_its_first_checkpoint_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="planted failure"):
        train_in_process(capsys, *FAULT, "--loss-args", "raise_at=2", "--output-dir", str(out))
    assert not out.exists()
    # Started again in the same folder: it just trains.
    code, err = train_in_process(capsys, *DIGITS, "--output-dir", str(out))
    assert code == 0, err[-3000:]


def test_a_folder_without_checkpoints_says_how_to_start_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")  # what a run killed before its first checkpoint leaves
    code, err = train_in_process(capsys, *DIGITS, "--output-dir", str(out))
    assert_user_error(code, err, f"rm -r {out}")
    assert "--resume" not in err
    code, err = train_in_process(capsys, *DIGITS, "--resume", str(out))
    assert_user_error(code, err, "no complete checkpoint", f"rm -r {out}", f"--output-dir {out}")


# -- damaged run files and unwritable outputs in evaluate / visualize / compare -------------------------


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"{not json", ["metrics.json is not valid JSON", "delete it"]),
        (b"[1, 2]", ["holds a JSON list, not an object"]),
    ],
    ids=["not-json", "not-an-object"],
)
@pytest.mark.parametrize("command", ["evaluate", "visualize"])
def test_a_damaged_metrics_json(run_copy, content, words, command):
    (run_copy / "metrics.json").write_bytes(content)
    extra = ["--only", "curves"] if command == "visualize" else []
    assert_cli_error(cli(command, str(run_copy), *extra), str(run_copy / "metrics.json"), *words)


@pytest.mark.parametrize("command", ["evaluate", "visualize", "compare"])
def test_a_config_json_that_is_not_utf8(run_copy, command):
    config = run_copy / "config.json"
    config.write_bytes(config.read_bytes().replace(b'"name"', b'"n\xe9me"', 1))
    assert_cli_error(cli(command, str(run_copy)), f"{config} is not UTF-8 text", "restore config.json")


def test_a_config_file_that_is_not_utf8(tmp_path, capsys):
    config = tmp_path / "recipe.json"
    config.write_bytes(b'{"name": "caf\xe9"}')
    code, err = train_in_process(capsys, "--config", str(config))
    assert_user_error(code, err, f"recipe file {config} is not UTF-8 text")


def test_a_malformed_history_row(run_copy):
    history = run_copy / "history.csv"
    lines = history.read_text().splitlines()
    history.write_text("\n".join([lines[0], "1,0.1,abc,0.001,5", *lines[1:]]) + "\n")
    assert_cli_error(cli("visualize", str(run_copy), "--only", "curves"), f"{history} line 2", "delete that line")


def test_a_history_row_cut_short_by_a_kill_is_ignored(run_copy):
    history = run_copy / "history.csv"
    history.write_text(history.read_text() + "5,0.9")
    result = cli("visualize", str(run_copy), "--only", "curves")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("command", ["visualize", "compare"])
def test_an_output_path_under_a_file(run_copy, tmp_path, command):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    args = ["--only", "curves", "--output-dir", str(blocker / "figs")] if command == "visualize" else [
        "--output", str(blocker / "figs" / "compare.png"), "--max-points", "200"]  # fmt: skip
    assert_cli_error(cli(command, str(run_copy), *args), f"cannot create the folder {blocker / 'figs'}")
    assert blocker.read_text() == "a file"


@pytest.mark.parametrize("command", ["visualize", "compare"])
def test_a_full_disk_while_writing_figures_leaves_no_partial_figure(run_copy, monkeypatch, command):
    from matplotlib.figure import Figure

    def full(self, fname, *args, **kwargs):
        Path(fname).write_bytes(b"")  # what a full disk leaves: an empty or cut-short file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full)
    out = run_copy / "figs"
    args = ["--only", "curves", "--output-dir", str(out)] if command == "visualize" else [
        "--output", str(out / "compare.png"), "--max-points", "200"]  # fmt: skip
    assert_cli_error(cli(command, str(run_copy), *args), "could not write figure", "No space left on device",
                     "free disk space")  # fmt: skip
    assert not out.exists() or not any(out.iterdir())


def test_a_full_disk_while_evaluate_writes_metrics(run_copy, monkeypatch):
    import metriclab.runs

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    before = (run_copy / "metrics.json").read_bytes()
    monkeypatch.setattr(metriclab.runs, "write_atomic", full)
    result = cli("evaluate", str(run_copy))
    assert_cli_error(
        result, f"could not write {run_copy / 'metrics.json'} (No space left on device)", "free disk space"
    )
    assert (run_copy / "metrics.json").read_bytes() == before
