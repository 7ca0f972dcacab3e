"""Datasets of image files, streamed instead of held in memory: the contract and its checks.

A :class:`StreamingDataset` is what a dataset plugin returns for data that does not fit in
memory (folders of photos): per split, file paths and integer labels (plus, optionally, which
test images are queries and which are gallery, and a category per image). Labels live in
memory (they are small); images are decoded and transformed by DataLoader workers
(:mod:`metriclab.data.loader`) as the epoch order asks for them. The resident
:class:`metriclab.data.Dataset` stays for MNIST-sized data; the engine picks the path by type.

Bad data is found before training: :func:`check_files` reads each file's header and
:func:`report_problems` raises one MetricLabError with one line per problem.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from metriclab.errors import MetricLabError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".pgm", ".ppm")
BOX_COLUMNS = ("x_1", "y_1", "x_2", "y_2")  # open-metric-learning's optional crop of a CSV row, in pixels
# A CSV's empty cells as pandas, R and spreadsheets write them (pandas reads these as missing, as OML does)
MISSING = frozenset({"", "nan", "none", "na", "n/a", "null", "<na>"})
TRUE, FALSE = frozenset({"true", "1", "yes", "t", "1.0"}), frozenset({"false", "0", "no", "f", "0.0"}) | MISSING
MAX_REPORTED = 20  # problems listed one per line; more are counted


def image_files(folder: str | os.PathLike) -> list[str]:
    """Sorted paths of the image files (:data:`IMAGE_SUFFIXES`) in ``folder`` and its sub-folders.

    Hidden files and folders (``.DS_Store``, macOS's ``._photo.jpg`` companions, ``.ipynb_checkpoints``) are
    left out; links are followed, as torchvision's ``ImageFolder`` does.
    """
    found = []
    for parent, folders, names in os.walk(folder, followlinks=True):
        folders[:] = [f for f in folders if not f.startswith(".")]
        found += [
            os.path.join(parent, n)
            for n in names
            if not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_SUFFIXES
        ]
    return sorted(found)


@dataclass
class ImageFiles:
    """One split as files: ``paths[i]`` has label ``labels[i]``; optional query/gallery marks and categories."""

    paths: list[str]
    labels: torch.Tensor
    is_query: torch.Tensor | None = None  # bool (N,): the image is searched for (In-Shop protocol)
    is_gallery: torch.Tensor | None = None  # bool (N,): the image is searched in
    categories: list[str] | None = None
    boxes: torch.Tensor | None = None  # int64 (N, 4): x1, y1, x2, y2 of the region to crop; -1 where none

    def __len__(self) -> int:
        return len(self.paths)

    def marks(self) -> tuple[Any, Any]:
        """``(is_query, is_gallery)`` as numpy bool arrays, or ``(None, None)`` where the split marks none."""
        if self.is_query is None or self.is_gallery is None:
            return None, None
        return self.is_query.numpy(), self.is_gallery.numpy()


@dataclass
class StreamingDataset:
    """A train/test split of image files, decoded and transformed on the fly.

    ``image_size`` and the transforms are set by :func:`metriclab.data.load_dataset` from the
    recipe: a transform takes a ``uint8 (C, H, W)`` tensor and returns ``uint8 (C, S, S)``
    with ``S = image_size``. ``channels`` is 3 (colour; grey images are repeated) or 1.
    """

    streaming: ClassVar[bool] = True

    name: str
    train: ImageFiles
    test: ImageFiles
    classes: list[str]
    source: str
    channels: int = 3
    image_size: int = 224
    notice: str | None = None
    extra: dict = field(default_factory=dict)
    train_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    test_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    transforms: dict = field(default_factory=dict)  # {"train": {"name", "args"}, "test": ...} as recorded

    @property
    def train_labels(self) -> torch.Tensor:
        return self.train.labels

    @property
    def test_labels(self) -> torch.Tensor:
        return self.test.labels

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one transformed image, ``(C, S, S)``."""
        return (self.channels, self.image_size, self.image_size)

    def files(self, name: str) -> ImageFiles:
        """The files of the ``'train'`` or ``'test'`` split."""
        if name not in ("train", "test"):
            raise ValueError(f"unknown split {name!r}; use 'train' or 'test'")
        return self.train if name == "train" else self.test

    def describe(self) -> dict:
        """JSON-ready summary recorded in a run's config.json (the test-time transform included)."""
        test = self.test
        protocol = "query/gallery" if test.is_query is not None and test.is_gallery is not None else "leave-one-out"
        return {
            "name": self.name,
            "source": self.source,
            "notice": self.notice,
            "streaming": True,
            "train_size": len(self.train),
            "test_size": len(self.test),
            "input_shape": list(self.input_shape),
            "classes": self.classes,
            "transforms": self.transforms,
            "protocol": protocol,
            "categories": test.categories is not None,  # scored per category too (by_category)
            "skipped": self.extra.get("skipped", {"count": 0, "files": []}),
        }


def decode(path: str, channels: int = 3) -> torch.Tensor:
    """The image at ``path`` as ``uint8 (channels, H, W)``; libjpeg-turbo/libpng through torchvision, else Pillow.

    Whatever the file holds: an animation gives its first frame, 16-bit pixels are scaled to 8 bits, and
    grey is Pillow's luma of the colours (``convert("L")``), whatever the format.
    """
    from torchvision.io import ImageReadMode, decode_image, read_file

    try:  # in colour: libpng's and libjpeg's own grey conversions differ from Pillow's, and GIF and WebP have none
        image = decode_image(read_file(path), mode=ImageReadMode.RGB)
    except RuntimeError:  # formats torchvision does not decode (BMP, TIFF, PNM) and damaged files: Pillow decides
        import numpy as np
        from PIL import Image

        try:
            with Image.open(path) as opened:
                if opened.mode == "I" or opened.mode.startswith("I;16"):  # 16-bit grey (TIFF, PGM): Pillow's convert
                    # would clip it to white
                    top = np.clip(np.asarray(opened), 0, 65535) >> 8
                    opened = Image.fromarray(top.astype(np.uint8))
                array = np.asarray(opened.convert("RGB"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # Pillow's ways of refusing
            raise MetricLabError(
                f"image {path} cannot be decoded ({err}); replace or delete it, or pass "
                "--dataset-args skip_unreadable=true"
            ) from err
        image = torch.from_numpy(array.copy()).permute(2, 0, 1)
    if image.dim() == 4:  # an animated GIF: (frames, C, H, W)
        image = image[0]
    if image.dtype != torch.uint8:  # 16-bit PNG
        from torchvision.transforms.v2.functional import to_dtype

        image = to_dtype(image, torch.uint8, scale=True)
    if channels == 3:
        return image
    # Pillow's ITU-R 601-2 luma, rounded (torchvision's rgb_to_grayscale truncates: grey 1 becomes 0)
    red, green, blue = image.to(torch.int32)
    return ((red * 19595 + green * 38470 + blue * 7471 + 0x8000) >> 16).to(torch.uint8).unsqueeze(0)


def prepared(
    path: str, channels: int, box: Sequence[int] | None = None, transform: Callable | None = None
) -> torch.Tensor:
    """The image at ``path`` as a run sees it: decoded, cut to ``box`` (x1, y1, x2, y2) if given, then transformed."""
    image = decode(path, channels)
    if box is not None:
        x1, y1, x2, y2 = box
        image = image[:, y1:y2, x1:x2]
    return transform(image) if transform is not None else image


def read_csv(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    """``(rows, columns)`` of a UTF-8 CSV file (a spreadsheet's byte-order mark is dropped).

    Raises MetricLabError when it cannot be read, or when some but not all of the crop columns
    :data:`BOX_COLUMNS` are there (open-metric-learning needs all four).
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows, columns = list(reader), list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise MetricLabError(f"cannot read {path} ({err}); pass a readable UTF-8 CSV file") from err
    boxes = [c for c in BOX_COLUMNS if c in columns]
    if 0 < len(boxes) < len(BOX_COLUMNS):
        missing = ", ".join(c for c in BOX_COLUMNS if c not in columns)
        raise MetricLabError(
            f"{path} has the crop column(s) {', '.join(boxes)} but not {missing}; give all four or none"
        )
    return rows, columns


def csv_flag(value: str | None) -> bool | None:
    """A CSV cell of ``is_query``/``is_gallery`` as a bool (an empty cell is False), None when it is not one."""
    text = (value or "").strip().lower()
    return True if text in TRUE else False if text in FALSE else None


def crop_box(row: Mapping[str, str | None]) -> list[int] | None:
    """``[x1, y1, x2, y2]`` of a CSV row's crop columns (:data:`BOX_COLUMNS`), None when all four are empty.

    Raises ValueError, naming the cells, when they are not four numbers or not a region
    (``0 <= x1 < x2`` and ``0 <= y1 < y2``).
    """
    cells = [(row[c] or "").strip() for c in BOX_COLUMNS]
    if all(c.lower() in MISSING for c in cells):
        return None
    try:
        x1, y1, x2, y2 = (round(float(c)) for c in cells)
    except (ValueError, OverflowError):  # not a number, NaN or infinite
        raise ValueError(f"crop {', '.join(cells)} (x_1, y_1, x_2, y_2) is not four numbers") from None
    if not (0 <= x1 < x2 and 0 <= y1 < y2):
        raise ValueError(f"crop x_1={x1} x_2={x2} y_1={y1} y_2={y2} is empty or negative")
    return [x1, y1, x2, y2]


def unreadable(path: str) -> str | None:
    """Why the image file at ``path`` cannot be used (missing, unreadable, not an image), or None."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.verify()  # reads the header (and for PNG the chunks' checksums) without decoding
    except FileNotFoundError:
        return "file not found"
    except PermissionError:
        return "permission denied"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"not a readable image ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    return None


def check_files(paths: Sequence[str], where: Sequence[str]) -> list[tuple[int, str]]:
    """``(index, "where: path: why")`` of every file that cannot be read; ``where[i]`` names its row or folder."""
    problems = []
    for i, path in enumerate(paths):
        why = unreadable(path)
        if why is not None:
            problems.append((i, f"{where[i]}: {path}: {why}"))
    return problems


def report_problems(source: str, problems: Sequence[str], fix: str) -> None:
    """Raise one MetricLabError listing ``problems`` one per line (the first ``MAX_REPORTED``), then the fix."""
    if not problems:
        return
    shown = [f"  {p}" for p in problems[:MAX_REPORTED]]
    if len(problems) > MAX_REPORTED:
        shown.append(f"  ... and {len(problems) - MAX_REPORTED} more")
    count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
    raise MetricLabError(f"{source}: {count} in the data; {fix}:\n" + "\n".join(shown))


def drop(files: ImageFiles, bad: set[int]) -> ImageFiles:
    """``files`` without the entries at the indices in ``bad``."""
    keep = [i for i in range(len(files)) if i not in bad]
    index = torch.tensor(keep, dtype=torch.long)

    def pick(mask: torch.Tensor | None) -> torch.Tensor | None:
        return None if mask is None else mask[index]

    return ImageFiles(
        paths=[files.paths[i] for i in keep],
        labels=files.labels[index],
        is_query=pick(files.is_query),
        is_gallery=pick(files.is_gallery),
        categories=None if files.categories is None else [files.categories[i] for i in keep],
        boxes=pick(files.boxes),
    )


def checked(
    name: str,
    splits: dict[str, ImageFiles],
    where: dict[str, list[str]],
    skip_unreadable: bool,
    other_problems: list[str],
) -> tuple[dict[str, ImageFiles], dict[str, Any]]:
    """Splits with unreadable files dropped (``skip_unreadable``) or a MetricLabError listing every problem.

    Returns the splits and the ``skipped`` record (count and files) that config.json keeps.
    """
    problems = list(other_problems)
    bad: dict[str, list[tuple[int, str]]] = {s: check_files(f.paths, where[s]) for s, f in splits.items()}
    unreadable_lines = [line for found in bad.values() for _, line in found]
    if not skip_unreadable:
        problems += unreadable_lines
    fix = "fix or remove them"
    if unreadable_lines and not skip_unreadable:
        fix += " (or pass --dataset-args skip_unreadable=true to train without the unreadable images)"
    report_problems(name, problems, fix)
    out = {s: drop(f, {i for i, _ in bad[s]}) if bad[s] else f for s, f in splits.items()}
    for split, files in out.items():
        if len(files) == 0:
            raise MetricLabError(f"{name}: the {split} split has no readable images; add images to it")
    return out, {"count": len(unreadable_lines), "files": unreadable_lines}
