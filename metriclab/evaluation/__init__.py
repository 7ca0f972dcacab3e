"""Evaluation of finished runs (``metriclab evaluate``)."""

from metriclab.evaluation.evaluate import evaluate_run

__all__ = ["evaluate_run"]
