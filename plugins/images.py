"""Built-in datasets of image files: ``image-folder`` (a folder per class) and ``csv`` (open-metric-learning's format).

Both return a :class:`metriclab.data.images.StreamingDataset`: paths and labels, checked before
training (every file's header is read; missing or unreadable files, empty classes, missing columns and
bad labels are listed one per line in one error), then streamed through DataLoader workers.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

import torch

from metriclab.data.images import (
    BOX_COLUMNS,
    IMAGE_SUFFIXES,
    ImageFiles,
    StreamingDataset,
    checked,
    crop_box,
    csv_flag,
    image_files,
    read_csv,
    report_problems,
)
from metriclab.errors import MetricLabError
from metriclab.registry import register_dataset

SPLIT_RULES = ("classes", "images")
CSV_REQUIRED = ("label", "path", "split")
CSV_SPLITS = {"train": "train", "validation": "test"}


def _root(data_dir: str | None, kind: str, what: str) -> Path:
    if data_dir is None:
        raise MetricLabError(f"dataset '{kind}' needs --data-dir {what}")
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise MetricLabError(f"dataset '{kind}': {path} does not exist; pass --data-dir {what}")
    return path


def _check_common(channels: int, train_fraction: float | None = None) -> None:
    if channels not in (1, 3):
        raise MetricLabError(f"channels must be 3 (colour) or 1 (grey), got {channels}")
    if train_fraction is not None and not 0.0 < train_fraction < 1.0:
        raise MetricLabError(f"train_fraction must be between 0 and 1, got {train_fraction}; use e.g. 0.5")


def _class_folders(root: Path) -> tuple[dict[str, list[str]], list[str]]:
    """``({class name: sorted image paths}, problems)`` of ``root/<class>/<image>``, sub-folders included."""
    folders = sorted((e for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")), key=lambda e: e.name)
    found, problems = {}, []
    for folder in folders:
        images = image_files(folder.path)
        if not images:
            problems.append(f"{folder.path}: empty class (no {'/'.join(IMAGE_SUFFIXES)} files)")
        found[folder.name] = images
    return found, problems


def _files(classes: list[str], by_class: dict[str, list[str]]) -> tuple[ImageFiles, list[str]]:
    index = {name: i for i, name in enumerate(classes)}
    paths, labels, where = [], [], []
    for name, images in by_class.items():
        paths += images
        labels += [index[name]] * len(images)
        where += [f"class '{name}'"] * len(images)
    return ImageFiles(paths, torch.tensor(labels, dtype=torch.long)), where


@register_dataset("image-folder")
def image_folder(
    data_dir: str | None = None,
    split: str = "classes",
    train_fraction: float = 0.5,
    seed: int = 0,
    channels: int = 3,
    skip_unreadable: bool = False,
) -> StreamingDataset:
    """Images in ``data_dir/<class>/`` (or ``data_dir/train/<class>/`` and ``data_dir/test/<class>/``), streamed.

    One folder is split by ``split``: ``"classes"`` puts the first ``train_fraction`` of the sorted
    class names in train and the rest in test (the class-disjoint protocol of CUB-200-2011, Cars196 and
    SOP); ``"images"`` splits each class's images, stratified and seeded by ``seed``.
    """
    what = "ROOT with one folder of images per class (or ROOT/train and ROOT/test)"
    root = _root(data_dir, "image-folder", what)
    _check_common(channels, train_fraction)
    if split not in SPLIT_RULES:
        raise MetricLabError(f"image-folder: split must be one of {', '.join(SPLIT_RULES)}, got {split!r}")
    if (root / "train").is_dir() and (root / "test").is_dir():
        train_dirs, problems = _class_folders(root / "train")
        test_dirs, more = _class_folders(root / "test")
        problems += more
        how = f"folders {root / 'train'} and {root / 'test'}"
    else:
        by_class, problems = _class_folders(root)
        if not by_class:
            raise MetricLabError(f"image-folder: {root} has no class folders; lay it out as {what}")
        names = sorted(by_class)
        if len(names) < 2:
            raise MetricLabError(f"image-folder: {root} has {len(names)} class folder; metric learning needs 2 or more")
        if split == "classes":
            cut = min(max(round(len(names) * train_fraction), 1), len(names) - 1)
            train_dirs = {n: by_class[n] for n in names[:cut]}
            test_dirs = {n: by_class[n] for n in names[cut:]}
            how = f"{root}, classes split {cut}/{len(names) - cut} (first {cut} sorted classes train)"
        else:
            generator = torch.Generator().manual_seed(seed)
            train_dirs, test_dirs = {}, {}
            for name in names:
                images = by_class[name]
                picked = torch.randperm(len(images), generator=generator).tolist()
                n_test = (
                    min(max(round(len(images) * (1 - train_fraction)), 1), len(images) - 1) if len(images) > 1 else 0
                )
                test_dirs[name] = sorted(images[i] for i in picked[:n_test])
                train_dirs[name] = sorted(images[i] for i in picked[n_test:])
            how = f"{root}, images split stratified {train_fraction:g}/{1 - train_fraction:g} seed {seed}"
    classes = sorted(set(train_dirs) | set(test_dirs))
    train, train_where = _files(classes, train_dirs)
    test, test_where = _files(classes, test_dirs)
    splits, skipped = checked(
        f"image-folder {root}",
        {"train": train, "test": test},
        {"train": train_where, "test": test_where},
        skip_unreadable,
        problems,
    )
    return StreamingDataset(
        name=root.name or "image-folder",
        train=splits["train"],
        test=splits["test"],
        classes=classes,
        source=f"image folder {how}: {len(splits['train'])} train / {len(splits['test'])} test images",
        channels=channels,
        extra={"root": str(root.resolve()), "skipped": skipped},
    )


def _label(text: str) -> tuple[str | int | None, str | None]:
    """A label as an int (integer text) or a string, or ``(None, why)``."""
    text = text.strip()
    if not text:
        return None, "empty label"
    try:
        return int(text), None
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return text, None
    if math.isnan(number):
        return None, "label is NaN (an empty cell read as a number)"
    return None, f"label {text!r} is a number but not an integer; use integer or string labels"


def _box(row: dict, where: str, problems: list[str]) -> list[int] | None | bool:
    """``[x1, y1, x2, y2]`` of the row's crop, None without one, False (and a problem noted) if it is wrong."""
    try:
        return crop_box(row)
    except ValueError as err:
        problems.append(f"{where}: {err}")
        return False


