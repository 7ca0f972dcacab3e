"""Bad input: one readable line naming the problem and the fix, exit code 2, no traceback,
and nothing on disk damaged (or left behind)."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest
from accelerate import Accelerator
from conftest import run_recipe
from sklearn.datasets import load_digits

from metriclab.runs import Run

from .conftest import ENV, FAULT, one_line, train_in_process

DIGITS = ["--dataset", "digits", "--encoder-args", "hidden=[16]", "--epochs", "1", "--max-steps", "2"]


def assert_user_error(code: int, err: str, *words: str) -> None:
    """Exit 2 with exactly one line on stderr, holding every one of ``words``."""
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--loss", "contrastiv"], ["unknown loss 'contrastiv'", "Did you mean 'contrastive'", "plugins losses`"]),
        (["--miner", "semihard"], ["unknown miner 'semihard'", "'semi-hard'"]),
        (["--encoder", "nope"], ["unknown encoder 'nope'", "`metriclab plugins encoders`"]),
        (["--plugins", "no_such_plugin_module"], ["'no_such_plugin_module' cannot be imported", "install it"]),
        (["--plugins", "missing/plugin.py"], ["plugin file missing/plugin.py does not exist", "pass the path"]),
        (["--loss-args", "margn=1"], ["has no argument 'margn'", "Did you mean 'margin'", "Accepted arguments"]),
        (["--encoder-args", "hiden=[8]"], ["encoder 'mlp' has no argument 'hiden'", "Did you mean 'hidden'"]),
        (["--loss-args", "margin=abc"], ["argument 'margin' must be a number", "got 'abc'", "margin=1.0"]),
        (["--miner-args", "pos_fraction=[1]"], ["'pos_fraction' must be a number", "pos_fraction=0.5"]),
        (["--encoder-args", "hidden=64"], ["'hidden' must be a list", "hidden=[1024, 1024]"]),
        (["--optimizer-args", "weight_decay=abc"], ["optimizer 'adam' rejected", "'weight_decay': 'abc'", "type"]),
        (["--loss-args", "margin=-1"], ["margin must be non-negative, got -1", "margin=1.0"]),
        (["--embedding-dim", "0"], ["embedding_dim must be a positive integer or None, got 0"]),
        (["--batch-size", "1"], ["holds 1 sample(s), so no pair", "--batch-size to at least 2"]),
        (
            ["--sampler", "m-per-class", "--m-per-class", "8", "--batch-size", "8"],
            ["holds 1 class(es) of 8 samples", "at least 2 classes", "--batch-size to at least 16"],
        ),
        (["--keep-checkpoints", "0"], ["keep_checkpoints >= 1"]),
        (["--data-dir", "somewhere"], ["dataset 'digits' does not read from a directory", "drop --data-dir"]),
    ],
    ids=lambda v: "_".join(v) if isinstance(v, list) and v and v[0].startswith("--") else None,
)
def test_bad_recipe_options(tmp_path, capsys, args, words):
    out = tmp_path / "run"
    code, err = train_in_process(capsys, *DIGITS, *args, "--output-dir", str(out))
    assert_user_error(code, err, *words)
    assert not out.exists()  # a run that never started leaves no folder behind


def test_transforms_on_a_resident_dataset_are_reported_as_ignored(tmp_path, capsys):
    args = ["--train-transform", "random-resized-crop", "--test-transform-args", "crop_fraction=0.9"]
    code, err = train_in_process(capsys, *DIGITS, *args, "--output-dir", str(tmp_path / "run"))
    assert code == 0, err[-3000:]
    assert "--train-transform, --test-transform-args ignored: dataset 'digits' is held in memory" in " ".join(
        err.split()
    )


def test_a_malformed_option_value_is_cli_misuse(tmp_path, capsys):
    code, err = train_in_process(capsys, *DIGITS, "--lr", "abc", "--output-dir", str(tmp_path / "run"))
    assert code == 2 and "argument --lr: invalid float value: 'abc'" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ('{"name": "x", "epochs": 2,}', ["is not valid JSON", "line 1", "correct the file"]),
        ('{"name": "x", "embeding_dim": 3}', ["recipe has no field 'embeding_dim'", "Did you mean 'embedding_dim'"]),
        ('{"name": "x", "epochs": "three"}', ["'epochs' must be int, got 'three' (str)", "numbers unquoted"]),
        ('{"name": "x", "share_weights": "yes"}', ["'share_weights' must be bool", "true/false"]),
        ('{"recipe": {"lr": null}}', ["'lr' must be float, got None"]),
        ('["mnist_siamese"]', ["recipe file", "holds a JSON list, not an object", "recipe JSON"]),
    ],
    ids=["syntax", "unknown-field", "wrong-type", "wrong-bool", "null", "not-an-object"],
)
def test_bad_recipe_file(tmp_path, capsys, content, words):
    path = tmp_path / "recipe.json"
    path.write_text(content)
    code, err = train_in_process(capsys, "--config", str(path), "--output-dir", str(tmp_path / "run"))
    assert_user_error(code, err, str(path), *words)
    assert path.read_text() == content and not (tmp_path / "run").exists()


def test_a_missing_recipe_file(tmp_path, capsys):
    code, err = train_in_process(capsys, "--config", str(tmp_path / "nope.json"))
    assert_user_error(code, err, "nope.json does not exist", "config.json")


# -- data -------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` (uint8 images or labels) in the idx format of the MNIST files."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def idx_dir(tmp_path):
    """A folder with the four MNIST idx files, made from scikit-learn's digits (8x8)."""
    digits = load_digits()
    images, labels = (digits.images * 255 / 16).astype(np.uint8), digits.target
    folder = tmp_path / "idx"
    folder.mkdir()
    files = {
        "train-images-idx3-ubyte": images[:1000],
        "train-labels-idx1-ubyte": labels[:1000],
        "t10k-images-idx3-ubyte": images[1000:1300],
        "t10k-labels-idx1-ubyte": labels[1000:1300],
    }
    for name, array in files.items():
        (folder / name).write_bytes(idx_bytes(array))
    return folder


