"""Evaluation on several processes: each ranks its share of the queries; results equal one process's exactly.

Two ways in, one code path (:func:`metriclab.metrics.retrieval.evaluate_embeddings` with
``distributed=True`` on an initialised torch.distributed group):

* ``accelerate launch -m metriclab evaluate RUN``: accelerate's environment names the processes;
  :func:`launched_group` joins its group (gloo on CPU, NCCL on GPUs) and every process evaluates.
* ``metriclab evaluate RUN --processes N``: :func:`evaluate_in_processes` starts N local processes
  (spawned, gloo on CPU) on the embeddings already loaded, and returns rank 0's result.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch

from metriclab.errors import MetricLabError
from metriclab.metrics.retrieval import evaluate_embeddings


def launched_world() -> int:
    """How many processes a launcher (``accelerate launch``, ``torchrun``) started; 1 when none did."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_group() -> tuple[int, int]:
    """Join the launcher's process group (if not yet joined); returns ``(rank, world size)``."""
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, threads: int, args: tuple, kwargs: dict, out: str) -> None:
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world)}
    )
    torch.set_num_threads(threads)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        scores = evaluate_embeddings(*args, **kwargs, device="cpu", distributed=True)
        if rank == 0:
            Path(out).write_text(json.dumps(scores))
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def evaluate_in_processes(processes: int, *args: Any, **kwargs: Any) -> dict[str, dict[str, float]]:
    """:func:`evaluate_embeddings` (same arguments) on ``processes`` local CPU processes, gloo; rank 0's result."""
    if processes < 1:
        raise MetricLabError(f"--processes must be at least 1, got {processes}")
    if processes == 1:
        return evaluate_embeddings(*args, **kwargs)
    threads = max(1, (os.cpu_count() or 1) // processes)
    with tempfile.TemporaryDirectory(prefix="metriclab-eval-") as tmp:
        out = str(Path(tmp) / "scores.json")
        torch.multiprocessing.start_processes(
            _worker,
            args=(processes, _free_port(), threads, args, kwargs, out),
            nprocs=processes,
            start_method="spawn",
        )
        return json.loads(Path(out).read_text())
