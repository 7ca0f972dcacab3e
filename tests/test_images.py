"""Datasets of image files: folders and CSV files of digits in several image formats, written at test time."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from metriclab_plugins.images import csv_dataset, image_folder
from PIL import Image

from metriclab.data import Dataset, ImageSource, StreamingDataset, load_dataset
from metriclab.data.sampling import epoch_order, local_batches
from metriclab.errors import MetricLabError
from metriclab.metrics.retrieval import retrieval_metrics
from metriclab.recipe import Recipe
from metriclab.registry import datasets, register_dataset
from metriclab.runs import Run

FORMATS = ("png", "jpg", "bmp", "webp")


def digits_rgb(n_classes: int, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """``uint8 (N, 8, 8, 3)`` tinted digits and their labels, class-major."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    rng = np.random.default_rng(0)
    images, labels = [], []
    for c in range(n_classes):
        for i in np.flatnonzero(bunch.target == c)[:per_class]:
            grey = bunch.images[i] * (255 / 16)
            images.append(np.rint(grey[..., None] * rng.uniform(0.3, 1.0, 3)).astype(np.uint8))
            labels.append(c)
    return np.stack(images), np.array(labels)


def write_tree(root: Path, n_classes: int = 6, per_class: int = 8, varied: bool = True) -> Path:
    """``root/cNN/NNN.ext``: digits as images of several formats, sizes, colours and greys (or all 8x8 PNG)."""
    images, labels = digits_rgb(n_classes, per_class)
    rng = np.random.default_rng(1)
    for j, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / f"c{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(image)
        if not varied:
            picture.save(folder / f"{j:03d}.png")
            continue
        size = (int(rng.integers(12, 40)), int(rng.integers(12, 40)))
        picture = picture.resize(size, Image.BILINEAR)
        if j % 3 == 0:
            picture = picture.convert("L")  # grey images are read as colour (channels repeated)
        fmt = FORMATS[j % len(FORMATS)]
        picture.save(folder / f"{j:03d}.{fmt}")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_tree(tmp_path_factory.mktemp("images") / "digits")


def test_image_folder_split_by_classes_is_class_disjoint(tree):
    data = image_folder(str(tree), split="classes", train_fraction=0.5)
    assert isinstance(data, StreamingDataset) and data.classes == [f"c{c:02d}" for c in range(6)]
    assert set(data.train.labels.tolist()) == {0, 1, 2} and set(data.test.labels.tolist()) == {3, 4, 5}
    assert len(data.train) == len(data.test) == 24
    assert all(
        Path(p).parent.name == data.classes[int(y)] for p, y in zip(data.train.paths, data.train.labels, strict=True)
    )
    assert image_folder(str(tree), split="classes", train_fraction=0.34).train.labels.unique().tolist() == [0, 1]


def test_image_folder_split_by_images_is_stratified_and_seeded(tree):
    a = image_folder(str(tree), split="images", train_fraction=0.75, seed=3)
    assert torch.bincount(a.train.labels).tolist() == [6] * 6 and torch.bincount(a.test.labels).tolist() == [2] * 6
    assert not set(a.train.paths) & set(a.test.paths)
    assert a.test.paths == image_folder(str(tree), split="images", train_fraction=0.75, seed=3).test.paths
    assert a.test.paths != image_folder(str(tree), split="images", train_fraction=0.75, seed=4).test.paths


def test_train_and_test_folders_are_used_as_they_are(tmp_path):
    write_tree(tmp_path / "train", n_classes=3, per_class=4)
    write_tree(tmp_path / "test", n_classes=4, per_class=2)
    data = image_folder(str(tmp_path))
    assert (len(data.train), len(data.test), len(data.classes)) == (12, 8, 4)


def test_every_image_decodes_to_colour_at_the_recipe_size(tree):
    recipe = Recipe(dataset="image-folder", data_dir=str(tree), image_size=20)
    data = load_dataset(recipe)
    assert data.input_shape == (3, 20, 20) and data.transforms["test"]["name"] == "resize-center-crop"
    source = ImageSource(data, "train", augment=True, num_workers=0)
    (images,) = source([torch.arange(len(data.train))])  # every format, size and grey image, augmented
    assert images.shape == (24, 3, 20, 20) and images.dtype == torch.uint8
    assert ImageSource(data, "test").take([0, 5]).shape == (2, 3, 20, 20)


