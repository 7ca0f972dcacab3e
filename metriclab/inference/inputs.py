"""What ``embed`` and ``search`` read: image files, a folder, an open-metric-learning CSV or a dataset split.

One function, :func:`load_images`, turns image files into the model's input (uint8 ``(N, C, H, W)``):
it is the one place that preprocesses a file, so a run's own test-time transform can replace it.
:func:`read_inputs` lists what an ``INPUT`` argument names (paths, labels, split columns) without
reading the pixels, so a folder of a million images streams through :func:`load_images` batch by batch.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from metriclab.data.images import (
    BOX_COLUMNS,
    IMAGE_SUFFIXES,
    ImageFiles,
    crop_box,
    csv_flag,
    decode,
    image_files,
    prepared,
    read_csv,
)
from metriclab.errors import MetricLabError

EMBEDDING_SUFFIXES = (".npz", ".parquet")
# open-metric-learning's dataset CSV: required and optional columns
CSV_REQUIRED = ("label", "path")
CSV_OPTIONAL = ("split", "is_query", "is_gallery", "category")
DECODERS = 8  # threads decoding a batch of image files (at most one per core)


def load_images(
    paths: Sequence[str | Path],
    input_shape: Sequence[int],
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    boxes: np.ndarray | None = None,
    unreadable: list[tuple[int, str]] | None = None,
) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` of image files, decoded on threads.

    ``boxes`` (int64 ``(N, 4)``: x1, y1, x2, y2; -1 where none) crops each image first, as training on a CSV
    with crop columns did. With ``transform`` (a streamed run's test-time transform), each file is decoded as
    the run's dataset decoded it and transformed; without, it is converted to grey (C=1) or RGB (C=3) and
    resized to H x W (bilinear), as for runs trained on arrays. A file that cannot be decoded raises
    :class:`UnreadableImage`; given an ``unreadable`` list, ``(position, why)`` is appended to it instead and
    the image left black.
    """
    channels, height, width = (int(s) for s in input_shape)
    if channels not in (1, 3):
        raise MetricLabError(
            f"the model takes {channels}-channel images, which image files cannot provide; "
            "pass (N, C, H, W) uint8 arrays to embed() instead"
        )
    shape = (channels, height, width)
    out = torch.empty((len(paths), *shape), dtype=torch.uint8)
    if transform is not None:
        read = functools.partial(_transformed, shape=shape, transform=transform)
    else:
        read = functools.partial(_resized, shape=shape)
    crops = [None] * len(paths) if boxes is None else [tuple(map(int, b)) if b[0] >= 0 else None for b in boxes]

    # Decoding (libjpeg, libpng, Pillow) releases the GIL, so threads decode a batch side by side.
    def attempt(path: str | Path, crop: tuple[int, ...] | None) -> torch.Tensor | UnreadableImage:
        try:
            return read(path, crop)
        except UnreadableImage as err:
            if unreadable is None:
                raise
            return err

    with ThreadPoolExecutor(max(1, min(DECODERS, os.cpu_count() or 1, len(paths)))) as pool:
        for i, image in enumerate(pool.map(attempt, paths, crops)):
            if isinstance(image, UnreadableImage):
                unreadable.append((i, str(image)))
                out[i] = 0
            else:
                out[i] = image
    return out


class UnreadableImage(MetricLabError):
    """An image file that is missing or cannot be decoded (a header can look whole over truncated data)."""


