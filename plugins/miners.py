"""Built-in miners: which pairs or triplets of a batch the loss looks at.

Contract for miner plugins: a miner is called like pytorch-metric-learning's miners,
``miner(embeddings, labels, ref_emb=None, ref_labels=None)`` -> indices tuple, either pairs
``(a1, p, a2, n)`` or triplets ``(a, p, n)``, as index tensors on the embeddings' device.
Subclass ``pytorch_metric_learning.miners.BaseMiner`` and implement ``mine``.

A random miner must be deterministic given its seed and the sequence of calls: in
distributed training every process mines the same gathered global batch and must draw the
same pairs. Own a ``torch.Generator`` seeded from a ``seed`` argument; never use the global RNG.
A miner with such state may expose ``state() -> JSON-ready`` and ``load_state(state)``: the engine
writes it into every checkpoint, so a resumed run draws what the uninterrupted run would have.

A miner may also offer ``fuse(loss) -> objective | None``: one computation
``objective(embeddings, labels, ref_emb, ref_labels) -> loss`` equal (up to float rounding) to
``loss(embeddings, labels, miner(embeddings, labels, ref_emb, ref_labels), ref_emb, ref_labels)``.
Index tuples have data-dependent sizes, so on a GPU every mined step waits for the device several
times; a fused objective of fixed shapes does not. The engine uses it whenever it is offered.
A fused objective that does the same device work on every call (given the batch size) may declare it
with an attribute ``graph_generators() -> [torch.Generator, ...]``, the generators it draws from:
then the engine may capture whole training steps as a CUDA graph (:mod:`metriclab.training.graphs`).

Every miner class of ``pytorch_metric_learning.miners`` is also registered as ``pml.<ClassName>``.
"""

from __future__ import annotations

import base64
import inspect
from collections.abc import Callable
from typing import Any

import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.miners import BaseMiner, BatchHardMiner
from pytorch_metric_learning.reducers import AvgNonZeroReducer
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from metriclab.errors import MetricLabError
from metriclab.registry import register_miner


