"""Recipes: what to train, as a plain dataclass with JSON round-trip and CLI overrides.

A recipe file names its components and hyper-parameters and hands them to :func:`metriclab.main`
(:mod:`metriclab.training.launch`)::

    recipe = Recipe(name="mnist_siamese", dataset="mnist", encoder="mlp", loss="contrastive")
    if __name__ == "__main__":
        main(recipe)

Every field can be overridden on the command line (``--loss triplet --embedding-dim 64``);
``--help`` lists them. Changing a component's name drops the recipe's arguments for the
old component, since they rarely fit the new one; ``--loss-args`` etc. apply on top.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from metriclab.errors import MetricLabError, did_you_mean
from metriclab.runs import read_json_object

# Component fields whose ``<name>_args`` dict belongs to them.
COMPONENTS = (
    "dataset",
    "encoder",
    "second_encoder",
    "loss",
    "miner",
    "optimizer",
    "sampler",
    "train_transform",
    "test_transform",
    "scheduler",
)

# The epoch-end scores a run can keep its best epoch by (keys of metrics.json's "epochs" rows; higher is better),
# and how messages and figures name them.
SELECTION_METRICS = {"precision@1": "precision@1", "map@r": "MAP@R"}


@dataclass
class Recipe:
    """Everything that defines a training run; JSON-serialisable and CLI-overridable."""

    name: str = "run"
    # data
    dataset: str = "mnist"
    dataset_args: dict = field(default_factory=dict)
    data_dir: str | None = None
    # streaming image datasets: square side the transforms produce (None: 224), transforms by name
    # (None: random-resized-crop for training, resize-center-crop for testing), DataLoader workers
    image_size: int | None = None
    train_transform: str | None = None
    train_transform_args: dict = field(default_factory=dict)
    test_transform: str | None = None
    test_transform_args: dict = field(default_factory=dict)
    num_workers: int = 2
    prefetch_factor: int = 2
    # model: a Siamese network; share_weights=False gives a second (pseudo-siamese) tower
    encoder: str = "mlp"
    encoder_args: dict = field(default_factory=dict)
    embedding_dim: int | None = 2  # None: a backbone encoder's own features (no linear head)
    share_weights: bool = True
    second_encoder: str | None = None
    second_encoder_args: dict = field(default_factory=dict)
    # objective
    loss: str = "contrastive"
    loss_args: dict = field(default_factory=dict)
    miner: str | None = "random-pairs"
    miner_args: dict = field(default_factory=dict)
    global_mining: bool = True
    sampler: str = "random"
    sampler_args: dict = field(default_factory=dict)
    m_per_class: int = 4
    # optimisation
    optimizer: str = "adam"
    optimizer_args: dict = field(default_factory=dict)
    lr: float = 1e-3
    # learning-rate schedule (a registered scheduler), in optimizer steps, behind an optional linear warm-up
    scheduler: str | None = None
    scheduler_args: dict = field(default_factory=dict)
    warmup_steps: int = 0
    warmup_start_factor: float = 0.01
    # fine-tuning: a backbone encoder (timm:<model>, torchvision:<model>) frozen first, then slower than its head
    freeze_backbone_epochs: int = 0
    freeze_backbone_steps: int = 0
    backbone_lr_multiplier: float = 1.0
    weight_decay_norms_and_biases: bool = False  # False: no weight decay on normalisation weights and biases
    loss_lr: float | None = None  # lr of the loss's own parameters (ArcFace, ProxyAnchor, SoftTriple); None: lr
    grad_clip_norm: float | None = None  # clip the global gradient norm of the network to this
    batch_size: int = 128
    epochs: int = 5
    max_steps: int | None = None
    # model selection by the epoch-end test scores: keep the weights of the epoch with the best `keep_best`
    # (precision@1 or map@r) as the run's, and stop once `patience` epochs in a row have not beaten it
    keep_best: str | None = None
    patience: int | None = None
    seed: int = 0
    mixed_precision: str = "no"  # no, bf16, fp16, or auto: bf16 where the device computes it natively
    gradient_accumulation_steps: int = 1
    compile: bool = False
    cuda_graphs: bool = True  # on a GPU, replay steady training steps from a CUDA graph where possible
    on_nonfinite: str = "stop"
    # outputs
    output_dir: str | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 50
    log_with: str | None = None
    embed_train: bool = True
    metric: str = "euclidean"
    resume: str | None = None
    plugins: list = field(default_factory=list)
    cpu: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise MetricLabError for values no run could use."""
        _check_types(self)
        if self.embedding_dim is not None and self.embedding_dim < 1:
            raise MetricLabError(f"embedding_dim must be a positive integer or None, got {self.embedding_dim!r}")
        positive = (
            "batch_size",
            "epochs",
            "gradient_accumulation_steps",
            "m_per_class",
            "log_every",
            "prefetch_factor",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MetricLabError(f"recipe field '{name}' must be a positive integer, got {value!r}")
        if self.image_size is not None and self.image_size < 1:
            raise MetricLabError(f"image_size must be a positive integer or None, got {self.image_size!r}")
        if self.num_workers < 0:
            raise MetricLabError(
                f"num_workers must be >= 0 (0: decode images in the training process), got {self.num_workers}"
            )
        if self.keep_best not in (None, *SELECTION_METRICS):
            raise MetricLabError(
                f"keep_best must be one of {', '.join(SELECTION_METRICS)} or None, got {self.keep_best!r}; "
                "e.g. --keep-best map@r"
            )
        if self.patience is not None and (self.patience < 1 or self.keep_best is None):
            raise MetricLabError(
                f"patience {self.patience!r} needs a score to watch and must be >= 1: e.g. --keep-best map@r "
                "--patience 3 stops after 3 epochs without a better MAP@R and keeps the best epoch's weights"
            )
        if self.max_steps is not None and self.max_steps < 1:
            raise MetricLabError(f"max_steps must be a positive integer or None, got {self.max_steps!r}")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise MetricLabError(
                f"checkpoint_every must be >= 0 (0: only at epoch ends) and keep_checkpoints >= 1, got "
                f"{self.checkpoint_every} and {self.keep_checkpoints}"
            )
        if self.warmup_steps < 0 or not 0 < self.warmup_start_factor <= 1:
            raise MetricLabError(
                f"warmup_steps must be >= 0 and warmup_start_factor in (0, 1], got {self.warmup_steps} and "
                f"{self.warmup_start_factor}; e.g. --warmup-steps 100 --warmup-start-factor 0.01"
            )
        if self.freeze_backbone_epochs < 0 or self.freeze_backbone_steps < 0:
            raise MetricLabError("freeze_backbone_epochs and freeze_backbone_steps must be >= 0 (0: never frozen)")
        for name in ("backbone_lr_multiplier", "loss_lr", "grad_clip_norm"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise MetricLabError(f"{name} must be > 0, got {value!r}; e.g. --{name.replace('_', '-')} 0.1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise MetricLabError(f"lr must be a finite number > 0, got {self.lr!r}; pass e.g. --lr 0.001")
        choices = {
            "mixed_precision": ("no", "fp16", "bf16", "auto"),
            "on_nonfinite": ("stop", "skip"),
            "metric": ("euclidean", "cosine"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise MetricLabError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.sampler == "m-per-class" and self.batch_size % self.m_per_class:
            raise MetricLabError(
                f"batch_size {self.batch_size} is not a multiple of m_per_class {self.m_per_class}; "
                "choose sizes so each batch holds whole groups of m samples per class"
            )
        for name in COMPONENTS:
            if not isinstance(getattr(self, f"{name}_args"), dict):
                raise MetricLabError(f"{name}_args must be a dict of keyword arguments")
            _check_finite(f"{name}_args", getattr(self, f"{name}_args"))
        if "data_dir" in self.dataset_args:
            # One place for the folder, so what is read and what config.json records agree.
            given = self.dataset_args["data_dir"]
            self.dataset_args = {k: v for k, v in self.dataset_args.items() if k != "data_dir"}
            if self.data_dir is not None and given is not None and str(given) != self.data_dir:
                raise MetricLabError(
                    f"the dataset folder is given twice: data_dir {self.data_dir!r} and dataset_args data_dir "
                    f"{given!r}; set it once, with --data-dir"
                )
            self.data_dir = None if given is None else str(given)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form of the recipe."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        """Recipe from a dict, rejecting unknown fields with a did-you-mean hint."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise MetricLabError(f"recipe has no field '{key}'.{did_you_mean(key, names)}")
        return cls(**data)

    def to_json(self, path: str | Path) -> None:
        """Write the recipe as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> Recipe:
        """Read a recipe written by :meth:`to_json` (or a run's config.json)."""
        try:
            data = read_json_object(
                Path(path), "correct the file, or pass another recipe JSON (e.g. a run's config.json)"
            )
        except MetricLabError as err:
            raise MetricLabError(f"recipe file {err}") from err
        data = data.get("recipe", data)
        if not isinstance(data, dict):
            raise MetricLabError(
                f"recipe file {path}: its 'recipe' entry holds a JSON {type(data).__name__}, not an object of recipe "
                'fields; write it as {"name": ..., "loss": ...} (e.g. with Recipe.to_json)'
            )
        try:
            return cls.from_dict(data)
        except MetricLabError as err:
            raise MetricLabError(f"recipe file {path}: {err}") from err

    def with_overrides(self, argv: list[str] | None = None, prog: str | None = None) -> Recipe:
        """A copy of the recipe with command-line overrides applied (``--help`` lists them)."""
        parser = _parser(self, prog)
        args = vars(parser.parse_args(argv))
        config = args.pop("config")
        data = Recipe.from_json(config).to_dict() if config else self.to_dict()
        given = {k: (None if v is _NULL else v) for k, v in args.items() if v is not None}
        for name in COMPONENTS:
            if name in given and given[name] != data[name]:
                data[f"{name}_args"] = {}
            if f"{name}_args" in given:
                extra = given.pop(f"{name}_args")
                data[f"{name}_args"] = {**({} if extra.pop(_CLEARED, False) else data[f"{name}_args"]), **extra}
        if "data_dir" in data["dataset_args"]:  # the command line's folder wins over the recipe's (or --config's)
            data["data_dir"] = given.pop("data_dir", None) or data["dataset_args"].pop("data_dir")
        for key, value in given.items():
            data[key] = value
        return Recipe.from_dict(data)


def _check_types(recipe: Recipe) -> None:
    """Raise MetricLabError naming the first field whose value has the wrong type (e.g. from a JSON file)."""
    for name, hint in get_type_hints(Recipe).items():
        value = getattr(recipe, name)
        allowed = tuple(t for t in getattr(hint, "__args__", (hint,)) if isinstance(t, type))
        if value is None and type(None) in allowed:
            continue
        if isinstance(value, bool) and bool not in allowed:  # bool is an int subclass: true is no batch size
            ok = False
        else:
            ok = isinstance(value, allowed) or (float in allowed and isinstance(value, int))
        if not ok:
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise MetricLabError(
                f"recipe field '{name}' must be {expected}, got {value!r} ({type(value).__name__}); correct it "
                "(in JSON: numbers unquoted, true/false, null)"
            )
    if not all(isinstance(p, str) for p in recipe.plugins):
        raise MetricLabError(f"recipe field 'plugins' must be a list of module names or paths, got {recipe.plugins!r}")


def _check_finite(where: str, value: Any) -> None:
    """Raise MetricLabError if ``value`` holds a NaN or infinite number (JSON's NaN/Infinity parse to those)."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(f"{where} {key}", item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_finite(where, item)
    elif isinstance(value, float) and not math.isfinite(value):
        raise MetricLabError(f"{where} must be a finite number, got {value!r}")


def key_values(items: Sequence[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` as one dict, each value as JSON when it parses, else a string (as ``--*-args`` read)."""
    out: dict[str, Any] = {}
    for text in items or []:
        try:
            out |= _key_values(text)
        except argparse.ArgumentTypeError as err:
            raise MetricLabError(f"{err}; pass e.g. dataset_root=/data/images") from None
    return out


def _key_values(text: str) -> dict[str, Any]:
    """Parse ``key=value`` (value as JSON when it parses, else a string)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return {key.replace("-", "_"): value}


# What ``--FIELD none`` parses to for a field that may be null, so it can clear a value from --config.
_NULL = object()
_CLEARED = "\0cleared"  # the key ``--COMPONENT-args none`` parses to: start from no arguments


def _recipe_key_values(text: str) -> dict[str, Any]:
    """``key=value`` as :func:`_key_values`, or ``none``: the recipe's arguments for the component are dropped."""
    return {_CLEARED: True} if text == "none" else _key_values(text)


def _nullable(base: type) -> Any:
    """An argparse type: ``none``/``null`` as _NULL, anything else as ``base``."""

    def parse(text: str) -> Any:
        return _NULL if text.lower() in ("none", "null") else base(text)

    parse.__name__ = base.__name__  # argparse names the type in "invalid int value" messages
    return parse


class _MergeDict(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        merged: dict[str, Any] = {}
        for item in values:
            merged.update(item)
        setattr(namespace, self.dest, merged)


def _parser(recipe: Recipe, prog: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=f"Train recipe '{recipe.name}'. Every recipe field can be overridden; defaults are the recipe's.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", help="start from a recipe JSON file (e.g. a run's config.json)")
    hints = get_type_hints(Recipe)
    for f in dataclasses.fields(Recipe):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(recipe, f.name)
        hint = hints[f.name]
        nullable = type(None) in getattr(hint, "__args__", ())
        if f.name == "resume":
            parser.add_argument(
                flag,
                nargs="?",
                const="latest",
                default=None,
                type=_nullable(str),
                help="continue from the latest checkpoint of the newest run of this recipe, or from RUN_DIR/CHECKPOINT "
                "(none: start a new run)",
            )
        elif hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"(recipe: {default})")
        elif hint is dict:
            parser.add_argument(
                flag,
                nargs="+",
                type=_recipe_key_values,
                action=_MergeDict,
                default=None,
                metavar="KEY=VALUE",
                help=f"keyword arguments, merged into the recipe's {default} (none: leave the recipe's out)",
            )
        elif hint is list:
            parser.add_argument(flag, nargs="+", default=None, help=f"(recipe: {default})")
        else:
            base = next((t for t in (int, float, str) if t in getattr(hint, "__args__", (hint,))), str)
            more = "; none clears it" if nullable else ""
            parser.add_argument(
                flag, type=_nullable(base) if nullable else base, default=None, help=f"(recipe: {default}{more})"
            )
    return parser
