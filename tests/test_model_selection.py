"""keep_best and patience: a run keeps its best epoch's weights and embeddings, and stops when no epoch beats it."""

import shutil

import numpy as np
import pytest
from conftest import tiny_recipe

from metriclab import load_model
from metriclab.errors import MetricLabError
from metriclab.recipe import Recipe
from metriclab.runs import Run
from metriclab.training.engine import train

# A learning rate that grows 2% a step: on digits the test MAP@R peaks at epoch 3 and then falls, so the last
# epoch is not the best one (22 steps an epoch).
DECLINING = {"lr": 0.01, "scheduler": "exponential", "scheduler_args": {"gamma": 1.02}, "metric": "cosine"}


@pytest.fixture(scope="module")
def stopped_early(tmp_path_factory):
    out = tmp_path_factory.mktemp("selection") / "run"
    recipe = tiny_recipe(out, epochs=8, keep_best="map@r", patience=2, keep_checkpoints=10, **DECLINING)
    train(recipe)
    return out, recipe


def test_a_run_keeps_the_weights_and_embeddings_of_its_best_epoch(stopped_early):
    out, _ = stopped_early
    run = Run(out)
    scores = {row["epoch"]: row["map@r"] for row in run.metrics["epochs"]}
    best = max(scores, key=scores.get)
    assert best < max(scores), f"the test's run must get worse after its best epoch: {scores}"
    assert run.metrics["final"]["kept_epoch"] == {"epoch": best, "of": max(scores), "by": "map@r"}
    assert run.metrics["final"]["test_loo"]["map@r"] == pytest.approx(scores[best], abs=1e-12)

    kept, labels = run.embeddings("test")
    snapshot = np.load(out / "embeddings" / f"epoch_{best:04d}" / "test.npz")
    np.testing.assert_array_equal(kept, snapshot["embeddings"])
    # model.safetensors is that epoch's network: what evaluate, embed and export use.
    model = load_model(out, device="cpu")
    np.testing.assert_allclose(model.embed("digits:test"), kept, atol=1e-5)
    train_embeddings, _ = run.embeddings("train")
    np.testing.assert_allclose(model.embed("digits:train"), train_embeddings, atol=1e-5)


def test_patience_stops_the_run_after_that_many_epochs_without_a_better_score(stopped_early):
    out, recipe = stopped_early
    epochs = [row["epoch"] for row in Run(out).metrics["epochs"]]
    best = Run(out).metrics["final"]["kept_epoch"]["epoch"]
    assert epochs == list(range(1, best + recipe.patience + 1)) and len(epochs) < recipe.epochs


@pytest.mark.parametrize("where", ["before the best", "after the best", "at the end"])
def test_a_resumed_run_keeps_the_best_epoch_of_its_checkpoint(stopped_early, tmp_path, where):
    """Each checkpoint holds its own best weights: a resume from before the best, after it, or from the end (a run
    killed before its last files) ends with the weights and embeddings of the uninterrupted run."""
    out, recipe = stopped_early
    best = Run(out).metrics["final"]["kept_epoch"]["epoch"]
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    checkpoints = Run.checkpoints_in(resumed)  # one per epoch
    checkpoint = {"before the best": checkpoints[best - 2], "after the best": checkpoints[best]}.get(where)
    (resumed / "model.safetensors").unlink()
    for stale in ("test.npz", "train.npz"):  # what a kill before the end leaves: the last epoch's
        (resumed / "embeddings" / stale).unlink()
    train(Recipe(**{**recipe.to_dict(), "output_dir": str(resumed), "resume": str(checkpoint or resumed)}))
    # A resume that forgot the best would keep a later, worse epoch, or the last weights.
    assert Run(resumed).metrics["final"]["kept_epoch"] == Run(out).metrics["final"]["kept_epoch"]
    kept = Run(resumed).embeddings("test")[0]
    np.testing.assert_array_equal(kept, Run(out).embeddings("test")[0])
    np.testing.assert_allclose(load_model(resumed, device="cpu").embed("digits:test"), kept, atol=1e-5)


def test_a_checkpoint_before_the_best_epoch_keeps_its_own_best(stopped_early, tmp_path):
    """checkpoints/best/ holds the run's latest best; a checkpoint from before it brings back its own best."""
    out, recipe = stopped_early
    scores = {row["epoch"]: row["map@r"] for row in Run(out).metrics["epochs"]}
    assert scores[1] > scores[2] < scores[3], scores  # the checkpoint of epoch 2 has epoch 1 as its best
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    (resumed / "model.safetensors").unlink()
    epoch_2 = Run.checkpoints_in(resumed)[1]
    train(Recipe(**{**recipe.to_dict(), "output_dir": str(resumed), "resume": str(epoch_2), "epochs": 2}))
    assert Run(resumed).metrics["final"]["kept_epoch"] == {"epoch": 1, "of": 2, "by": "map@r"}
    first = np.load(out / "embeddings" / "epoch_0001" / "test.npz")["embeddings"]
    np.testing.assert_array_equal(Run(resumed).embeddings("test")[0], first)
    np.testing.assert_allclose(load_model(resumed, device="cpu").embed("digits:test"), first, atol=1e-5)


def test_a_resume_that_keeps_the_best_by_another_score_starts_the_choice_afresh(tmp_path):
    """A precision@1 of ~0.4 is no bar for a MAP@R of ~0.3: the epochs from the resume on are compared alone."""
    out = tmp_path / "run"
    recipe = tiny_recipe(out, epochs=2, keep_best="precision@1", **DECLINING)
    train(recipe)
    train(Recipe(**{**recipe.to_dict(), "resume": str(out), "keep_best": "map@r", "epochs": 3}))
    assert Run(out).metrics["final"]["kept_epoch"] == {"epoch": 3, "of": 3, "by": "map@r"}


def test_an_epoch_cut_short_and_then_completed_is_told_apart_from_it(tmp_path):
    """max_steps stops mid-epoch 2 (scored as epoch 2); the resumed, completed epoch 2 is another set of weights."""
    out = tmp_path / "run"
    recipe = tiny_recipe(out, epochs=2, keep_best="map@r", **DECLINING)
    train(Recipe(**{**recipe.to_dict(), "max_steps": 33}))  # 22 steps an epoch
    cut_short = Run(out).metrics["epochs"][-1]["map@r"]
    train(Recipe(**{**recipe.to_dict(), "resume": str(out)}))
    run = Run(out)
    scores = [row["map@r"] for row in run.metrics["epochs"]]  # epoch 2 completed replaces the cut-short row
    assert cut_short > max(scores), (cut_short, scores)  # the weights kept are those of the cut-short epoch 2
    assert run.metrics["final"]["test_loo"]["map@r"] == pytest.approx(cut_short, abs=1e-12)
    np.testing.assert_allclose(load_model(out, device="cpu").embed("digits:test"), run.embeddings("test")[0], atol=1e-5)


def test_selection_options_name_what_to_pass():
    with pytest.raises(MetricLabError, match="keep_best must be one of precision@1, map@r"):
        Recipe(keep_best="recall@1")
    with pytest.raises(MetricLabError, match="--keep-best map@r --patience 3"):
        Recipe(patience=3)
    assert Recipe().with_overrides(["--keep-best", "map@r", "--patience", "2"]).patience == 2
