"""Using a trained run: rebuild its recipe, network, dataset and embeddings; embed, search and export with it."""

from metriclab.inference.model import EmbeddingModel, load_model
from metriclab.inference.rebuild import embed_run, load_run_model, run_dataset, run_embeddings, run_recipe

__all__ = ["EmbeddingModel", "embed_run", "load_model", "load_run_model", "run_dataset", "run_embeddings", "run_recipe"]
