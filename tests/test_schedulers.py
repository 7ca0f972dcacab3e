"""Learning-rate schedulers: registered by name, stepped once per optimizer step, logged, restored on resume."""

import math
import shutil

import pytest
import torch
from conftest import tiny_recipe

from metriclab import registry
from metriclab.errors import MetricLabError
from metriclab.recipe import Recipe
from metriclab.runs import Run
from metriclab.training.engine import train
from metriclab.training.optimization import build_scheduler


def _optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _lrs(recipe: Recipe, steps: int, total: int) -> list[float]:
    optimizer = _optimizer(recipe.lr)
    schedule = build_scheduler(recipe, optimizer, total)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return out


def test_builtins_are_torch_schedulers():
    assert {"constant", "cosine", "step", "multistep", "exponential", "linear"} <= set(
        registry.list_components("scheduler")
    )
    for name in registry.list_components("scheduler"):
        if registry.schedulers.source(name) != "metriclab":
            continue  # a test plugin loaded earlier in this process (tests/reliability/broken_plugin.py)
        schedule = registry.create("scheduler", name, optimizer=_optimizer(), total_steps=10)
        assert isinstance(schedule, torch.optim.lr_scheduler.LRScheduler)


def test_warmup_then_cosine_follows_the_formula():
    recipe = Recipe(scheduler="cosine", warmup_steps=4, warmup_start_factor=0.2, lr=1.0)
    lrs = _lrs(recipe, 14, total=14)
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])  # linear from 0.2 x lr up to lr
    cosine = [0.5 * (1 + math.cos(math.pi * t / 10)) for t in range(10)]
    assert lrs[4:] == pytest.approx(cosine)


def test_warmup_alone_is_in_front_of_a_constant_lr():
    lrs = _lrs(Recipe(warmup_steps=2, warmup_start_factor=0.5, lr=1.0), 5, total=5)
    assert lrs == pytest.approx([0.5, 0.75, 1.0, 1.0, 1.0])


def test_step_schedule_and_no_schedule():
    assert _lrs(Recipe(scheduler="step", scheduler_args={"step_size": 2, "gamma": 0.5}, lr=1.0), 5, 5) == pytest.approx(
        [1, 1, 0.5, 0.5, 0.25]
    )
    assert build_scheduler(Recipe(), _optimizer(), 10) is None


def test_unknown_scheduler_and_bad_arguments_are_user_errors():
    with pytest.raises(MetricLabError, match="Did you mean 'cosine'"):
        build_scheduler(Recipe(scheduler="cosin"), _optimizer(), 10)
    with pytest.raises(MetricLabError, match="no argument 'gama'"):
        build_scheduler(Recipe(scheduler="step", scheduler_args={"gama": 0.5}), _optimizer(), 10)
    with pytest.raises(MetricLabError, match="warmup_steps"):
        Recipe(warmup_steps=-1)


def test_overrides_name_the_scheduler_and_drop_its_arguments():
    recipe = Recipe(scheduler="step", scheduler_args={"step_size": 3})
    assert recipe.with_overrides(["--scheduler", "cosine"]).scheduler_args == {}
    assert recipe.with_overrides(["--scheduler", "none"]).scheduler is None
    assert recipe.with_overrides(["--scheduler-args", "gamma=0.5"]).scheduler_args == {"step_size": 3, "gamma": 0.5}


def test_history_logs_the_scheduled_lr_and_resume_restores_the_schedule(tmp_path):
    """12 steps of a linear decay behind a 3-step warm-up; the lr moves every step, across a resume."""
    fields = {"scheduler": "linear", "warmup_steps": 3, "warmup_start_factor": 0.1, "log_every": 1, "lr": 0.01}
    fields |= {"epochs": 1, "max_steps": 12, "embed_train": False}
    straight = tmp_path / "straight"
    train(tiny_recipe(straight, checkpoint_every=5, keep_checkpoints=10, **fields))
    expected = _lrs(Recipe(**fields), 12, total=12)
    # history logs the lr in force after each step: the schedule's value for the next one
    logged = [row["lr"] for row in Run(straight).history()]
    assert logged == pytest.approx([*expected[1:], 0.0], rel=1e-5, abs=1e-12)
    assert Run(straight).config["components"]["scheduler"]["name"] == "linear"
    assert (Run.latest_checkpoint_in(straight) / "scheduler.bin").is_file()

    # Resumed from step 5, the schedule continues where it was (a fresh one would warm up again).
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    (resumed / "history.csv").write_text("\n".join((resumed / "history.csv").read_text().splitlines()[:6]) + "\n")
    train(tiny_recipe(resumed, resume=str(resumed / "checkpoints" / "step_00000005"), **fields))
    assert [row["lr"] for row in Run(resumed).history()] == pytest.approx(logged, rel=1e-5, abs=1e-12)
