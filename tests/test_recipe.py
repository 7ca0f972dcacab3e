"""Recipe fields, JSON round trip and command-line overrides."""

import pytest

from metriclab import MetricLabError, Recipe


def test_json_round_trip(tmp_path):
    recipe = Recipe(name="x", loss="triplet", loss_args={"margin": 0.3}, plugins=["a.py"])
    recipe.to_json(tmp_path / "r.json")
    assert Recipe.from_json(tmp_path / "r.json") == recipe


def test_overrides_change_fields_and_keep_the_rest():
    recipe = Recipe(name="x", embedding_dim=2, epochs=10, loss_args={"margin": 2.0})
    new = recipe.with_overrides(["--embedding-dim", "64", "--epochs", "3", "--no-share-weights", "--lr", "0.01"])
    assert (new.embedding_dim, new.epochs, new.share_weights, new.lr) == (64, 3, False, 0.01)
    assert new.loss_args == {"margin": 2.0} and new.name == "x"
    assert recipe.embedding_dim == 2  # the recipe itself is untouched


def test_switching_a_component_drops_its_old_arguments_unless_given():
    recipe = Recipe(loss="contrastive", loss_args={"margin": 2.0}, miner_args={"pos_fraction": 0.3})
    assert recipe.with_overrides(["--loss", "triplet"]).loss_args == {}
    assert recipe.with_overrides(["--loss", "contrastive"]).loss_args == {"margin": 2.0}  # same name: kept
    assert recipe.with_overrides(["--loss", "triplet", "--loss-args", "margin=0.1"]).loss_args == {"margin": 0.1}
    merged = recipe.with_overrides(["--miner-args", "pairs_per_sample=3"]).miner_args
    assert merged == {"pos_fraction": 0.3, "pairs_per_sample": 3}
    assert recipe.with_overrides(["--miner", "none"]).miner is None
    # none leaves the recipe's arguments out; any given with it still apply
    assert recipe.with_overrides(["--loss-args", "none"]).loss_args == {}
    assert recipe.with_overrides(["--miner-args", "none", "seed=3"]).miner_args == {"seed": 3}


def test_config_file_is_the_starting_point(tmp_path):
    Recipe(name="from-file", epochs=7).to_json(tmp_path / "config.json")
    new = Recipe(name="code").with_overrides(["--config", str(tmp_path / "config.json"), "--seed", "3"])
    assert (new.name, new.epochs, new.seed) == ("from-file", 7, 3)


@pytest.mark.parametrize(
    "fields",
    [
        {"embedding_dim": 0},
        {"batch_size": -1},
        {"lr": 0.0},
        {"mixed_precision": "fp8"},
        {"sampler": "m-per-class", "batch_size": 10, "m_per_class": 4},
    ],
)
def test_impossible_values_are_rejected(fields):
    with pytest.raises(MetricLabError):
        Recipe(**fields)


def test_unknown_field_suggests_the_right_one():
    with pytest.raises(MetricLabError, match="embedding_dim"):
        Recipe.from_dict({"embeding_dim": 3})


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit):
        Recipe().with_overrides(["--help"])
    out = capsys.readouterr().out
    for flag in ("--loss", "--embedding-dim", "--share-weights", "--resume", "--loss-args", "--output-dir"):
        assert flag in out