def _read(path: str | Path, read: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``read()`` of the image file at ``path``, its failure one line saying what is wrong with the file."""
    if not Path(path).is_file():
        raise UnreadableImage(f"image {path} does not exist; check the path")
    try:
        return read()
    except MetricLabError as err:  # training's wording suggests skip_unreadable, which embedding has not
        raise UnreadableImage(
            f"{path} is not a readable image ({err.__cause__}); replace or remove it (PNG, JPEG and the other "
            "formats Pillow reads are accepted)"
        ) from None


def _resized(path: str | Path, crop: tuple[int, ...] | None, shape: tuple[int, int, int]) -> torch.Tensor:
    from PIL import Image

    channels, height, width = shape
    decoded = _read(path, lambda: decode(str(path), channels))
    image = Image.fromarray(decoded.permute(1, 2, 0).squeeze(2).numpy())
    if crop is not None:
        image = image.crop(crop)
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(pixels.reshape(height, width, channels).transpose(2, 0, 1).copy())


def _transformed(
    path: str | Path,
    crop: tuple[int, ...] | None,
    shape: tuple[int, int, int],
    transform: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    image = _read(path, lambda: prepared(str(path), shape[0], crop, transform))
    if tuple(image.shape) != shape or image.dtype != torch.uint8:
        raise MetricLabError(
            f"the run's test transform made {path} a {image.dtype} {tuple(image.shape)} image, not uint8 {shape}; "
            "check the transform plugin"
        )
    return image


def check_images(images: torch.Tensor | np.ndarray, input_shape: Sequence[int]) -> torch.Tensor:
    """``images`` as a uint8 ``(N, C, H, W)`` tensor, or a MetricLabError saying how they differ from the model's."""
    t = torch.as_tensor(images)
    expected = tuple(int(s) for s in input_shape)
    if t.ndim == len(expected) and t.shape[0] != 0 and expected[0] == 1 and tuple(t.shape[1:]) == expected[1:]:
        t = t.unsqueeze(1)  # (N, H, W) grey images
    if t.ndim != 4 or tuple(t.shape[1:]) != expected:
        wanted = "x".join(map(str, expected))
        raise MetricLabError(
            f"images have shape {tuple(t.shape)} but the model takes (N, {', '.join(map(str, expected))}) "
            f"({wanted}) uint8 images; resize them or pass image files, which are resized"
        )
    if t.dtype != torch.uint8:
        raise MetricLabError(f"images must be uint8 pixels 0..255, got {t.dtype}; convert them first")
    return t


@dataclass
class Inputs:
    """What an input names: image ``paths`` (read lazily) or in-memory ``images``, and what is known about them.

    ``labels`` is None when unknown; ``columns`` holds extra per-item columns (``split``,
    ``is_query``, ``is_gallery`` of a CSV). ``paths`` always has one entry per item (for a dataset,
    ``name:split:index``).
    """

    paths: np.ndarray
    labels: np.ndarray | None = None
    images: torch.Tensor | None = None
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = ""

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, keep: np.ndarray) -> Inputs:
        """The items at indices (or under the mask) ``keep``, with their labels and columns."""
        return Inputs(
            self.paths[keep],
            None if self.labels is None else self.labels[keep],
            None if self.images is None else self.images[torch.as_tensor(keep)],
            {name: values[keep] for name, values in self.columns.items()},
            self.source,
        )

    def batches(
        self,
        input_shape: Sequence[int],
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        unreadable: list[tuple[int, str]] | None = None,
    ) -> Callable[[int, int], torch.Tensor]:
        """A function ``(start, stop) -> uint8 images`` of items ``start:stop`` (files through :func:`load_images`);
        files that cannot be decoded are appended to ``unreadable`` as ``(item, why)`` where it is given."""
        if self.images is not None:
            images = check_images(self.images, input_shape)
            return lambda start, stop: images[start:stop]
        boxes = crop_boxes(self.columns)

        def load(start: int, stop: int) -> torch.Tensor:
            found: list[tuple[int, str]] | None = None if unreadable is None else []
            crops = None if boxes is None else boxes[start:stop]
            images = load_images(self.paths[start:stop], input_shape, transform, crops, found)
            if found:
                unreadable.extend((start + i, why) for i, why in found)
            return images

        return load


def _typed(labels: list[str]) -> np.ndarray:
    """Labels as int64 when every one is an integer (so they match a dataset's), else as strings."""
    try:
        return np.array([int(v) for v in labels], dtype=np.int64)
    except ValueError:
        return np.array(labels)


def _folder(path: Path) -> Inputs:
    files = [Path(f) for f in image_files(path)]
    if not files:
        raise MetricLabError(f"{path} holds no image files ({', '.join(IMAGE_SUFFIXES)}); pass a folder of images")
    # As the image-folder dataset reads it: images in class sub-folders (and their sub-folders) are labelled by the
    # class folder's name, under ROOT/train and ROOT/test too
    parts = [f.relative_to(path).parts for f in files]
    depth = 1 + ((path / "train").is_dir() and (path / "test").is_dir())  # ROOT/<class> or ROOT/<split>/<class>
    labels = None
    if all(len(p) > depth and (depth == 1 or p[0] in ("train", "test")) for p in parts):
        labels = _typed([p[depth - 1] for p in parts])
    return Inputs(np.array([str(f) for f in files]), labels, source=f"folder {path}")


def split_inputs(name: str, split: str, images: torch.Tensor, labels: torch.Tensor) -> Inputs:
    """A dataset split held in memory, its items named ``name:split:index``."""
    paths = np.array([f"{name}:{split}:{i}" for i in range(len(labels))])
    return Inputs(paths, labels.numpy(), images=images, source=f"dataset '{name}', {split} split")


def file_inputs(name: str, split: str, files: ImageFiles, classes: Sequence[str]) -> Inputs:
    """A streamed dataset's split: its image files, with their query/gallery marks, categories and crops.

    Labelled as a folder or a CSV of the same files is (by class folder name, or by the CSV's label), so the
    split can be searched in, or score, embeddings of those.
    """
    columns = {
        column: values.numpy()
        for column, values in (("is_query", files.is_query), ("is_gallery", files.is_gallery))
        if values is not None
    }
    if files.categories is not None:
        columns["category"] = np.array(files.categories)
    if files.boxes is not None:
        columns |= {column: files.boxes[:, i].numpy() for i, column in enumerate(BOX_COLUMNS)}
    source = f"dataset '{name}', {split} split ({len(files)} files)"
    labels = _typed([classes[i] for i in files.labels.tolist()])
    return Inputs(np.array(files.paths), labels, columns=columns, source=source)


