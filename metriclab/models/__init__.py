"""Models: the Siamese network, building it from a recipe, embedding with it, loading its weights."""

from metriclab.models.build import build_model
from metriclab.models.network import SiameseNetwork, embed, load_weights

__all__ = ["SiameseNetwork", "build_model", "embed", "load_weights"]
