"""Plugin contracts, checked before the first training step: one forward and one loss on a small batch.

A component that breaks its contract (an encoder that returns no ``torch.nn.Module`` or embeddings of
the wrong width, a dataset of float or channels-last images or of labels that do not fit, a loss whose
``forward`` does not take pytorch-metric-learning's arguments or returns no scalar, a miner that returns
no index tuple) stops the run before it starts, with one line naming the component, the package it came
from and the contract it broke. The forward pass also initialises lazy modules (``torch.nn.LazyLinear``),
so it runs before anything counts or optimises the parameters.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

import torch

from metriclab import registry
from metriclab.data import Dataset
from metriclab.data.loader import ImageSource, is_streaming
from metriclab.errors import MetricLabError
from metriclab.metrics.protocol import queries_with_matches
from metriclab.models import SiameseNetwork, build_model
from metriclab.recipe import Recipe

# What each kind promises the engine, as the error messages name it.
DATASET = "a metriclab.data.Dataset of uint8 images (N, C, H, W) and int64 labels (N,) in range(len(classes))"
ENCODER = "a torch.nn.Module mapping float images (N, C, H, W) to embeddings (N, embedding_dim)"
LOSS = "a torch.nn.Module whose forward(embeddings, labels, indices_tuple, ref_emb, ref_labels) returns a scalar tensor"
MINER = "a callable (embeddings, labels, ref_emb, ref_labels) -> (a, p, n) or (a1, p, a2, n) index tensors"
SAMPLER = "a callable (labels, generator) -> a 1-D int64 tensor of indices into labels, drawn from the generator only"
TRANSFORM = "a callable mapping a uint8 (C, H, W) image to a uint8 (C, size, size) tensor"
SCHEDULER = "a factory (optimizer, total_steps=..., **options) returning a torch.optim.lr_scheduler.LRScheduler"
SAMPLES_PER_CLASS, CLASSES = 2, 4  # the check batch: enough for a positive and a negative pair


def broken(kind: str, name: str, contract: str, problem: str) -> MetricLabError:
    """The one-line error for component ``name`` of ``kind`` that broke ``contract``."""
    source = registry.registry(kind).source(name)
    return MetricLabError(
        f"{kind} '{name}' from {source} breaks the {kind} contract ({contract}): {problem}; "
        f"fix the {kind} in {source} or choose another one"
    )


def ignored_transforms(recipe: Recipe, dataset: Any) -> list[str]:
    """The transform options the recipe sets that ``dataset`` ignores, as flags (a resident dataset has none)."""
    fields = ("train_transform", "train_transform_args", "test_transform", "test_transform_args")
    return [] if is_streaming(dataset) else [f"--{f.replace('_', '-')}" for f in fields if getattr(recipe, f)]


def check_dataset(recipe: Recipe, dataset: Any) -> None:
    """Raise MetricLabError unless the recipe's dataset keeps the :class:`Dataset` contract."""

    def fail(problem: str) -> MetricLabError:
        return broken("dataset", recipe.dataset, DATASET, problem)

    if not isinstance(dataset, Dataset) and not is_streaming(dataset):
        raise fail(f"its factory returned a {type(dataset).__name__}, not a Dataset")
    classes = len(dataset.classes)
    if is_streaming(dataset):  # files: their readers checked them; the labels are checked here
        _check_labels(fail, dataset, classes)
        is_query, is_gallery = dataset.test.marks()
        if is_query is not None and queries_with_matches(dataset.test.labels.numpy(), is_query, is_gallery) == 0:
            raise MetricLabError(
                f"dataset '{recipe.dataset}': none of its {int(is_query.sum())} test queries (is_query) has an image "
                "of its class in the gallery (is_gallery) besides itself, so nothing could be scored; mark gallery "
                "images of the queries' classes"
            )
        return
    for split in ("train", "test"):
        images, labels = getattr(dataset, f"{split}_images"), getattr(dataset, f"{split}_labels")
        if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
            kinds = f"{type(images).__name__} and {type(labels).__name__}"
            raise fail(f"{split} images and labels are {kinds}, not tensors")
        if images.dtype != torch.uint8:
            raise fail(f"{split}_images are {images.dtype}; store uint8 values 0-255 (e.g. (x * 255).round().byte())")
        if images.dim() != 4:
            raise fail(f"{split}_images have shape {tuple(images.shape)}; add the channel axis: (N, C, H, W)")
        if images.shape[3] in (1, 3) and images.shape[1] not in (1, 3):
            raise fail(f"{split}_images have shape {tuple(images.shape)}, channels last; permute to (N, C, H, W)")
        if labels.dim() == 1 and len(labels) != len(images):
            raise fail(f"{split} has {len(images)} images but {len(labels)} labels; give one label per image")
    _check_labels(fail, dataset, classes)