def _csv(path: Path) -> Inputs:
    rows, header = read_csv(path)
    missing = [c for c in CSV_REQUIRED if c not in header]
    if missing:
        raise MetricLabError(
            f"{path} lacks the column(s) {', '.join(missing)}; a dataset CSV has columns label, path "
            "(relative to the CSV's folder or absolute), and optionally split, is_query, is_gallery"
        )
    if not rows:
        raise MetricLabError(f"{path} has no rows; a dataset CSV has a header and one row per image")
    for column in CSV_REQUIRED:
        empty = [i + 2 for i, r in enumerate(rows) if not (r[column] or "").strip()]  # line 1 is the header
        if empty:
            raise MetricLabError(
                f"{path}, row {empty[0]}: no {column} ({len(empty)} such rows); give every row a {column}"
            )
    paths = np.array([str(path.parent / Path(r["path"].strip()).expanduser()) for r in rows])
    if len(paths) and not any(os.path.exists(p) for p in paths):  # stops at the first that exists
        raise MetricLabError(
            f"none of the {len(paths)} images of {path} exists (e.g. {paths[0]}): a dataset CSV's relative paths are "
            "read from its own folder; put the CSV in the folder its paths start from, or make them absolute (a "
            "run's own CSV also embeds as csv:train / csv:test, with its dataset_root)"
        )
    labels = _typed([r["label"].strip() for r in rows])
    columns: dict[str, np.ndarray] = {}
    for name in CSV_OPTIONAL:
        if name in header:
            values = [r[name] or "" for r in rows]  # a short row's missing cells are empty
            if name.startswith("is_"):
                flags = [csv_flag(v) for v in values]
                if None in flags:
                    row = flags.index(None)
                    raise MetricLabError(f"{path}, row {row + 2}: {name} {values[row]!r} is not true/false; use 1/0")
                columns[name] = np.array(flags, dtype=bool)
            else:
                columns[name] = np.array(values)
    if all(c in header for c in BOX_COLUMNS):  # columns, so the embedding file keeps the crop that was embedded
        boxes = _boxes(rows, path)
        columns |= {name: boxes[:, i] for i, name in enumerate(BOX_COLUMNS)}
    return Inputs(paths, labels, columns=columns, source=f"CSV {path}")


def crop_boxes(columns: dict[str, np.ndarray]) -> np.ndarray | None:
    """int64 ``(N, 4)`` crops (x1, y1, x2, y2; -1 where none) from per-item ``x_1``..``y_2`` columns; None without."""
    if not all(name in columns for name in BOX_COLUMNS):
        return None
    return np.stack([columns[name] for name in BOX_COLUMNS], axis=1).astype(np.int64)


def _boxes(rows: list[dict], path: Path) -> np.ndarray:
    """int64 ``(N, 4)`` crops of the rows' x_1, y_1, x_2, y_2 cells (pixels; -1 where a row's are empty)."""
    out = np.full((len(rows), 4), -1, dtype=np.int64)
    for i, row in enumerate(rows):
        try:
            box = crop_box(row)
        except ValueError as err:
            raise MetricLabError(
                f"{path}, row {i + 2}: {err}; give four pixel coordinates with x_1 < x_2 and y_1 < y_2, "
                "or leave all four empty"
            ) from None
        if box is not None:
            out[i] = box
    return out


def is_dataset_split(spec: str) -> bool:
    """Whether ``spec`` reads as ``DATASET:SPLIT`` (a registered dataset's train or test split) rather than a path."""
    name, sep, split = spec.rpartition(":")
    return bool(sep and name and split in ("train", "test") and not Path(spec).exists())


def read_inputs(
    spec: str | Path | Sequence[str | Path], dataset_split: Callable[[str, str], Inputs] | None = None
) -> Inputs:
    """The images ``spec`` names: a folder, a dataset CSV, image files, or ``DATASET:SPLIT``.

    ``dataset_split(name, split)`` returns the :class:`Inputs` of a registered dataset's split.
    """
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    if not specs:
        raise MetricLabError("no input given; pass image files, a folder, a dataset CSV or DATASET:SPLIT")
    if len(specs) == 1:
        one = str(specs[0])
        path = Path(one)
        if is_dataset_split(one):
            if dataset_split is None:
                raise MetricLabError(f"'{one}' names a dataset split, which needs a run to load it")
            name, _, split = one.rpartition(":")
            return dataset_split(name, split)
        if path.is_dir():
            return _folder(path)
        if path.suffix.lower() == ".csv":
            if not path.is_file():
                raise MetricLabError(f"{path} does not exist; pass a dataset CSV with columns label, path")
            return _csv(path)
    for s in specs:
        p = Path(s)
        if not p.is_file():
            hint = " (or DATASET:train / DATASET:test)" if ":" in str(s) else ""
            raise MetricLabError(f"{s} is not an image file, folder or dataset CSV{hint}; check the path")
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            raise MetricLabError(f"{s} is not an image ({', '.join(IMAGE_SUFFIXES)}); pass image files")
    return Inputs(np.array([str(s) for s in specs]), source=f"{len(specs)} image file(s)")