def test_animations_16_bit_and_other_formats_decode_as_8_bit_images_of_the_run_s_channels(tmp_path):
    from metriclab.data.images import decode
    from metriclab.inference.inputs import load_images

    ramp = np.arange(12 * 10, dtype=np.uint16).reshape(12, 10) * 500  # 0..59,500: 8 bits are its top byte
    colour = np.dstack([ramp >> 8] * 3).astype(np.uint8)
    root = tmp_path / "odd" / "c00"
    root.mkdir(parents=True)
    Image.fromarray(ramp).save(root / "grey16.png")
    Image.fromarray(ramp).save(root / "grey16.tif")
    Image.fromarray(ramp.astype(np.int32), mode="I").save(root / "grey16.pgm")  # Pillow reads it as mode "I"
    frames = [Image.fromarray(colour), Image.fromarray(255 - colour)]
    frames[0].save(root / "moving.gif", save_all=True, append_images=frames[1:])
    Image.fromarray(colour).save(root / "still.webp", lossless=True)
    Image.fromarray(colour).save(root / "colour.tiff")
    Image.fromarray(colour[..., 0]).save(root / "grey.pgm")
    Image.fromarray(colour).convert("CMYK").save(root / "print.jpg", quality=100)
    (tmp_path / "odd" / "c01").mkdir()
    Image.fromarray(colour).save(tmp_path / "odd" / "c01" / "x.ppm")
    data = image_folder(str(tmp_path / "odd"), split="images", train_fraction=0.5)
    found = sorted(Path(p).name for p in data.train.paths + data.test.paths)
    assert found == sorted(["grey16.png", "grey16.tif", "grey16.pgm", "moving.gif", "still.webp", "colour.tiff",
                            "grey.pgm", "print.jpg", "x.ppm"])  # fmt: skip
    for path in found:
        path = str(next((tmp_path / "odd").rglob(path)))
        for channels in (1, 3):
            image = decode(path, channels)
            assert image.dtype == torch.uint8 and image.shape == (channels, 12, 10), (path, channels)
            if "print" not in path:  # lossless (GIF: its palette): the first frame, the 16-bit ramp's top byte
                expected = np.asarray(Image.open(path).convert("L")) if path.endswith("gif") else colour[..., 0]
                np.testing.assert_array_equal(image[0].numpy(), expected, err_msg=path)
    # a run trained on arrays resizes with Pillow: a 16-bit image is the ramp, not clipped to white
    loaded = load_images([root / "grey16.png", root / "grey16.tif", root / "grey16.pgm"], (1, 12, 10))
    np.testing.assert_array_equal(loaded[:, 0].numpy(), [colour[..., 0]] * 3)
    import zlib

    from metriclab.data.images import unreadable

    bomb = tmp_path / "bomb.png"  # a header of 20,000 x 20,000 pixels: Pillow refuses it as a decompression bomb
    Image.new("L", (1, 1)).save(bomb)
    data = bytearray(bomb.read_bytes())
    data[16:24] = (20000).to_bytes(4, "big") * 2
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # the header chunk's checksum, made right
    bomb.write_bytes(bytes(data))
    assert "not a readable image" in unreadable(str(bomb))
    broken = root / "broken.ppm"  # a header Pillow cannot parse: ValueError, reported as an unreadable file
    broken.write_bytes(b"P6\n10 x\n255\n" + bytes(300))
    with pytest.raises(MetricLabError, match="broken.ppm is not a readable image"):
        load_images([broken], (1, 12, 10))


def test_hidden_files_are_left_out_and_a_class_s_sub_folders_are_in_it(tmp_path):
    from metriclab.inference.inputs import read_inputs

    root = write_tree(tmp_path / "photos", n_classes=2, per_class=2, varied=False)
    (root / "c00" / "._000.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")  # AppleDouble companion
    (root / "c00" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "c01" / ".ipynb_checkpoints").mkdir()
    (root / "c01" / ".ipynb_checkpoints" / "002.png").write_bytes((root / "c01" / "002.png").read_bytes())
    (root / "c01" / "close-ups").mkdir()
    (root / "c01" / "close-ups" / "004.png").write_bytes((root / "c01" / "003.png").read_bytes())
    data = image_folder(str(root), split="images", train_fraction=0.5)
    names = sorted(str(Path(p).relative_to(root)) for p in data.train.paths + data.test.paths)
    assert names == ["c00/000.png", "c00/001.png", "c01/002.png", "c01/003.png", "c01/close-ups/004.png"]
    assert [str(Path(p).relative_to(root)) for p in read_inputs([str(root / "c00")]).paths] == [
        "c00/000.png",
        "c00/001.png",
    ]
    embedded = read_inputs([str(root)])  # labelled by class folder, as training labels them
    assert list(embedded.labels) == ["c00", "c00", "c01", "c01", "c01"]
    split = write_tree(tmp_path / "split" / "train", n_classes=2, per_class=1, varied=False).parent
    write_tree(split / "test", n_classes=2, per_class=1, varied=False)
    assert list(read_inputs([str(split)]).labels) == ["c00", "c01", "c00", "c01"]  # ROOT/test/..., ROOT/train/...
    (split / "test" / "loose.png").write_bytes((split / "test" / "c00" / "000.png").read_bytes())
    assert read_inputs([str(split)]).labels is None  # an image outside any class folder: no labels, not wrong ones


def test_corrupt_file_and_empty_class_are_reported_in_one_error_each_on_a_line(tmp_path):
    root = write_tree(tmp_path / "bad", n_classes=4, per_class=3)
    (root / "c01" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "c99").mkdir()
    with pytest.raises(MetricLabError) as err:
        image_folder(str(root))
    lines = str(err.value).splitlines()
    assert "2 problems" in lines[0] and "skip_unreadable=true" in lines[0]
    assert any("broken.jpg" in line and "not a readable image" in line for line in lines[1:])
    assert any("c99" in line and "empty class" in line for line in lines[1:])


