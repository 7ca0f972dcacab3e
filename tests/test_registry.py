"""The registry as users and plugin authors meet it: names, wildcards, errors, entry points."""

from __future__ import annotations

import sys

import pytest
import torch

from metriclab import registry
from metriclab.errors import MetricLabError


@pytest.fixture
def restore_registries():
    """Undo every registration a test makes; the registries are module globals shared by all tests."""
    registry.load_plugins()
    saved = {kind: dict(reg._entries) for kind, reg in registry.REGISTRIES.items()}
    yield
    for kind, reg in registry.REGISTRIES.items():
        reg._entries.clear()
        reg._entries.update(saved[kind])


def test_builtins_are_listed_and_created_by_name():
    assert {"contrastive", "triplet"} <= set(registry.list_components("loss"))
    assert {"mlp", "convnet", "resnet18"} <= set(registry.list_components("encoders"))
    assert {"random-pairs", "all-pairs", "batch-hard"} <= set(registry.list_components("miner"))
    assert {"adam", "adamw", "sgd", "rmsprop"} <= set(registry.list_components("optimizer"))
    loss = registry.create("loss", "contrastive", margin=0.5)
    assert loss.margin == 0.5


def test_wildcard_lists_every_pml_loss():
    names = registry.list_components("loss", "pml.*Loss")
    assert "pml.MultiSimilarityLoss" in names and "pml.ArcFaceLoss" in names
    assert all(n.startswith("pml.") and n.endswith("Loss") for n in names)
    assert "pml.BaseMetricLossFunction" not in registry.list_components("loss", "pml.*")
    assert "pml.BatchHardMiner" in registry.list_components("miner", "pml.*")


def test_pml_class_is_registered_itself_so_its_signature_is_visible():
    from pytorch_metric_learning.losses import ArcFaceLoss

    assert registry.losses.get("pml.ArcFaceLoss") is ArcFaceLoss
    loss = registry.create("loss", "pml.ArcFaceLoss", num_classes=3, embedding_size=4)
    assert loss.W.shape == (4, 3)


@pytest.mark.parametrize(
    "name", ["pml.ArcFaceLoss", "pml.CosFaceLoss", "pml.SubCenterArcFaceLoss", "pml.ProxyAnchorLoss"]
)
def test_class_losses_get_the_class_count_and_width_even_through_their_base_class(name):
    """CosFaceLoss and SubCenterArcFaceLoss take ``*args`` and pass them on to ArcFaceLoss: the recipe need not."""
    from metriclab.recipe import Recipe
    from metriclab.training.components import build_objective

    loss, _ = build_objective(Recipe(name="x", loss=name, miner=None, embedding_dim=4), num_classes=3)
    weights = loss.W if hasattr(loss, "W") else loss.proxies
    assert sorted(weights.shape) == sorted([3 * getattr(loss, "sub_centers", 1), 4])


def test_unknown_name_suggests_close_match_and_the_plugins_command():
    with pytest.raises(MetricLabError) as err:
        registry.create("loss", "contrastiv")
    assert "'contrastive'" in str(err.value)
    assert "metriclab plugins" in str(err.value)


def test_wrong_argument_name_suggests_the_right_one():
    with pytest.raises(MetricLabError) as err:
        registry.create("miner", "random-pairs", pos_fracton=0.3)
    assert "pos_fracton" in str(err.value) and "'pos_fraction'" in str(err.value)


def test_a_missing_argument_or_contract_argument_says_what_to_pass(restore_registries):
    @registry.register_loss("test-needs-temperature")
    def needs_temperature(*, temperature):
        return torch.nn.Identity()

    @registry.register_encoder("test-no-width")
    def no_width(*, input_shape):
        return torch.nn.Flatten()

    with pytest.raises(MetricLabError, match="needs the argument 'temperature'.*--loss-args temperature=VALUE"):
        registry.create("loss", "test-needs-temperature")
    with pytest.raises(MetricLabError, match="breaks the encoder contract.*takes no 'embedding_dim'"):
        registry.create("encoder", "test-no-width", embedding_dim=4, input_shape=(1, 8, 8))


def test_a_plugin_file_that_fails_to_import_is_one_error_naming_it(tmp_path):
    broken = tmp_path / "needs_a_library.py"
    broken.write_text("import a_library_that_is_not_installed\n")
    with pytest.raises(MetricLabError, match="needs_a_library.py failed to import: ModuleNotFoundError"):
        registry.load_plugin(str(broken))
    assert "metriclab_user_plugin_needs_a_library" not in sys.modules
    text = tmp_path / "plugin.txt"
    text.write_text("")
    with pytest.raises(MetricLabError, match="is not a Python file"):
        registry.load_plugin(str(text))


