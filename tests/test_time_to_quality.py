"""The fast Fashion-MNIST recipe trains with its proxy loss and schedule; the `ttq` benchmark writes its section."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
from conftest import read_json, run_recipe

from metriclab.runs import Run

ROOT = Path(__file__).resolve().parents[1]


def _train_on_digits(recipe: str, out: Path, *args: str) -> dict:
    """Run ``recipe`` on the 8x8 digits (batch 64, 5 warm-up steps) into ``out``; its config.json once it learned."""
    common = ["--dataset", "digits", "--batch-size", "64", "--warmup-steps", "5"]
    result = run_recipe(recipe, *common, *args, "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert Run(out).metrics["final"]["test_loo"]["precision@1"] > 0.5  # digits: 10 classes, chance is 0.1
    return read_json(out / "config.json")


def test_fast_recipe_trains_under_its_warmup_and_decay(tmp_path):
    out = tmp_path / "fast"
    config = _train_on_digits("fashion_mnist_fast.py", out, "--log-every", "1")
    assert config["components"]["loss"]["name"] == "pml.NormalizedSoftmaxLoss"
    assert config["recipe"]["scheduler"] == "cosine" and config["recipe"]["metric"] == "cosine"
    lrs = [row["lr"] for row in Run(out).history()]
    peak = max(lrs)
    # Warm-up rises to the recipe's lr, then the cosine decay brings it down to almost nothing by the last step.
    assert lrs[0] < peak / 2 and lrs.index(peak) <= 6 and lrs[-1] < peak / 10, lrs


def test_cosface_recipe_trains_vgg_stages_with_a_cosface_loss(tmp_path):
    config = _train_on_digits("fashion_mnist_cosface.py", tmp_path / "cosface", "--epochs", "2")
    assert config["components"]["loss"]["name"] == "cosface"
    assert config["components"]["loss"]["args"]["label_smoothing"] == 0.1
    assert config["recipe"]["encoder_args"]["convs_per_stage"] == 2
    assert config["recipe"]["encoder_args"]["global_pool"] == "gem"


@pytest.mark.slow  # three short trainings and pml's loop: about half a minute
def test_quick_ttq_benchmark_writes_its_section(tmp_path, monkeypatch):
    monkeypatch.setenv("METRICLAB_BENCH_DIR", str(tmp_path / "work"))
    monkeypatch.syspath_prepend(str(ROOT))
    for name in [m for m in sys.modules if m == "bench" or m.startswith("bench.")]:
        monkeypatch.delitem(sys.modules, name)
    bench = importlib.import_module("bench.run")
    output = tmp_path / "BENCHMARKS.md"
    assert bench.main(["--quick", "--only", "ttq", "--output", str(output)]) == 0
    section = re.search(r"<!-- bench:ttq -->\n(.*?)<!-- /bench:ttq -->", output.read_text(), flags=re.S).group(1)
    rows = [line for line in section.splitlines() if re.match(r"\| (pytorch|metriclab)[^|]* \| 0 \|", line)]
    assert len(rows) == 3, section  # one run of each contender, seed 0
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[2] == "not reached" or re.fullmatch(r"\d+\.\d \(\d+\)", cells[2]), row
        assert 0 <= float(cells[4]) <= 1 and float(cells[3].replace(",", "")) >= 0  # a number (quick runs take ~0 s)
    # The recipes were scored at each of their three steps; pml's loop stops at its first score at or above
    # the target, so its curve ends there: at step 1 when it got there at once, with 3 points when it never did.
    curves = {line.split(":")[0]: line for line in section.splitlines() if line.startswith("- ")}
    assert len(curves) == 3, section
    for name, line in curves.items():
        points = [float(p1) for p1 in re.findall(r" s / ([0-9.]+)", line)]
        if "pytorch-metric-learning" in name:
            assert points and (points[-1] >= 0.3 or len(points) == 3) and all(p < 0.3 for p in points[:-1]), line
        else:
            assert len(points) == 3, line
