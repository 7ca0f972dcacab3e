"""Datasets as in-memory tensors: the contract between dataset plugins and the engine.

MNIST-sized data fits in memory (and on a GPU) whole, so a dataset is four tensors and
the engine indexes batches directly; no DataLoader, no per-sample transforms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Dataset:
    """A train/test split of images and labels, plus where it really came from.

    Images are ``uint8`` tensors of shape ``(N, C, H, W)``; labels are ``int64`` of
    shape ``(N,)`` with values in ``range(len(classes))``. ``source`` names the files,
    package or URL the data was read from, and ``notice`` (if set) is shown to the
    user, e.g. when a smaller fallback replaced the requested data.
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    source: str
    notice: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one image, ``(C, H, W)``."""
        return tuple(self.train_images.shape[1:])

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)`` of the ``'train'`` or ``'test'`` split."""
        if name == "train":
            return self.train_images, self.train_labels
        if name == "test":
            return self.test_images, self.test_labels
        raise ValueError(f"unknown split {name!r}; use 'train' or 'test'")

    def describe(self) -> dict:
        """JSON-ready summary recorded in a run's config.json."""
        return {
            "name": self.name,
            "source": self.source,
            "notice": self.notice,
            "train_size": int(self.train_labels.numel()),
            "test_size": int(self.test_labels.numel()),
            "input_shape": list(self.input_shape),
            "classes": self.classes,
        }
