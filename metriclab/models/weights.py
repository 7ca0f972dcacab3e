"""Loading a backbone's weights from a local file, safely and with a readable account of what did not fit.

``.safetensors`` files are read with safetensors; ``.pth``/``.pt``/``.bin`` files with
``torch.load(weights_only=True)``, so a pickle that would run code is refused, never executed.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metriclab.errors import MetricLabError

# Where checkpoints commonly nest their state dict, and prefixes that wrappers (DDP, EMA, Lightning) add.
_NESTED = ("state_dict", "model", "model_state_dict", "module")
_PREFIXES = ("module.", "model.", "backbone.")


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file (what config.json records about the weights a run started from)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` or weights-only torch file; MetricLabError for anything else."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MetricLabError(f"weights file {path} does not exist; pass weights=PATH to a .safetensors or .pth file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # noqa: BLE001 - safetensors raises several types for damaged files
            raise MetricLabError(f"{path} is not a readable safetensors file ({err}); download it again") from err
    try:
        data: Any = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise MetricLabError(
            f"refused to load {path}: it is not a weights-only torch file (unpickling it would run code); "
            "use weights you trust saved as tensors (torch.save(model.state_dict()) or .safetensors)"
        ) from err
    except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged or foreign file
        raise MetricLabError(f"{path} is not a readable torch weights file ({err}); download it again") from err
    for key in _NESTED:
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise MetricLabError(f"{path} holds no state dict of tensors; save one with torch.save(model.state_dict())")
    return data


def load_backbone_weights(
    backbone: nn.Module,
    path: str | Path,
    ignore: tuple[str, ...] = (),
    adapt: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """Load ``path`` into ``backbone``; return what config.json records (file, sha256, keys left out).

    Keys under ``ignore`` (the library's classifier, which the embedding head replaces) may be in the
    file without fitting; ``adapt`` may convert tensors first (RGB stem weights for grey images). Any
    other key of the file that the backbone lacks, any backbone key the file lacks, and any shape
    mismatch raise one MetricLabError naming the keys.
    """
    state = read_state_dict(path)
    own = backbone.state_dict()
    for prefix in _PREFIXES:  # wrappers' prefixes, removed only when that makes the keys fit
        if state and not any(k in own for k in state) and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    if adapt is not None:
        state = adapt(dict(state))
    ignored = sorted(k for k in state if k not in own and k.startswith(ignore)) if ignore else []
    state = {k: v for k, v in state.items() if k not in ignored}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
        raise MetricLabError(
            f"weights in {path} do not fit this backbone: {'; '.join(parts)} keys; pass the file saved from the "
            "same model name (and in_chans), e.g. timm's or torchvision's own checkpoint of it"
        )
    backbone.load_state_dict(state)
    return {"file": str(Path(path).expanduser().resolve()), "sha256": file_sha256(path), "ignored_keys": ignored}
