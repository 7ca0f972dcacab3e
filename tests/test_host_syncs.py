"""The training loop does not wait on the host between logging steps.

On a GPU, ``.item()``, ``bool(tensor)``, ``.cpu()``, ``nonzero`` and friends stall the CPU until
the GPU has caught up. CI has no GPU, so this test counts, on the CPU, every such call made by
metriclab's own code during training and checks the count does not grow with the number of steps.
Miners and losses that return a data-dependent number of pairs or triplets (pytorch-metric-learning's
index tuples) need that number on the host; the first test trains with a loss that needs none, so what it
measures is the loop itself. The built-in miners' fused objectives (``miner.fuse(loss)``) need none either.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import metriclab_plugins
import torch
from conftest import tiny_recipe
from torch.overrides import TorchFunctionMode

import metriclab
from metriclab import registry
from metriclab.training.engine import train

OURS = (str(Path(metriclab.__file__).parent), str(Path(metriclab_plugins.__file__).parent))
TORCH = str(Path(torch.__file__).parent)
SYNCING = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.Tensor.masked_select,
    torch.masked_select,
    torch.unique,
    torch.Tensor.unique,
}
PLUGIN = '''
import torch
from metriclab.registry import register_loss

@register_loss("sync-free-test")
class SpreadLoss(torch.nn.Module):
    """Pull every embedding towards its class's slot on the unit circle: no data-dependent shapes."""

    def forward(self, embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None):
        angle = labels.float()
        target = torch.stack([angle.cos(), angle.sin()], 1)
        return (embeddings - target).pow(2).sum(1).mean()
'''


class HostSyncs(TorchFunctionMode):
    """Counts syncing tensor calls by the metriclab line that made them."""

    def __init__(self, where: tuple[str, ...] = OURS) -> None:
        super().__init__()
        self.where = where  # count calls made from files under these folders
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        syncing = func in SYNCING
        if func is torch.Tensor.__getitem__:  # boolean-mask indexing runs nonzero
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            syncing = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
        if func is torch.Tensor.to:
            syncing = any(str(a) == "cpu" for a in (*args[1:], *kwargs.values()))
        if syncing:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(TORCH):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(self.where):
                where = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {frame.f_code.co_name}"
                self.calls[f"{where} {getattr(func, '__name__', func)}"] += 1
        return func(*args, **kwargs)


def syncs_during_training(tmp_path: Path, steps: int, **components) -> Counter[str]:
    if not components:  # the loss of PLUGIN, from the file the test wrote
        components = {"loss": "sync-free-test", "miner": None, "plugins": [str(tmp_path / "sync_free_loss.py")]}
    recipe = tiny_recipe(
        tmp_path / f"run-{steps}-{components['loss']}",
        encoder_args={"hidden": [16]},
        **components,
        batch_size=32,
        epochs=1,
        max_steps=steps,
        log_every=1000,  # only the last step logs
        embed_train=False,
    )
    with HostSyncs() as mode:
        train(recipe)
    return mode.calls


def test_training_steps_add_no_host_syncs(tmp_path):
    (tmp_path / "sync_free_loss.py").write_text(PLUGIN)
    short, long = syncs_during_training(tmp_path, 3), syncs_during_training(tmp_path, 9)
    assert sum(short.values()) > 0, "the counter saw none of the syncs at the end of a run: it is not working"
    per_step = {k: long[k] - short[k] for k in long if long[k] != short[k]}
    assert not per_step, f"host syncs that grow with the number of steps (6 more steps): {per_step}"


def test_the_seed_recipes_fused_objective_adds_no_host_syncs(tmp_path):
    seed_recipe = {"loss": "contrastive", "miner": "random-pairs"}  # recipes/mnist_siamese.py
    short, long = (syncs_during_training(tmp_path, steps, **seed_recipe) for steps in (3, 9))
    per_step = {k: long[k] - short[k] for k in long if long[k] != short[k]}
    assert not per_step, f"host syncs in metriclab or its plugins that grow with the steps: {per_step}"


def test_the_dense_triplet_loss_makes_no_host_sync_anywhere():
    # What the semi-hard recipe runs on a GPU (on a CPU it mines with a sorted search, which syncs).
    generator = torch.Generator().manual_seed(0)
    emb = torch.randn(64, 8, generator=generator, requires_grad=True)
    labels = torch.randint(0, 5, (64,), generator=generator)
    loss, miner = registry.create("loss", "triplet"), registry.create("miner", "semi-hard")
    with HostSyncs(where=("/",)) as mode:  # pytorch-metric-learning's code too
        value = miner.dense_loss(loss, emb, labels)
    value.backward()
    assert not mode.calls, dict(mode.calls)
    with HostSyncs(where=("/",)) as mode:  # the counter does see the syncs of the mined way
        loss(emb, labels, miner(emb, labels))
    assert mode.calls
