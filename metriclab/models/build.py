"""A recipe's Siamese network, built from the registry's encoders."""

from __future__ import annotations

from typing import Any

from metriclab import registry
from metriclab.errors import MetricLabError
from metriclab.models.network import SiameseNetwork

# Encoder arguments that load starting weights: a rebuilt run loads its own trained weights instead.
_STARTING_WEIGHTS = ("pretrained", "weights")


def build_model(recipe: Any, input_shape: tuple[int, ...], starting_weights: bool = True) -> SiameseNetwork:
    """The recipe's Siamese network for images of ``input_shape`` (C, H, W).

    ``starting_weights=False`` builds it without downloading or reading the encoder's pretrained weights
    (for a finished run, whose model.safetensors replaces them).
    """

    def args_of(args: dict) -> dict:
        return args if starting_weights else {k: v for k, v in args.items() if k not in _STARTING_WEIGHTS}

    common = {"embedding_dim": recipe.embedding_dim, "input_shape": tuple(input_shape)}
    tower = registry.encoders.create(recipe.encoder, **common, **args_of(recipe.encoder_args))
    second = None
    if not recipe.share_weights:
        name = recipe.second_encoder or recipe.encoder
        args = recipe.second_encoder_args if recipe.second_encoder else recipe.encoder_args
        second = registry.encoders.create(name, **common, **args_of(args))
    elif recipe.second_encoder:
        raise MetricLabError("second_encoder is set but share_weights is true; pass --no-share-weights to use it")
    return SiameseNetwork(tower, second, channels=input_shape[0])


def backbone_preprocessing(recipe: Any) -> dict[str, Any]:
    """How the recipe's encoder was pretrained to see images (a family's ``factory.preprocessing(member)``), or {}.

    Keys among ``image_size`` (a recipe without one trains image files at it, so a pretrained backbone sees
    images as large as those it learned from), ``crop_fraction`` and ``interpolation`` (the transforms of a
    run that starts from pretrained weights use them unless its recipe sets them).
    """
    registry.load_plugins("encoder")
    prefix, colon, member = recipe.encoder.partition(":")
    family = registry.encoders.families.get(prefix) if colon else None
    preprocessing = getattr(family.factory, "preprocessing", None) if family is not None else None
    return dict(preprocessing(member)) if preprocessing is not None else {}
