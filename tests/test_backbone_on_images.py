"""A timm backbone fine-tuned on a folder of image files, offline, from a local weights file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metriclab.models import preferred_image_size
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
    assert preferred_image_size(Recipe(encoder="timm:test_resnet")) == 160  # its pretrained config's 160 px
    assert preferred_image_size(Recipe(encoder="timm:resnet10t")) == 176
    assert preferred_image_size(Recipe(encoder="mlp")) is None


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
    assert config["dataset"]["input_shape"] == [3, 160, 160]
    recorded = config["components"]["encoder"]["weights"]
    assert str(weights) in json.dumps(recorded)  # which weights the run started from
    assert (run / "model.safetensors").is_file()
