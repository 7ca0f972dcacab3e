"""Backbones people fine-tune: timm/torchvision by name, offline weights, the embedding head, fine-tuning
controls, and the classic conv Siamese network with its contrastive loss.

timm's tiny test models (``test_resnet``, ``test_vit``) are created without downloading anything.
"""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import pytest
import timm
import torch
from conftest import tiny_recipe
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from metriclab import registry
from metriclab.cli import app
from metriclab.errors import MetricLabError
from metriclab.inference.rebuild import load_run_model
from metriclab.models import BackboneEncoder, build_model
from metriclab.recipe import Recipe
from metriclab.runs import Run
from metriclab.training.engine import train
from metriclab.training.graphs import why_not_captured
from metriclab.training.optimization import parameter_groups

SHAPE = (1, 8, 8)  # sklearn digits


def _encoder(name: str, shape=SHAPE, **kwargs) -> BackboneEncoder:
    return registry.create("encoder", name, input_shape=shape, **{"embedding_dim": 16, **kwargs})


def _timm_weights(tmp_path, name="test_resnet", suffix=".safetensors", **kwargs):
    """A timm model's own state dict (classifier included, as downloaded checkpoints are), saved to a file."""
    torch.manual_seed(1)
    state = {k: v.contiguous() for k, v in timm.create_model(name, **kwargs).state_dict().items()}
    path = tmp_path / f"{name}{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    return path, state


# -- names ------------------------------------------------------------------------------------------------


def test_families_resolve_any_library_model_and_suggest_close_names():
    assert isinstance(_encoder("timm:test_resnet"), BackboneEncoder)
    assert "timm:test_vit" in registry.encoders and "torchvision:resnet18" in registry.encoders
    with pytest.raises(MetricLabError, match="Did you mean 'test_resnet'"):
        registry.encoders.get("timm:test_resnt")
    assert registry.list_components("encoder", "timm:test_vit*")[:2] == ["timm:test_vit", "timm:test_vit2"]


def test_plugins_lists_each_family_as_one_row_and_its_members_on_request():
    runner = CliRunner()
    result = runner.invoke(app, ["plugins", "encoders", "--json"])
    rows = json.loads(result.output)
    names = [r["name"] for r in rows]
    assert "timm:<model>" in names and "torchvision:<model>" in names and len(rows) < 20
    assert "timm:*resnet*" in next(r["source"] for r in rows if r["name"] == "timm:<model>")
    members = json.loads(runner.invoke(app, ["plugins", "timm:test_*", "--json"]).output)
    assert {"timm:test_resnet", "timm:test_vit"} <= {r["name"] for r in members}


# -- the head ---------------------------------------------------------------------------------------------


def test_head_projects_normalises_or_keeps_the_features():
    images = torch.rand(4, *SHAPE)
    assert _encoder("timm:test_resnet")(images).shape == (4, 16)
    unit = _encoder("timm:test_vit", patch_size=4, normalize=True, batch_norm=True, dropout=0.1).eval()(images)
    assert torch.allclose(unit.norm(dim=1), torch.ones(4), atol=1e-5)
    vit = _encoder("timm:test_vit", patch_size=4)  # a fixed-size model is built for the dataset's images
    assert vit.data_config["input_size"] == [1, 8, 8] and vit.data_config["pretrained_input_size"] == [3, 160, 160]
    kept = _encoder("timm:test_resnet", embedding_dim=None)
    assert kept(images).shape == (4, kept.backbone.num_features) and kept.embedding_dim == kept.backbone.num_features
    grey = _encoder("torchvision:resnet18", shape=(1, 32, 32))  # grey images repeated to RGB
    assert grey(torch.rand(2, 1, 32, 32)).shape == (2, 16)
    with pytest.raises(MetricLabError, match="embedding_dim=None needs a backbone"):
        build_model(Recipe(encoder="mlp", embedding_dim=None), SHAPE)


# -- weights ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_loads_into_the_backbone_and_sets_its_normalisation(tmp_path, suffix):
    path, state = _timm_weights(tmp_path, suffix=suffix)
    encoder = _encoder("timm:test_resnet", shape=(3, 16, 16), weights=str(path))
    loaded = encoder.backbone.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    assert encoder.weights["ignored_keys"] == ["fc.bias", "fc.weight"]  # the classifier the head replaces
    assert len(encoder.weights["sha256"]) == 64
    network = build_model(Recipe(encoder="timm:test_resnet", encoder_args={"weights": str(path)}), (3, 16, 16))
    assert network.input_mean.flatten().tolist() == pytest.approx(encoder.data_config["mean"])
    network.fit_input_statistics(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))  # kept: the backbone's own
    assert network.input_std.flatten().tolist() == pytest.approx(encoder.data_config["std"])


def test_rgb_weights_adapt_to_grey_images(tmp_path):
    path, state = _timm_weights(tmp_path)
    encoder = _encoder("timm:test_resnet", weights=str(path))
    stem = encoder.backbone.state_dict()["conv1.0.weight"]
    assert torch.allclose(stem, state["conv1.0.weight"].sum(dim=1, keepdim=True))  # timm's adapt_input_conv


