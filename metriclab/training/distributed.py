"""Cross-process gathers for metric learning: every process sees the global batch.

Each process embeds its shard; :func:`gather_with_grad` concatenates all shards in rank
order (the global batch order) while keeping the gradient of the local part, so every
process mines and computes the loss on the same global batch, as one process with an
N-times larger batch would. The local gradient is scaled by the world size because DDP
averages gradients over processes while the single-process gradient is their sum.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

from metriclab.data.sampling import shard_sizes


def _all_gather_padded(tensor: torch.Tensor, sizes: list[int], accelerator: Accelerator) -> torch.Tensor:
    """Gather tensors whose first dimensions are ``sizes`` (known on every process), in rank order."""
    longest = max(sizes)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = accelerator.gather(padded.contiguous()).reshape(len(sizes), longest, *tensor.shape[1:])
    return torch.cat([gathered[r, :n] for r, n in enumerate(sizes)])


def gather_with_grad(local: torch.Tensor, global_size: int, accelerator: Accelerator) -> torch.Tensor:
    """The global batch of embeddings; gradients flow (scaled by world size) into ``local`` only."""
    world = accelerator.num_processes
    if world == 1:
        return local
    sizes = shard_sizes(global_size, world)
    gathered = _all_gather_padded(local.detach(), sizes, accelerator)
    rank = accelerator.process_index
    start = sum(sizes[:rank])
    # Same value as `local`, gradient multiplied by `world` (DDP divides it again).
    scaled = local + (world - 1) * (local - local.detach())
    return torch.cat([gathered[:start], scaled, gathered[start + sizes[rank] :]])


def gather_shards(local: torch.Tensor, total: int, accelerator: Accelerator) -> torch.Tensor:
    """All processes' contiguous shards of ``total`` items, concatenated with no padding or duplicates."""
    if accelerator.num_processes == 1:
        return local
    return _all_gather_padded(local, shard_sizes(total, accelerator.num_processes), accelerator)
