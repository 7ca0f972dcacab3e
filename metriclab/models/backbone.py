"""A pretrained backbone with an embedding head: what fine-tuning trains.

The encoder families ``timm:<model>`` and ``torchvision:<model>`` (``metriclab_plugins.encoders``)
return a :class:`BackboneEncoder`: the library's network without its classifier, giving pooled
features, then an :class:`EmbeddingHead`. The engine tells the two apart by these attribute names
(``backbone``, ``head``): the backbone can be frozen for the first epochs or steps and trained at a
smaller learning rate (``metriclab.training.optimization``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


class EmbeddingHead(nn.Module):
    """Pooled features ``(N, F)`` -> (BatchNorm) -> (dropout) -> linear to ``embedding_dim`` -> (L2 normalisation).

    ``embedding_dim=None`` keeps the ``F`` features (no linear layer); ``normalize`` projects onto the unit sphere.
    """

    def __init__(
        self,
        in_features: int,
        embedding_dim: int | None,
        *,
        batch_norm: bool = False,
        dropout: float = 0.0,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(in_features) if batch_norm else nn.Identity()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.linear = nn.Linear(in_features, embedding_dim) if embedding_dim is not None else nn.Identity()
        self.normalize = normalize
        self.embedding_dim = embedding_dim if embedding_dim is not None else in_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(N, embedding_dim)``."""
        x = self.linear(self.dropout(self.norm(features.flatten(1))))
        return F.normalize(x, dim=1) if self.normalize else x


class BackboneEncoder(nn.Module):
    """``head(backbone(images))``, with what the backbone expects as input and which weights it started from.

    ``data_config`` is the backbone's own input size, mean, std and interpolation (timm's
    ``resolve_data_config``); ``weights`` says which weights were loaded (``{"hub": ...}`` or
    ``{"file": ..., "sha256": ...}``), or is None for random initialisation. Both go into config.json.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: EmbeddingHead,
        data_config: dict[str, Any],
        weights: dict[str, Any] | None,
        channels: int = 3,
    ) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        self.data_config, self.weights = data_config, weights
        self.embedding_dim = head.embedding_dim
        self.channels = channels  # what the backbone takes; grey images are repeated to it

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(N, embedding_dim)`` of standardised images ``(N, C, H, W)``."""
        if images.shape[1] != self.channels:
            images = images.expand(-1, self.channels, -1, -1)
        return self.head(self.backbone(images))