def _check_labels(fail: Callable[[str], MetricLabError], dataset: Any, classes: int) -> None:
    """The labels of both splits: int64 (N,), numbered 0..classes-1; a train split that is not empty."""
    for split in ("train", "test"):
        labels = getattr(dataset, f"{split}_labels")
        if not isinstance(labels, torch.Tensor):
            raise fail(f"{split}_labels are a {type(labels).__name__}, not a tensor; use int64 labels (N,)")
        if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise fail(f"{split}_labels are {labels.dtype} of shape {tuple(labels.shape)}; use int64 labels (N,)")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            raise fail(
                f"{split}_labels range over {int(labels.min())}..{int(labels.max())} but there are {classes} classes; "
                f"number the classes 0..{classes - 1}"
            )
    if not len(dataset.train_labels):
        raise fail("the train split is empty")


def check_sampler(recipe: Recipe, labels: torch.Tensor) -> None:
    """Raise MetricLabError unless the recipe's sampler gives valid orders of one length, drawn from its generator.

    Every process computes the epoch's order itself and takes its shard: an order drawn from any other random
    source would differ between processes, and some samples would be trained twice, others never.
    """
    from metriclab.data.sampling import build_sampler, epoch_generator

    def fail(problem: str) -> MetricLabError:
        return broken("sampler", recipe.sampler, SAMPLER, problem)

    sampler = build_sampler(recipe.sampler, recipe.m_per_class, recipe.sampler_args)
    orders = []
    with torch.random.fork_rng(devices=[]):
        for epoch in (0, 0, 1):
            torch.manual_seed(len(orders))  # another global state for each call: the order must not follow it
            order = sampler(labels, epoch_generator(recipe.seed, epoch, labels.device))
            if not isinstance(order, torch.Tensor) or order.dim() != 1 or order.is_floating_point():
                shown = f"{order.dtype} {tuple(order.shape)}" if isinstance(order, torch.Tensor) else type(order)
                raise fail(f"it returned {getattr(shown, '__name__', shown)}; return a 1-D integer tensor")
            bad = _outside(order, len(labels))
            if bad is not None:
                raise fail(
                    f"its order holds {bad} among {len(labels)} samples (0..{len(labels) - 1}); index into the labels"
                )
            orders.append(order)
    if not torch.equal(orders[0], orders[1]):
        raise fail("two calls with equally seeded generators gave different orders; draw only from the generator")
    if len(orders[2]) != len(orders[0]):
        raise fail(f"its orders have {len(orders[0])} and {len(orders[2])} samples; give every epoch one length")


def check_transforms(dataset: Any) -> None:
    """Raise MetricLabError unless a streaming dataset's transforms turn its first image into uint8 (C, S, S)."""
    from metriclab.data.images import decode

    if not is_streaming(dataset) or not len(dataset.train.paths):
        return
    try:
        image = decode(dataset.train.paths[0], dataset.channels)
    except MetricLabError:  # an unreadable image left in on purpose (skip_unreadable): its reader has said so
        return
    expected = (dataset.channels, dataset.image_size, dataset.image_size)
    for split in ("train", "test"):
        transform = getattr(dataset, f"{split}_transform")
        name = dataset.transforms.get(split, {}).get("name", f"{split}_transform")
        with torch.random.fork_rng(devices=[]):
            out = transform(image.clone()) if transform is not None else image
        if not isinstance(out, torch.Tensor) or out.dtype != torch.uint8 or tuple(out.shape) != expected:
            shown = f"{out.dtype} {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            problem = f"it turned a {tuple(image.shape)} image into {shown}, not uint8 {expected}"
            floats = isinstance(out, torch.Tensor) and out.is_floating_point()
            hint = "; leave out ToDtype/Normalize: the network scales its input" if floats else ""
            raise broken("transform", name, TRANSFORM, problem + hint)


def check_scheduler(name: str, schedule: Any) -> None:
    """Raise MetricLabError unless scheduler ``name`` built a torch LRScheduler."""
    if not isinstance(schedule, torch.optim.lr_scheduler.LRScheduler):
        raise broken("scheduler", name, SCHEDULER, f"its factory returned a {type(schedule).__name__}")


def build_checked_model(recipe: Recipe, input_shape: tuple[int, ...]) -> SiameseNetwork:
    """:func:`metriclab.models.build_model`, with an encoder that returns no Module named as such."""
    try:
        return build_model(recipe, input_shape)
    except TypeError:
        for name, args in _encoders(recipe):
            common = {"embedding_dim": recipe.embedding_dim, "input_shape": tuple(input_shape)}
            with torch.random.fork_rng():
                tower = registry.encoders.create(name, **common, **args)
            if not isinstance(tower, torch.nn.Module):
                raise broken("encoder", name, ENCODER, f"its factory returned a {type(tower).__name__}") from None
        raise


def _encoders(recipe: Recipe) -> list[tuple[str, dict]]:
    towers = [(recipe.encoder, recipe.encoder_args)]
    if not recipe.share_weights:
        second = recipe.second_encoder or recipe.encoder
        towers.append((second, recipe.second_encoder_args if recipe.second_encoder else recipe.encoder_args))
    return towers


