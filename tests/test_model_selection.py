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


def test_a_resumed_run_remembers_its_best_epoch(stopped_early, tmp_path):
    out, recipe = stopped_early
    best = Run(out).metrics["final"]["kept_epoch"]["epoch"]
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    after_best = Run.checkpoints_in(resumed)[best]  # the checkpoint of the epoch after the best one
    (resumed / "model.safetensors").unlink()
    train(Recipe(**{**recipe.to_dict(), "output_dir": str(resumed), "resume": str(after_best)}))
    # A resume that forgot the best score would keep a later, worse epoch.
    assert Run(resumed).metrics["final"]["kept_epoch"] == Run(out).metrics["final"]["kept_epoch"]
    np.testing.assert_array_equal(Run(resumed).embeddings("test")[0], Run(out).embeddings("test")[0])


def test_selection_options_name_what_to_pass():
    with pytest.raises(MetricLabError, match="keep_best must be one of precision@1, map@r"):
        Recipe(keep_best="recall@1")
    with pytest.raises(MetricLabError, match="--keep-best map@r --patience 3"):
        Recipe(patience=3)
    assert Recipe().with_overrides(["--keep-best", "map@r", "--patience", "2"]).patience == 2
