"""Built-in encoders: the networks that map images to embeddings.

Contract for encoder plugins: a factory registered with ``@register_encoder(name)`` takes the
keyword arguments ``embedding_dim: int`` and ``input_shape: tuple[int, int, int]`` (C, H, W),
which the engine supplies, plus options of its own, and returns an ``nn.Module`` that maps
float images ``(N, C, H, W)`` to embeddings ``(N, embedding_dim)``. The images arrive
standardised per channel with the training set's mean and std (the Siamese network does it,
and saves the statistics with the weights), or with the backbone's own mean and std when it starts
from pretrained weights.

Families: ``timm:<model>`` is any model ``timm.list_models()`` knows and ``torchvision:<model>`` any
classification model of ``torchvision.models.list_models()``, built without the classifier and
followed by an embedding head (:class:`metriclab.models.BackboneEncoder`). ``pretrained=True`` uses
the library's own download and cache; ``weights=PATH`` loads a local ``.safetensors``/``.pth`` file
(weights-only) on a machine without a network. Extra keyword arguments go to the library's
constructor (``drop_path_rate=0.1``, ``img_size=64``, ...).
"""

from __future__ import annotations

import itertools
import math
import sys
from typing import Any

import torch
from torch import nn

from metriclab.errors import MetricLabError
from metriclab.models import BackboneEncoder, EmbeddingHead, load_backbone_weights
from metriclab.registry import register_encoder, register_encoder_family


def _check(embedding_dim: int | None, input_shape: tuple[int, ...]) -> None:
    if embedding_dim is None:
        raise MetricLabError(
            "this encoder has no features of its own to keep: embedding_dim=None needs a backbone encoder "
            "(timm:<model>, torchvision:<model>); pass e.g. --embedding-dim 64"
        )
    if embedding_dim < 1:
        raise MetricLabError(f"embedding_dim must be at least 1, got {embedding_dim}; pass e.g. embedding_dim=2")
    if len(input_shape) != 3:
        raise MetricLabError(f"input_shape must be (channels, height, width), got {tuple(input_shape)}")


@register_encoder("mlp")
def mlp(*, embedding_dim: int, input_shape: tuple[int, int, int], hidden: tuple[int, ...] = (1024, 1024)) -> nn.Module:
    """Fully connected tower (the classic Siamese 784-1024-1024-2 for MNIST and embedding_dim=2)."""
    _check(embedding_dim, input_shape)
    sizes = [math.prod(input_shape), *hidden]
    layers: list[nn.Module] = [nn.Flatten()]
    for size_in, size_out in itertools.pairwise(sizes):
        layers += [nn.Linear(size_in, size_out), nn.ReLU()]
    layers.append(nn.Linear(sizes[-1], embedding_dim))
    return nn.Sequential(*layers)


class GeneralizedMeanPool(nn.Module):
    """GeM pooling (Radenović et al., 2018): ``mean(x ** p) ** (1 / p)`` over positions, ``p`` learned (init 3).

    ``p = 1`` is average pooling and ``p -> inf`` max pooling. Computed in float32, so half-precision
    activations cannot overflow in the power.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, C, 1, 1)``."""
        pooled = x.float().clamp(min=self.eps).pow(self.p).mean((2, 3), keepdim=True).pow(1.0 / self.p)
        return pooled.to(x.dtype)


