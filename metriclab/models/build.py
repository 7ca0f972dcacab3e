"""A recipe's Siamese network, built from the registry's encoders."""

from __future__ import annotations

from typing import Any

from metriclab import registry
from metriclab.errors import MetricLabError
from metriclab.models.network import SiameseNetwork


def build_model(recipe: Any, input_shape: tuple[int, ...]) -> SiameseNetwork:
    """The recipe's Siamese network for images of ``input_shape`` (C, H, W)."""
    common = {"embedding_dim": recipe.embedding_dim, "input_shape": tuple(input_shape)}
    tower = registry.encoders.create(recipe.encoder, **common, **recipe.encoder_args)
    second = None
    if not recipe.share_weights:
        name = recipe.second_encoder or recipe.encoder
        args = recipe.second_encoder_args if recipe.second_encoder else recipe.encoder_args
        second = registry.encoders.create(name, **common, **args)
    elif recipe.second_encoder:
        raise MetricLabError("second_encoder is set but share_weights is true; pass --no-share-weights to use it")
    return SiameseNetwork(tower, second, channels=input_shape[0])