MNIST_FROM = ["--dataset", "mnist", "--encoder-args", "hidden=[16]", "--epochs", "1", "--max-steps", "2"]


def test_idx_files_made_by_these_tests_train(tmp_path, capsys, idx_dir):
    """The control: intact files train, so the failures below come from the damage alone."""
    out = tmp_path / "run"
    code, err = train_in_process(capsys, *MNIST_FROM, "--data-dir", str(idx_dir), "--output-dir", str(out))
    assert code == 0, err[-3000:]
    assert json.loads((out / "config.json").read_text())["dataset"]["train_size"] == 1000


def _truncate(folder):
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])


def _corrupt(folder):
    path = folder / "t10k-images-idx3-ubyte"
    path.write_bytes(b"\x89PNG" + path.read_bytes()[4:])


def _fewer_labels(folder):
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(999, dtype=np.uint8)))


def _missing(folder):
    (folder / "t10k-labels-idx1-ubyte").unlink()


def _not_gzip(folder):
    (folder / "train-images-idx3-ubyte").unlink()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"images as text, not gzip")


def _swapped(folder):
    images, labels = folder / "train-images-idx3-ubyte", folder / "train-labels-idx1-ubyte"
    data = images.read_bytes()
    images.write_bytes(labels.read_bytes())
    labels.write_bytes(data)


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (_truncate, ["train-images-idx3-ubyte is truncated", "promises shape (1000, 8, 8)", "--data-dir"]),
        (_corrupt, ["t10k-images-idx3-ubyte is not an idx file", "magic bytes 89504e47"]),
        (_fewer_labels, ["has 1000 images but", "has 999 labels", "replace both"]),
        (_missing, ["t10k-labels-idx1-ubyte (raw or .gz) not found", "put all four idx files"]),
        (_not_gzip, ["cannot read idx file", "train-images-idx3-ubyte.gz", "download it again"]),
        (_swapped, ["not uint8 images (N, H, W)", "swapped"]),
    ],
    ids=["truncated", "corrupt", "labels-mismatch", "missing-file", "not-gzip", "swapped"],
)
def test_damaged_dataset_files(tmp_path, capsys, idx_dir, damage, words):
    damage(idx_dir)
    before = {p.name: p.read_bytes() for p in idx_dir.iterdir()}
    out = tmp_path / "run"
    code, err = train_in_process(capsys, *MNIST_FROM, "--data-dir", str(idx_dir), "--output-dir", str(out))
    assert_user_error(code, err, *words)
    assert {p.name: p.read_bytes() for p in idx_dir.iterdir()} == before  # the data is never "repaired"
    assert not out.exists()