def test_skip_flag_trains_without_unreadable_images_and_records_them(tmp_path):
    root = write_tree(tmp_path / "bad", n_classes=4, per_class=3)
    (root / "c02" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    data = image_folder(str(root), split="images", skip_unreadable=True)
    assert len(data.train) + len(data.test) == 12
    skipped = data.describe()["skipped"]
    assert skipped["count"] == 1 and "broken.png" in skipped["files"][0]


def write_csv(tmp_path: Path, rows: list[dict], name: str = "data.csv") -> Path:
    path = tmp_path / name
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def oml_rows(tree: Path) -> list[dict]:
    """open-metric-learning rows for ``tree``: classes c00-c02 train, c03-c05 validation (half queries)."""
    rows = []
    for i, path in enumerate(sorted(tree.rglob("*.*"))):
        label = int(path.parent.name[1:])
        relative = path.relative_to(tree.parent)
        rows.append(
            {
                "label": label,
                "path": str(relative) if i % 2 else str(path),  # relative to the CSV's folder, or absolute
                "split": "train" if label < 3 else "validation",
                "is_query": label >= 3 and i % 2 == 0,
                "is_gallery": label >= 3 and i % 2 == 1,
                "category": "round" if label in (0, 3, 5) else "straight",
            }
        )
    return rows


def test_csv_in_open_metric_learning_format(tree):
    path = write_csv(tree.parent, oml_rows(tree))
    data = csv_dataset(str(path))
    assert (len(data.train), len(data.test)) == (24, 24) and data.classes == [str(c) for c in range(6)]
    assert data.test.is_query.sum() == 12 and not (data.test.is_query & data.test.is_gallery).any()
    assert set(data.test.categories) == {"round", "straight"}
    assert data.describe()["protocol"] == "query/gallery"


def test_a_csv_as_pandas_and_spreadsheets_write_it_reads_alike_for_training_and_embedding(tree, tmp_path):
    from metriclab.inference.inputs import read_inputs

    rows = []
    for r in oml_rows(tree):  # pandas' floats for flags, "nan" in train rows, empty crops, a spreadsheet's BOM
        validation = r["split"] == "validation"
        flags = {c: float(r[c]) if validation else "nan" for c in ("is_query", "is_gallery")}
        rows.append({**r, **flags, "x_1": "NaN", "x_2": "", "y_1": "nan", "y_2": "NA", "sequence": "s1"})
    path = write_csv(tree.parent, rows, "pandas.csv")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    data = csv_dataset(str(path))
    assert data.test.is_query.sum() == 12 and data.test.is_gallery.sum() == 12 and (data.test.boxes == -1).all()
    assert "'sequence' column is not used" in data.notice
    embedded = read_inputs([str(path)])
    assert embedded.columns["is_query"].sum() == 12 and embedded.columns["is_gallery"].sum() == 12
    assert (embedded.columns["x_1"] == -1).all()
    for broken, words in (
        ([{k: v for k, v in r.items() if k not in ("y_1", "y_2")} for r in rows], "x_1, x_2 but not y_1, y_2"),
        ([{**r, "is_query": "maybe"} for r in rows], "is_query 'maybe' is not true/false"),
    ):
        path = write_csv(tree.parent, broken, "broken.csv")
        for read in (csv_dataset, lambda p: read_inputs([p])):
            with pytest.raises(MetricLabError, match=words):
                read(str(path))
    (tmp_path / "elsewhere").mkdir()
    apart = write_csv(tmp_path / "elsewhere", [{**r, "path": str(Path(r["path"]).name)} for r in oml_rows(tree)])
    with pytest.raises(MetricLabError, match="relative paths are read from its own folder"):
        read_inputs([str(apart)])
    (tmp_path / "header.csv").write_text("label,path\n")
    with pytest.raises(MetricLabError, match="has no rows"):
        read_inputs([str(tmp_path / "header.csv")])
    (tmp_path / "short.csv").write_text("label,path\n1\n")
    with pytest.raises(MetricLabError, match="row 2: no path"):
        read_inputs([str(tmp_path / "short.csv")])
    (tmp_path / "unlabelled.csv").write_text(f"label,path\n1,{path}\n,{path}\n")
    with pytest.raises(MetricLabError, match="row 3: no label"):
        read_inputs([str(tmp_path / "unlabelled.csv")])


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda rows: [{k: v for k, v in r.items() if k != "split"} for r in rows], ["no column 'split'"]),
        (
            lambda rows: [{**r, "label": "2.5"} if i == 4 else r for i, r in enumerate(rows)],
            ["row 6", "not an integer"],
        ),
        (lambda rows: [{**r, "path": "gone.jpg"} if i == 2 else r for i, r in enumerate(rows)], ["row 4", "gone.jpg"]),
        (lambda rows: [{**r, "split": "val"} if i == 0 else r for i, r in enumerate(rows)], ["row 2", "'val'"]),
    ],
)
def test_bad_csv_rows_are_named(tree, change, words):
    path = write_csv(tree.parent, change(oml_rows(tree)), "bad.csv")
    with pytest.raises(MetricLabError) as err:
        csv_dataset(str(path))
    assert all(word in str(err.value) for word in words), str(err.value)


def test_queries_with_no_gallery_image_of_their_class_stop_the_run_before_training(tree, tmp_path):
    from metriclab.training.engine import train

    rows = oml_rows(tree)  # validation classes 3-5: class 3 all gallery, classes 4 and 5 all queries
    rows = [
        {**r, "is_query": r["label"] in (4, 5), "is_gallery": r["label"] == 3} if r["label"] >= 3 else r for r in rows
    ]
    path = write_csv(tree.parent, rows, "no_matches.csv")
    recipe = twin_recipe(tmp_path / "run", dataset="csv", data_dir=str(path), num_workers=0)
    with pytest.raises(MetricLabError, match="none of its 16 test queries"):
        train(recipe)
    assert not (tmp_path / "run").exists()


