"""A trained run as a ready-to-use embedding model: ``metriclab.load_model(RUN).embed(images or paths)``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metriclab.data import is_streaming
from metriclab.errors import MetricLabError
from metriclab.inference.inputs import (
    Inputs,
    check_images,
    file_inputs,
    is_dataset_split,
    load_images,
    read_inputs,
    split_inputs,
)
from metriclab.inference.rebuild import _input_shape, load_run_model, run_dataset, run_recipe
from metriclab.runs import Run

Progress = Callable[[int, int], None]


class EmbeddingModel:
    """A run's network with its preprocessing: image files or uint8 arrays in, float32 embeddings out.

    Preprocessing (also written into exported files): image files of a run trained on streamed files go
    through the run's own test-time transform (:attr:`transform`, as recorded in config.json), so a file
    embeds as the run's evaluation embedded it; for other runs they are converted to grey (1 channel) or
    RGB (3) and resized to the run's H x W (bilinear). uint8 pixels are divided by 255 and standardised
    by the per-channel mean and std saved with the weights (inside :attr:`network`).
    """

    def __init__(self, run: Run, network: torch.nn.Module, input_shape: tuple[int, ...], metric: str) -> None:
        self.run = run
        self.network = network
        self.input_shape = input_shape
        self.metric = metric
        self.embedding_dim = int(run_recipe(run).embedding_dim)
        self.test_transform = run.config.get("dataset", {}).get("transforms", {}).get("test")
        self.transform = None
        if self.test_transform:
            from metriclab import registry

            self.transform = registry.transforms.create(self.test_transform["name"], **self.test_transform["args"])

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.input_shape))
        return (
            f"EmbeddingModel({str(self.run.path)!r}, {shape} -> {self.embedding_dim}-D, {self.metric}, {self.device})"
        )

    @functools.cached_property
    def weights_sha256(self) -> str | None:
        """SHA-256 of the weights file the network was loaded from (recorded in embedding files), None without one."""
        from metriclab.models.weights import file_sha256

        path = self.run.weights_path
        return file_sha256(path) if path.is_file() else None

    @property
    def device(self) -> torch.device:
        """Where the network runs."""
        return next(self.network.parameters()).device

    @property
    def preprocessing(self) -> dict[str, Any]:
        """The preprocessing, as JSON: what the network's input is and how image files become it."""
        network = self.network
        height, width = self.input_shape[1:]
        files = {"mode": "L (grey)" if self.input_shape[0] == 1 else "RGB"}
        if self.test_transform:
            files["test_transform"] = self.test_transform  # torchvision.transforms.v2 by name, as in training
            # ... and what it does, exactly: e.g. Resize(size=[37], ..., antialias=True), CenterCrop(size=(32, 32))
            steps = [line.strip() for line in repr(self.transform).splitlines()]
            files["test_transform_steps"] = [line for line in steps if line not in ("Compose(", ")")]
        else:
            files["resize"] = f"{width}x{height} (W x H), PIL bilinear, when sizes differ"
        return {
            "input": "float32 (N, C, H, W) in [0, 1]: uint8 pixels / 255",
            "input_shape": list(self.input_shape),
            "image_files": files,
            "standardisation (inside the model)": {
                "mean": network.input_mean.flatten().tolist(),
                "std": network.input_std.flatten().tolist(),
            },
            "output": f"float32 (N, {self.embedding_dim}) embeddings; compare with {self.metric} distance",
        }

    def inputs(self, spec: str | Path | Sequence[str | Path]) -> Inputs:
        """What ``spec`` names (see :func:`metriclab.inference.inputs.read_inputs`), dataset splits through the run."""

        def dataset_split(name: str, split: str) -> Inputs:
            own = name == run_recipe(self.run).dataset
            dataset = run_dataset(self.run, None if own else name)
            if is_streaming(dataset):  # its files, through the run's test-time transform as its evaluation did
                return file_inputs(name, split, dataset.files(split), dataset.classes)
            return split_inputs(name, split, *dataset.split(split))

        return read_inputs(spec, dataset_split)

    def images(self, paths: Sequence[str], boxes: np.ndarray | None = None) -> np.ndarray:
        """uint8 ``(N, C, H, W)`` images of paths as written by ``embed``: files, or ``DATASET:SPLIT:INDEX`` items.

        ``boxes`` (int64 ``(N, 4)``, -1 where none; :meth:`EmbeddingSet.boxes`) crops files as they were embedded.
        """
        out = []
        splits: dict[str, torch.Tensor] = {}
        for i, path in enumerate(paths):
            spec, _, index = str(path).rpartition(":")
            if index.isdigit() and is_dataset_split(spec):
                if spec not in splits:
                    splits[spec] = self.inputs(spec).images
                out.append(splits[spec][int(index)].numpy())
            else:
                box = None if boxes is None else boxes[i : i + 1]
                out.append(load_images([path], self.input_shape, self.transform, box)[0].numpy())
        return np.stack(out)

    @torch.no_grad()
    def embed(
        self,
        images: Any,
        batch_size: int = 256,
        progress: Progress | None = None,
        unreadable: list[tuple[int, str]] | None = None,
    ) -> np.ndarray:
        """Float32 ``(N, D)`` embeddings of uint8 images ``(N, C, H, W)``, image paths, a folder, a CSV or an Inputs.

        ``progress(done, total)`` is called after each batch. An image file that cannot be decoded stops the call;
        given an ``unreadable`` list, ``(item, why)`` is appended to it instead and that item's row is not its
        embedding (leave it out).
        """
        if isinstance(images, (torch.Tensor, np.ndarray)):
            items = Inputs(
                np.array([f"[{i}]" for i in range(len(images))]), images=check_images(images, self.input_shape)
            )
        elif isinstance(images, Inputs):
            items = images
        else:
            items = self.inputs(images)
        batch = items.batches(self.input_shape, self.transform, unreadable)
        total = len(items)
        out = np.empty((total, self.embedding_dim), dtype=np.float32)
        device = self.device
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            x = batch(start, stop).to(device, non_blocking=True).float().div_(255)
            out[start:stop] = self.network(x).float().cpu().numpy()
            if progress is not None:
                progress(stop, total)
        if not np.isfinite(out).all():
            raise MetricLabError(
                f"the weights in {self.run.weights_path} produce NaN or inf embeddings (training diverged); retrain"
            )
        return out

    def __call__(self, images: Any) -> np.ndarray:
        """Same as :meth:`embed`."""
        return self.embed(images)


def load_model(run: str | Path | Run, device: str | torch.device | None = None) -> EmbeddingModel:
    """The trained model of run directory ``run`` (weights from model.safetensors only), in eval mode on ``device``.

    ``device`` defaults to CUDA when available. Plugins the run was trained with must be loaded first
    (``metriclab.registry.load_plugin``); a run's own plugin list is never imported.
    """
    loaded = run if isinstance(run, Run) else Run(run)
    if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
        raise MetricLabError(f"device '{device}' was asked for but no CUDA GPU is available here; use --device cpu")
    network = load_run_model(loaded, device)
    return EmbeddingModel(loaded, network, _input_shape(loaded), run_recipe(loaded).metric)