@register_encoder("convnet")
def convnet(
    *,
    embedding_dim: int,
    input_shape: tuple[int, int, int],
    channels: tuple[int, ...] = (32, 64, 128, 128, 128),
    batch_norm: bool = True,
    convs_per_stage: int = 1,
    global_pool: str = "avg",
    drop_rate: float = 0.0,
) -> nn.Module:
    """Small ConvNet: stages of conv3x3-(BatchNorm)-ReLU, each ending in a 2x2 max-pool, then a linear embedding head.

    ``channels`` gives one stage each; ``convs_per_stage=2`` is the VGG-style stage. The head sees the last map
    averaged over its positions (``global_pool="avg"``), pooled by a learned generalized mean (``"gem"``,
    :class:`GeneralizedMeanPool`, the usual pooling of retrieval networks) or whole (``"flatten"``: where each
    feature is, which a centred dataset's classes tell apart by), after dropout of ``drop_rate`` (timm's names).
    """
    _check(embedding_dim, input_shape)
    if convs_per_stage < 1:
        raise MetricLabError(f"convs_per_stage must be at least 1, got {convs_per_stage}; pass e.g. convs_per_stage=2")
    if global_pool not in ("avg", "gem", "flatten"):
        raise MetricLabError(f"global_pool must be 'avg', 'gem' or 'flatten', got {global_pool!r}")
    if not 0.0 <= drop_rate < 1.0:
        raise MetricLabError(f"drop_rate must be in [0, 1), got {drop_rate}; pass e.g. drop_rate=0.3")
    layers: list[nn.Module] = []
    size_in = input_shape[0]
    for size_out in channels:
        for i in range(convs_per_stage):
            # BatchNorm: on Fashion-MNIST one epoch of triplet training reached test precision@1 0.853 with it
            # and 0.842 without (2-core CPU, same recipe otherwise).
            norm = [nn.BatchNorm2d(size_out)] if batch_norm else []
            layers += [nn.Conv2d(size_in, size_out, 3, padding=1, bias=not batch_norm), *norm]
            size_in = size_out
            if i < convs_per_stage - 1:
                layers.append(nn.ReLU())
        # ceil_mode keeps a 1x1 map at 1x1, so five stages also fit 8x8 inputs (28 -> 14 -> 7 -> 4 -> 2 -> 1).
        # Pooling before the ReLU gives the same outputs and gradients (max and ReLU commute) on a 4x smaller map.
        layers += [nn.MaxPool2d(2, ceil_mode=True), nn.ReLU()]
    features = size_in
    if global_pool == "flatten":
        height, width = input_shape[1:]
        for _ in channels:
            height, width = -(-height // 2), -(-width // 2)  # each ceil-mode pool halves, rounding up
        features *= height * width
    else:
        layers.append(GeneralizedMeanPool() if global_pool == "gem" else nn.AdaptiveAvgPool2d(1))
    layers.append(nn.Flatten())
    if drop_rate:  # no module at 0: the default network keeps its layers' indices, so saved weights still load
        layers.append(nn.Dropout(drop_rate))
    layers.append(nn.Linear(features, embedding_dim))
    return nn.Sequential(*layers)


@register_encoder("resnet18")
def resnet18(*, embedding_dim: int, input_shape: tuple[int, int, int], pretrained: bool = False) -> nn.Module:
    """torchvision's ResNet-18 for small C-channel images: 3x3 stride-1 stem, no max-pool, linear head.

    ``pretrained=True`` loads torchvision's ImageNet weights (needs a network the first time);
    the replaced stem and head start from scratch either way.
    """
    import torchvision  # imported here: it takes a second that commands which build no model need not pay

    _check(embedding_dim, input_shape)
    weights = torchvision.models.ResNet18_Weights.DEFAULT if pretrained else None
    model = torchvision.models.resnet18(weights=weights)
    # The ImageNet stem (7x7 stride 2 + max-pool) would shrink a 28x28 image to 7x7 before the first block.
    model.conv1 = nn.Conv2d(input_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    model.fc = nn.Linear(model.fc.in_features, embedding_dim)
    return model


@register_encoder("siamese-conv")
def siamese_conv(
    *,
    embedding_dim: int,
    input_shape: tuple[int, int, int],
    channels: tuple[int, ...] = (32, 64, 128, 256),
    kernels: tuple[int, ...] = (7, 5, 3, 1, 1),
) -> nn.Module:
    """The conv tower of the TensorFlow MNIST Siamese example: conv 7x7x32, 5x5x64, 3x3x128, 1x1x256, 1x1x2.

    Each convolution ('same' padding, Xavier-uniform initialisation; ReLU except after the last) is
    followed by 2x2 max-pooling (ceil mode, so 28 -> 14 -> 7 -> 4 -> 2 -> 1), and the 1x1 map is
    flattened: a 2-D output for ``embedding_dim=2``, the last convolution's width.
    """
    _check(embedding_dim, input_shape)
    sizes = [input_shape[0], *channels, embedding_dim]
    if len(kernels) != len(sizes) - 1:
        raise MetricLabError(f"siamese-conv needs one kernel size per convolution: {len(sizes) - 1}, got {kernels}")
    layers: list[nn.Module] = []
    for i, (size_in, size_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Conv2d(size_in, size_out, kernels[i], padding="same"))
        if i < len(kernels) - 1:
            layers.append(nn.ReLU())
        layers.append(nn.MaxPool2d(2, ceil_mode=True))
    layers += [nn.AdaptiveMaxPool2d(1), nn.Flatten()]  # a no-op on MNIST (1x1 already); fits larger images
    tower = nn.Sequential(*layers)
    for conv in tower:
        if isinstance(conv, nn.Conv2d):  # the example's initialisation: Xavier-uniform weights, zero biases
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
    return tower


# -- families: timm and torchvision backbones with an embedding head ------------------------------------


def _timm_models() -> list[str]:
    import timm

    return timm.list_models()


def _torchvision_models() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _choose_weights(family: str, name: str, pretrained: bool, weights: str | None) -> None:
    if pretrained and weights:
        raise MetricLabError(
            f"{family}:{name}: pass either pretrained=true (download) or weights=PATH (local file), not both"
        )


def _download_failed(family: str, name: str, err: Exception) -> MetricLabError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    cached = ""
    if family == "timm":  # timm downloads through huggingface_hub, which retries an unreachable host ~25 s a file
        from huggingface_hub import is_offline_mode

        if not is_offline_mode():
            cached = "; if they are in the Hugging Face cache, HF_HUB_OFFLINE=1 reads them at once"
    return MetricLabError(
        f"could not get the pretrained weights of {family}:{name} ({first}); without a network, download them "
        f"on another machine and pass weights=PATH (a .safetensors or .pth file){cached}"
    )


def _head(features: int, embedding_dim: int | None, batch_norm: bool, dropout: float, normalize: bool) -> EmbeddingHead:
    if embedding_dim is not None and embedding_dim < 1:
        raise MetricLabError(f"embedding_dim must be at least 1 or None (keep the backbone's), got {embedding_dim}")
    if not 0 <= dropout < 1:
        raise MetricLabError(f"dropout must be in [0, 1), got {dropout}")
    return EmbeddingHead(features, embedding_dim, batch_norm=batch_norm, dropout=dropout, normalize=normalize)


@register_encoder_family("timm", members=_timm_models)
def timm_encoder(
    model_name: str,
    *,
    embedding_dim: int | None,
    input_shape: tuple[int, int, int],
    pretrained: bool = False,
    weights: str | None = None,
    batch_norm: bool = False,
    dropout: float = 0.0,
    normalize: bool = False,
    **model_args: Any,
) -> BackboneEncoder:
    """A timm model (``timm.create_model(model_name, num_classes=0, in_chans=C, **model_args)``) + embedding head.

    Models with a fixed input size (ViTs) are built for the dataset's image size unless ``img_size`` is given.
    """
    import timm
    from timm.data import resolve_data_config
    from timm.models import adapt_input_conv

    _choose_weights("timm", model_name, pretrained, weights)
    args = {"num_classes": 0, "in_chans": input_shape[0], **model_args}
    cfg = _timm_config(model_name)
    if cfg is not None and cfg.fixed_input_size and "img_size" not in model_args:
        args["img_size"] = tuple(input_shape[1:])
    try:
        backbone = timm.create_model(model_name, pretrained=pretrained, **args)
    except (OSError, RuntimeError) as err:  # hub download errors are OSErrors (connection, missing file)
        if not pretrained:
            raise
        raise _download_failed("timm", model_name, err) from err
    record = None
    if pretrained:
        source = backbone.pretrained_cfg
        record = {"hub": source.get("hf_hub_id") or source.get("url"), "tag": source.get("tag"), "library": "timm"}
    elif weights:
        first_conv = f"{backbone.pretrained_cfg.get('first_conv')}.weight"
        classifier = backbone.pretrained_cfg.get("classifier") or "head"
        classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)

        # timm's loader passes a checkpoint through its model's filter (a ViT's position embedding resampled to
        # the image size built for, original checkpoints' keys renamed); a local file gets the same treatment.
        timm_filter = getattr(sys.modules[type(backbone).__module__], "checkpoint_filter_fn", None)

        def adapt(state: dict) -> dict:  # 3-channel weights for a C-channel input, as timm's own loader does
            if timm_filter is not None:
                state = timm_filter(state, backbone)
            if first_conv in state and state[first_conv].shape[1] != input_shape[0]:
                state[first_conv] = adapt_input_conv(input_shape[0], state[first_conv])
            return state

        record = load_backbone_weights(backbone, weights, ignore=tuple(f"{c}." for c in classifiers), adapt=adapt)
    data = resolve_data_config({}, model=backbone)
    data_config = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
    # What the network was built for: the dataset's channels and image size (a ViT's img_size where given);
    # the pretrained weights' own size stays on record.
    data_config["pretrained_input_size"] = data_config["input_size"]
    size = args.get("img_size", input_shape[1:])
    size = [size, size] if isinstance(size, int) else list(size)
    data_config["input_size"] = [input_shape[0], *size]
    # The pooled features' width: timm 1.0's head_hidden_size where a model's pre-logits widen them (MobileNetV3's
    # conv head, MambaOut, a "catavgmax" pool), else num_features.
    features = getattr(backbone, "head_hidden_size", None) or backbone.num_features
    head = _head(features, embedding_dim, batch_norm, dropout, normalize)
    return BackboneEncoder(backbone, head, data_config, record, channels=input_shape[0])


def _timm_config(model_name: str) -> Any:
    """timm's pretrained config of ``model_name`` (``arch`` or ``arch.tag``: the tag's own), None if it has none."""
    from timm.models import get_pretrained_cfg

    try:
        return get_pretrained_cfg(model_name)
    except RuntimeError:  # an unknown tag: timm.create_model says so
        return None


def _timm_preprocessing(model_name: str) -> dict[str, Any]:
    """How the timm model's pretrained weights saw images: ``image_size``, ``crop_fraction``, ``interpolation``."""
    cfg = _timm_config(model_name)
    if cfg is None:
        return {}
    out: dict[str, Any] = {"image_size": int(cfg.input_size[-1])} if cfg.input_size else {}
    if cfg.crop_pct:
        out["crop_fraction"] = float(cfg.crop_pct)
    if cfg.interpolation in ("bilinear", "bicubic", "nearest"):
        out["interpolation"] = cfg.interpolation
    return out


# Read by metriclab.models.backbone_preprocessing: the image size a recipe that names none trains at, and the
# crop and interpolation of a pretrained backbone's transforms.
timm_encoder.preprocessing = _timm_preprocessing


@register_encoder_family("torchvision", members=_torchvision_models)
def torchvision_encoder(
    model_name: str,
    *,
    embedding_dim: int | None,
    input_shape: tuple[int, int, int],
    pretrained: bool = False,
    weights: str | None = None,
    batch_norm: bool = False,
    dropout: float = 0.0,
    normalize: bool = False,
    **model_args: Any,
) -> BackboneEncoder:
    """A torchvision classification model (``torchvision.models.get_model``) without its classifier + embedding head.

    The classifier (the model's last ``nn.Linear``) is replaced by the head; images with fewer than three
    channels are repeated to three, as the library's models expect.
    """
    import torchvision

    _choose_weights("torchvision", model_name, pretrained, weights)
    enum = torchvision.models.get_model_weights(model_name).DEFAULT
    try:
        backbone = torchvision.models.get_model(model_name, weights=enum if pretrained else None, **model_args)
    except (OSError, RuntimeError) as err:  # torch.hub's download: URLError is an OSError
        if not pretrained:
            raise
        raise _download_failed("torchvision", model_name, err) from err
    linears = [(n, m) for n, m in backbone.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise MetricLabError(f"torchvision:{model_name} has no linear classifier to replace; use a timm model instead")
    linear_name, linear = linears[-1]
    parent = backbone.get_submodule(linear_name.rpartition(".")[0]) if "." in linear_name else backbone
    setattr(parent, linear_name.rpartition(".")[2], nn.Identity())
    record = {"hub": enum.url, "library": "torchvision"} if pretrained else None
    if weights:
        record = load_backbone_weights(backbone, weights, ignore=(f"{linear_name}.",))
    preset = enum.transforms()
    data_config = {
        "input_size": [3, *input_shape[1:]],  # what the network is built for, as timm backbones record it
        "pretrained_input_size": [3, *([preset.crop_size[0]] * 2)],
        "interpolation": preset.interpolation.value,
        "mean": list(preset.mean),
        "std": list(preset.std),
        "resize_size": list(preset.resize_size),
    }
    head = _head(linear.in_features, embedding_dim, batch_norm, dropout, normalize)
    return BackboneEncoder(backbone, head, data_config, record, channels=3)


def _torchvision_preprocessing(model_name: str) -> dict[str, Any]:
    """How torchvision evaluates the model's default weights (their transforms preset, which the encoder records
    too): ``image_size``, ``crop_fraction``, ``interpolation``."""
    import torchvision

    try:
        preset = torchvision.models.get_model_weights(model_name).DEFAULT.transforms()
    except (ValueError, KeyError):  # not a torchvision model: building it says so
        return {}
    crop, resize = preset.crop_size[0], preset.resize_size[0]
    return {"image_size": crop, "crop_fraction": crop / resize, "interpolation": preset.interpolation.value}


torchvision_encoder.preprocessing = _torchvision_preprocessing