def test_weights_that_do_not_fit_are_refused_with_the_keys(tmp_path):
    path, _ = _timm_weights(tmp_path, name="test_vit")
    with pytest.raises(MetricLabError, match=r"do not fit this backbone: \d+ missing \(.*\); \d+ unexpected") as err:
        _encoder("timm:test_resnet", weights=str(path))
    assert "\n" not in str(err.value)
    with pytest.raises(MetricLabError, match="does not exist"):
        _encoder("timm:test_resnet", weights=str(tmp_path / "nope.pth"))
    with pytest.raises(MetricLabError, match="not both"):
        _encoder("timm:test_resnet", weights=str(path), pretrained=True)


def test_a_vit_weights_file_loads_at_another_image_size_as_timm_loads_it(tmp_path):
    path, state = _timm_weights(tmp_path, name="test_vit")  # pretrained at 160 px: 100 patches + a class token
    encoder = _encoder("timm:test_vit", shape=(3, 32, 32), weights=str(path))
    assert encoder.backbone.pos_embed.shape[1] < state["pos_embed"].shape[1]  # resampled by timm's filter
    resampled = timm.models.vision_transformer.checkpoint_filter_fn(dict(state), encoder.backbone)["pos_embed"]
    own = encoder.backbone.state_dict()
    assert torch.equal(own["pos_embed"], resampled) and torch.equal(
        own["blocks.0.mlp.fc1.weight"], state["blocks.0.mlp.fc1.weight"]
    )


@pytest.mark.parametrize(("name", "args"), [("test_resnet", {"global_pool": "catavgmax"}), ("test_mambaout", {})])
def test_the_head_takes_the_width_a_backbone_s_pre_logits_give(name, args):
    encoder = _encoder(f"timm:{name}", shape=(3, 32, 32), **args)  # wider than num_features
    assert encoder(torch.zeros(2, 3, 32, 32)).shape == (2, 16)


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())  # harmless, but unpickling it would call a function


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"conv1.0.weight": torch.zeros(1), "payload": _RunsCode()}, path)
    with pytest.raises(MetricLabError, match="refused to load .*unpickling it would run code") as err:
        _encoder("timm:test_resnet", weights=str(path))
    assert "\n" not in str(err.value)


# -- fine-tuning --------------------------------------------------------------------------------------------


