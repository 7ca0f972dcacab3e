"""The README's code blocks run as written: the recipe example trains, the plugin example installs and is used."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT, main_in_process, run_recipe

from metriclab import Recipe
from metriclab.runs import Run

README = ROOT / "README.md"


def readme_block(language: str, containing: str) -> str:
    """The one ```language code block of the README that contains ``containing``."""
    blocks = re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.M | re.S)
    found = [block for block in blocks if containing in block]
    assert len(found) == 1, f"{len(found)} {language} blocks of README.md contain {containing!r}"
    return found[0]


def test_the_recipe_example_trains(tmp_path):
    recipe_file = tmp_path / "my_recipe.py"
    recipe_file.write_text(readme_block("python", "recipe = Recipe("))
    namespace: dict = {}
    exec(compile(recipe_file.read_text(), str(recipe_file), "exec"), namespace)  # imported, not run as __main__
    recipe = namespace["recipe"]
    assert isinstance(recipe, Recipe) and recipe.encoder == "convnet" and recipe.miner == "semi-hard"
    # Its main() with the overrides the README names, on a tiny budget (digits, 3 steps).
    out = tmp_path / "run"
    tiny = ["--dataset", "digits", "--epochs", "1", "--max-steps", "3", "--batch-size", "64", "--no-embed-train"]
    main_in_process(str(recipe_file), *tiny, "--loss-args", "margin=0.5", "--output-dir", str(out))
    config = Run(out).config
    assert config["recipe"]["name"] == "mnist_triplet_64d" and config["recipe"]["embedding_dim"] == 64
    assert config["components"]["loss"]["args"]["margin"] == 0.5
    assert config["components"]["miner"]["args"]["margin"] == 0.2
    assert config["components"]["sampler"] == {"name": "m-per-class", "source": "metriclab", "args": {"m_per_class": 4}}
    assert Run(out).embeddings("test")[0].shape[1] == 64


def test_the_plugin_example_installs_through_its_entry_point(tmp_path):
    tomllib = pytest.importorskip("tomllib", reason="reading the README's pyproject block needs Python 3.11+")
    code = readme_block("python", "@register_encoder(")
    path = re.match(r"# (\S+)\n", code).group(1)  # the block's first line names its file
    site = tmp_path / "site"
    (site / path).parent.mkdir(parents=True)
    (site / path).write_text(code)
    (site / path).parent.joinpath("__init__.py").write_text("")
    pyproject = tomllib.loads(readme_block("toml", "metriclab.plugins"))
    entry_points = pyproject["project"]["entry-points"]["metriclab.plugins"]
    package = path.split("/")[0]
    info = site / f"{package}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[metriclab.plugins]\n{lines}")
    # A recipe trains with it by name, and the run records the package it came from.
    out = tmp_path / "run"
    args = ["--dataset", "digits", "--epochs", "1", "--max-steps", "2", "--no-embed-train", "--encoder", "tiny-linear"]
    result = run_recipe("mnist_siamese.py", *args, "--output-dir", str(out), env={"PYTHONPATH": str(site)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert Run(out).config["components"]["encoder"]["source"] == package