def test_duplicate_registration_is_an_error(restore_registries):
    @registry.register_encoder("test-duplicate")
    def first(**kwargs):
        return torch.nn.Identity()

    with pytest.raises(MetricLabError, match="already registered"):

        @registry.register_encoder("test-duplicate")
        def second(**kwargs):
            return torch.nn.Identity()

    assert registry.encoders.get("test-duplicate") is first


PLUGIN_MODULE = '''
import math

import torch
from metriclab.registry import register_encoder


@register_encoder("demo-linear")
def demo_linear(*, embedding_dim, input_shape, scale=1.0):
    """A flatten + linear encoder from a third-party package."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(input_shape), embedding_dim))
'''


@pytest.fixture
def install(tmp_path, monkeypatch, restore_registries):
    """``install(package, {module: source}, entry_points)``: an installed package of plugin modules (a real
    dist-info on the path), found by the next lookup; its modules are forgotten afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_entry_points", None)  # read again, with the package's
    monkeypatch.setattr(registry, "_imported", set(registry._imported))  # the built-ins stay imported
    modules: list[str] = []

    def add(package: str, sources: dict[str, str], entry_points: str) -> None:
        for name, body in sources.items():
            (tmp_path / f"{name}.py").write_text(body)
            sys.modules.pop(name, None)
            modules.append(name)
        info = tmp_path / f"{package.replace('-', '_')}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[metriclab.plugins]\n{entry_points}")

    yield add
    for name in modules:
        sys.modules.pop(name, None)


def test_third_party_plugin_is_found_through_a_real_entry_point(install):
    install("demo-metriclab-plugin", {"demo_metriclab_plugin": PLUGIN_MODULE}, "demo = demo_metriclab_plugin\n")

    encoder = registry.create("encoder", "demo-linear", embedding_dim=3, input_shape=(1, 4, 4))

    assert encoder(torch.rand(2, 1, 4, 4)).shape == (2, 3)
    assert registry.encoders.entries("demo-linear")[0].source == "demo-metriclab-plugin"
    assert "demo-linear" in registry.list_components("encoder", "demo-*")


KIND_MODULES = {
    "kindplug_encoders": "from metriclab.registry import register_encoder\n\n"
    '@register_encoder("kind-encoder")\ndef kind_encoder(*, embedding_dim, input_shape):\n    return None\n',
    "kindplug_losses": "from metriclab.registry import register_loss\n\n"
    '@register_loss("kind-loss")\ndef kind_loss():\n    return None\n',
    "kindplug_any": "from metriclab.registry import register_miner\n\n"
    '@register_miner("kind-any-miner")\ndef kind_any_miner():\n    return None\n',
    # named after losses, but registers an encoder: found all the same, once the losses' turn has not found it
    "kindplug_misfiled": "from metriclab.registry import register_encoder\n\n"
    '@register_encoder("misfiled-encoder")\ndef misfiled(*, embedding_dim, input_shape):\n    return None\n',
}


def test_an_entry_point_named_after_a_kind_is_imported_when_that_kind_is_first_used(install):
    install(
        "kindplug",
        KIND_MODULES,
        "encoders = kindplug_encoders\nlosses.extra = kindplug_losses\nanything = kindplug_any\n"
        "losses = kindplug_misfiled\n",
    )

    def imported() -> set[str]:
        return {name for name in KIND_MODULES if name in sys.modules}

    assert registry.encoders.source("kind-encoder") == "kindplug"
    # the encoders' entry point and the one named after no kind; neither 'losses' one yet
    assert imported() == {"kindplug_encoders", "kindplug_any"}
    assert registry.losses.source("kind-loss") == "kindplug"
    assert imported() == set(KIND_MODULES)
    assert "misfiled-encoder" in registry.encoders


def test_a_misfiled_registration_is_found_by_a_lookup_of_its_kind(install):
    """An entry point named after one kind that registers another: a lookup that misses loads the rest."""
    install("kindplug", {"kindplug_misfiled": KIND_MODULES["kindplug_misfiled"]}, "losses = kindplug_misfiled\n")

    assert registry.encoders.source("misfiled-encoder") == "kindplug"
    assert "misfiled-encoder" in registry.list_components("encoder")
