"""Datasets as in-memory tensors: the contract between dataset plugins and the engine.

MNIST-sized data fits in memory (and on a GPU) whole, so a dataset is four tensors and
the engine indexes batches directly; no DataLoader, no per-sample transforms.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from metriclab.errors import MetricLabError


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


# The four files of an MNIST-style dataset, keyed by the role they play in a Dataset.
IDX_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# idx type codes (third magic byte) as big-endian numpy dtypes; same table as torchvision's
# SN3_PASCALVINCENT_TYPEMAP, but numpy swaps the byte order for us on load.
_IDX_DTYPES: dict[int, str] = {8: ">u1", 9: ">i1", 11: ">i2", 12: ">i4", 13: ">f4", 14: ">f8"}


def default_data_dir() -> Path:
    """Where datasets are cached: ``$METRICLAB_DATA`` if set, else ``~/.cache/metriclab/data`` (not created)."""
    env = os.environ.get("METRICLAB_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "metriclab" / "data"


def read_idx(path: str | Path) -> torch.Tensor:
    """The array stored in an idx file (raw or ``.gz``) as a tensor of its header's shape and dtype.

    Raises MetricLabError naming the file if it cannot be decompressed, has a wrong magic
    number, or its size does not match its header (e.g. a truncated download).
    """
    # torchvision's read_sn3_pascalvincent_tensor takes only uncompressed paths and checks with
    # assert (and not at all with strict=False), so the 4 + 4*ndim byte header is parsed here.
    path = Path(path)
    fix = "delete it and download it again, or pass --data-dir with intact idx files"
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise MetricLabError(f"cannot read idx file {path} ({err}); {fix}") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES or not 1 <= data[3] <= 4:
        raise MetricLabError(
            f"{path} is not an idx file: magic bytes {data[:4].hex() or 'missing'} (expected 0000 08 01..04, "
            f"e.g. 00000803 for images); it is corrupt or in another format, {fix}"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise MetricLabError(f"{path} is truncated inside its header ({len(data)} bytes); {fix}")
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = header + math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        problem = "is truncated" if len(data) < expected else "has trailing bytes"
        raise MetricLabError(
            f"{path} {problem}: its header promises shape {tuple(shape)} ({expected} bytes) "
            f"but it has {len(data)} bytes; {fix}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).astype(dtype.newbyteorder("="))
    return torch.from_numpy(array.reshape(shape))


def find_idx_files(directory: str | Path, prefix_candidates: Sequence[str] = ("", "MNIST/raw")) -> dict[str, Path]:
    """Paths of the four MNIST-style idx files (role -> path, see ``IDX_FILES``) found under ``directory``.

    Each candidate subfolder of ``directory`` (``""`` is the folder itself, ``"MNIST/raw"`` is
    torchvision's layout) is searched for each file, raw or ``.gz`` (raw preferred: torchvision
    keeps both after extracting). The folder holding the most files wins, earlier candidates
    on ties; the result may be incomplete, so check ``len(result) == 4``.
    """
    best: dict[str, Path] = {}
    for prefix in prefix_candidates:
        folder = Path(directory).expanduser() / prefix
        found = {}
        for role, name in IDX_FILES.items():
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    found[role] = candidate
                    break
        if len(found) > len(best):
            best = found
    return best


def load_idx_dataset(
    name: str,
    directory: str | Path,
    classes: list[str],
    prefix_candidates: Sequence[str] = ("", "MNIST/raw"),
) -> Dataset:
    """The Dataset stored as the four idx files under ``directory`` (see ``find_idx_files``).

    Images become ``uint8 (N, 1, H, W)``, labels ``int64``; ``source`` lists the files read.
    Raises MetricLabError if a file is missing or corrupt, or images and labels disagree.
    """
    files = find_idx_files(directory, prefix_candidates)
    missing = [IDX_FILES[role] for role in IDX_FILES if role not in files]
    if missing:
        folders = ", ".join(str(Path(directory).expanduser() / p) for p in prefix_candidates)
        raise MetricLabError(
            f"{name}: {', '.join(missing)} (raw or .gz) not found in {folders}; "
            "put all four idx files into one of these folders or pass --data-dir with them"
        )
    tensors = {role: read_idx(path) for role, path in files.items()}
    for split in ("train", "test"):
        images, labels = tensors[f"{split}_images"], tensors[f"{split}_labels"]
        image_path, label_path = files[f"{split}_images"], files[f"{split}_labels"]
        if images.dtype != torch.uint8 or images.dim() != 3:
            raise MetricLabError(
                f"{image_path} holds {images.dtype} of shape {tuple(images.shape)}, not uint8 images (N, H, W); "
                "check that the images and labels files were not swapped or replace the file"
            )
        if labels.dim() != 1 or labels.dtype.is_floating_point:
            raise MetricLabError(
                f"{label_path} holds {labels.dtype} of shape {tuple(labels.shape)}, not integer labels (N,); "
                "check that the images and labels files were not swapped or replace the file"
            )
        if len(images) != len(labels):
            raise MetricLabError(
                f"{name}: {image_path} has {len(images)} images but {label_path} has {len(labels)} labels; "
                "the two files come from different versions or one is damaged, replace both from the same source"
            )
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
            raise MetricLabError(
                f"{label_path} has labels outside 0..{len(classes) - 1} for the {len(classes)} classes of {name}; "
                "point --data-dir at the files of this dataset"
            )
    return Dataset(
        name=name,
        train_images=tensors["train_images"].unsqueeze(1),
        train_labels=tensors["train_labels"].long(),
        test_images=tensors["test_images"].unsqueeze(1),
        test_labels=tensors["test_labels"].long(),
        classes=list(classes),
        source="idx files " + ", ".join(str(files[role]) for role in IDX_FILES),
        extra={"files": {role: str(path) for role, path in files.items()}},
    )
