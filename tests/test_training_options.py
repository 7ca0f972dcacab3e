"""Recipe options that change how training runs: each one at least runs and leaves its trace."""

import itertools
import time
import types

import pytest
from accelerate import Accelerator
from conftest import TINY, main_in_process, read_json, run_recipe, tiny_recipe

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
    main_in_process(
        "mnist_siamese.py", *TINY, "--epochs", "1", "--embedding-dim", "4", *options, "--output-dir", str(out)
    )
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
    main_in_process("mnist_siamese.py", *TINY, "--epochs", "1", "--log-with", "tensorboard", "--log-every", "5",
                    "--output-dir", str(out))  # fmt: skip
    events = list(out.rglob("events.out.tfevents.*"))
    assert events, sorted(str(p) for p in out.rglob("*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert {"loss", "lr", "samples_per_s", "test_precision@1"} <= set(accumulator.Tags()["scalars"])


def test_checkpoint_writing_is_not_counted_as_training_time(tmp_path, monkeypatch):
    """--checkpoint-every: samples/s and the recorded training seconds measure the steps, not the writing."""
    from metriclab.training import engine

    # A slow disk on the engine's clock: each checkpoint takes 1000 s of it (and no real time), so the
    # result does not depend on how fast this machine runs the steps.
    delay, saved, offset = 1000.0, [], [0.0]
    original = Accelerator.save_state

    def slow_save_state(self, output_dir=None, **kwargs):
        saved.append(output_dir)
        offset[0] += delay
        return original(self, output_dir, **kwargs)

    clock = types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + offset[0], monotonic=time.monotonic)
    monkeypatch.setattr(engine, "time", clock)
    monkeypatch.setattr(Accelerator, "save_state", slow_save_state)
    # 22 steps; checkpoints at steps 4, 8, 12, 16 and 20, half of them at a logging step, and at the end.
    options = {"embedding_dim": 4, "epochs": 1, "checkpoint_every": 4, "log_every": 8, "embed_train": False}
    recipe = tiny_recipe(tmp_path / "run", name="slow-disk", **options)
    run = Run(engine.train(recipe))
    assert len(saved) == 6
    final = run.metrics["final"]
    assert final["steps"] == 22
    assert 0 < final["train_seconds"] < delay, final  # the five checkpoints inside the loop took 5000 s
    assert all(0 < row["samples_per_s"] for row in run.history())
    assert min(row["samples_per_s"] for row in run.history()) > 64 / delay  # no logged window held a checkpoint
    state = read_json(run.path / "checkpoints" / "step_00000022" / "trainer_state.json")["state"]
    assert state["seconds"] == pytest.approx(final["train_seconds"], abs=1e-3)


def test_every_checkpoint_records_the_training_seconds_up_to_its_step(tmp_path):
    """A checkpoint between logging steps holds the seconds of the steps since the last log too."""
    from metriclab.training.engine import train

    recipe = tiny_recipe(
        tmp_path / "run",
        name="seconds",
        embedding_dim=4,
        epochs=1,
        checkpoint_every=2,
        keep_checkpoints=100,
        log_every=50,  # no log inside the epoch: only the checkpoints can record the seconds
        embed_train=False,
    )
    run = Run(train(recipe))
    states = [read_json(c / "trainer_state.json")["state"] for c in sorted((run.path / "checkpoints").glob("step_*"))]
    seconds = [s["seconds"] for s in states]
    assert [s["step"] for s in states] == [*range(2, 22, 2), 22]
    assert all(a < b for a, b in itertools.pairwise(seconds)), seconds  # each later checkpoint trained longer
    assert seconds[-1] == pytest.approx(run.metrics["final"]["train_seconds"], abs=1e-3)


@pytest.mark.parametrize("steps, updated", [(1, False), (2, True)])
def test_gradient_accumulation_updates_the_weights_every_nth_step(tmp_path, steps, updated):
    import torch
    from accelerate.utils import set_seed

    from metriclab.data import load_dataset
    from metriclab.models import build_model, load_weights
    from metriclab.training.engine import train

    recipe = tiny_recipe(tmp_path / "run", gradient_accumulation_steps=2, epochs=1, max_steps=steps, embed_train=False)
    run = train(recipe)
    set_seed(recipe.seed)  # the engine's order: seed, dataset, network
    dataset = load_dataset(recipe)
    initial, trained = build_model(recipe, dataset.input_shape), build_model(recipe, dataset.input_shape)
    load_weights(trained, run / "model.safetensors")
    weights = [(a, b) for a, b in zip(initial.towers.parameters(), trained.towers.parameters(), strict=True)]
    assert any(not torch.equal(a, b) for a, b in weights) == updated


@pytest.mark.parametrize("native", [True, False], ids=["bf16-units", "no-bf16-units"])
def test_auto_mixed_precision_records_what_ran(tmp_path, monkeypatch, native):
    """--mixed-precision auto trains in bf16 only where the device has bf16 units; config.json says which."""
    from metriclab.training import engine

    monkeypatch.setattr(engine, "native_bf16", lambda cpu: native)
    out = tmp_path / "run"
    main_in_process("mnist_siamese.py", *TINY, "--epochs", "1", "--mixed-precision", "auto", "--output-dir", str(out))
    assert read_json(out / "config.json")["recipe"]["mixed_precision"] == ("bf16" if native else "no")


def test_native_bf16_asks_the_cpu(monkeypatch):
    import torch

    from metriclab.training.engine import native_bf16

    for amx, avx512_bf16 in itertools.product([True, False], repeat=2):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        assert native_bf16(cpu=True) is (amx or avx512_bf16)


def test_one_process_trains_recipes_of_different_precisions_one_after_another(tmp_path):
    """A notebook or script may train a float32 recipe and then a bf16 one: accelerate's state starts afresh."""
    from metriclab.training.engine import train

    for i, precision in enumerate(("no", "bf16", "no")):
        out = train(tiny_recipe(tmp_path / f"run{i}", epochs=1, mixed_precision=precision))
        assert read_json(out / "config.json")["recipe"]["mixed_precision"] == precision
