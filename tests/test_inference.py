"""Using a trained run: `metriclab.load_model(RUN).embed`, `metriclab embed` and `metriclab export`."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import cli, one_line_error
from PIL import Image

from metriclab.errors import MetricLabError
from metriclab.inference import embed_run
from metriclab.inference.search import load_embedding_set
from metriclab.runs import Run


def test_load_model_embeds_a_split_as_evaluate_does(small_run, model):
    expected, labels = embed_run(Run(small_run), "test", model=model.network)
    items = model.inputs("digits:test")
    got = model.embed(items.images, batch_size=100)
    assert got.shape == (len(labels), 8) and got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(items.labels, labels)
    assert model.preprocessing["input_shape"] == [1, 8, 8]
    assert len(model.preprocessing["standardisation (inside the model)"]["mean"]) == 1


def test_image_files_embed_like_the_pixels_and_are_resized_and_converted(model, image_folder, tmp_path):
    pixels = model.inputs("digits:test").images
    paths = sorted(image_folder.rglob("*.png"))
    got = model.embed(paths)
    index = [int(p.stem) for p in paths]
    np.testing.assert_array_equal(got, model.embed(pixels[index]))
    # an RGB image of another size becomes the grey 8x8 image the model takes (ITU-R 601 luma)
    Image.new("RGB", (20, 12), (10, 200, 30)).save(tmp_path / "big.png")
    from metriclab.inference.inputs import load_images

    loaded = load_images([tmp_path / "big.png"], (1, 8, 8))
    assert loaded.shape == (1, 1, 8, 8) and loaded.dtype == torch.uint8
    assert set(loaded.flatten().tolist()) == {round(0.299 * 10 + 0.587 * 200 + 0.114 * 30)}
    assert model.embed([tmp_path / "big.png"]).shape == (1, 8)


def test_embed_arrays_of_the_wrong_shape_or_type_are_refused(model):
    with pytest.raises(MetricLabError, match="takes"):
        model.embed(np.zeros((2, 3, 8, 8), dtype=np.uint8))
    with pytest.raises(MetricLabError, match="uint8"):
        model.embed(np.zeros((2, 1, 8, 8), dtype=np.float32))
    assert model.embed(np.zeros((2, 8, 8), dtype=np.uint8)).shape == (2, 8)  # (N, H, W) grey is accepted


@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_cli_embed_writes_embeddings_labels_and_paths(small_run, model, image_folder, tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow", reason="Parquet output needs the parquet extra (pyarrow)")
    out = tmp_path / f"folder{suffix}"
    result = cli("embed", small_run, image_folder, "-o", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "30 images" in result.stdout and str(out) in result.stdout
    assert result.stderr.strip("\n") == result.stderr  # no progress bar's empty lines when not on a terminal
    data = load_embedding_set(out)
    paths = sorted(str(p) for p in image_folder.rglob("*.png"))
    assert list(data.paths) == paths
    np.testing.assert_array_equal(data.embeddings, model.embed(paths))
    np.testing.assert_array_equal(data.labels, [int(p.split("/")[-2]) for p in paths])
    assert data.meta["embedding_dim"] == 8 and data.meta["run"] == str(small_run)


def test_cli_embed_a_dataset_split_and_an_open_metric_learning_csv(small_run, model, image_folder, tmp_path):
    result = cli("embed", small_run, "digits:test", "-o", tmp_path / "test.npz", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    data = load_embedding_set(tmp_path / "test.npz")
    assert summary["count"] == len(data) == 450 and summary["labels"]
    np.testing.assert_array_equal(data.embeddings, model.embed(model.inputs("digits:test").images))
    assert data.paths[3] == "digits:test:3"

    rows = [
        {"label": p.parent.name, "path": str(p.relative_to(image_folder)), "split": "validation", "is_query": i % 2}
        for i, p in enumerate(sorted(image_folder.rglob("*.png")))
    ]
    table = image_folder / "dataset.csv"
    with table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["label", "path", "split", "is_query"])
        writer.writeheader()
        writer.writerows(rows)
    result = cli("embed", small_run, table, "-o", tmp_path / "csv.npz")
    assert result.exit_code == 0, result.output
    data = load_embedding_set(tmp_path / "csv.npz")
    assert list(data.labels) == [int(r["label"]) for r in rows]
    assert list(data.columns["is_query"]) == [bool(r["is_query"]) for r in rows]
    assert set(data.columns["split"]) == {"validation"}
    # search scores the rows it is given, and says that a CSV's marks are applied by evaluate only
    searched = cli("search", small_run, tmp_path / "csv.npz", "--gallery", tmp_path / "csv.npz", "--evaluate")
    assert searched.exit_code == 0 and "marks are kept in the files but not applied here" in " ".join(
        searched.stderr.split()
    )


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_runs_outside_metriclab_like_pytorch(small_run, model, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="ONNX export needs the onnx extra (onnx, onnxscript, onnxruntime)")
        pytest.importorskip("onnxscript", reason="ONNX export needs the onnx extra (onnx, onnxscript, onnxruntime)")
    out = tmp_path / f"model.{fmt}"
    result = cli("export", small_run, "--format", fmt, "-o", out)
    assert result.exit_code == 0, result.output
    assert "largest difference vs PyTorch" in result.stdout
    images = model.inputs("digits:test").images[100:117]
    expected = model.embed(images)
    x = images.float().numpy() / 255
    for n in (3, 17):  # the batch dimension is dynamic
        if fmt == "onnx":
            import onnxruntime

            session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            got = session.run(None, {"images": x[:n]})[0]
        else:
            got = torch.jit.load(str(out)).eval()(torch.from_numpy(x[:n])).detach().numpy()
        np.testing.assert_allclose(got, expected[:n], atol=1e-4, rtol=0)
    from metriclab.inference.export import read_metadata

    meta = read_metadata(out)
    assert meta["embedding_dim"] == 8 and meta["preprocessing"]["input_shape"] == [1, 8, 8]
    assert meta["preprocessing"]["standardisation (inside the model)"]["mean"] == pytest.approx(
        model.network.input_mean.flatten().tolist()
    )


def test_bad_inputs_fail_in_one_line(small_run, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    line = one_line_error(cli("embed", small_run, tmp_path / "broken.png", "-o", tmp_path / "x.npz"))
    assert "not a readable image" in line
    line = one_line_error(cli("embed", small_run, tmp_path / "missing-folder", "-o", tmp_path / "x.npz"))
    assert "not an image file, folder or dataset CSV" in line
    (tmp_path / "empty").mkdir()
    assert "no image files" in one_line_error(cli("embed", small_run, tmp_path / "empty", "-o", tmp_path / "x.npz"))
    (tmp_path / "bad.csv").write_text("path\na.png\n")
    assert "label" in one_line_error(cli("embed", small_run, tmp_path / "bad.csv", "-o", tmp_path / "x.npz"))
    line = one_line_error(cli("embed", small_run, "digits:test", "-o", tmp_path / "x.txt"))
    assert ".npz or .parquet" in line
    assert "unknown export format" in one_line_error(cli("export", small_run, "--format", "tflite"))
    if not torch.cuda.is_available():
        line = one_line_error(cli("embed", small_run, "digits:test", "-o", tmp_path / "x.npz", "--device", "cuda"))
        assert "no CUDA GPU" in line


def test_csv_crop_columns_crop_before_embedding(model, tmp_path):
    """A dataset CSV's x_1..y_2 cut the region out first, as training on that CSV did; empty cells keep the whole."""
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (30, 40), dtype=np.uint8))
    picture.save(tmp_path / "whole.png")
    picture.crop((10, 5, 30, 15)).save(tmp_path / "cut.png")
    table = "label,path,x_1,y_1,x_2,y_2\n0,whole.png,10,5,30,15\n1,whole.png,,,,\n"
    (tmp_path / "data.csv").write_text(table)
    rows = model.embed(tmp_path / "data.csv")
    np.testing.assert_array_equal(rows, model.embed([tmp_path / "cut.png", tmp_path / "whole.png"]))
    assert not np.allclose(rows[0], rows[1])
    (tmp_path / "bad.csv").write_text("label,path,x_1,y_1,x_2,y_2\n0,whole.png,30,5,10,15\n")
    with pytest.raises(MetricLabError, match=r"row 2: crop x_1=30 x_2=10 y_1=5 y_2=15 is empty or negative; give four"):
        model.embed(tmp_path / "bad.csv")


