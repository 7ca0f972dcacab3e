"""Training steps as CUDA graphs: the host launches a whole step's kernels with one replay.

On a GPU the small networks metriclab trains are bound by the host, not the device: a step
is 120-135 kernels, and Python, autograd and the launches cost about 45 µs of host time per
kernel against a few µs of GPU work each (H200, BENCHMARKS.md). Captured once, a step costs
one ``replay()``.

What is captured is torch's "whole network capture" (CUDA semantics notes): warm-up steps
run eagerly on a side stream, then one step of the steady batch size is recorded, then
replayed for every batch of that size. A step is captured only if it can be:

- the device work depends on nothing but tensors on the device: the objective declares it
  (``objective.graph_generators``, set by the built-in fused objectives, returns the
  generators it draws from so replays advance them), and the warm-up steps asked for no
  host synchronisation (a data-dependent size, an ``.item()``); otherwise every step stays eager;
- one process, a torch optimizer stepped directly (no fp16 loss scaling, no gradient
  accumulation), no ``torch.compile``, and ``on_nonfinite`` is not ``skip``.

Batches of another size (an epoch's last, shorter batch) run eagerly on the same parameters,
gradients and optimizer state: all of them stay at their addresses, so checkpoints,
evaluation and eager steps see what the graph updates. The learning rate is fixed once captured.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

WARMUP_STEPS = 3  # torch's recipe warms up for 3 iterations (lazy state, cuDNN's algorithm choice)


def why_not_captured(
    device: torch.device,
    num_processes: int,
    stepper: Any,
    objective: Any,
    *,
    enabled: bool = True,
    compiled: bool = False,
    skip_nonfinite: bool = False,
    scheduled: bool = False,
    unfreezes: bool = False,
) -> str | None:
    """Why training steps can't be CUDA graphs here, or None when :class:`StepGraph` may capture them."""
    if not enabled:
        return "off in the recipe"
    if device.type != "cuda":
        return "not on a CUDA device"
    if num_processes > 1:
        return "several processes"
    if not isinstance(stepper, torch.optim.Optimizer) or not type(stepper).__module__.startswith("torch.optim"):
        return "the optimizer is not a torch optimizer stepped directly (fp16 loss scaling or gradient accumulation)"
    # Replays must not bake in host-side optimizer state (step counts): SGD has none; others must keep it on the device.
    on_device = all(g.get("capturable") or (g.get("fused") and "capturable" in g) for g in stepper.param_groups)
    if not (type(stepper) is torch.optim.SGD or on_device):
        return "the optimizer keeps state on the host (SGD, fused Adam/AdamW, or capturable=True can be captured)"
    if compiled:
        return "the network is compiled"
    if skip_nonfinite:
        return "on_nonfinite='skip' checks every loss on the host"
    if unfreezes:
        return "the backbone is unfrozen during the run (a captured step keeps training what it trained at capture)"
    if scheduled:
        return "a learning-rate schedule changes the lr every step (a captured step keeps the lr of its capture)"
    if not hasattr(objective, "graph_generators"):
        return "the objective does not declare fixed shapes (only the built-in fused miner + loss pairs do)"
    return None


class StepGraph:
    """``step(batch) -> loss``, replayed from a CUDA graph for batches of the steady size.

    ``step`` must leave every gradient ``None`` (it zeroes with ``set_to_none=True``), so the
    captured backward writes gradients into the graph's own memory. Batches of ``batch_size``
    indices are captured, after ``WARMUP_STEPS`` eager ones; other sizes always run eagerly.
    """

    def __init__(
        self,
        step: Callable[[torch.Tensor], torch.Tensor],
        optimizer: torch.optim.Optimizer,
        objective: Any,
        batch_size: int,
    ):
        self.step, self.optimizer, self.objective, self.size = step, optimizer, objective, batch_size
        self.warm = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.refused: str | None = None  # set when a warm-up step showed the step can't be captured
        self.captured_at_call: int | None = None
        self.calls = 0
        self._batch: torch.Tensor | None = None
        self._loss: torch.Tensor | None = None

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """This step's loss (a new tensor: the graph's own output is overwritten by the next replay)."""
        self.calls += 1
        if self.refused is not None or batch.numel() != self.size:
            return self.step(batch).detach()
        if self.graph is not None:
            self._batch.copy_(batch)
            self.graph.replay()
            return self._loss.clone()
        if self.warm < WARMUP_STEPS:
            self.warm += 1
            return self._warm_up(batch)
        self._capture(batch)
        self.graph.replay()  # capturing records the work without doing it
        return self._loss.clone()

    def _warm_up(self, batch: torch.Tensor) -> torch.Tensor:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        mode = torch.cuda.get_sync_debug_mode()  # the user's own setting, restored after
        with warnings.catch_warnings(record=True) as caught, torch.cuda.stream(side):
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                loss = self.step(batch)
            finally:
                torch.cuda.set_sync_debug_mode(mode)
        torch.cuda.current_stream().wait_stream(side)
        syncs = [w for w in caught if "called a synchronizing CUDA operation" in str(w.message)]
        if syncs:
            self.refused = f"the step synchronises with the host ({syncs[0].filename}:{syncs[0].lineno})"
        for w in caught:  # other warnings are not ours to swallow (but the debug mode's notice about itself is)
            if w not in syncs and not str(w.message).startswith("Synchronization debug mode"):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        # Detached: a loss that keeps its autograd graph alive keeps AccumulateGrad nodes made on this side
        # stream, which the capture (on its own stream) would then have to synchronise with.
        return loss.detach()

    def _capture(self, batch: torch.Tensor) -> None:
        self._batch = batch.clone()
        graph = torch.cuda.CUDAGraph()
        for generator in self.objective.graph_generators():
            graph.register_generator_state(generator)
        # Optimizers with the flag must be told a graph is being captured; their state is on the device already.
        flagged = [g for g in self.optimizer.param_groups if "capturable" in g]
        before = [g["capturable"] for g in flagged]
        for group in flagged:
            group["capturable"] = True
        try:
            with torch.cuda.graph(graph):
                self._loss = self.step(self._batch).detach()  # keeps no autograd graph (see _warm_up)
        finally:
            for group, value in zip(flagged, before, strict=True):
                group["capturable"] = value
        self.graph, self.captured_at_call = graph, self.calls