def check_components(recipe: Recipe, dataset: Dataset, model: SiameseNetwork, loss_fn: Any, miner: Any) -> None:
    """One forward and one loss on a small batch; MetricLabError naming the first component that breaks its contract.

    The forward pass runs in eval mode without gradients, so it changes no weights and draws no random
    numbers (beyond initialising lazy modules); the loss and the miner run on copies, so their state
    (a miner's generator, a loss's memory) is as if they had never been called.
    """
    index = _check_batch(dataset.train_labels)
    images = ImageSource(dataset, "train", num_workers=0).take(index).float().div_(255)
    labels = dataset.train_labels[index]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = []
            for tower, (name, _) in enumerate(_encoders(recipe)):
                out = model(images, tower=tower)
                _check_embeddings(recipe, name, out, len(index), model.embedding_dim)
                outputs.append(out.float())
    finally:
        model.train(was_training)
    embeddings = outputs[0]
    ref = outputs[1] if len(outputs) > 1 else None
    ref_labels = labels.clone() if ref is not None else None

    if not isinstance(loss_fn, torch.nn.Module):
        raise broken("loss", recipe.loss, LOSS, f"its factory returned a {type(loss_fn).__name__}")
    _check_signature("loss", recipe.loss, LOSS, loss_fn.forward, 5)
    loss_copy, miner_copy = _copy(loss_fn), _copy(miner)
    with torch.no_grad():
        if miner is not None:
            _check_signature("miner", recipe.miner, MINER, getattr(miner_copy, "forward", miner_copy), 4)
            _check_indices(recipe.miner, miner_copy(embeddings, labels, ref, ref_labels), len(index))
            miner_copy = _copy(miner)
        from metriclab.training.components import objective

        value = objective(loss_copy, miner_copy)(embeddings, labels, ref, ref_labels)
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
        shown = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise broken("loss", recipe.loss, LOSS, f"it returned {shown}; reduce it to one number (e.g. .mean())")


def _check_batch(labels: torch.Tensor) -> torch.Tensor:
    """Indices of up to ``SAMPLES_PER_CLASS`` samples of each of the first ``CLASSES`` classes."""
    picked = [(labels == c).nonzero().flatten()[:SAMPLES_PER_CLASS] for c in labels.unique()[:CLASSES]]
    return torch.cat(picked)


def _check_embeddings(recipe: Recipe, name: str, out: Any, n: int, own_width: int | None) -> None:
    if not isinstance(out, torch.Tensor):
        raise broken("encoder", name, ENCODER, f"its forward returned a {type(out).__name__}, not a tensor")
    if out.dim() != 2 or out.shape[0] != n or not out.is_floating_point():
        raise broken(
            "encoder", name, ENCODER, f"{n} images gave {out.dtype} of shape {tuple(out.shape)}, not ({n}, D) floats"
        )
    # embedding_dim=None keeps a backbone's own features: the encoder states their width.
    expected = recipe.embedding_dim if recipe.embedding_dim is not None else own_width
    if expected is not None and out.shape[1] != expected:
        raise broken(
            "encoder",
            name,
            ENCODER,
            f"it outputs {out.shape[1]} features but embedding_dim is {expected}; its last layer must "
            "have the embedding_dim the factory is given",
        )


def _check_signature(kind: str, name: str, contract: str, function: Callable, count: int) -> None:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # no signature to read: the call itself will tell
        return
    try:
        signature.bind(*[None] * count)
    except TypeError:
        raise broken(kind, name, contract, f"its signature is {signature}") from None


def _outside(indices: torch.Tensor, n: int) -> int | None:
    """An index of ``indices`` outside ``0..n-1`` (the most negative, else the largest); None if all are inside."""
    if not len(indices):
        return None
    low, high = int(indices.min()), int(indices.max())
    return low if low < 0 else high if high >= n else None


def _check_indices(name: str, mined: Any, n: int) -> None:
    def fail(problem: str) -> MetricLabError:
        return broken("miner", name, MINER, problem)

    if not isinstance(mined, tuple) or len(mined) not in (3, 4):
        size = f" of {len(mined)}" if isinstance(mined, (tuple, list)) else ""
        return_value = f"a {type(mined).__name__}{size}"
        raise fail(f"it returned {return_value}; return a tuple of 3 (triplets) or 4 (pairs) index tensors")
    for part in mined:
        if not isinstance(part, torch.Tensor) or part.dim() != 1 or part.is_floating_point():
            shown = f"{part.dtype} {tuple(part.shape)}" if isinstance(part, torch.Tensor) else type(part).__name__
            raise fail(f"it returned {shown} among its indices; each must be a 1-D integer tensor")
        bad = _outside(part, n)
        if bad is not None:
            raise fail(f"its indices hold {bad} in a batch of {n} (0..{n - 1}); index into the batch")
    groups = [mined] if len(mined) == 3 else [mined[:2], mined[2:]]
    if any(len({len(p) for p in group}) > 1 for group in groups):
        raise fail(f"its index tensors have lengths {[len(p) for p in mined]}; tensors of one tuple must match")


def _copy(component: Any) -> Any:
    try:
        return copy.deepcopy(component)
    except Exception:  # noqa: BLE001 - an uncopyable component is checked as it is
        return component
