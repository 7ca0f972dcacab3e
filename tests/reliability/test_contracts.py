"""Plugins that break their contracts stop the run before its first step, with one line naming the
component, its package and the contract; a lazy encoder keeps the contract and trains; a name clash
between installed packages never takes the built-ins down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from metriclab.runs import Run

from .conftest import one_line, train_in_process
from .test_bad_input import DIGITS, assert_user_error

BROKEN = Path(__file__).with_name("broken_plugin.py")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--encoder", "broken-not-a-module"], ["encoder 'broken-not-a-module'", "returned a dict"]),
        (["--encoder", "broken-wide"], ["encoder 'broken-wide'", "outputs 7 features but embedding_dim is 4"]),
        (["--dataset-args", "damage=float"], ["dataset 'broken-dataset'", "train_images are torch.float32"]),
        (["--dataset-args", "damage=nhwc"], ["dataset 'broken-dataset'", "channels last"]),
        (["--dataset-args", "damage=labels-out-of-range"], ["test_labels range over 1..10 but there are 10 classes"]),
        (["--dataset-args", "damage=short-labels"], ["train has 1347 images but 1342 labels"]),
        (["--dataset-args", "damage=not-a-dataset"], ["dataset 'broken-dataset'", "returned a dict, not a Dataset"]),
        (["--loss", "broken-two-argument-loss", "--miner", "none"], ["loss 'broken-two-argument-loss'", "signature"]),
        (["--loss", "broken-vector-loss"], ["loss 'broken-vector-loss'", "tensor of shape (8,)"]),
        (["--miner", "broken-miner"], ["miner 'broken-miner'", "returned a tuple of 2"]),
        (["--sampler", "broken-global-shuffle"], ["sampler 'broken-global-shuffle'", "draw only from the generator"]),
        (["--sampler", "broken-list-sampler"], ["sampler 'broken-list-sampler'", "returned list"]),
        (["--sampler", "broken-offset-sampler"], ["sampler 'broken-offset-sampler'", "holds 1351 among 1347"]),
        (["--sampler", "broken-negative-sampler"], ["sampler 'broken-negative-sampler'", "holds -3 among 1347"]),
        (["--scheduler", "broken-scheduler"], ["scheduler 'broken-scheduler'", "returned a NoneType"]),
    ],
    ids=lambda v: "_".join(v).replace("--", "") if isinstance(v, list) and v[0].startswith("--") else None,
)
def test_a_broken_contract_stops_before_training(tmp_path, capsys, args, words):
    out = tmp_path / "run"
    dataset = ["--dataset", "broken-dataset"] if args[0] == "--dataset-args" else []
    base = [a for a in DIGITS if a not in ("--encoder-args", "hidden=[16]")] if "--encoder" in args else DIGITS
    code, err = train_in_process(
        capsys,
        *base,
        "--embedding-dim",
        "4",
        *dataset,
        *args,
        "--plugins",
        str(BROKEN),
        "--output-dir",
        str(out),
    )
    assert_user_error(code, err, *words, f"from {BROKEN}", "contract")
    assert not out.exists()  # nothing trained, nothing left behind


@pytest.mark.parametrize(
    ("transform", "words"),
    [
        ("broken-float-transform", ["into torch.float32 (3, 8, 8), not uint8 (3, 8, 8)", "leave out ToDtype"]),
        ("broken-size-transform", ["into torch.uint8 (3, 11, 11), not uint8 (3, 8, 8)"]),
    ],
)
def test_a_transform_that_breaks_its_contract_stops_before_training(tmp_path, capsys, transform, words):
    from PIL import Image

    for split, label, i in [(s, c, i) for s in ("train", "test") for c in ("a", "b") for i in range(3)]:
        (tmp_path / "photos" / split / label).mkdir(parents=True, exist_ok=True)
        Image.new("L", (12, 10), 40 * i + (100 if label == "b" else 0)).save(
            tmp_path / "photos" / split / label / f"{i}.png"
        )
    out = tmp_path / "run"
    code, err = train_in_process(
        capsys, "--dataset", "image-folder", "--data-dir", str(tmp_path / "photos"), "--encoder", "mlp",
        "--encoder-args", "hidden=[8]", "--embedding-dim", "4", "--image-size", "8", "--num-workers", "0",
        "--max-steps", "1", f"--{'train' if 'float' in transform else 'test'}-transform", transform,
        "--plugins", str(BROKEN), "--output-dir", str(out),
    )  # fmt: skip
    assert_user_error(code, err, f"transform '{transform}'", *words, f"from {BROKEN}", "contract")
    assert not out.exists()


def test_a_lazy_encoder_trains_and_its_parameters_are_counted(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = train_in_process(
        capsys, *DIGITS, "--encoder", "lazy-mlp", "--encoder-args", "hidden=16", "--embedding-dim", "4",
        "--plugins", str(BROKEN), "--output-dir", str(out),
    )  # fmt: skip
    assert code == 0, err[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["parameters"] == (64 * 16 + 16) + (16 * 4 + 4)  # two linear layers, sized by the first forward
    assert Run(out).weights_path.is_file()


CLASHING_PACKAGE = """
import torch
from metriclab.registry import register_encoder, register_loss