def test_a_csv_s_problems_of_every_kind_are_listed_in_one_error(tree):
    rows = oml_rows(tree)
    rows[0] = {**rows[0], "split": "val"}
    rows[3] = {**rows[3], "label": "cat"}  # a string among integer labels
    rows[5] = {**rows[5], "path": "gone.jpg"}
    with pytest.raises(MetricLabError) as err:
        csv_dataset(str(write_csv(tree.parent, rows, "three.csv")))
    lines = str(err.value).splitlines()
    assert "3 problems" in lines[0]
    assert any("row 2" in line and "'val'" in line for line in lines)
    assert any("row 5" in line and "label 'cat' is a string, the other rows' are integers" in line for line in lines)
    assert any("row 7" in line and "gone.jpg" in line for line in lines)


def test_processes_read_disjoint_images_whose_union_is_the_epoch(tree):
    data = load_dataset(Recipe(dataset="image-folder", data_dir=str(tree), image_size=8, test_transform="resize"))
    order = epoch_order(data.train_labels, 0, 0, "m-per-class", 4)
    whole = torch.cat(list(ImageSource(data, "train", num_workers=0)([order])))
    parts = []
    for rank in range(2):
        steps = local_batches(order, 0, 8, rank, 2)
        parts.append([torch.cat(list(ImageSource(data, "train", num_workers=1)([local for _, local in steps])))])
    # Rank 0 holds the first half of every global batch of 8, rank 1 the second half.
    mixed = torch.cat([torch.cat(pair) for pair in zip(parts[0][0].split(4), parts[1][0].split(4), strict=True)])
    assert torch.equal(mixed, whole)


# -- training on both data paths -------------------------------------------------------------------


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    """The same 8x8 digits as PNG files (streamed) and as a resident Dataset, in the same order."""
    root = tmp_path_factory.mktemp("twin")
    images, labels = digits_rgb(4, 16)
    tensors = {}
    for split, rows in (("train", slice(0, None, 2)), ("test", slice(1, None, 2))):
        for j, (image, label) in enumerate(zip(images[rows], labels[rows], strict=True)):
            folder = root / split / f"c{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{j:03d}.png")
        tensors[split] = (
            torch.from_numpy(images[rows]).permute(0, 3, 1, 2).contiguous(),
            torch.from_numpy(labels[rows]),
        )

    def resident() -> Dataset:
        (xa, ya), (xb, yb) = tensors["train"], tensors["test"]
        return Dataset("twin", xa, ya, xb, yb, [f"c{c:02d}" for c in range(4)], source="test arrays")

    if "test-twin" not in datasets:
        register_dataset("test-twin", resident)
    return root


def spy_batches(monkeypatch) -> list:
    """Record (global batch, images) of every training step the engine takes."""
    from metriclab.training import engine

    seen, original = [], engine._Trainer._step

    def step(self, batch, pixels=None):
        images = self.train_images[batch] if pixels is None else pixels
        seen.append((batch.cpu().clone(), images.cpu().clone()))
        return original(self, batch, pixels)

    monkeypatch.setattr(engine._Trainer, "_step", step)
    return seen


def twin_recipe(out: Path, **fields) -> Recipe:
    """A tiny ConvNet run on the twin data, deterministic transforms, one DataLoader worker."""
    common = {
        "encoder": "convnet",
        "encoder_args": {"channels": [8, 8]},
        "embedding_dim": 8,
        "loss": "triplet",
        "miner": "semi-hard",
        "sampler": "m-per-class",
        "batch_size": 8,
        "epochs": 2,
        "image_size": 8,
        "train_transform": "resize",
        "test_transform": "resize",
        "num_workers": 1,
        "cpu": True,
        "log_every": 1,
    }
    return Recipe(**{**common, "output_dir": str(out), **fields})


def test_resident_and_streaming_paths_give_identical_batches_and_weights(twin, tmp_path, monkeypatch):
    from metriclab.training.engine import train

    runs, seen = {}, {}
    for name, fields in (("resident", {"dataset": "test-twin"}), ("files", {"dataset": "image-folder"})):
        record = spy_batches(monkeypatch)
        extra = {"data_dir": str(twin)} if name == "files" else {}
        runs[name] = Run(train(twin_recipe(tmp_path / name, **fields, **extra)))
        seen[name] = record
        monkeypatch.undo()
    assert len(seen["files"]) == len(seen["resident"]) == 2 * 4
    for (batch_a, images_a), (batch_b, images_b) in zip(seen["resident"], seen["files"], strict=True):
        assert torch.equal(batch_a, batch_b) and torch.equal(images_a, images_b)
    emb_a, emb_b = runs["resident"].embeddings("test")[0], runs["files"].embeddings("test")[0]
    np.testing.assert_array_equal(emb_a, emb_b)
    assert runs["files"].config["dataset"]["transforms"]["test"] == {
        "name": "resize",
        "source": "metriclab",
        "args": {"size": 8, "interpolation": "bilinear"},
    }


