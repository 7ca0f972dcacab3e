"""Recipe options that change how training runs: each one at least runs and leaves its trace."""

import pytest
from conftest import TINY, read_json, run_recipe

from metriclab.runs import Run


@pytest.mark.parametrize(
    "options",
    [
        ["--mixed-precision", "bf16"],
        ["--gradient-accumulation-steps", "2"],
        ["--sampler", "m-per-class", "--m-per-class", "4"],
        ["--no-share-weights"],
        ["--no-share-weights", "--second-encoder", "convnet", "--second-encoder-args", "channels=[8,8]"],
        ["--loss", "pml.MultiSimilarityLoss", "--miner", "pml.MultiSimilarityMiner"],
        ["--loss", "pml.ArcFaceLoss", "--miner", "none"],
    ],
    ids=["bf16", "grad-accum", "m-per-class", "two-towers", "pseudo-siamese", "pml-loss", "arcface-params"],
)
def test_option_runs_to_a_complete_run(tmp_path, options):
    out = tmp_path / "run"
    result = run_recipe(
        "mnist_siamese.py", *TINY, "--epochs", "1", "--embedding-dim", "4", *options, "--output-dir", str(out)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "model.safetensors").is_file()
    assert Run(out).metrics["final"]["test_loo"]["precision@1"] > 0.2  # chance is 0.1


@pytest.mark.slow
def test_torch_compile_runs(tmp_path):
    out = tmp_path / "run"
    result = run_recipe("mnist_siamese.py", *TINY, "--epochs", "1", "--compile", "--output-dir", str(out), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_json(out / "config.json")["recipe"]["compile"] is True
    assert Run(out).embeddings("test")[0].shape[1] == 2


def test_tensorboard_tracking_writes_events(tmp_path):
    out = tmp_path / "run"
    result = run_recipe(
        "mnist_siamese.py",
        *TINY,
        "--epochs",
        "1",
        "--log-with",
        "tensorboard",
        "--log-every",
        "5",
        "--output-dir",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    events = list(out.rglob("events.out.tfevents.*"))
    assert events, sorted(str(p) for p in out.rglob("*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert {"loss", "lr", "samples_per_s", "test_precision@1"} <= set(accumulator.Tags()["scalars"])
