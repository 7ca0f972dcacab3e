"""The images of given sample indices, on either data path: ``ImageSource(dataset, split)(batches)``.

The engine and evaluation never touch files or tensors of images directly: they hand a list of
index batches (from :mod:`metriclab.data.sampling`) to an image source and get, batch by batch,
``uint8 (n, C, H, W)`` tensors on the device. A resident :class:`~metriclab.data.Dataset` indexes
its tensor; a :class:`~metriclab.data.images.StreamingDataset` decodes and transforms files in
``torch.utils.data.DataLoader`` worker processes, which receive the very same index batches as a
batch sampler, so both paths give identical batches for one epoch order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from metriclab.data.dataset import Dataset
from metriclab.data.images import StreamingDataset, prepared
from metriclab.errors import MetricLabError


class DecodedFiles(torch.utils.data.Dataset):
    """Map-style torch dataset: item ``i`` is file ``i`` decoded and transformed (run in a worker)."""

    def __init__(
        self, paths: Sequence[str], transform: Callable | None, channels: int, boxes: torch.Tensor | None = None
    ) -> None:
        self.paths, self.transform, self.channels, self.boxes = list(paths), transform, channels, boxes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int | tuple[int, int]) -> torch.Tensor:
        """File ``item``, or ``(index, seed)``: file ``index`` with its random transform drawn from ``seed``."""
        index, seed = item if isinstance(item, tuple) else (item, None)
        has_box = self.boxes is not None and self.boxes[index, 0] >= 0  # the region of interest only
        box = self.boxes[index].tolist() if has_box else None
        if seed is None:
            return prepared(self.paths[index], self.channels, box, self.transform)
        # The CPU generator only (torch.manual_seed would seed every CUDA device too: 60 us against 1 us), and the
        # process's own state restored after (the training process's, with 0 workers).
        state = torch.get_rng_state()
        torch.default_generator.manual_seed(seed)
        try:
            return prepared(self.paths[index], self.channels, box, self.transform)
        finally:
            torch.set_rng_state(state)


_WRAPPED = "metriclab.errors.MetricLabError: "


class _Plan(torch.utils.data.Sampler):
    """The batch sampler of a persistent DataLoader: whatever list of index batches was set last."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def is_streaming(dataset: object) -> bool:
    """Whether ``dataset`` streams its images from files (else it holds them as tensors)."""
    return bool(getattr(dataset, "streaming", False))


class ImageSource:
    """``source(batches)`` yields the images of each index batch of one split, as ``uint8`` on ``device``."""

    def __init__(
        self,
        dataset: Dataset | StreamingDataset,
        split: str,
        device: torch.device | str = "cpu",
        augment: bool = False,
        num_workers: int = 2,
        prefetch_factor: int = 2,
    ) -> None:
        self.device = torch.device(device)
        self.streaming = is_streaming(dataset)
        if self.streaming:
            files = dataset.files(split)
            transform = dataset.train_transform if augment else dataset.test_transform
            self.files = DecodedFiles(files.paths, transform, dataset.channels, files.boxes)
            self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
            self.images = None
            self.plan, self.loader = _Plan(), None  # workers start on first use and stay for later calls
        else:
            self.images = dataset.split(split)[0].to(self.device)

    def __call__(
        self, batches: Sequence[torch.Tensor], seeds: Sequence[Sequence[int]] | None = None
    ) -> Iterator[torch.Tensor]:
        """The images of each batch of indices, in order; streamed ahead by the workers.

        ``seeds`` (one per image, :func:`metriclab.data.sampling.augmentation_seeds`) draw the random transforms
        of files, so they do not depend on which worker decodes an image or on where a resumed run restarted.
        """
        if not self.streaming:
            for batch in batches:
                yield self.images[batch.to(self.device)]
            return
        if seeds is None:
            self.plan.batches = [batch.tolist() for batch in batches]
        else:
            self.plan.batches = [list(zip(b.tolist(), s, strict=True)) for b, s in zip(batches, seeds, strict=True)]
        if not self.plan.batches:
            return
        if self.loader is None:
            self.loader = DataLoader(
                self.files,
                batch_sampler=self.plan,
                num_workers=self.num_workers,
                pin_memory=self.device.type == "cuda",
                prefetch_factor=self.prefetch_factor if self.num_workers else None,
                persistent_workers=self.num_workers > 0,  # no start-up cost per epoch
            )
        try:
            for images in self.loader:
                yield images.to(self.device, non_blocking=True)
        except MetricLabError as err:  # raised in a worker: the DataLoader wraps it in the worker's traceback
            raise MetricLabError(str(err).strip().splitlines()[-1].removeprefix(_WRAPPED)) from None

    def close(self) -> None:
        """Stop the worker processes (they stay between calls); a later call starts new ones."""
        self.loader = None  # its persistent iterator shuts its workers down when released

    def take(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """``uint8 (n, C, H, W)`` images at ``indices`` on the CPU (test-time transform for files)."""
        index = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if not self.streaming:
            return self.images[index.to(self.device)].cpu()
        if index.numel() == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.stack([self.files[i] for i in index.tolist()])


def chunks(n: int, size: int, indices: torch.Tensor | None = None) -> list[torch.Tensor]:
    """``range(n)`` (or ``indices``) cut into batches of ``size``."""
    indices = torch.arange(n) if indices is None else indices
    return list(indices.split(size))


def statistics_sample(
    dataset: Dataset | StreamingDataset, num_workers: int = 0, max_images: int = 1024
) -> torch.Tensor:
    """``uint8`` images to fit the network's input standardisation on.

    All train images of a resident dataset; an evenly spaced sample of at most ``max_images`` train
    files (test-time transform) of a streaming one, so start-up time does not grow with the dataset.
    """
    if not is_streaming(dataset):
        return dataset.train_images
    n = len(dataset.train)
    index = torch.linspace(0, n - 1, min(n, max_images)).round().long().unique()
    source = ImageSource(dataset, "train", num_workers=num_workers)
    return torch.cat(list(source(list(index.split(128)))))