@pytest.mark.parametrize(("transform", "workers"), [("resize", (0, 0)), ("random-resized-crop", (1, 0))])
def test_resume_mid_epoch_on_files_continues_with_the_same_batches(twin, tmp_path, monkeypatch, transform, workers):
    """Also with random augmentation, decoded by a worker before the stop and in the main process after it."""
    from metriclab.training.engine import train

    def recipe(out: str, workers: int, **fields) -> Recipe:
        fields |= {"dataset": "image-folder", "data_dir": str(twin), "train_transform": transform}
        return twin_recipe(tmp_path / out, num_workers=workers, **fields)

    whole = spy_batches(monkeypatch)
    straight = Run(train(recipe("straight", workers[0])))
    monkeypatch.undo()
    first = spy_batches(monkeypatch)
    run_dir = train(recipe("resumed", workers[0], max_steps=6))  # stops after 2 of the 4 steps of the second epoch
    monkeypatch.undo()
    rest = spy_batches(monkeypatch)
    train(recipe("unused", workers[1], resume=str(run_dir)))
    assert len(first) == 6 and len(rest) == 2
    for (batch_a, images_a), (batch_b, images_b) in zip(whole, first + rest, strict=True):
        assert torch.equal(batch_a, batch_b) and torch.equal(images_a, images_b)
    np.testing.assert_array_equal(straight.embeddings("test")[0], Run(run_dir).embeddings("test")[0])


def test_a_relative_data_dir_is_recorded_absolute_so_figures_work_from_elsewhere(twin, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from metriclab.cli import app
    from metriclab.training.engine import train

    monkeypatch.chdir(twin.parent)
    run = train(twin_recipe(tmp_path / "run", dataset="image-folder", data_dir=twin.name, epochs=1, num_workers=0))
    assert Run(run).config["recipe"]["data_dir"] == str(twin.resolve())
    monkeypatch.chdir(tmp_path)
    drawn = CliRunner().invoke(app, ["visualize", str(run), "--only", "thumbnails", "--method", "pca"])
    assert drawn.exit_code == 0 and (run / "figures" / "thumbnails.png").is_file(), drawn.output


@pytest.mark.slow
def test_ctrl_c_while_workers_decode_is_answered_once_by_the_training_process(twin, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import RECIPES, ROOT

    out = tmp_path / "run"
    args = ["--dataset", "image-folder", "--data-dir", str(twin), "--image-size", "8", "--epochs", "1000"]
    args += ["--encoder-args", "channels=[8,8]", "--batch-size", "8", "--num-workers", "2", "--cpu"]
    args += ["--checkpoint-every", "2", "--output-dir", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, str(RECIPES / "image_folder.py"), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(out.glob("checkpoints/step_*")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)  # as a terminal's Ctrl-C reaches the whole group, workers included
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output[-3000:]
    assert output.count("Interrupted") == 1 and "Stopped at step" in output, output[-3000:]


# -- the dataset's own evaluation protocol -----------------------------------------------------------


def pml_scores(query, query_labels, reference, reference_labels) -> dict:
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    calculator = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
        k="max_bin_count",
        device=torch.device("cpu"),
        knn_func=CustomKNN(LpDistance(normalize_embeddings=False)),
    )
    tensors = [torch.as_tensor(x) for x in (query, query_labels, reference, reference_labels)]
    return calculator.get_accuracy(*tensors, ref_includes_query=False)


def test_query_gallery_metrics_match_pytorch_metric_learning():
    from metriclab.metrics.protocol import query_gallery_metrics

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 15, 400)
    embeddings = (rng.normal(size=(400, 6)) + rng.normal(size=(15, 6))[labels] * 1.5).astype(np.float32)
    is_query = rng.random(400) < 0.3
    categories = np.where(labels < 6, "tops", "shoes")
    out = query_gallery_metrics(embeddings, labels, is_query, ~is_query, list(categories), ks=(1,), metric="euclidean")
    q, g = np.flatnonzero(is_query), np.flatnonzero(~is_query)
    expected = pml_scores(embeddings[q], labels[q], embeddings[g], labels[g])
    assert out["query_gallery"]["queries"] == len(q) and out["query_gallery"]["gallery"] == len(g)
    for ours, theirs in (("precision@1", "precision_at_1"), ("map@r", "mean_average_precision_at_r")):
        assert out["query_gallery"][ours] == pytest.approx(expected[theirs], abs=1e-6)
    assert out["query_gallery"]["r_precision"] == pytest.approx(expected["r_precision"], abs=1e-6)
    for name in ("tops", "shoes"):  # a category's queries against the whole gallery
        rows = q[categories[q] == name]
        expected = pml_scores(embeddings[rows], labels[rows], embeddings[g], labels[g])
        assert out["by_category"][name]["map@r"] == pytest.approx(expected["mean_average_precision_at_r"], abs=1e-6)
    loo = query_gallery_metrics(embeddings, labels, np.ones(400, bool), np.ones(400, bool), ks=(1,))
    assert loo["query_gallery"]["gallery"] == 400  # every image both: leave-one-out
    # some images both query and gallery, the rest of the gallery distractors: each query leaves itself out
    both = is_query | (labels == 0)
    out = query_gallery_metrics(embeddings, labels, both, ~is_query, ks=(1,))["query_gallery"]
    p1, map_r = brute_force_without_self(embeddings, labels, np.flatnonzero(both), np.flatnonzero(~is_query))
    assert out["precision@1"] == pytest.approx(p1, abs=1e-12) and out["map@r"] == pytest.approx(map_r, abs=1e-12)
    assert out["queries"] == out["queries_scored"] == both.sum() and out["gallery"] == (~is_query).sum()
    lone = query_gallery_metrics(embeddings, labels, is_query, ~is_query & (labels != 3), ks=(1,))["query_gallery"]
    assert lone["queries_scored"] == lone["queries"] - (labels[is_query] == 3).sum()  # class 3 has no gallery image
    with pytest.raises(MetricLabError, match="none of the dataset's"):
        query_gallery_metrics(embeddings, labels, labels == 0, labels == 1, ks=(1,))


def brute_force_without_self(embeddings, labels, query, gallery):
    """Precision@1 and MAP@R of test images ``query`` searched in ``gallery`` (euclidean), each without itself."""
    p1, ap = [], []
    for i in query:
        rows = gallery[gallery != i]
        order = rows[np.argsort(((embeddings[rows] - embeddings[i]) ** 2).sum(1), kind="stable")]
        hits = labels[order] == labels[i]
        r = int(hits.sum())
        if r:
            p1.append(hits[0])
            top = hits[:r]
            ap.append((np.cumsum(top) / np.arange(1, r + 1))[top].sum() / r)
    return np.mean(p1), np.mean(ap)


def test_leave_one_out_per_category_is_each_category_s_share_of_the_whole():
    """Each category's images searched in the whole test set, each leaving itself out (SOP's super-categories)."""
    from metriclab.metrics.protocol import category_metrics, query_gallery_metrics

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 12, 300)
    embeddings = (rng.normal(size=(300, 5)) + rng.normal(size=(12, 5))[labels] * 1.5).astype(np.float32)
    categories = np.where(labels % 3 == 0, "bikes", np.where(labels % 3 == 1, "chairs", "lamps"))
    per = category_metrics(embeddings, labels, list(categories), ks=(1, 5), metric="cosine")
    whole = retrieval_metrics(embeddings, labels, ks=(1, 5), metric="cosine", clustering=False)
    counts = {name: (categories == name).sum() for name in per}
    assert set(per) == {"bikes", "chairs", "lamps"}
    for key in ("precision@1", "precision@5", "map@r", "r_precision", "knn_accuracy"):
        share = sum(counts[name] * per[name][key] for name in per) / len(labels)
        assert share == pytest.approx(whole[key], abs=1e-12), key
    # a dataset marking every image as both query and gallery is leave-one-out, broken down the same way
    everything = np.ones(300, bool)
    loo = query_gallery_metrics(embeddings, labels, everything, everything, list(categories), ks=(1, 5))
    assert loo["by_category"] == category_metrics(embeddings, labels, categories, ks=(1, 5))


