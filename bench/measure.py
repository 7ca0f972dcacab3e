"""Measuring helpers shared by the benchmarks: peak memory, machine load, child processes, medians.

Every timed piece of work runs in a fresh child process so that its peak memory, its imports and its
warm-up are its own; the child prints one JSON line (prefixed by ``RESULT``) that the parent reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "RESULT "
# Scratch space (trained run, embeddings, numba caches, raw results); not committed.
WORK = Path(os.environ.get("METRICLAB_BENCH_DIR") or Path(tempfile.gettempdir()) / "metriclab-bench")
RUNS = WORK / "runs"  # every child's result, for --reuse


def load() -> str:
    """The 1/5/15-minute load averages, as ``uptime`` shows them (other jobs share these cores)."""
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (``VmHWM``), in MiB: counts torch's allocations too."""
    return _status_kib("VmHWM") / 1024


def rss_mib() -> float:
    """This process's resident set size now (``VmRSS``), in MiB."""
    return _status_kib("VmRSS") / 1024


@contextmanager
def peak_memory() -> Iterator[dict[str, float]]:
    """Peak RSS while the block runs: ``{"peak_mib", "before_mib", "added_mib"}`` filled in at exit.

    The kernel's high-water mark is reset first (``/proc/self/clear_refs`` = 5) so it covers the block
    only; where that is refused, a psutil sampler (every 5 ms) stands in.
    """
    result: dict[str, float] = {"before_mib": rss_mib()}
    try:
        Path("/proc/self/clear_refs").write_text("5")
        sampler = None
    except OSError:
        sampler = _Sampler()
        sampler.start()
    try:
        yield result
    finally:
        if sampler is None:
            result["peak_mib"] = peak_rss_mib()
        else:
            result["peak_mib"] = sampler.stop()
        result["added_mib"] = result["peak_mib"] - result["before_mib"]


class _Sampler(threading.Thread):
    """Samples this process's RSS with psutil until stopped; returns the largest value seen (MiB)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        import psutil

        self.process, self.peak, self.done = psutil.Process(), 0.0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss / 2**20)
            time.sleep(0.005)

    def stop(self) -> float:
        self.done.set()
        self.join()
        return max(self.peak, self.process.memory_info().rss / 2**20)


def emit(result: dict[str, Any]) -> None:
    """Print a child's result where the parent finds it."""
    sys.stdout.flush()
    # One write call (atomic on a pipe below 4 KiB), so lines of several launched processes never interleave.
    os.write(sys.stdout.fileno(), (PREFIX + json.dumps(result) + "\n").encode())


def run_child(
    args: Sequence[str],
    env: dict[str, str] | None = None,
    timeout: float = 1800,
    log: Callable[[str], None] = print,
    inline: bool = False,
    reuse: bool = False,
) -> dict[str, Any]:
    """Run ``python ARGS`` (or an explicit command) from the repo root; return its RESULT dict plus wall time.

    ``inline`` (for --quick): call the script's ``work(argv)`` in this process instead, saving the
    seconds a fresh process spends importing torch; memory numbers then describe this process.
    Every result is also saved under ``RUNS``; ``reuse`` returns a saved result of the same command
    instead of running it again (marked ``reused``), so a long suite can be continued.
    """
    if inline:
        return _run_inline(args, log)
    saved = RUNS / (hashlib.sha1(json.dumps(list(args)).encode()).hexdigest()[:16] + ".json")
    if reuse and saved.exists():
        result = json.loads(saved.read_text())
        result["reused"] = True
        log(f"  reusing {saved} ({' '.join(str(a) for a in args[:6])}..., measured {result.get('measured')})")
        return result
    command = list(args) if args[0] != "python" else [sys.executable, *args[1:]]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    before = load()
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        output = proc.stdout[-2000:] + proc.stderr[-4000:]
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{output}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith(PREFIX)]
    if not lines:
        raise RuntimeError(f"{' '.join(command)} printed no result:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    results = [json.loads(line[len(PREFIX) :]) for line in lines]
    result = results[0] if len(results) == 1 else {"processes": results}
    result.setdefault("process_wall_s", round(wall, 2))
    result["load_before"] = before
    result["load_after"] = load()
    result["measured"] = time.strftime("%Y-%m-%d %H:%M")
    RUNS.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(result))
    log(f"  {' '.join(str(a) for a in args[:6])}... {wall:.1f} s (load {before} -> {result['load_after']})")
    return result


def _run_inline(args: Sequence[str], log: Callable[[str], None]) -> dict[str, Any]:
    import importlib

    module = importlib.import_module("bench." + Path(args[1]).stem)
    before = load()
    start = time.perf_counter()
    result = module.work(list(args[2:]))
    result["process_wall_s"] = round(time.perf_counter() - start, 2)
    result["load_before"], result["load_after"] = before, load()
    log(f"  (in-process) {' '.join(str(a) for a in args[1:6])}... {result['process_wall_s']:.1f} s")
    return result


def rotated(items: Sequence[Any], turn: int) -> list[Any]:
    """``items`` started at position ``turn`` (wrapping): who goes first changes from one repetition to the next."""
    start = turn % len(items)
    return [*items[start:], *items[:start]]


def median(values: Sequence[float]) -> float:
    """The median of ``values`` (NaN when empty)."""
    return statistics.median(values) if values else float("nan")


def machine() -> dict[str, str]:
    """The CPU model, core count, and versions of the packages that matter for these numbers."""
    from importlib.metadata import version

    model = "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    import torch

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {
        "cpu": f"{model} ({os.cpu_count()} cores{', AVX-512' if 'avx512f' in flags else ''})",
        "torch_threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": version("torch"),
        "torchvision": version("torchvision"),
        "pytorch-metric-learning": version("pytorch-metric-learning"),
        "accelerate": version("accelerate"),
        "umap-learn": version("umap-learn"),
        "numba": version("numba"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
    }


def commit() -> str:
    """The checked-out commit, and whether the working tree differs from it (what a measurement ran)."""
    git = ["git", "-C", str(ROOT)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "an unknown commit (not a git checkout)"
    changed = [line for line in dirty.stdout.splitlines() if not line.endswith("BENCHMARKS.md")]
    return f"commit {head.stdout.strip()}" + (" with uncommitted changes" if changed else "")


def fmt(value: float, digits: int = 1) -> str:
    """A number for a table: fixed digits, '-' for None/NaN."""
    if value is None or value != value:
        return "-"
    return f"{value:,.{digits}f}"