@register_encoder("mlp")
def mlp(*, embedding_dim, input_shape):
    return torch.nn.Flatten()


@register_loss("clash-only-loss")
class OnlyHere(torch.nn.Module):
    def forward(self, embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None):
        return embeddings.sum() * 0
"""


def _package(site: Path, name: str, body: str) -> None:
    (site / f"{name}.py").write_text(body)
    info = site / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[metriclab.plugins]\n{name} = {name}\n")


def _python(site: Path, code: str) -> subprocess.CompletedProcess:
    # The package's folder comes first on the path, so its entry point is found (and listed) before the built-ins'.
    # It is also the working directory: `python -c` puts that first, and a source checkout's metriclab.egg-info
    # there would otherwise list the built-ins first.
    env = {**os.environ, "PYTHONPATH": str(site), "COLUMNS": "400"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, cwd=site, timeout=120
    )


def test_a_package_that_clashes_with_a_builtin_name_loaded_first_leaves_the_builtins_working(tmp_path):
    _package(tmp_path, "aaa_clashing_plugin", CLASHING_PACKAGE)
    result = _python(
        tmp_path,
        """
        import importlib.metadata
        from metriclab import registry
        first = next(iter(importlib.metadata.entry_points(group="metriclab.plugins"))).name
        print("first:", first)
        print("contrastive:", type(registry.create("loss", "contrastive")).__name__)
        print("mlp from:", registry.encoders.source("mlp"))
        print("clash-only-loss:", type(registry.create("loss", "clash-only-loss")).__name__)
        """,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "first: aaa_clashing_plugin" in result.stdout  # the clashing package really is found first
    assert "contrastive: ContrastiveLoss" in result.stdout
    assert "mlp from: metriclab" in result.stdout
    assert "clash-only-loss: OnlyHere" in result.stdout
    text = one_line(result.stderr)
    assert "encoder 'mlp' is registered by both metriclab and aaa-clashing-plugin" in text
    assert text.count("registered by both") == 1


@pytest.mark.slow  # a fresh interpreter importing torch: seconds
def test_two_packages_with_one_name_refuse_it_whatever_their_order(tmp_path):
    _package(tmp_path, "aaa_clashing_plugin", CLASHING_PACKAGE.replace('"clash-only-loss"', '"first-loss"'))
    _package(
        tmp_path,
        "zzz_clashing_plugin",
        CLASHING_PACKAGE.replace('"mlp"', '"shared-name"')
        .replace('"clash-only-loss"', '"second-loss"')
        .replace('register_encoder("shared-name")', 'register_encoder("shared-name")'),
    )
    (tmp_path / "aaa_clashing_plugin.py").write_text(
        (tmp_path / "aaa_clashing_plugin.py").read_text().replace('"mlp"', '"shared-name"')
    )
    result = _python(
        tmp_path,
        """
        from metriclab import registry
        from metriclab.errors import MetricLabError
        first, second = registry.create("loss", "first-loss"), registry.create("loss", "second-loss")
        print(type(first).__name__, type(second).__name__)
        try:
            registry.encoders.get("shared-name")
        except MetricLabError as err:
            print("refused:", err)
        """,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OnlyHere OnlyHere" in result.stdout
    assert "refused: encoder 'shared-name' is registered by both aaa-clashing-plugin and zzz-clashing-plugin" in (
        result.stdout
    )


def test_the_contract_check_changes_nothing_in_training(tmp_path, capsys, monkeypatch):
    """Eval-mode forward without gradients, loss and miner on copies: the same weights as without the check."""
    from safetensors.torch import load_file

    from metriclab.training import contracts

    args = [*DIGITS, "--max-steps", "3", "--loss", "contrastive", "--miner", "random-pairs"]
    code, err = train_in_process(capsys, *args, "--output-dir", str(tmp_path / "checked"))
    assert code == 0, err[-3000:]
    monkeypatch.setattr(contracts, "check_components", lambda *a, **k: None)
    code, err = train_in_process(capsys, *args, "--output-dir", str(tmp_path / "unchecked"))
    assert code == 0, err[-3000:]
    checked, unchecked = (
        load_file(tmp_path / "checked" / "model.safetensors"),
        load_file(tmp_path / "unchecked" / "model.safetensors"),
    )
    assert checked.keys() == unchecked.keys()
    assert all((checked[k] == unchecked[k]).all() for k in checked)
