"""Using a trained run: rebuild its recipe, network, dataset and embeddings from the run directory."""

from metriclab.inference.rebuild import embed_run, load_run_model, run_dataset, run_embeddings, run_recipe

__all__ = ["embed_run", "load_run_model", "run_dataset", "run_embeddings", "run_recipe"]