def test_csv_crop_columns_cut_the_region_of_interest(tmp_path):
    image = np.zeros((30, 40, 3), np.uint8)
    image[5:15, 10:30] = 200  # the object
    rows = []
    for i in range(8):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        split = "train" if i < 4 else "validation"
        rows.append({"label": i % 2 + (0 if i < 4 else 2), "path": f"{i}.png", "split": split})
        rows[-1] |= (
            {"x_1": 10, "x_2": 30, "y_1": 5, "y_2": 15} if i % 2 else {"x_1": "", "x_2": "", "y_1": "", "y_2": ""}
        )
    data = load_dataset(
        Recipe(dataset="csv", data_dir=str(write_csv(tmp_path, rows)), image_size=10, test_transform="resize")
    )
    cropped, whole = ImageSource(data, "train").take([1, 0])
    assert int(cropped.min()) == 200 and int(whole.min()) == 0


# -- the recipe and the CLI, as users run them ----------------------------------------------------


def test_a_corrupt_image_stops_the_recipe_before_training_with_exit_2(tmp_path):
    from conftest import run_recipe

    root = write_tree(tmp_path / "photos", n_classes=4, per_class=3)
    (root / "c03" / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "run"
    result = run_recipe(
        "image_folder.py", "--dataset", "image-folder", "--data-dir", str(root), "--output-dir", str(out)
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "bad.jpg" in result.stderr and "skip_unreadable=true" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.slow
def test_recipe_trains_evaluates_and_visualizes_a_csv_with_queries_and_gallery(tree, tmp_path, monkeypatch):
    from conftest import read_json, run_recipe
    from typer.testing import CliRunner

    from metriclab.cli import app

    csv_path = write_csv(tree.parent, oml_rows(tree), "recipe.csv")
    out = tmp_path / "run"
    args = ["--dataset", "csv", "--data-dir", str(csv_path), "--image-size", "16", "--epochs", "1"]
    args += ["--encoder-args", "channels=[8,16]", "--batch-size", "16", "--num-workers", "1", "--cpu"]
    result = run_recipe("image_folder.py", *args, "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    config = read_json(out / "config.json")
    assert config["dataset"]["input_shape"] == [3, 16, 16] and config["dataset"]["protocol"] == "query/gallery"
    assert config["dataset"]["transforms"]["test"]["name"] == "resize-center-crop"
    evaluated = CliRunner().invoke(app, ["evaluate", str(out), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    scores = json.loads(evaluated.stdout)[0]
    assert scores["query_gallery"]["queries"] == 12 and set(scores["by_category"]) == {"round", "straight"}
    # training scored its epochs and its end by the CSV's protocol too: the queries searched in the gallery
    metrics = read_json(out / "metrics.json")
    (epoch,) = metrics["epochs"]
    for key in ("precision@1", "map@r"):
        assert epoch[key] == metrics["final"]["query_gallery"][key] == scores["query_gallery"][key]
    from metriclab.viz.figures import _curve_series

    assert epoch["protocol"] == "query/gallery" and "test retrieval (queries vs gallery)/MAP@R" in _curve_series(
        Run(out)
    )
    assert "12 queries searched in a gallery of 12" in " ".join((result.stdout + result.stderr).split())
    from metriclab.viz import plots

    titles, drawing = [], plots.retrieval_gallery
    monkeypatch.setattr(plots, "retrieval_gallery", lambda *a, **kw: titles.append(kw["title"]) or drawing(*a, **kw))
    drawn = CliRunner().invoke(
        app, ["visualize", str(out), "--only", "thumbnails", "--only", "gallery", "--method", "pca"]
    )
    assert drawn.exit_code == 0, drawn.output
    assert "in the dataset's gallery" in titles[0]  # its queries searched in its gallery, as it is scored
    assert (out / "figures" / "thumbnails.png").is_file() and (out / "figures" / "gallery.png").is_file()


@pytest.mark.slow
def test_two_processes_stream_disjoint_shards_and_match_one_process(twin, tmp_path):
    import random
    import sys

    from conftest import run_recipe
    from safetensors.torch import load_file

    def train_with(processes: int, batch: int) -> Path:
        port = str(random.randint(20000, 40000))
        many = ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", port]
        launcher = [sys.executable, "-m", "accelerate.commands.launch", *(many if processes > 1 else [])]
        out = tmp_path / f"p{processes}"
        args = ["--data-dir", str(twin), "--image-size", "8", "--train-transform", "resize", "--test-transform"]
        args += ["resize", "--encoder", "mlp", "--encoder-args", "hidden=[32]", "--optimizer", "sgd", "--lr", "0.1"]
        args += ["--batch-size", str(batch), "--max-steps", "1", "--no-embed-train", "--num-workers", "1", "--cpu"]
        result = run_recipe("image_folder.py", *args, "--output-dir", str(out), launcher=launcher)
        assert result.returncode == 0, result.stderr[-4000:]
        return out

    one, two = train_with(1, 16), train_with(2, 8)
    assert Run(two).config["num_processes"] == 2 and Run(two).config["global_batch_size"] == 16
    assert Run(one).history()[0]["loss"] == pytest.approx(Run(two).history()[0]["loss"], rel=1e-5, abs=1e-6)
    weights_one, weights_two = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    for key in weights_one:
        torch.testing.assert_close(weights_one[key], weights_two[key], rtol=1e-4, atol=1e-6)
    emb_one, emb_two = Run(one).embeddings("test")[0], Run(two).embeddings("test")[0]  # streamed, gathered in order
    np.testing.assert_allclose(emb_one, emb_two, rtol=1e-4, atol=1e-5)


def test_an_image_that_fails_only_when_decoded_is_named_in_one_line(tmp_path):
    root = write_tree(tmp_path / "late", n_classes=2, per_class=2, varied=False)
    data = image_folder(str(root), split="images")
    Path(data.train.paths[0]).write_bytes(b"garbage after the check")  # damaged after the dataset was checked
    with pytest.raises(MetricLabError) as err:
        list(ImageSource(data, "train", num_workers=1)([torch.arange(len(data.train))]))
    assert data.train.paths[0] in str(err.value) and "\n" not in str(err.value) and "Traceback" not in str(err.value)


@pytest.fixture(scope="module")
def streamed_run(tree, tmp_path_factory) -> Run:
    """A one-epoch run trained on the image files, with the default transforms."""
    from metriclab.training.engine import train

    recipe = twin_recipe(
        tmp_path_factory.mktemp("streamed") / "run",
        dataset="image-folder",
        data_dir=str(tree),
        dataset_args={"split": "images"},
        image_size=16,
        train_transform=None,
        test_transform=None,  # the defaults: random-resized-crop and resize-center-crop
        epochs=1,
        embed_train=False,
    )
    return Run(train(recipe))


def test_files_embed_through_the_run_s_own_test_transform(streamed_run):
    """``load_model(run).embed(files)`` of a run trained on files embeds them as its evaluation did."""
    import metriclab
    from metriclab.inference import run_dataset

    run = streamed_run
    saved, labels = run.embeddings("test")
    files = run_dataset(run).test.paths  # the order of the saved embeddings
    model = metriclab.load_model(run.path, device="cpu")
    assert model.preprocessing["image_files"]["test_transform"]["name"] == "resize-center-crop"
    np.testing.assert_allclose(model.embed(list(files)), saved, rtol=1e-4, atol=1e-5)
    # The steps written into the metadata (and into exported files) are enough to prepare the images elsewhere.
    import re

    from PIL import Image
    from torchvision.transforms.v2 import functional

    resize, crop = model.preprocessing["image_files"]["test_transform_steps"]
    side, square = int(re.search(r"size=\[(\d+)\]", resize)[1]), int(re.search(r"size=\((\d+),", crop)[1])
    mode = "L" if model.input_shape[0] == 1 else "RGB"
    by_hand = []
    for f in files:
        pixels = np.array(Image.open(f).convert(mode))
        image = torch.from_numpy(pixels[..., None] if pixels.ndim == 2 else pixels).permute(2, 0, 1)
        by_hand.append(functional.center_crop(functional.resize(image, [side]), [square]))
    np.testing.assert_allclose(model.embed(torch.stack(by_hand).numpy()), saved, rtol=1e-4, atol=1e-5)
    # A plain resize of the whole picture to 16x16 (what a run trained on arrays does) would embed them otherwise.
    model.transform = None
    assert not np.allclose(model.embed(list(files)), saved, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("through_transform", [True, False])
def test_a_damaged_file_fails_embedding_in_one_line_about_the_file(streamed_run, tmp_path, through_transform):
    import metriclab

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    model = metriclab.load_model(streamed_run.path, device="cpu")
    if not through_transform:
        model.transform = None  # as a run trained on arrays reads files
    with pytest.raises(MetricLabError, match="broken.jpg is not a readable image") as err:
        model.embed([broken])
    assert "skip_unreadable" not in str(err.value)  # a training option: nothing embedding can take


def test_a_streamed_run_s_split_embeds_and_exports_by_its_files(streamed_run, tree, tmp_path):
    """``DATASET:SPLIT`` of a run trained on files (what `metriclab export` checks on by default) names the files,
    labelled by class folder as the folder itself reads, so either can search or score the other."""
    from conftest import cli

    import metriclab
    from metriclab.inference import run_dataset
    from metriclab.inference.search import load_embedding_set

    run = streamed_run
    saved, labels = run.embeddings("test")
    dataset = run_dataset(run)
    model = metriclab.load_model(run.path, device="cpu")
    items = model.inputs("image-folder:test")
    assert list(items.paths) == dataset.test.paths and items.images is None
    names = [dataset.classes[i] for i in labels]
    assert list(items.labels) == names == [Path(p).parent.name for p in items.paths]
    np.testing.assert_allclose(model.embed("image-folder:test"), saved, rtol=1e-4, atol=1e-5)

    out = tmp_path / "test.npz"
    result = cli("embed", run.path, "image-folder:test", "-o", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    written = load_embedding_set(out)
    assert list(written.labels) == names and all(Path(p).is_file() for p in written.paths)

    result = cli("search", run.path, tree, "--gallery", "image-folder:test", "-k", "3", "--evaluate", "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)["scores"]
    assert scores["queries_scored"] == sum(1 for f in tree.rglob("*") if f.is_file()) and scores["precision@1"] > 0
    assert scores["queries_in_gallery"] == len(items)  # the test split's own files leave themselves out

    result = cli("export", run.path, "--format", "torchscript", "-o", tmp_path / "model.pt")
    assert result.exit_code == 0, result.output
    assert "image-folder" in result.stdout and (tmp_path / "model.pt").is_file()


def test_evaluate_on_a_csv_whose_paths_are_relative_to_another_folder(streamed_run, tree, tmp_path):
    """A CSV kept apart from its images: one line naming dataset_root, then `--dataset-args dataset_root=DIR`,
    and the CSV's query/gallery protocol."""
    from conftest import cli, one_line_error

    rows = [{**r, "path": str(Path(r["path"]).relative_to(tree.parent) if Path(r["path"]).is_absolute() else r["path"])}
            for r in oml_rows(tree)]  # fmt: skip
    path = write_csv(tmp_path, rows, "elsewhere.csv")  # every path relative to tree's folder, not the CSV's
    args = ["evaluate", streamed_run.path, "--dataset", "csv", "--data-dir", path, "--no-clustering", "--json"]
    line = one_line_error(cli(*args))
    assert f"none of the {len(rows)} images" in line and "--dataset-args dataset_root=DIR" in line

    result = cli(*args, "--dataset-args", f"dataset_root={tree.parent}")
    assert result.exit_code == 0, result.output
    (scores,) = json.loads(result.stdout)
    assert (
        scores["key"] == f"csv/{scores['metric']}"
        and scores["test_size"] == 24
        and 0 < scores["test_loo"]["precision@1"] <= 1
    )
    assert scores["key"] in json.loads((streamed_run.path / "metrics.json").read_text())["evaluations"]
    # the CSV's own protocol, though the run was trained on another dataset: its queries searched in its gallery
    assert scores["query_gallery"]["queries"] == 12 and scores["query_gallery"]["gallery"] == 12
    assert set(scores["by_category"]) == {"round", "straight"}
    assert one_line_error(cli(*args, "--dataset-args", "dataset_root")).endswith("pass e.g. dataset_root=/data/images")

    # without query/gallery marks: leave-one-out, per category too
    unmarked = [{k: v for k, v in r.items() if not k.startswith("is_")} for r in rows]
    path = write_csv(tmp_path, unmarked, "unmarked.csv")
    args = ["evaluate", streamed_run.path, "--dataset", "csv", "--data-dir", path, "--no-clustering", "--json"]
    result = cli(*args, "--dataset-args", f"dataset_root={tree.parent}")
    assert result.exit_code == 0, result.output
    (scores,) = json.loads(result.stdout)
    assert "query_gallery" not in scores and set(scores["by_category"]) == {"round", "straight"}
