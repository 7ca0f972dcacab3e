"""Training steps replayed from a CUDA graph train exactly as eager steps do, and only where they can.

The replays themselves need a CUDA GPU (skipped elsewhere); which steps may be captured is checked everywhere.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from metriclab import registry
from metriclab.data import Dataset
from metriclab.runs import Run
from metriclab.training import engine
from metriclab.training.components import objective
from metriclab.training.graphs import StepGraph, why_not_captured

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def fused_adam(device: str = "cpu", **kwargs):
    return registry.create("optimizer", "adam", params=[torch.zeros(3, device=device, requires_grad=True)], **kwargs)


def seed_objective():
    return objective(registry.create("loss", "contrastive"), registry.create("miner", "random-pairs"))


@pytest.mark.parametrize(
    "change,reason",
    [
        ({"device": torch.device("cpu")}, "not on a CUDA device"),
        ({"num_processes": 2}, "several processes"),
        ({"stepper": object()}, "not a torch optimizer"),
        ({"stepper": fused_adam(fused=False)}, "keeps state on the host"),
        ({"stepper": torch.optim.Adagrad([torch.zeros(3, requires_grad=True)])}, "keeps state on the host"),
        ({"compiled": True}, "compiled"),
        ({"skip_nonfinite": True}, "on_nonfinite"),
        ({"enabled": False}, "off in the recipe"),
        ({"objective": objective(registry.create("loss", "contrastive"), None)}, "does not declare fixed shapes"),
    ],
)
def test_steps_are_captured_only_where_they_can_be(change, reason):
    args = {
        "device": torch.device("cuda"),
        "num_processes": 1,
        "stepper": fused_adam(),
        "objective": seed_objective(),
        "compiled": False,
        "skip_nonfinite": False,
    }
    assert why_not_captured(**args) is None
    assert reason in why_not_captured(**{**args, **change})


def test_sgd_and_capturable_optimizers_may_be_captured():
    sgd = registry.create("optimizer", "sgd", params=[torch.zeros(3, requires_grad=True)])
    for stepper in (sgd, fused_adam(fused=False, capturable=True)):
        assert (
            why_not_captured(torch.device("cuda"), 1, stepper, seed_objective(), compiled=False, skip_nonfinite=False)
            is None
        )


def test_fused_objectives_name_the_generators_they_draw_from():
    miner = registry.create("miner", "random-pairs", seed=4)
    fused = miner.fuse(registry.create("loss", "contrastive"))
    assert fused.graph_generators() == []  # nothing drawn yet
    fused(torch.randn(8, 2), torch.arange(8) % 2)
    assert fused.graph_generators() == [miner._generator]
    triplet = registry.create("miner", "semi-hard").fuse(registry.create("loss", "triplet"))
    assert triplet.graph_generators() == []


def test_a_run_records_whether_its_steps_were_replayed_from_a_cuda_graph(make_tiny_recipe):
    run = engine.train(make_tiny_recipe(epochs=1))
    assert Run(run).metrics["final"]["cuda_graph"] == {"used": False, "reason": "not on a CUDA device"}


def test_batches_of_another_size_and_refused_steps_run_eagerly_without_warming_up():
    calls = []

    def step(batch):
        calls.append(len(batch))
        return torch.tensor(float(len(batch)), requires_grad=True) * 2

    graphed = StepGraph(step, fused_adam(), seed_objective(), batch_size=16)
    loss = graphed(torch.arange(5))  # an epoch's short last batch (or a resumed run's first): eager, not a warm-up
    assert loss.item() == 10 and not loss.requires_grad and calls == [5]
    assert graphed.warm == 0 and graphed.graph is None
    graphed.refused = "the step synchronises with the host"
    assert graphed(torch.arange(16)).item() == 32 and calls == [5, 16] and graphed.warm == 0


# -- on a GPU ------------------------------------------------------------------------------------


def blobs() -> Dataset:
    """10 classes of noisy 8x8 prototypes: 700 train (10 batches of 64 and a short one), 200 test; no package data."""
    generator = torch.Generator().manual_seed(0)
    prototypes = torch.rand(10, 1, 8, 8, generator=generator) * 200

    def draw(n):
        labels = torch.arange(n) % 10
        noise = torch.randn(n, 1, 8, 8, generator=generator) * 40
        return (prototypes[labels] + noise).clamp(0, 255).to(torch.uint8), labels

    (train, train_labels), (test, test_labels) = draw(700), draw(200)
    return Dataset("blobs", train, train_labels, test, test_labels, [str(c) for c in range(10)], "made by the test")


@pytest.fixture
def blobs_dataset(register):
    """``blobs`` registered as the dataset "graph-test-blobs" for one test."""
    return register("dataset", "graph-test-blobs", blobs)


def linear_step(seed: int, sync: bool = False):
    """A tiny training step on the GPU that draws from its own generator, with its model and optimizer."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(5, 3).cuda()
    optimizer = registry.create("optimizer", "adam", params=model.parameters(), lr=0.05)
    data = torch.randn(100, 5, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(seed)

    def step(batch):
        noise = torch.rand(len(batch), 3, generator=generator, device="cuda")
        loss = ((model(data[batch]) - noise) ** 2).mean()
        if sync:
            loss = loss * (1 + 0 * loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def graph_generators():
        return [generator]

    step.graph_generators = graph_generators
    return step, model, optimizer, generator


@cuda
@pytest.mark.parametrize("sync", [False, True])
def test_replayed_steps_equal_eager_steps(sync):
    batches = [torch.arange(i, i + 16, device="cuda") % 100 for i in range(0, 160, 16)] * 2
    batches.insert(7, torch.arange(5, device="cuda"))  # a short batch after capture runs eagerly
    eager_step, eager_model, _, eager_gen = linear_step(0, sync)
    step, model, optimizer, generator = linear_step(0, sync)
    graphed = StepGraph(step, optimizer, step, batch_size=16)
    eager = torch.stack([eager_step(b) for b in batches])
    losses = torch.stack([graphed(b) for b in batches])
    if sync:
        assert graphed.graph is None and "synchronises" in graphed.refused
    else:
        assert graphed.refused is None and graphed.captured_at_call == 4
    torch.testing.assert_close(losses, eager, rtol=1e-6, atol=1e-7)
    for got, want in zip(model.parameters(), eager_model.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert torch.equal(generator.get_state(), eager_gen.get_state())  # replays advanced the generator
    assert all(p.grad is None for p in model.parameters())


@cuda
@pytest.mark.parametrize(
    "overrides",
    [
        {},  # the seed recipe: MLP, contrastive loss, random pairs
        {"loss": "triplet", "miner": "semi-hard", "embedding_dim": 8},
        {"mixed_precision": "bf16"},
    ],
    ids=["contrastive", "semi-hard-triplet", "bf16"],
)
def test_training_with_cuda_graphs_equals_eager_training(
    tmp_path, monkeypatch, make_tiny_recipe, blobs_dataset, overrides
):
    from accelerate.state import AcceleratorState

    graphs = []

    class Recorded(StepGraph):
        def __init__(self, *args):
            super().__init__(*args)
            graphs.append(self)

    monkeypatch.setattr(engine, "StepGraph", Recorded)
    runs = {}
    for on in (True, False):
        AcceleratorState._reset_state(reset_partial_state=True)  # one process trains with several precisions
        recipe = make_tiny_recipe(
            tmp_path / str(on), dataset=blobs_dataset, cpu=False, cuda_graphs=on, log_every=5, **overrides
        )
        runs[on] = engine.train(recipe)
    (graph,) = graphs
    assert graph.refused is None and graph.graph is not None and graph.calls > graph.captured_at_call
    assert Run(runs[True]).metrics["final"]["cuda_graph"] == {"used": True, "captured_at_step": 4}
    assert Run(runs[False]).metrics["final"]["cuda_graph"] == {
        "used": False,
        "reason": "off in the recipe",
    }
    tolerance = {"rtol": 2e-2, "atol": 2e-3} if overrides.get("mixed_precision") else {"rtol": 1e-4, "atol": 1e-6}
    got, want = (load_file(runs[on] / "model.safetensors") for on in (True, False))
    for name in want:
        torch.testing.assert_close(got[name], want[name], **tolerance)
    logged = [
        torch.tensor([float(row.split(",")[2]) for row in (runs[on] / "history.csv").read_text().splitlines()[1:]])
        for on in (True, False)
    ]
    torch.testing.assert_close(logged[0], logged[1], **tolerance)  # the losses the replays returned