def test_a_failed_download_is_one_error_naming_both_ways_round_it(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(MetricLabError) as err:
        registry.create("encoder", "timm:resnet18", embedding_dim=8, input_shape=(3, 32, 32), pretrained=True)
    text = str(err.value)
    assert "could not get the pretrained weights of timm:resnet18 (We couldn't connect" in text
    assert "pass weights=PATH" in text and "HF_HUB_OFFLINE=1" in text
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1: nothing new to say
    with pytest.raises(MetricLabError) as err:
        registry.create("encoder", "timm:resnet18", embedding_dim=8, input_shape=(3, 32, 32), pretrained=True)
    assert "pass weights=PATH" in str(err.value) and "HF_HUB_OFFLINE" not in str(err.value)


def test_parameter_groups_split_backbone_head_loss_and_decay():
    recipe = Recipe(encoder="timm:test_resnet", embedding_dim=16, lr=0.01, backbone_lr_multiplier=0.1, loss_lr=0.5)
    model = build_model(recipe, SHAPE)
    loss = registry.create("loss", "pml.ArcFaceLoss", num_classes=10, embedding_size=16)
    groups = {g["name"]: g for g in parameter_groups(recipe, model, loss)}
    assert list(groups)[0] == "head"
    assert {n: g["lr"] for n, g in groups.items()} == {
        "head": 0.01,
        "head_no_decay": 0.01,
        "backbone": pytest.approx(0.001),
        "backbone_no_decay": pytest.approx(0.001),
        "loss": 0.5,
    }
    assert all(p.ndim > 1 for p in groups["backbone"]["params"]) and groups["backbone_no_decay"]["weight_decay"] == 0
    counted = sum(len(g["params"]) for g in groups.values())
    assert counted == len(list(model.parameters())) + len(list(loss.parameters()))
    with pytest.raises(MetricLabError, match="has no backbone"):
        parameter_groups(Recipe(freeze_backbone_epochs=1), build_model(Recipe(), SHAPE), loss)


def _fine_tune(out, path, **overrides):
    fields = {
        "encoder": "timm:test_resnet",
        "encoder_args": {"weights": str(path)},
        "embedding_dim": 8,
        "epochs": 1,
        "max_steps": 4,
        "freeze_backbone_steps": 2,
        "backbone_lr_multiplier": 0.1,
        "scheduler": "cosine",
        "grad_clip_norm": 5.0,
        "checkpoint_every": 1,
        "keep_checkpoints": 10,
        "log_every": 1,
        "embed_train": False,
        "batch_size": 32,
    }
    return train(tiny_recipe(out, **{**fields, **overrides}))


def test_frozen_backbone_stays_bit_identical_while_the_head_learns(tmp_path):
    path, state = _timm_weights(tmp_path, in_chans=1)
    out = tmp_path / "run"
    _fine_tune(out, path)

    def weights(step):
        return load_file(str(out / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))

    prefix = "towers.0.backbone."
    for step in (1, 2):  # frozen: weights and BatchNorm statistics exactly as loaded
        saved = weights(step)
        assert all(torch.equal(saved[prefix + k], v) for k, v in state.items() if not k.startswith("fc."))
    assert not torch.equal(weights(1)["towers.0.head.linear.weight"], weights(2)["towers.0.head.linear.weight"])
    assert not torch.equal(weights(3)[prefix + "conv1.0.weight"], state["conv1.0.weight"])  # unfrozen at step 3

    history = Run(out).history()
    assert [r["backbone_lr"] for r in history] == pytest.approx([0.1 * r["lr"] for r in history], rel=1e-4)
    config = Run(out).config
    assert config["recipe"]["freeze_backbone_steps"] == 2 and config["recipe"]["backbone_lr_multiplier"] == 0.1
    encoder = config["components"]["encoder"]
    assert encoder["weights"]["file"] == str(path.resolve()) and len(encoder["weights"]["sha256"]) == 64
    assert encoder["input_statistics"] == "backbone" and encoder["data_config"]["mean"] == [0.5, 0.5, 0.5]
    optimizer = torch.load(out / "checkpoints" / "step_00000004" / "optimizer.bin", weights_only=True)
    assert [g["name"] for g in optimizer["param_groups"]][:4] == [
        "head",
        "head_no_decay",
        "backbone",
        "backbone_no_decay",
    ]

    # A finished run is rebuilt without its starting weights file (model.safetensors holds the trained ones).
    path.unlink()
    model = load_run_model(Run(out), device="cpu")
    final = load_file(str(out / "model.safetensors"))
    assert torch.equal(model.state_dict()["towers.0.head.linear.weight"], final["towers.0.head.linear.weight"])


@pytest.mark.slow
def test_resume_restores_the_freeze_state_the_groups_and_the_schedule(tmp_path):
    """Resumed from step 1 (backbone frozen, cosine schedule under way): the uninterrupted run's weights and lrs."""
    path, _ = _timm_weights(tmp_path, in_chans=1)
    out = tmp_path / "run"
    _fine_tune(out, path)
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    _fine_tune(resumed, path, resume=str(resumed / "checkpoints" / "step_00000001"))
    final, again = load_file(str(out / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(final[k], again[k]) for k in final)
    lrs = [(r["lr"], r["backbone_lr"]) for r in Run(out).history()]
    assert [(r["lr"], r["backbone_lr"]) for r in Run(resumed).history()] == lrs


# -- the classic conv Siamese network -----------------------------------------------------------------------


def test_siamese_conv_tower_is_the_tensorflow_example():
    tower = registry.create("encoder", "siamese-conv", embedding_dim=2, input_shape=(1, 28, 28))
    convs = [m for m in tower if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size[0], c.out_channels) for c in convs] == [(7, 32), (5, 64), (3, 128), (1, 256), (1, 2)]
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in tower) == 5
    assert tower(torch.rand(3, 1, 28, 28)).shape == (3, 2)
    assert all(torch.count_nonzero(c.bias) == 0 for c in convs)


def test_contrastive_without_squares_matches_the_example_formula():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0], [0.0, 8.0]])
    labels = torch.tensor([0, 0, 1, 1])
    pairs = tuple(torch.tensor(v) for v in ([0], [1], [0, 2], [2, 3]))  # one positive (d=5), two negatives
    loss = registry.create("loss", "contrastive", margin=5.0, squared=False)(x, labels, pairs)
    d_neg = [1.0, 65**0.5]
    expected = (5.0 + sum(max(0.0, 5.0 - d) for d in d_neg)) / 3
    assert loss.item() == pytest.approx(expected)
    squared = registry.create("loss", "contrastive", margin=5.0)(x, labels, pairs)
    assert squared.item() == pytest.approx((25.0 + sum(max(0.0, 5.0 - d) ** 2 for d in d_neg)) / 3)


# -- speed features ---------------------------------------------------------------------------------------


def test_backbones_run_channels_last_and_in_bf16():
    network = build_model(Recipe(encoder="timm:test_resnet", embedding_dim=8), SHAPE)
    assert network.memory_format == torch.channels_last
    assert network.towers[0].backbone.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert network(torch.rand(4, *SHAPE)).shape == (4, 8)


def test_cuda_graphs_are_declined_with_the_reason_when_the_lr_moves_or_the_backbone_unfreezes():
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    objective = SimpleNamespace(graph_generators=list)
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    assert why_not_captured(cuda, 1, sgd, objective) is None
    assert "schedule" in why_not_captured(cuda, 1, sgd, objective, scheduled=True)
    assert "unfrozen" in why_not_captured(cuda, 1, sgd, objective, unfreezes=True)


@pytest.mark.slow
def test_a_compiled_backbone_trains(tmp_path):
    out = tmp_path / "run"
    train(tiny_recipe(out, encoder="timm:test_resnet", encoder_args={}, embedding_dim=8, compile=True, max_steps=3))
    assert Run(out).embeddings("test")[0].shape[1] == 8
