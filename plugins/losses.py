"""Built-in losses: Hadsell et al.'s contrastive loss, the triplet loss, CosFace, and every pml loss.

Contract for loss plugins: a loss is an ``nn.Module`` called like pytorch-metric-learning's
losses, ``loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)`` ->
scalar tensor. ``indices_tuple`` comes from a miner: pairs ``(a1, p, a2, n)`` or triplets
``(a, p, n)``; ``ref_emb``/``ref_labels`` are the second tower's output in a pseudo-siamese
network. Subclassing ``pytorch_metric_learning.losses.BaseMetricLossFunction`` gives this
call signature and makes the distance and reducer injectable (``distance=``, ``reducer=``).

Every loss class of ``pytorch_metric_learning.losses`` is also registered as
``pml.<ClassName>`` (``pml.MultiSimilarityLoss``, ``pml.ArcFaceLoss``, ...).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import BaseMetricLossFunction, TripletMarginLoss
from pytorch_metric_learning.reducers import MeanReducer
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from metriclab.errors import MetricLabError
from metriclab.registry import register_loss

# Below this squared distance the negative term's sqrt is clamped, so its gradient stays finite.
_EPS = 1e-12


def _check_margin(margin: float) -> None:
    if margin < 0:
        raise MetricLabError(f"margin must be non-negative, got {margin}; pass e.g. margin=1.0")


@register_loss("contrastive")
class ContrastiveLoss(BaseMetricLossFunction):
    """Hadsell, Chopra & LeCun (2006): mean over pairs of y·d² + (1−y)·max(0, margin − d)².

    ``squared=False`` gives the variant of the TensorFlow MNIST Siamese example,
    y·d + (1−y)·max(0, margin − d) (margin 5 there: ``recipes/mnist_siamese_conv.py``).
    ``d`` is the Euclidean distance between raw (unnormalised) embeddings unless another
    ``distance`` is injected; ``y = 1`` for a same-class pair. The mean runs over the mined
    pairs, or over all pairs in the batch when no ``indices_tuple`` is given; triplets are
    split into their positive and negative pairs.
    """

    def __init__(self, margin: float = 1.0, squared: bool = True, **kwargs: Any) -> None:
        _check_margin(margin)
        super().__init__(**kwargs)
        if self.distance.is_inverted:
            raise MetricLabError(
                f"contrastive loss needs a distance, not the similarity {type(self.distance).__name__}; "
                "pass an LpDistance or use pml.ContrastiveLoss"
            )
        self.margin, self.squared = margin, squared
        self.add_to_recordable_attributes(name="margin", is_stat=False)

    def get_default_distance(self) -> LpDistance:
        """Plain Euclidean distance, as in the paper (pml's default would normalise embeddings)."""
        return LpDistance(normalize_embeddings=False, p=2, power=1)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels) -> dict:
        """Per-pair losses in pml's loss-dict form, for the reducer to average."""
        c_f.labels_or_indices_tuple_required(labels, indices_tuple)
        a1, p, a2, n = lmu.convert_to_pairs(indices_tuple, labels, ref_labels)
        if len(a1) + len(a2) == 0:
            return self.zero_losses()
        # pml reduces positive and negative pairs alike; one list of all pairs gives the paper's single mean.
        anchors, partners = torch.cat([a1, a2]), torch.cat([p, n])
        positive = torch.arange(len(anchors), device=anchors.device) < len(a1)
        losses = self.pair_losses(embeddings[anchors], ref_emb[partners], positive)
        return {"loss": {"losses": losses, "indices": (anchors, partners), "reduction_type": "pos_pair"}}

    def pair_losses(self, x: torch.Tensor, y: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        """Losses of the row-aligned pairs ``(x[i], y[i])``: d² where ``positive[i]``, else max(0, margin − d)².

        Not squared: d and max(0, margin − d).
        """
        squared, d = self._pair_distances(x, y)
        if not self.squared:
            return torch.where(positive, d, torch.relu(self.margin - d))
        return torch.where(positive, squared, torch.relu(self.margin - d) ** 2)

    def reduces_to_mean(self) -> bool:
        """Whether the loss is the plain mean of :meth:`pair_losses` (no other reducer, no regularizer).

        Miners that draw a fixed number of pairs use this to compute mining and loss in one pass
        (see ``RandomPairsMiner.fuse``).
        """
        cls = type(self)  # a subclass that changes forward() or compute_loss() computes something else
        plain = cls.forward is BaseMetricLossFunction.forward and cls.compute_loss is ContrastiveLoss.compute_loss
        return plain and type(self.reducer) is MeanReducer and self.embedding_regularizer is None

    def _pair_distances(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(d², d)`` of row-aligned pairs, with finite gradients at ``d = 0``."""
        dist = self.distance
        x, y = dist.maybe_normalize(x), dist.maybe_normalize(y)
        if isinstance(dist, LpDistance) and dist.p == 2 and dist.power == 1:
            squared = (x - y).pow(2).sum(dim=1)  # no sqrt: d/dx sqrt is infinite at 0
            return squared, squared.clamp_min(_EPS).sqrt()
        d = dist.pairwise_distance(x, y) ** dist.power
        return d * d, d


@register_loss("triplet")
def triplet(margin: float = 0.2, **kwargs: Any) -> TripletMarginLoss:
    """pml's TripletMarginLoss with margin 0.2; other keyword arguments go to it unchanged."""
    _check_margin(margin)
    return TripletMarginLoss(margin=margin, **kwargs)


@register_loss("cosface")
class CosFaceLoss(pml_losses.CosFaceLoss):
    """pml's CosFaceLoss (Wang et al., 2018: softmax over cosines to one weight per class, an additive margin on the
    true class's) with ``label_smoothing`` of its targets (Szegedy et al., 2016), as torch's cross-entropy takes it.

    Smoothing keeps a proxy loss from pulling every image onto its class weight: on Fashion-MNIST, 0.1 raised
    MAP@R after 5 epochs (BENCHMARKS.md, "Time to quality, fourth round"). Other arguments are pml's.
    """

    def __init__(self, *args: Any, label_smoothing: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not 0.0 <= label_smoothing < 1.0:
            raise MetricLabError(f"label_smoothing must be in [0, 1), got {label_smoothing}; pass e.g. 0.1")
        self.cross_entropy = torch.nn.CrossEntropyLoss(reduction="none", label_smoothing=label_smoothing)


# The classes themselves, so their real signatures (num_classes, embedding_size, ...) stay visible.
for _name, _cls in inspect.getmembers(pml_losses, inspect.isclass):
    if issubclass(_cls, BaseMetricLossFunction) and not _name.startswith(("Base", "Generic")):
        register_loss(f"pml.{_name}", _cls)
