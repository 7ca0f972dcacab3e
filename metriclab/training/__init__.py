"""Training: ``train(recipe)`` on accelerate (``engine``), its checkpoints, processes, CUDA graphs and progress."""

from metriclab.training.engine import train
from metriclab.training.launch import main

__all__ = ["main", "train"]
