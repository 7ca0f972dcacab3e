"""Models: the Siamese network, building it from a recipe, embedding with it, loading its weights."""

from metriclab.models.backbone import BackboneEncoder, EmbeddingHead
from metriclab.models.build import backbone_preprocessing, build_model
from metriclab.models.network import SiameseNetwork, embed, load_weights
from metriclab.models.weights import load_backbone_weights, read_state_dict

__all__ = [
    "backbone_preprocessing",
    "BackboneEncoder",
    "EmbeddingHead",
    "SiameseNetwork",
    "build_model",
    "embed",
    "load_backbone_weights",
    "load_weights",
    "read_state_dict",
]
