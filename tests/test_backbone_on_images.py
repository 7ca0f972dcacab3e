"""A timm backbone fine-tuned on a folder of image files, offline, from a local weights file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metriclab.models import backbone_preprocessing
from metriclab.recipe import Recipe
from metriclab.training import train

timm = pytest.importorskip("timm")


def write_folder(root: Path, classes: int = 4, per_class: int = 4) -> Path:
    """A class-folder tree of small colour JPEGs and PNGs of varied sizes."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            side = 24 + 8 * (i % 3)
            pixels = (rng.random((side, side, 3)) * 60 + 40 * c).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.{'jpg' if i % 2 else 'png'}")
    return root


def test_a_pretrained_backbone_sets_the_image_size_of_a_recipe_that_names_none():
    # its pretrained config's 160 px, crop and resampling; a tag's own config, not its architecture's default one
    expected = {"image_size": 160, "crop_fraction": 0.95, "interpolation": "bilinear"}
    assert backbone_preprocessing(Recipe(encoder="timm:test_resnet")) == expected
    assert backbone_preprocessing(Recipe(encoder="timm:resnet50.tv2_in1k"))["image_size"] == 176
    assert backbone_preprocessing(Recipe(encoder="timm:convnext_small.in12k_ft_in1k_384"))["image_size"] == 384
    assert backbone_preprocessing(Recipe(encoder="timm:resnet50"))["image_size"] == 224
    assert backbone_preprocessing(Recipe(encoder="mlp")) == {}
    # torchvision: its default weights' evaluation preset (efficientnet_b3: resize to 320 bicubic, crop 300)
    expected = {"image_size": 300, "crop_fraction": 300 / 320, "interpolation": "bicubic"}
    assert backbone_preprocessing(Recipe(encoder="torchvision:efficientnet_b3")) == expected


def test_a_pretrained_backbone_s_crop_and_resampling_fill_the_transforms_and_a_smaller_size_is_named():
    from metriclab.training.engine import with_backbone_preprocessing

    vit = Recipe(dataset="image-folder", encoder="timm:test_vit", encoder_args={"weights": "w.safetensors"})
    recipe, below = with_backbone_preprocessing(vit)
    assert (recipe.image_size, below) == (160, None)
    assert recipe.test_transform_args == {"crop_fraction": 0.95, "interpolation": "bicubic"}
    assert recipe.train_transform_args == {"interpolation": "bicubic"}  # random-resized-crop takes no crop_fraction
    chosen = dataclasses.replace(vit, image_size=64, test_transform_args={"crop_fraction": 1.0})
    recipe, below = with_backbone_preprocessing(chosen)
    assert below == 160 and recipe.test_transform_args == {"crop_fraction": 1.0, "interpolation": "bicubic"}
    scratch, below = with_backbone_preprocessing(Recipe(dataset="image-folder", encoder="timm:test_vit", image_size=64))
    assert below is None and scratch.test_transform_args == {} and scratch.train_transform_args == {}
    resumed, _ = with_backbone_preprocessing(vit, transforms=False)  # a resume keeps the transforms it started with
    assert resumed.image_size == 160 and resumed.test_transform_args == {}


def test_a_resume_goes_on_with_the_transform_arguments_its_run_started_with(tmp_path):
    from metriclab.training.checkpoints import changed_options
    from metriclab.training.engine import _started_transforms, with_backbone_preprocessing

    vit = Recipe(dataset="image-folder", encoder="timm:test_vit", encoder_args={"weights": "w.safetensors"})
    started, _ = with_backbone_preprocessing(vit)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"recipe": started.to_dict()}))
    resumed = _started_transforms(with_backbone_preprocessing(vit, transforms=False)[0], run)
    assert (
        resumed.test_transform_args
        == started.test_transform_args
        == {"crop_fraction": 0.95, "interpolation": "bicubic"}
    )
    assert changed_options(resumed, run) == []
    own = _started_transforms(dataclasses.replace(vit, test_transform_args={"crop_fraction": 1.0}), run)
    assert own.test_transform_args == {"crop_fraction": 1.0, "interpolation": "bicubic"}  # what it sets, it keeps
    other = _started_transforms(dataclasses.replace(vit, test_transform="resize"), run)
    assert other.test_transform_args == {}  # another transform: nothing of the old one's
    (run / "config.json").write_text(json.dumps({"recipe": vit.to_dict()}))  # a run from before the filling
    assert _started_transforms(vit, run).test_transform_args == {}


