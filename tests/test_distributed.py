"""Two gloo processes on CPU behave like one process with the whole global batch."""

import sys

import pytest
import torch
from conftest import free_port, read_json, run_recipe
from safetensors.torch import load_file

from metriclab.runs import Run

pytestmark = pytest.mark.slow


def launcher(processes: int) -> list[str]:
    port = str(free_port())
    flags = (
        ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", port]
        if processes > 1
        else ["--num_processes", "1"]
    )
    return [sys.executable, "-m", "accelerate.commands.launch", *flags]


COMMON = [
    "--dataset",
    "digits",
    "--encoder-args",
    "hidden=[32]",
    "--embedding-dim",
    "4",
    "--epochs",
    "1",
    "--log-every",
    "1",
    "--no-embed-train",
]


def train(tmp_path, name, processes, batch, *extra):
    out = tmp_path / name
    result = run_recipe(
        "mnist_siamese.py",
        *COMMON,
        "--batch-size",
        str(batch),
        "--output-dir",
        str(out),
        *extra,
        launcher=launcher(processes),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.mark.parametrize(
    "objective",
    [
        ["--loss", "contrastive", "--miner", "random-pairs"],
        ["--loss", "triplet", "--miner", "semi-hard"],
    ],
    ids=["contrastive+random-pairs", "triplet+semi-hard"],
)
def test_two_processes_match_one_process_with_the_global_batch(tmp_path, objective):
    # SGD: the update is the gradient itself (Adam's first step, ~lr*sign(g), would amplify
    # float noise in near-zero gradients).
    sgd = ["--optimizer", "sgd", "--lr", "0.1", "--max-steps", "1"]
    one = train(tmp_path, "one", 1, 64, *sgd, *objective)
    two = train(tmp_path, "two", 2, 32, *sgd, *objective)
    assert read_json(two / "config.json")["num_processes"] == 2
    assert read_json(two / "config.json")["global_batch_size"] == 64
    loss_one, loss_two = Run(one).history()[0]["loss"], Run(two).history()[0]["loss"]
    assert loss_one == pytest.approx(loss_two, rel=1e-5, abs=1e-6)
    weights_one, weights_two = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    for key in weights_one:
        torch.testing.assert_close(weights_one[key], weights_two[key], rtol=1e-4, atol=1e-6)


def test_without_global_mining_two_processes_differ(tmp_path):
    """The switch that turns gathering off really changes what the loss sees."""
    one = train(tmp_path, "one", 1, 64, "--max-steps", "1")
    local = train(tmp_path, "local", 2, 32, "--max-steps", "1", "--no-global-mining")
    assert Run(one).history()[0]["loss"] != pytest.approx(Run(local).history()[0]["loss"], rel=1e-4)


def test_a_whole_epoch_on_two_processes_matches_one_process(tmp_path):
    """Every sample once per epoch (the last, short global batch is split 2+1), and the
    gathered evaluation embeddings equal a single-process run's, in the same order."""
    one = train(tmp_path, "one", 1, 64, "--optimizer", "sgd", "--lr", "0.05")
    two = train(tmp_path, "two", 2, 32, "--optimizer", "sgd", "--lr", "0.05")
    assert Run(two).metrics["epochs"][0]["step"] == Run(one).metrics["epochs"][0]["step"] == 22
    emb_one, labels_one = Run(one).embeddings("test")
    emb_two, labels_two = Run(two).embeddings("test")
    assert (labels_two == labels_one).all()
    torch.testing.assert_close(torch.from_numpy(emb_two), torch.from_numpy(emb_one), rtol=1e-3, atol=1e-3)
