"""The Siamese network: one shared tower by default, or two towers (pseudo-siamese)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from metriclab.errors import MetricLabError


class SiameseNetwork(nn.Module):
    """Embeds inputs with tower 0 (shared weights) or, for a pseudo-siamese net, tower 0 or 1.

    With shared weights both inputs of a pair go through the same tower, so a batch is
    embedded once and pairs are formed from it; with two towers the second element of
    each pair is embedded by tower 1 (the engine passes it to the loss as ``ref_emb``).
    """

    def __init__(self, tower: nn.Module, second_tower: nn.Module | None = None, channels: int = 1) -> None:
        super().__init__()
        self.towers = nn.ModuleList([tower] if second_tower is None else [tower, second_tower])
        # Per-channel input standardisation, saved with the weights so evaluation embeds exactly as training did.
        self.register_buffer("input_mean", torch.zeros(channels, 1, 1))
        self.register_buffer("input_std", torch.ones(channels, 1, 1))
        # A tower that starts from pretrained weights expects the inputs those weights were trained on:
        # its own mean and std (timm's pretrained config) replace the dataset's statistics.
        config = getattr(tower, "data_config", None) if getattr(tower, "weights", None) else None
        self.statistics_fixed = config is not None
        if config is not None:
            mean, std = torch.tensor(config["mean"]), torch.tensor(config["std"])
            if channels != len(mean):  # grey images for an RGB backbone: the channels' average
                mean, std = mean.mean().expand(channels), std.mean().expand(channels)
            self.input_mean.copy_(mean.view(-1, 1, 1))
            self.input_std.copy_(std.view(-1, 1, 1))
        # Convolutions run faster on channels-last (NHWC) tensors: oneDNN on CPUs, tensor cores on GPUs.
        # Same values, other strides; on CPU this halved the ConvNet's forward pass (batch 256, 2 cores).
        self.memory_format = torch.channels_last if any(isinstance(m, nn.Conv2d) for m in self.modules()) else None
        if self.memory_format is not None:
            self.to(memory_format=self.memory_format)

    @torch.no_grad()
    def fit_input_statistics(self, images: torch.Tensor, chunk: int = 8192) -> None:
        """Set the standardisation to the per-channel mean and std of uint8 ``images`` (N, C, H, W).

        A network whose tower starts from pretrained weights keeps the backbone's own statistics.
        """
        if self.statistics_fixed:
            return
        total = torch.zeros(images.shape[1], dtype=torch.float64, device=images.device)
        squares = torch.zeros_like(total)
        for start in range(0, images.shape[0], chunk):
            x = images[start : start + chunk].double().div_(255)
            total += x.sum(dim=(0, 2, 3))
            squares += x.pow(2).sum(dim=(0, 2, 3))
        count = images.shape[0] * images.shape[2] * images.shape[3]
        mean = total / count
        std = (squares / count - mean.pow(2)).clamp_min(1e-12).sqrt()
        self.input_mean.copy_(mean.view(-1, 1, 1))
        self.input_std.copy_(std.view(-1, 1, 1))

    @property
    def embedding_dim(self) -> int | None:
        """The width of the embeddings, where the tower says (a backbone's head does); else None."""
        return getattr(self.towers[0], "embedding_dim", None)

    @property
    def data_config(self) -> dict[str, Any] | None:
        """The backbone's own input size, mean, std and interpolation (what transforms should default to), or None."""
        return getattr(self.towers[0], "data_config", None)

    @property
    def shares_weights(self) -> bool:
        """True when both inputs of a pair go through the same tower."""
        return len(self.towers) == 1

    def forward(self, images: torch.Tensor, tower: int = 0) -> torch.Tensor:
        """Embeddings ``(N, D)`` of float images ``(N, C, H, W)`` in [0, 1] (standardised here)."""
        x = (images - self.input_mean) / self.input_std
        if self.memory_format is not None:
            x = x.contiguous(memory_format=self.memory_format)
        return self.towers[min(tower, len(self.towers) - 1)](x)


def load_weights(model: nn.Module, path: Any) -> None:
    """Load safetensors weights into ``model``, explaining a mismatch instead of a raw traceback."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for damaged files
        raise MetricLabError(f"{path} is not a readable safetensors file ({err}); retrain or restore the file") from err
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise MetricLabError(
            f"weights in {path} do not fit the model described by the run's config.json ({str(err).splitlines()[0]})"
        ) from err


# Images per forward pass when embedding. On a 2-core Xeon the Fashion-MNIST ConvNet embeds 28x28 images 2.1-2.3x
# faster in batches of 128-512 than of 2,048, whose activations (~100 MB a layer) no cache holds; a GPU wants the
# larger batches.
CPU_EMBED_BATCH = 256
EMBED_BATCH = 2048


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor, batch_size: int | None = None, tower: int = 0) -> torch.Tensor:
    """Float32 embeddings of uint8 ``images`` (N, C, H, W), computed in eval mode in batches on the model's device
    (``batch_size`` images at a time; by default 256 on a CPU and 2,048 elsewhere)."""
    device = next(model.parameters()).device
    batch_size = batch_size or (CPU_EMBED_BATCH if device.type == "cpu" else EMBED_BATCH)
    was_training = model.training
    model.eval()
    try:
        chunks = [
            model(images[i : i + batch_size].to(device, non_blocking=True).float().div_(255), tower=tower).float()
            for i in range(0, images.shape[0], batch_size)
        ]
    finally:
        model.train(was_training)
    if not chunks:
        return torch.empty(0, 0, device=device)
    return torch.cat(chunks)
