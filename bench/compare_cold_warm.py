"""Benchmark `compare_cold_warm`: UMAP through ``metriclab.viz.projections.project`` and ``metriclab compare``,
cold (a fresh process with an empty numba cache directory) and warm (a fresh process reusing that cache).

umap-learn's numba kernels compile on first use; metriclab caches them on disk (``$METRICLAB_CACHE/numba``),
so only the first process should pay for it. Points: the 10k test embeddings of the last metriclab
Fashion-MNIST run of `train_vs_pml` when it exists, else a random-but-clustered 64-D set.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.measure import emit, fmt, peak_rss_mib, run_child
from bench.train_vs_pml import TRAINED_RUN, WORK


def points(quick: bool) -> tuple[Path, str]:
    """An .npy of points to project and a sentence saying where they came from."""
    path = WORK / ("points-quick.npy" if quick else "points.npy")
    test = TRAINED_RUN / "embeddings" / "test.npz"
    if not quick and test.exists():
        with np.load(test) as data:
            np.save(path, data["embeddings"])
        return path, f"the 10,000 64-D Fashion-MNIST test embeddings of the last metriclab run ({TRAINED_RUN})"
    n = 500 if quick else 10_000
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n)
    x = rng.normal(size=(10, 64))[labels] + 1.2 * rng.normal(size=(n, 64))
    np.save(path, x.astype(np.float32))
    return path, f"{n:,} random-but-clustered 64-D points (10 Gaussian classes, seed 0)"


def _environment(cache: Path) -> dict[str, str]:
    """The environment of a child whose numba cache is ``cache`` (nothing inherited points elsewhere)."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["METRICLAB_CACHE"] = str(cache)
    return env


def _cache_files(cache: Path) -> int:
    return sum(1 for p in cache.rglob("*") if p.is_file()) if cache.exists() else 0


def work(argv: list[str] | None = None) -> dict[str, Any]:
    """``worker PATH METHOD``: time ``project(points, METHOD)`` in this process (imports included)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=("worker",))
    parser.add_argument("path", type=Path)
    parser.add_argument("method")
    args = parser.parse_args(argv)
    x = np.load(args.path)
    start = time.perf_counter()
    from metriclab.viz.projections import project

    out = project(x, args.method)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "points": len(out), "peak_rss_mib": peak_rss_mib()}


def _cli_available() -> str | None:
    """None when ``metriclab compare`` exists, else why not."""
    try:
        from typer.main import get_command

        from metriclab.cli import app

        if "compare" in get_command(app).commands:  # type: ignore[attr-defined]
            return None
        return "`metriclab compare` is not in metriclab/cli.py yet"
    except Exception as err:  # noqa: BLE001 - any import failure means: not measurable now
        return f"metriclab.cli does not import ({type(err).__name__}: {err})"


def run(quick: bool = False, log=print) -> tuple[str, dict[str, Any]]:
    """Run the benchmark; return its Markdown section and the raw results."""
    WORK.mkdir(parents=True, exist_ok=True)
    path, source = points(quick)
    # --quick uses PCA: UMAP's cold compile alone takes about a minute on 2 cores.
    method = "pca" if quick else "umap"
    results: dict[str, Any] = {"source": source, "method": method}
    cache = WORK / "numba-cold"
    shutil.rmtree(cache, ignore_errors=True)
    rows = []
    for label in ("cold", "warm", "warm"):
        files = _cache_files(cache)
        args = ["python", "bench/compare_cold_warm.py", "worker", str(path), method]
        result = run_child(args, _environment(cache), log=log, inline=quick)
        result.update(label=label, cache_files_before=files)
        rows.append(result)
    results["project"] = rows
    lines = [
        "## compare_cold_warm: UMAP of 10k points, cold and warm",
        "",
        f"Points: {source}. Cold = a fresh process whose `METRICLAB_CACHE` (numba cache) is an empty directory; "
        "warm = fresh processes reusing that directory. Process wall = the whole `python` process "
        "(imports included), as a user waits for it.",
        "",
        f"| what | run | numba cache files before | `project(x, '{method}')` s (import included) | process wall s "
        "| peak RSS MiB | load before |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `project` | {r['label']} | {r['cache_files_before']} | {fmt(r['seconds'], 1)} | "
            f"{fmt(r['process_wall_s'], 1)} | {fmt(r['peak_rss_mib'], 0)} | {r['load_before']} |"
        )
    why = "skipped in --quick (it runs UMAP twice)" if quick else _cli_available()
    run_dir = TRAINED_RUN if TRAINED_RUN.exists() else None
    if why is None and run_dir is None:
        why = "no trained run to compare (run the train_vs_pml benchmark first)"
    if why is None:
        cli_cache, setup_cache = WORK / "numba-cold-cli", WORK / "numba-setup"
        for folder in (cli_cache, setup_cache):
            shutil.rmtree(folder, ignore_errors=True)
        cli_rows = []
        # cold: a fresh process with an empty cache; after set-up: the first compare once `make setup` has run
        # compile_umap() into an empty cache (timed too: it is work a user waits for, once, while installing).
        steps = [("cold", cli_cache, "compare"), ("warm", cli_cache, "compare")]
        steps += [("set-up: compile_umap()", setup_cache, "setup"), ("first after set-up", setup_cache, "compare")]
        for label, cache, what in steps:
            files = _cache_files(cache)
            metriclab = str(Path(sys.executable).parent / "metriclab")
            command = [metriclab, "compare", str(run_dir), "--output", str(WORK / f"compare-{label[:4]}.png")]
            if what == "setup":
                command = [sys.executable, "-c", "from metriclab.viz.projections import compile_umap; compile_umap()"]
            result = _timed_command(command, _environment(cache), log)
            result.update(label=label, cache_files_before=files)
            cli_rows.append(result)
            name = "`make setup`'s UMAP compile" if what == "setup" else "`metriclab compare RUN`"
            lines.append(
                f"| {name} | {label} | {files} | - | {fmt(result['process_wall_s'], 1)} | - | {result['load_before']} |"
            )
        results["cli"] = cli_rows
        lines += [
            "",
            "`metriclab compare RUN` (the run above, 10k test points): UMAP of the 784-D raw pixels (via PCA to "
            "50-D), UMAP and PCA of the 64-D embeddings, faithfulness scores, one figure. `make setup` compiles "
            "umap's kernels into the cache once (`compile_umap()`), so a user's first compare starts warm.",
        ]
    else:
        lines += ["", f"`metriclab compare RUN`: not measured: {why}."]
    return "\n".join(lines) + "\n", results


def _timed_command(command: list[str], env: dict[str, str], log) -> dict[str, Any]:
    import subprocess

    from bench.measure import ROOT, load

    before = load()
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    log(f"  {' '.join(command[:4])}... {wall:.1f} s (load {before})")
    return {"process_wall_s": wall, "load_before": before, "load_after": load()}


if __name__ == "__main__":
    emit(work())