def test_crops_travel_with_the_embeddings_and_pictures_show_them(small_run, model, tmp_path):
    """An embedding file of a CSV with crops keeps them, so `search --figure` pictures the region that was embedded."""
    rng = np.random.default_rng(1)
    picture = Image.fromarray(rng.integers(0, 256, (30, 40), dtype=np.uint8))
    picture.save(tmp_path / "whole.png")
    picture.crop((10, 5, 30, 15)).save(tmp_path / "cut.png")
    (tmp_path / "data.csv").write_text("label,path,x_1,y_1,x_2,y_2\n0,whole.png,10,5,30,15\n1,whole.png,,,,\n")
    out = tmp_path / "crops.npz"
    assert cli("embed", small_run, tmp_path / "data.csv", "-o", out, "--device", "cpu").exit_code == 0
    data = load_embedding_set(out)
    np.testing.assert_array_equal(data.boxes(), [[10, 5, 30, 15], [-1, -1, -1, -1]])
    shown = model.images(data.paths, data.boxes())
    np.testing.assert_array_equal(shown[0], model.images([tmp_path / "cut.png"])[0])
    np.testing.assert_array_equal(shown[1], model.images([tmp_path / "whole.png"])[0])
    assert not np.array_equal(shown[0], model.images(data.paths)[0])  # without the crops: the whole picture
    figure = tmp_path / "search.png"
    result = cli("search", small_run, out, "--gallery", out, "-k", "1", "--figure", figure, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert figure.stat().st_size > 0


def test_embedding_with_a_trained_run_does_not_import_the_losses_libraries(small_run, image_folder, tmp_path):
    """Rebuilding a run's encoder imports only the encoders' plugins: pytorch-metric-learning (the losses and
    miners) and, through it, scipy.stats cost ~1 s to import and play no part in embedding."""
    out = tmp_path / "emb.npz"
    result = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "metriclab",
            "embed",
            str(small_run),
            str(image_folder),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(load_embedding_set(out).embeddings) == 30
    imported = {
        line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")
    }
    assert {"torch", "metriclab.inference"} <= imported  # (entry points are imported by importlib: not listed)
    assert not {name for name in imported if name.split(".")[0] == "pytorch_metric_learning"}