@register_dataset("csv")
def csv_dataset(
    data_dir: str | None = None, dataset_root: str | None = None, channels: int = 3, skip_unreadable: bool = False
) -> StreamingDataset:
    """Images listed in a CSV file in open-metric-learning's format, streamed.

    Columns: ``label`` (integer or string), ``path`` (relative to ``dataset_root``, by default the
    CSV's folder, or absolute), ``split`` (``train`` or ``validation``), and optionally ``is_query``
    and ``is_gallery`` (the validation images searched for and searched in), ``category``, and the crop
    ``x_1``, ``x_2``, ``y_1``, ``y_2`` (pixels; empty cells: the whole image).
    """
    path = _root(data_dir, "csv", "FILE.csv in open-metric-learning's format (label, path, split)")
    _check_common(channels)
    root = Path(dataset_root).expanduser() if dataset_root else path.parent
    rows, columns = read_csv(path)
    missing = [c for c in CSV_REQUIRED if c not in columns]
    if not rows:
        raise MetricLabError(
            f"csv: {path} has no rows; it needs a header ({', '.join(CSV_REQUIRED)}) and one row per image"
        )
    if missing:
        raise MetricLabError(
            f"csv: {path} has no column {', '.join(repr(c) for c in missing)} (it has {', '.join(columns)}); "
            f"open-metric-learning's format needs {', '.join(CSV_REQUIRED)}"
        )
    marks = [c for c in ("is_query", "is_gallery") if c in columns]
    if len(marks) == 1:
        raise MetricLabError(
            f"csv: {path} has '{marks[0]}' but not the other of is_query/is_gallery; add both or neither"
        )
    boxed = all(c in columns for c in BOX_COLUMNS)
    problems: list[str] = []
    parsed: dict[str, list[tuple[str, object, str, bool | None, bool | None, str | None]]] = {"train": [], "test": []}
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"row {number}"
        label, why = _label(row["label"] or "")
        split = CSV_SPLITS.get((row["split"] or "").strip())
        flags = [csv_flag(row[c]) for c in marks]
        if why:
            problems.append(f"{where}: {why}")
        if split is None:
            problems.append(f"{where}: split {row['split']!r} is neither 'train' nor 'validation'")
        for column, flag in zip(marks, flags, strict=True):
            if flag is None:
                problems.append(f"{where}: {column} {row[column]!r} is not true/false")
        if not (row["path"] or "").strip():
            problems.append(f"{where}: empty path")
        box = _box(row, where, problems) if boxed else None
        if why or split is None or None in flags or not (row["path"] or "").strip() or box is False:
            continue
        file = Path(row["path"].strip()).expanduser()
        file = file if file.is_absolute() else root / file
        query, gallery = flags if marks else (None, None)
        parsed[split].append((str(file), label, where, query, gallery, row.get("category"), box or [-1, -1, -1, -1]))
    files = [item[0] for items in parsed.values() for item in items]
    if files and not any(os.path.exists(f) for f in files):  # stops at the first that exists
        which = "the CSV's folder" if dataset_root is None else "dataset_root"
        raise MetricLabError(
            f"csv: none of the {len(files)} images of {path} exists under {root} (e.g. {files[0]}); relative "
            f"paths are read from dataset_root, here {which}: pass --dataset-args dataset_root=DIR with the "
            "folder they are relative to"
        )
    kinds = Counter(type(label) for rows_ in parsed.values() for _, label, *_ in rows_)
    if len(kinds) > 1:  # the rows of the rarer kind are the odd ones
        odd, usual = sorted(kinds, key=kinds.get)
        kind, kinds_ = {int: "an integer", str: "a string"}, {int: "integers", str: "strings"}
        problems += [
            f"{where}: label {label!r} is {kind[odd]}, the other rows' are {kinds_[usual]}"
            for rows_ in parsed.values()
            for _, label, where, *_ in rows_
            if type(label) is odd
        ]
        parsed = {split: [(f, str(label), *rest) for f, label, *rest in rows_] for split, rows_ in parsed.items()}
    if problems and not all(parsed.values()):  # a split left empty by its bad rows: those rows are the news
        report_problems(f"csv {path}", problems, "correct these rows")
    values = sorted({label for rows_ in parsed.values() for _, label, *_ in rows_})
    index = {value: i for i, value in enumerate(values)}
    splits, where = {}, {}
    for split, items in parsed.items():
        if not items:
            raise MetricLabError(
                f"csv: {path} has no rows with split '{'train' if split == 'train' else 'validation'}'"
            )
        splits[split] = ImageFiles(
            paths=[item[0] for item in items],
            labels=torch.tensor([index[item[1]] for item in items], dtype=torch.long),
            is_query=torch.tensor([bool(item[3]) for item in items]) if marks and split == "test" else None,
            is_gallery=torch.tensor([bool(item[4]) for item in items]) if marks and split == "test" else None,
            categories=[str(item[5]) for item in items] if "category" in columns else None,
            boxes=torch.tensor([item[6] for item in items], dtype=torch.long) if boxed else None,
        )
        where[split] = [item[2] for item in items]
    splits, skipped = checked(f"csv {path}", splits, where, skip_unreadable, problems)  # all problems at once
    test = splits["test"]
    if test.is_query is not None and not (test.is_query.any() and test.is_gallery.any()):
        raise MetricLabError(f"csv: {path} marks no validation image as is_query or none as is_gallery; mark both")
    return StreamingDataset(
        name=path.stem,
        train=splits["train"],
        test=test,
        classes=[str(v) for v in values],
        source=f"CSV {path.resolve()} (paths under {root.resolve()}): {len(splits['train'])} train / {len(test)} "
        f"validation images" + (", query/gallery marked" if marks else ""),
        channels=channels,
        notice=(
            f"{path.name}'s 'sequence' column is not used: a query's other images of its sequence stay in its "
            "gallery, so scores are higher than open-metric-learning's, which leaves them out"
        )
        if "sequence" in columns
        else None,
        extra={"csv": str(path.resolve()), "skipped": skipped},
    )