def test_a_data_directory_in_another_format(tmp_path, capsys):
    """PNG/CSV exports instead of idx files: named with the files that were expected."""
    folder = tmp_path / "pngs"
    (folder / "0").mkdir(parents=True)
    (folder / "0" / "img_0001.png").write_bytes(b"\x89PNG\r\n")
    (folder / "labels.csv").write_text("file,label\n0/img_0001.png,0\n")
    args = ["--dataset-args", "download=false", "fallback=false"]
    code, err = train_in_process(capsys, *MNIST_FROM, *args, "--data-dir", str(folder))
    assert_user_error(code, err, "MNIST not available: no idx files", "train-images-idx3-ubyte", str(folder))


def test_damaged_data_through_a_real_recipe_process(tmp_path, idx_dir):
    """The same contract where users meet it: a recipe run as a program."""
    _corrupt(idx_dir)
    result = run_recipe(
        "mnist_siamese.py", *MNIST_FROM, "--data-dir", str(idx_dir), "--output-dir", str(tmp_path / "run"), env=ENV
    )
    assert_user_error(result.returncode, result.stderr, "is not an idx file")
    assert not (tmp_path / "run").exists()


# -- where the run goes -----------------------------------------------------------------------------


def test_an_existing_run_directory_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"precious": true}')
    code, err = train_in_process(capsys, *DIGITS, "--output-dir", str(out))
    # A config.json without a checkpoint is a run killed before its first one: nothing to resume.
    assert_user_error(code, err, f"{out} already exists", "choose a new --output-dir", f"delete it (rm -r {out})")
    assert "--resume" not in err
    assert [p.name for p in out.iterdir()] == ["config.json"]
    assert (out / "config.json").read_text() == '{"precious": true}'


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_an_unwritable_output_location(tmp_path, capsys, where):
    # Root ignores permission bits, so a regular file stands in the way instead.
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    out = blocker if where == "file" else blocker / "run"
    code, err = train_in_process(capsys, *DIGITS, "--output-dir", str(out))
    assert_user_error(code, err, str(out), "--output-dir")
    assert blocker.read_text() == "a file, not a folder"


def test_a_full_disk_while_checkpointing_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    original = Accelerator.save_state
    calls = []

    def save_state(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:  # the disk fills up halfway through the second checkpoint
            with open(f"{output_dir}/model.safetensors", "wb") as handle:
                handle.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", f"{output_dir}/optimizer.bin")
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    code, err = train_in_process(capsys, *FAULT, "--epochs", "1", "--output-dir", str(out))
    good = out / "checkpoints" / "step_00000004"
    assert code == 2, err[-3000:]
    text = one_line(err)
    assert "Traceback" not in text
    assert "No space left on device" in text and "free disk space" in text
    assert f"Last good checkpoint (intact): {good}" in text and f"--resume {out}" in text
    assert Run.checkpoints_in(out) == [good]
    assert not list((out / "checkpoints").glob(".tmp-*"))

    monkeypatch.setattr(Accelerator, "save_state", original)
    code, err = train_in_process(capsys, *FAULT, "--epochs", "1", "--resume", str(out))
    assert code == 0, err[-3000:]
    assert f"Resumed from {good} (epoch 1, step 4)" in one_line(err)
    assert Run(out).metrics["final"]["steps"] == 22


def test_a_full_disk_while_writing_embeddings(tmp_path, capsys, monkeypatch):
    import metriclab.training.engine

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(metriclab.training.engine, "save_embeddings", full)
    out = tmp_path / "run"
    code, err = train_in_process(capsys, *FAULT, "--epochs", "1", "--output-dir", str(out))
    assert code == 2, err[-3000:]
    text = one_line(err)
    assert "Traceback" not in text
    assert f"No space left on device: {out / 'embeddings'}" in text
    assert f"--resume {out} (last good checkpoint: {out / 'checkpoints' / 'step_00000020'})" in text
