"""Export a run's network for serving outside metriclab: ONNX (onnxruntime) or TorchScript.

The exported model takes float32 images ``(N, C, H, W)`` in [0, 1] (uint8 pixels / 255) with a dynamic
batch dimension, and returns ``(N, D)`` embeddings; the per-channel standardisation is inside it. The
preprocessing that comes before (how image files become those pixels) is written into the file's
metadata (ONNX ``metadata_props`` / a TorchScript extra file ``metriclab.json``). After writing, the
exported file is loaded and run on real inputs and compared with PyTorch: the largest difference is
returned, and a difference above ``tolerance`` is an error.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metriclab import __version__
from metriclab.errors import MetricLabError
from metriclab.inference.model import EmbeddingModel

log = logging.getLogger(__name__)
FORMATS = ("onnx", "torchscript")
TORCHSCRIPT_METADATA = "metriclab.json"


class _Tower(torch.nn.Module):
    """The network's first tower with its standardisation: ``forward(images)`` only, as exporters want."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)


def export_metadata(model: EmbeddingModel) -> dict[str, Any]:
    """What the exported file says about itself: the run, the input, the preprocessing, the output."""
    return {
        "producer": f"metriclab {__version__}",
        "run": str(model.run.path),
        "recipe": model.run.config.get("recipe", {}).get("name"),
        "embedding_dim": model.embedding_dim,
        "metric": model.metric,
        "input_name": "images",
        "output_name": "embeddings",
        "preprocessing": model.preprocessing,
    }


def _export_onnx(module: torch.nn.Module, sample: torch.Tensor, path: Path, metadata: dict[str, Any]) -> None:
    try:
        import onnx
    except ImportError as err:
        raise MetricLabError(
            "ONNX export needs onnx, onnxscript and onnxruntime: pip install 'metriclab[onnx]'"
        ) from err
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        module,
        (sample,),
        dynamo=True,
        input_names=["images"],
        output_names=["embeddings"],
        dynamic_shapes={"images": {0: batch}},
        external_data=False,
        verbose=False,
    )
    proto = program.model_proto
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.save(proto, str(path))


def _run_onnx(path: Path, images: np.ndarray) -> np.ndarray:
    try:
        import onnxruntime
    except ImportError as err:
        raise MetricLabError("checking an ONNX export needs onnxruntime: pip install 'metriclab[onnx]'") from err
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def _export_torchscript(module: torch.nn.Module, sample: torch.Tensor, path: Path, metadata: dict[str, Any]) -> None:
    with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export, but still the format
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(module, (sample,), check_trace=False)
    traced.save(str(path), _extra_files={TORCHSCRIPT_METADATA: json.dumps(metadata)})


def _run_torchscript(path: Path, images: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return loaded(torch.from_numpy(images)).numpy()


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata an exported file carries (ONNX ``metadata_props`` or TorchScript ``metriclab.json``)."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        out: dict[str, Any] = {}
        for entry in proto.metadata_props:
            try:
                out[entry.key] = json.loads(entry.value)
            except ValueError:
                out[entry.key] = entry.value
        return out
    files = {TORCHSCRIPT_METADATA: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    return json.loads(files[TORCHSCRIPT_METADATA])


def export_model(
    model: EmbeddingModel, path: str | Path, fmt: str, check_images: torch.Tensor, tolerance: float = 1e-4
) -> dict[str, Any]:
    """Write ``model`` as ``fmt`` to ``path``, run it on ``check_images`` (uint8) and compare with PyTorch.

    Returns ``{"path", "format", "max_abs_diff", "checked", "batch_sizes", "metadata"}``; the check runs the
    export at two batch sizes to prove the batch dimension is dynamic.
    """
    if fmt not in FORMATS:
        raise MetricLabError(f"unknown export format '{fmt}'; use one of {', '.join(FORMATS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = _Tower(copy.deepcopy(model.network).cpu()).eval()
    images = check_images.float().div(255)
    if len(images) < 2:
        raise MetricLabError("the export check needs at least 2 images; pass more inputs")
    metadata = export_metadata(model)
    log.info("exporting to %s", fmt)
    with torch.no_grad():
        if fmt == "onnx":
            _export_onnx(module, images[:2].contiguous(), path, metadata)
        else:
            _export_torchscript(module, images[:2].contiguous(), path, metadata)
        expected = module(images).numpy()
    log.info("checking %s against PyTorch on %d images", path.name, len(images))
    run = _run_onnx if fmt == "onnx" else _run_torchscript
    batches = sorted({len(images), max(1, len(images) // 2 - 1)})
    diff = 0.0
    for n in batches:
        got = run(path, images[:n].numpy())
        diff = max(diff, float(np.abs(got - expected[:n]).max()))
    if not diff <= tolerance:
        raise MetricLabError(
            f"the {fmt} export differs from PyTorch by up to {diff:.3g} (> {tolerance:g}); "
            "the model uses an operation the exporter does not translate faithfully: try the other format"
        )
    return {
        "path": str(path),
        "format": fmt,
        "max_abs_diff": diff,
        "checked": len(images),
        "batch_sizes": batches,
        "metadata": metadata,
    }