@register_miner("random-pairs")
class RandomPairsMiner(BaseMiner):
    """Balanced random pairs: ``pairs_per_sample`` partners per anchor, each positive with ``pos_fraction``.

    A positive partner is drawn uniformly among the other samples of the anchor's label (a
    negative instead if there is none), a negative uniformly among samples of other labels.
    The draws depend only on ``seed``, the batch size and the number of earlier calls.
    """

    def __init__(self, pairs_per_sample: int = 1, pos_fraction: float = 0.5, seed: int = 0) -> None:
        if not 0.0 <= pos_fraction <= 1.0:
            raise MetricLabError(f"pos_fraction must be in [0, 1], got {pos_fraction}; pass e.g. pos_fraction=0.5")
        if pairs_per_sample < 1:
            raise MetricLabError(f"pairs_per_sample must be at least 1, got {pairs_per_sample}")
        super().__init__()
        self.pairs_per_sample, self.pos_fraction, self.seed = pairs_per_sample, pos_fraction, seed
        self._generator: torch.Generator | None = None
        self._pending_state: dict[str, str] | None = None

    def _rng(self, device: torch.device) -> torch.Generator:
        # Created lazily, on the device the embeddings live on, so drawing needs no host round trip.
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
            if self._pending_state is not None:
                saved, self._pending_state = self._pending_state, None
                if saved["device"] != device.type:
                    raise MetricLabError(
                        f"the checkpoint's random-pairs state was drawn on {saved['device']}, this run is on "
                        f"{device.type}; resume on the same kind of device or start a new run"
                    )
                raw = bytearray(base64.b64decode(saved["generator"]))
                self._generator.set_state(torch.frombuffer(raw, dtype=torch.uint8))
        return self._generator

    def mine(self, embeddings, labels, ref_emb, ref_labels) -> tuple[torch.Tensor, ...]:
        """Pair indices ``(a1, p, a2, n)`` into ``embeddings`` (anchors) and ``ref_emb`` (partners)."""
        anchors, partners, positive, keep = self.draw(labels, ref_labels)
        pos, neg = keep & positive, keep & ~positive
        return anchors[pos], partners[pos], anchors[neg], partners[neg]

    def draw(self, labels: torch.Tensor, ref_labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(anchors, partners, positive, keep)``, each of ``pairs_per_sample x len(labels)`` entries.

        A fixed number of draws, so nothing here waits for the device. ``keep`` is False where the
        anchor has no partner of the drawn kind (its ``partners`` entry is then a valid but unused index).
        """
        device, num_ref = labels.device, len(ref_labels)
        rng = self._rng(device)
        anchors = torch.arange(len(labels), device=device).repeat_interleave(self.pairs_per_sample)
        # Fixed-size draws, whatever the labels, keep every process's generator in step.
        want_pos = torch.rand(len(anchors), generator=rng, device=device) < self.pos_fraction
        u = torch.rand(len(anchors), generator=rng, device=device)

        # Samples of one label are a contiguous block [start, end) of the label-sorted reference set.
        order = torch.argsort(ref_labels, stable=True)
        sorted_labels = ref_labels[order]
        start = torch.searchsorted(sorted_labels, labels[anchors])
        count = torch.searchsorted(sorted_labels, labels[anchors], right=True) - start
        same_set = ref_labels is labels  # then the anchor is in its own block and is no partner
        num_pos, num_neg = count - int(same_set), num_ref - count
        positive = (want_pos & (num_pos > 0)) | (num_neg == 0)
        keep = torch.where(positive, num_pos > 0, num_neg > 0)

        pick_pos = torch.minimum((u * num_pos).long(), num_pos - 1)
        if same_set:
            rank = torch.empty_like(order)
            rank[order] = torch.arange(num_ref, device=device)
            pick_pos += (start + pick_pos >= rank[anchors]).long()  # skip the anchor itself
        pick_neg = torch.minimum((u * num_neg).long(), num_neg - 1)
        pick_neg += count * (pick_neg >= start)  # skip the anchor's block
        partners = order[torch.where(positive, start + pick_pos, pick_neg).clamp(0, num_ref - 1)]
        return anchors, partners, positive, keep

    def fuse(self, loss: Any) -> Callable | None:
        """``loss`` of this miner's pairs as one computation with no host sync, or None if ``loss`` can't.

        Offered to losses with ``pair_losses(x, y, positive)`` whose value is their mean
        (``reduces_to_mean()``, e.g. metriclab's ``contrastive``). Equal, up to float rounding, to
        ``loss(embeddings, labels, self(embeddings, labels))``, with the same random draws.
        """
        if _changed(self, RandomPairsMiner) or not (
            hasattr(loss, "pair_losses") and getattr(loss, "reduces_to_mean", lambda: False)()
        ):
            return None

        def objective(embeddings, labels, ref_emb=None, ref_labels=None):
            labels = c_f.to_device(labels, embeddings)  # as BaseMiner.forward does: draws on the embeddings' device
            ref_emb, ref_labels = c_f.set_ref_emb(embeddings, labels, ref_emb, ref_labels)
            with torch.no_grad():
                anchors, partners, positive, keep = self.draw(labels, ref_labels)
            losses = loss.pair_losses(embeddings[anchors], ref_emb[partners], positive)
            return torch.where(keep, losses, 0).sum() / keep.sum().clamp_min(1)

        objective.graph_generators = lambda: [self._generator] if self._generator is not None else []
        return objective

    def state(self) -> dict[str, str] | None:
        """JSON-ready generator state for checkpoints (None before the first draw)."""
        if self._generator is None:
            return self._pending_state
        raw = self._generator.get_state().numpy().tobytes()
        return {"device": self._generator.device.type, "generator": base64.b64encode(raw).decode()}

    def load_state(self, state: dict[str, str] | None) -> None:
        """Continue from a ``state()``: the next call draws what the saved miner's next call would have."""
        self._generator, self._pending_state = None, state


@register_miner("all-pairs")
class AllPairsMiner(BaseMiner):
    """Every positive and every negative pair of the batch."""

    def mine(self, embeddings, labels, ref_emb, ref_labels) -> tuple[torch.Tensor, ...]:
        """Pair indices ``(a1, p, a2, n)``."""
        return lmu.get_all_pairs_indices(labels, ref_labels)


@register_miner("all-triplets")
class AllTripletsMiner(BaseMiner):
    """Every (anchor, positive, negative) triplet of the batch."""

    def mine(self, embeddings, labels, ref_emb, ref_labels) -> tuple[torch.Tensor, ...]:
        """Triplet indices ``(a, p, n)``."""
        return lmu.get_all_triplets_indices(labels, ref_labels)


register_miner("batch-hard", BatchHardMiner)


class TripletMarginMiner(pml_miners.TripletMarginMiner):
    """pml's ``TripletMarginMiner``: same arguments, same triplets, found without enumerating all of them.

    pml lists every (anchor, positive, negative) of the batch (~B^3/10 index triplets for 10
    balanced classes) and then filters them. Here each anchor's negatives are sorted by distance
    once; the negatives that pass the margin test with a positive form one contiguous run of
    that order, located by binary search. The runs (widened by a rounding slack) are expanded
    and tested with pml's exact expression, so the kept set is identical; within an
    (anchor, positive) pair the negatives come in order of distance rather than of index.
    Cost: O(B^2 log B + candidates) instead of O(B^3): 24-34 ms -> 5 ms per step at batch 256 on a 2-core CPU.
    """

    def mine(self, embeddings, labels, ref_emb, ref_labels) -> tuple[torch.Tensor, ...]:
        """Triplet indices ``(a, p, n)``."""
        mat = self.distance(embeddings, ref_emb)
        matches, diffs = (m.bool() for m in lmu.get_matches_and_diffs(labels, ref_labels))
        # x = how far a negative is (the larger, the farther), c = the same for the positive:
        # pml's triplet margin is x - c, in both the distance and the (inverted) similarity case.
        x = -mat if self.distance.is_inverted else mat
        ranked, order = torch.where(diffs, x, torch.inf).sort(dim=1)  # each anchor's negatives, nearest first
        negatives = diffs.sum(1)
        self._set_stats_closed_form(mat, matches, diffs)

        low = high = None  # each positive c keeps the run of negatives x with low < x - c <= high
        if self.type_of_triplets == "easy":
            low = self.margin
        else:
            high = 0 if self.type_of_triplets == "hard" else self.margin
            low = 0 if self.type_of_triplets == "semihard" else None
        # Each anchor's positives first, in column order (a stable sort), then cut to the most any anchor has:
        # the bounds are searched per anchor row in (B, max positives), not per pair in (pairs, B).
        per_anchor = matches.sum(1)
        columns = matches.byte().sort(dim=1, descending=True, stable=True).indices[:, : int(per_anchor.max())]
        valid = torch.arange(columns.shape[1], device=columns.device) < per_anchor.unsqueeze(1)
        c = x.gather(1, columns)
        slack = 1e-5 * (c.abs() + abs(self.margin) + 1)  # wider than float32 rounding of x - c
        anchors, positives = valid.nonzero(as_tuple=True)[0], columns[valid]
        start = torch.zeros_like(anchors)
        end = negatives[anchors]
        if low is not None:
            start = torch.searchsorted(ranked, c + low - slack)[valid]
        if high is not None:
            end = torch.minimum(end, torch.searchsorted(ranked, c + high + slack, right=True)[valid])
        counts = (end - start).clamp_min(0)
        a = anchors.repeat_interleave(counts)
        p = positives.repeat_interleave(counts)
        first = torch.cumsum(counts, 0) - counts
        offset = torch.arange(len(a), device=a.device) - (first - start).repeat_interleave(counts)
        n = order[a, offset]
        return self._exact(mat, a, p, n)

    def _exact(self, mat: torch.Tensor, a: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The candidates that pass pml's own margin test, computed exactly as pml computes it."""
        ap_dist, an_dist = mat[a, p], mat[a, n]
        keep = self._passes(ap_dist - an_dist if self.distance.is_inverted else an_dist - ap_dist)
        return a[keep], p[keep], n[keep]

    def _passes(self, triplet_margin: torch.Tensor) -> torch.Tensor:
        """pml's test of ``type_of_triplets`` on triplet margins (how much farther the negative is)."""
        if self.type_of_triplets == "easy":
            return triplet_margin > self.margin
        keep = triplet_margin <= self.margin
        if self.type_of_triplets == "hard":
            keep &= triplet_margin <= 0
        elif self.type_of_triplets == "semihard":
            keep &= triplet_margin > 0
        return keep

    def fuse(self, loss: Any) -> Callable | None:
        """pml's ``TripletMarginLoss`` of this miner's triplets with no host sync on a GPU, or None.

        On a CUDA device, for batches with ``B x R x R <= DENSE_LIMIT``, every (anchor, positive,
        negative) of the batch is scored at once (:meth:`dense_loss`): a few large kernels instead
        of ~100 small ones and ~16 waits for the device per step. Elsewhere (a CPU, where the
        sorted search is faster; larger batches) it mines then calls the loss, as without fusion.
        Offered for the loss as the recipes use it: plain ``TripletMarginLoss`` (no swap, no
        smooth loss, all triplets per anchor, ``AvgNonZeroReducer``, no regularizer) with the
        miner's distance.
        """
        if _changed(self, TripletMarginMiner) or not (
            _plain_triplet_loss(loss) and _same_distance(loss.distance, self.distance)
        ):
            return None

        def objective(embeddings, labels, ref_emb=None, ref_labels=None):
            refs = len(embeddings) if ref_emb is None else len(ref_emb)
            if embeddings.is_cuda and len(embeddings) * refs * refs <= DENSE_LIMIT:
                return self.dense_loss(loss, embeddings, labels, ref_emb, ref_labels)
            return loss(embeddings, labels, self(embeddings, labels, ref_emb, ref_labels), ref_emb, ref_labels)

        # Fixed shapes only on the dense path; a graph is not captured if the warm-up steps mined (and synced).
        objective.graph_generators = list
        return objective

    def dense_loss(
        self,
        loss: Any,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``loss`` over the triplets this miner keeps, scored as one (B, R, R) array.

        Same triplets, same per-triplet values and the same mean over the non-zero ones as
        ``loss(embeddings, labels, self(embeddings, labels, ref_emb, ref_labels), ref_emb, ref_labels)``;
        only the order of summation differs. Memory: a few B x R x R arrays (64 MiB each at B = R = 256).
        """
        labels = c_f.to_device(labels, embeddings)
        ref_emb, ref_labels = c_f.set_ref_emb(embeddings, labels, ref_emb, ref_labels)
        mat = loss.distance(embeddings, ref_emb)
        matches, diffs = (m.bool() for m in lmu.get_matches_and_diffs(labels, ref_labels))
        ap, an = mat.unsqueeze(2), mat.unsqueeze(1)  # [a, p, .] and [a, ., n]
        with torch.no_grad():
            margins = ap - an if self.distance.is_inverted else an - ap
            mined = matches.unsqueeze(2) & diffs.unsqueeze(1) & self._passes(margins)
        losses = torch.relu(loss.distance.margin(ap, an) + loss.margin)
        kept = mined & (losses > 0)  # AvgNonZeroReducer: the mean of the positive losses
        return torch.where(kept, losses, 0).sum() / kept.sum().clamp_min(1)

    def _set_stats_closed_form(self, mat: torch.Tensor, matches: torch.Tensor, diffs: torch.Tensor) -> None:
        """pml's stats (means over every triplet of the batch), from pair sums instead of the triplets."""
        if not self.collect_stats:
            return
        per_anchor_neg, per_anchor_pos = diffs.sum(1, keepdim=True), matches.sum(1, keepdim=True)
        triplets = (per_anchor_pos * per_anchor_neg).sum().clamp_min(1)
        ap = (mat * matches * per_anchor_neg).sum() / triplets
        an = (mat * diffs * per_anchor_pos).sum() / triplets
        self.set_stats(ap.reshape(1), an.reshape(1), (ap - an if self.distance.is_inverted else an - ap).reshape(1))


# Largest B x R x R (anchors x references^2) that TripletMarginMiner.fuse scores densely: 512^3.
DENSE_LIMIT = 2**27


def _changed(miner: BaseMiner, cls: type) -> bool:
    """Whether ``miner`` is a subclass of ``cls`` that mines differently (its fusion would bypass that)."""
    kind = type(miner)
    return kind.forward is not BaseMiner.forward or any(
        getattr(kind, name) is not getattr(cls, name) for name in ("mine", "draw", "_passes") if hasattr(cls, name)
    )


def _plain_triplet_loss(loss: Any) -> bool:
    """Whether ``loss`` is pml's TripletMarginLoss as the recipes use it (what ``dense_loss`` computes)."""
    reducer = getattr(loss, "reducer", None)
    return (
        type(loss) is pml_losses.TripletMarginLoss
        and not loss.swap
        and not loss.smooth_loss
        and loss.triplets_per_anchor == "all"
        and type(reducer) is AvgNonZeroReducer
        and reducer.low == 0
        and reducer.high is None
        and loss.embedding_regularizer is None
    )


def _same_distance(a: Any, b: Any) -> bool:
    """Whether two pml distances compute the same matrix."""
    fields = ("normalize_embeddings", "p", "power", "is_inverted")
    return type(a) is type(b) and all(getattr(a, f, None) == getattr(b, f, None) for f in fields)


register_miner("triplet-margin", TripletMarginMiner)


@register_miner("semi-hard")
def semi_hard(margin: float = 0.2, **kwargs: Any) -> TripletMarginMiner:
    """Semi-hard triplets: d(a,p) < d(a,n) <= d(a,p) + margin (pml's TripletMarginMiner, mined faster)."""
    return TripletMarginMiner(margin=margin, type_of_triplets="semihard", **kwargs)


@register_miner("hard")
def hard(margin: float = 0.2, **kwargs: Any) -> TripletMarginMiner:
    """Hard triplets: d(a,n) <= d(a,p) (pml's TripletMarginMiner, mined faster)."""
    return TripletMarginMiner(margin=margin, type_of_triplets="hard", **kwargs)


for _name, _cls in inspect.getmembers(pml_miners, inspect.isclass):
    if issubclass(_cls, BaseMiner) and _name != "BaseMiner":
        register_miner(f"pml.{_name}", _cls)