def test_a_pretrained_backbone_on_tensors_in_memory_records_no_transforms(tmp_path):
    from safetensors.torch import save_file

    weights = tmp_path / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}, str(weights))
    recipe = Recipe(
        dataset="digits", encoder="timm:test_resnet", encoder_args={"weights": str(weights)}, embedding_dim=8,
        loss="triplet", miner=None, epochs=1, max_steps=1, batch_size=16, embed_train=False,
        output_dir=str(tmp_path / "run"), cpu=True,
    )  # fmt: skip
    config = json.loads((train(recipe) / "config.json").read_text())
    assert config["recipe"]["test_transform_args"] == {} and config["recipe"]["train_transform_args"] == {}


def test_a_resume_names_a_data_dir_only_when_it_is_another_place(tmp_path, monkeypatch):
    from metriclab.training.checkpoints import changed_options

    (tmp_path / "photos").mkdir()
    run = tmp_path / "run"
    run.mkdir()
    started = Recipe(dataset="image-folder", data_dir=str(tmp_path / "photos"), batch_size=32)
    (run / "config.json").write_text(json.dumps({"recipe": started.to_dict(), "global_batch_size": 64}))
    monkeypatch.chdir(tmp_path)
    assert changed_options(dataclasses.replace(started, data_dir="photos"), run, processes=2) == []  # the same folder
    assert changed_options(dataclasses.replace(started, data_dir="elsewhere"), run, processes=2) == [
        f"data_dir 'elsewhere' (started with '{tmp_path / 'photos'}')"
    ]
    # 2 processes x 32 continued as 1 x 64: the same global batch; as 1 x 32, half of it
    assert changed_options(dataclasses.replace(started, batch_size=64), run, processes=1) == []
    assert changed_options(started, run, processes=1) == ["global batch 32 = 1 x 32 (started with 64)"]
    csv = dataclasses.replace(started, dataset="csv", dataset_args={"dataset_root": str(tmp_path / "photos")})
    (run / "config.json").write_text(json.dumps({"recipe": csv.to_dict(), "global_batch_size": 64}))
    assert changed_options(dataclasses.replace(csv, dataset_args={"dataset_root": "photos"}), run, processes=2) == []


def test_timm_backbone_fine_tunes_on_an_image_folder_from_a_weights_file(tmp_path):
    from safetensors.torch import save_file

    data = write_folder(tmp_path / "photos")
    weights = tmp_path / "test_resnet.safetensors"
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}, str(weights))
    recipe = Recipe(
        dataset="image-folder",
        data_dir=str(data),
        dataset_args={"split": "classes"},
        encoder="timm:test_resnet",
        encoder_args={"weights": str(weights)},
        embedding_dim=16,
        loss="triplet",
        miner=None,
        epochs=1,
        batch_size=4,
        num_workers=0,
        embed_train=False,
        output_dir=str(tmp_path / "run"),
        cpu=True,
    )
    run = train(recipe)
    config = json.loads((run / "config.json").read_text())
    assert config["recipe"]["image_size"] == 160  # the backbone's own input size, as none was named
    # evaluated as timm evaluates the weights: their crop_pct and interpolation, recorded for embed and evaluate
    test_view = {"size": 160, "crop_fraction": 0.95, "interpolation": "bilinear"}
    transform = {"name": "resize-center-crop", "source": "metriclab", "args": test_view}
    assert config["dataset"]["transforms"]["test"] == transform
    assert config["dataset"]["input_shape"] == [3, 160, 160]
    recorded = config["components"]["encoder"]["weights"]
    assert str(weights) in json.dumps(recorded)  # which weights the run started from
    assert (run / "model.safetensors").is_file()
