"""The training loop, once: ``train(recipe)`` on accelerate, from data to a complete run directory.

Data lives on the training device as uint8 tensors; each step indexes its shard of the
global batch there, embeds it, gathers the global batch from all processes (so mining
and the loss see what one process with the whole batch would), and steps. The host is
consulted only every ``log_every`` steps (loss, speed, non-finite check) and at epoch ends.
Checkpoints (what one holds, how it is written, how a run resumes) are :mod:`metriclab.training.checkpoints`;
the dataset, network, loss and miner, and the objective that joins the last two (fused where the miner
offers it), are built by :mod:`metriclab.training.components`. On a GPU, steps that can be are replayed from a
CUDA graph (:mod:`metriclab.training.graphs`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, broadcast_object_list, set_seed

from metriclab import registry
from metriclab.data import load_dataset
from metriclab.data.loader import ImageSource, is_streaming, statistics_sample
from metriclab.data.loading import DEFAULT_TRANSFORMS
from metriclab.data.sampling import augmentation_seeds, build_sampler, epoch_order, local_batches, shard
from metriclab.errors import MetricLabError
from metriclab.metrics.protocol import protocol_metrics, query_gallery_metrics
from metriclab.metrics.retrieval import evaluate_embeddings, retrieval_metrics
from metriclab.models import backbone_preprocessing, embed
from metriclab.recipe import COMPONENTS, SELECTION_METRICS, Recipe
from metriclab.runs import DISK_ERRNOS, Run, append_history, save_embeddings, trim_history, write_config
from metriclab.training import contracts
from metriclab.training.checkpoints import (
    TrainerState,
    changed_options,
    checkpoint_dir,
    load_best,
    load_loss_state,
    require_finite_model,
    restore_best,
    resume,
    run_directory,
    save_best,
    save_checkpoint,
)
from metriclab.training.components import build_objective, describe_run, objective
from metriclab.training.distributed import gather_shards, gather_with_grad
from metriclab.training.graphs import StepGraph, why_not_captured
from metriclab.training.optimization import (
    BackboneFreezer,
    build_scheduler,
    group_lr,
    optimizer_steps,
    parameter_groups,
    total_batches,
)
from metriclab.training.progress import Reporter

STREAM_EMBED_BATCH = 256  # streamed images embedded per batch: the workers decode ahead while the model runs


def train(recipe: Recipe) -> Path:
    """Train ``recipe`` and return its run directory (written by the main process only).

    A new run that fails before its first checkpoint leaves no run directory behind (nothing to resume);
    a failure to write (full disk, read-only mount) is a MetricLabError naming the last
    good checkpoint, which stays intact.
    """
    # Plugin files are recorded by absolute path, so the run can be evaluated or resumed from anywhere.
    recipe = replace(recipe, plugins=[registry.load_plugin(spec) for spec in recipe.plugins])
    cpu = recipe.cpu or not torch.cuda.is_available()
    # The process group first: the run directory is chosen on the main process and shared,
    # and trackers need it when the Accelerator is created.
    process = PartialState(cpu=cpu)
    run_dir, checkpoint = run_directory(recipe, process)
    trained = False
    try:
        result = _train(recipe, cpu, run_dir, checkpoint)
        trained = True
        return result
    except OSError as err:
        if err.errno not in DISK_ERRNOS:
            raise  # not a problem of space or permissions: the real cause, with its traceback
        last = Run.latest_checkpoint_in(run_dir)
        then = f"continue with --resume {run_dir} (last good checkpoint: {last})" if last else "start the run again"
        if err.filename is None:
            where = f"{err.strerror} while training; free disk space where the run ({run_dir}) or its data is written"
        elif _inside(err.filename, run_dir):
            where = f"{err.strerror}: {err.filename}; free disk space or fix the permissions of the output location"
        else:  # not the run directory's file (e.g. a dataset cache): the output location is not to blame
            where = f"{err.strerror}: {err.filename}; free disk space or fix the permissions of that location"
        raise MetricLabError(f"{where}, then {then}") from err
    finally:
        if not trained and checkpoint is None and process.is_main_process and run_dir.is_dir():
            # A new run that failed before its first checkpoint has nothing to resume: leaving its config.json
            # would make the folder look like a run to continue, so it goes.
            if Run.latest_checkpoint_in(run_dir) is None:
                shutil.rmtree(run_dir, ignore_errors=True)


def native_bf16(cpu: bool) -> bool:
    """Whether training runs on a device with native bfloat16 matrix units.

    A CUDA GPU that supports bf16, or a CPU with AMX or AVX512-BF16 (a Xeon since Sapphire Rapids or Cooper
    Lake, an AMD Zen 4): autocast there halves a ConvNet step; on other CPUs bf16 is emulated, and slower.
    """
    if not cpu and torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    probes = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
    return any(probe is not None and probe() for probe in probes)


def _train(recipe: Recipe, cpu: bool, run_dir: Path, checkpoint: Path | None) -> Path:
    if recipe.mixed_precision == "auto":  # resolved here, so config.json records the precision that ran
        recipe = replace(recipe, mixed_precision="bf16" if native_bf16(cpu) else "no")
    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        # An earlier run in this process (a notebook, a script training two recipes) set accelerate's
        # process-wide state, which refuses another precision; one process can start it afresh.
        AcceleratorState._reset_state()
    try:
        accelerator = Accelerator(
            cpu=cpu,
            mixed_precision=recipe.mixed_precision,
            gradient_accumulation_steps=recipe.gradient_accumulation_steps,
            log_with=recipe.log_with,
            project_dir=str(run_dir),
            # A frozen backbone has no gradients until it is unfrozen: DDP must not wait for them.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if _freezes(recipe) else None,
        )
    except (ValueError, ImportError) as err:
        raise MetricLabError(f"cannot set up training ({err}); check --log-with and --mixed-precision") from err
    _check_global_batch(recipe, recipe.batch_size * accelerator.num_processes)
    reporter = Reporter(enabled=accelerator.is_main_process)
    set_seed(recipe.seed)

    given, new = recipe, checkpoint is None
    # A resumed run goes on with the crop and resampling its transforms started with: its config.json's (a run
    # started before they were filled in from the backbone keeps going without them).
    recipe, below = with_backbone_preprocessing(_absolute_data(recipe), transforms=new)
    if not new:
        try:
            config = Run(run_dir).config
        except MetricLabError:  # no config.json: nothing recorded to name a missing plugin's package from
            config = {}
        for kind, name in _component_names(recipe):  # a plugin uninstalled since: name the package to install
            registry.require_component(run_dir, config, kind, name)
        recipe = _started_transforms(recipe, run_dir)
        if changed := changed_options(recipe, run_dir, accelerator.num_processes):
            reporter.notice(
                f"Resuming {run_dir} with options that differ from its start: {'; '.join(changed)}. To resume with "
                f"the options it was started with, pass --config {run_dir / 'config.json'}"
            )
    with accelerator.main_process_first():
        dataset = load_dataset(recipe)
    if not is_streaming(dataset):  # tensors in memory are not transformed: nothing to fill in
        recipe = replace(
            recipe, train_transform_args=given.train_transform_args, test_transform_args=given.test_transform_args
        )
    contracts.check_dataset(recipe, dataset)
    contracts.check_transforms(dataset)
    contracts.check_sampler(recipe, dataset.train_labels)
    if dataset.notice:
        reporter.notice(dataset.notice)
    if below and is_streaming(dataset):
        reporter.notice(
            f"{recipe.encoder} was pretrained on {below} px images and trains on {recipe.image_size} px ones here; "
            f"pass --image-size {below} (or none) to train at its own size"
        )
    if ignored := contracts.ignored_transforms(recipe, dataset):
        reporter.notice(
            f"{', '.join(ignored)} ignored: dataset '{recipe.dataset}' is held in memory as tensors, and its batches "
            "are not transformed (transforms apply to datasets of image files: image-folder, csv)"
        )
    model = contracts.build_checked_model(recipe, dataset.input_shape)
    model.fit_input_statistics(statistics_sample(dataset, recipe.num_workers))
    loss_fn, miner = build_objective(recipe, num_classes=len(dataset.classes), embedding_dim=model.embedding_dim)
    # One forward and one loss before anything counts or optimises parameters (lazy modules initialise here).
    contracts.check_components(recipe, dataset, model, loss_fn, miner)
    freezer = BackboneFreezer(model, recipe.freeze_backbone_epochs, recipe.freeze_backbone_steps)
    optimizer = registry.optimizers.create(
        recipe.optimizer, params=parameter_groups(recipe, model, loss_fn), lr=recipe.lr, **recipe.optimizer_args
    )
    global_batch = recipe.batch_size * accelerator.num_processes
    # The schedule spans the run's batches; an epoch is as long as the sampler's order (m-per-class fills groups).
    epoch_length = epoch_order(dataset.train_labels, recipe.seed, 0, build_sampler_of(recipe)).numel()
    scheduler = build_scheduler(recipe, optimizer, optimizer_steps(recipe, epoch_length, global_batch))

    if accelerator.is_main_process and checkpoint is None:
        write_config(run_dir, describe_run(recipe, dataset, accelerator, model))
    if recipe.log_with:
        accelerator.init_trackers(recipe.name, config=_flat(recipe.to_dict()))

    if recipe.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    if scheduler is not None:  # prepared: saved in every checkpoint, restored by load_state
        scheduler = accelerator.prepare(scheduler)
    loss_fn.to(accelerator.device)
    state = TrainerState()
    if checkpoint is not None:
        state = resume(accelerator, checkpoint, miner)
        if state.best_step:  # the checkpoint's best stands only for the same score, with its weights back in place
            if recipe.keep_best != state.best_by:
                lost = f"--keep-best {recipe.keep_best} on a run that kept its best by {state.best_by}"
            elif not _restored_best(accelerator, checkpoint, run_dir):
                lost = f"{checkpoint} holds no weights of its best epoch (written by an earlier metriclab)"
            else:
                lost = None
            if lost is not None:
                if recipe.keep_best:
                    reporter.notice(f"{lost}: the best is chosen among the epochs from here on")
                state.best_epoch, state.best_step, state.best_score = 0, 0, None
        if not load_loss_state(checkpoint, loss_fn):
            reporter.notice(
                f"{checkpoint} holds no state of the loss (written by an earlier metriclab): its parameters start "
                "afresh, so the run will not end exactly as an uninterrupted one"
            )
        reporter.notice(f"Resumed from {checkpoint} (epoch {state.epoch + 1}, step {state.step})", style="green")

    trainer = _Trainer(recipe, accelerator, reporter, run_dir, dataset, model, loss_fn, miner, optimizer, state)
    trainer.scheduler, trainer.freezer = scheduler, freezer
    trainer.fit()
    accelerator.end_training()
    return run_dir


BACKBONE_TRANSFORM_ARGS = ("crop_fraction", "interpolation")  # what pretrained weights say about their images


def _restored_best(accelerator: Accelerator, checkpoint: Path, run_dir: Path) -> bool:
    """Whether ``checkpoint``'s best weights are back in ``run_dir/checkpoints/best`` (agreed by every process)."""
    restored = [restore_best(checkpoint, run_dir) if accelerator.is_main_process else None]
    broadcast_object_list(restored)
    accelerator.wait_for_everyone()
    return bool(restored[0])


def _component_names(recipe: Recipe) -> list[tuple[str, str | None]]:
    """``(kind, name)`` of every registered component the recipe names."""
    kinds = {"second_encoder": "encoder", "train_transform": "transform", "test_transform": "transform"}
    return [(kinds.get(field, field), getattr(recipe, field)) for field in COMPONENTS]


def _absolute_data(recipe: Recipe) -> Recipe:
    """``recipe`` with its data (``data_dir``, a CSV's ``dataset_root``) by absolute path, as config.json records
    it, so the run's figures and evaluations find the images from any folder."""
    if recipe.data_dir and Path(recipe.data_dir).expanduser().exists():
        recipe = replace(recipe, data_dir=str(Path(recipe.data_dir).expanduser().resolve()))
    root = recipe.dataset_args.get("dataset_root")
    if isinstance(root, str) and Path(root).expanduser().exists():
        root = str(Path(root).expanduser().resolve())
        recipe = replace(recipe, dataset_args={**recipe.dataset_args, "dataset_root": root})
    return recipe


def _started_transforms(recipe: Recipe, run_dir: Path) -> Recipe:
    """``recipe`` with the backbone-given transform arguments (crop, resampling) its run recorded at its start,
    where it names the same transform and does not set them itself."""
    started = Run(run_dir).config.get("recipe", {})

    def recorded(split: str, name: str) -> dict[str, Any]:
        same = name == (started.get(f"{split}_transform") or DEFAULT_TRANSFORMS[split])
        return (started.get(f"{split}_transform_args") or {}) if same else {}

    return _with_transform_args(recipe, recorded)


def with_backbone_preprocessing(recipe: Recipe, transforms: bool = True) -> tuple[Recipe, int | None]:
    """``(recipe, pretrained size)``: image files at a backbone's own size where the recipe names none, and (with
    ``transforms``) a pretrained backbone's crop and interpolation in transforms whose arguments do not set them
    (both recorded in config.json); the pretrained size is returned where the recipe trains below it, else None.
    """
    seen = backbone_preprocessing(recipe)
    if recipe.image_size is None and "image_size" in seen:
        recipe = replace(recipe, image_size=seen["image_size"])
    if not transforms or not (recipe.encoder_args.get("pretrained") or recipe.encoder_args.get("weights")):
        return recipe, None
    recipe = _with_transform_args(
        recipe, lambda split, name: registry.accepted_arguments(registry.transforms.get(name), seen)
    )
    pretrained_size = seen.get("image_size")
    below = recipe.image_size is not None and pretrained_size is not None and recipe.image_size < pretrained_size
    return recipe, pretrained_size if below else None


def _with_transform_args(recipe: Recipe, offered: Callable[[str, str], dict[str, Any]]) -> Recipe:
    """``recipe`` with each split's transform also given the :data:`BACKBONE_TRANSFORM_ARGS` among
    ``offered(split, transform name)`` that its own arguments do not set."""
    changes = {}
    for split in ("train", "test"):
        name = getattr(recipe, f"{split}_transform") or DEFAULT_TRANSFORMS[split]
        args = getattr(recipe, f"{split}_transform_args")
        extra = {k: v for k, v in offered(split, name).items() if k in BACKBONE_TRANSFORM_ARGS and k not in args}
        if extra:
            changes[f"{split}_transform_args"] = {**args, **extra}
    return replace(recipe, **changes)


def _freezes(recipe: Recipe) -> bool:
    return recipe.freeze_backbone_epochs > 0 or recipe.freeze_backbone_steps > 0


def build_sampler_of(recipe: Recipe) -> Any:
    """The recipe's sampler (its epoch orders, see :mod:`metriclab.data.sampling`)."""
    return build_sampler(recipe.sampler, recipe.m_per_class, recipe.sampler_args)


def _inside(filename: Any, folder: Path) -> bool:
    """Whether ``filename`` (of an OSError) lies in ``folder``."""
    return Path(str(filename)).resolve().is_relative_to(folder.resolve())


def _check_global_batch(recipe: Recipe, global_batch: int) -> None:
    """Raise MetricLabError if no batch could hold a pair, or (m-per-class) a negative."""
    if global_batch < 2:
        raise MetricLabError(
            f"the global batch holds {global_batch} sample(s), so no pair can be formed; "
            "raise --batch-size to at least 2"
        )
    if recipe.sampler == "m-per-class" and global_batch < 2 * recipe.m_per_class:
        # Each batch is whole groups of m samples of one class: one group means no negative pair or triplet.
        raise MetricLabError(
            f"with --sampler m-per-class each global batch of {global_batch} holds {global_batch // recipe.m_per_class}"
            f" class(es) of {recipe.m_per_class} samples, but mining needs at least 2 classes per batch; raise "
            f"--batch-size to at least {2 * recipe.m_per_class} (per process) or lower --m-per-class"
        )


def _flat(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in data.items()}


class _Trainer:
    """The loop and its bookkeeping; one instance per ``train`` call."""

    def __init__(self, recipe, accelerator, reporter, run_dir, dataset, model, loss_fn, miner, optimizer, state):
        self.recipe, self.accelerator, self.reporter, self.run_dir = recipe, accelerator, reporter, run_dir
        self.model, self.miner, self.optimizer, self.state = model, miner, optimizer, state
        self.objective = objective(loss_fn, miner)  # the loss is only ever called through it
        self.loss_fn = loss_fn  # checkpointed: a loss can have parameters (proxies)
        # accelerate's optimizer wrapper looks for an optional package on disk twice per step before stepping:
        # step + zero_grad took 0.28 ms through it vs 0.13 ms direct on this project's CPU (tiny MLP, interleaved).
        # With nothing else for it to do (no fp16 loss scaling, no gradient accumulation, no XLA) the torch
        # optimizer inside steps directly: the same update, and host time bounds small networks' steps on GPUs.
        plain = (
            optimizer.scaler is None
            and accelerator.gradient_accumulation_steps == 1
            and accelerator.distributed_type != DistributedType.XLA
        )
        self.stepper = optimizer.optimizer if plain else optimizer
        self.global_batch = recipe.batch_size * accelerator.num_processes
        # On a GPU, steady steps replay one CUDA graph wherever that gives the same training (training.graphs).
        self.graph_blocker = why_not_captured(
            accelerator.device,
            accelerator.num_processes,
            self.stepper,
            self.objective,
            enabled=recipe.cuda_graphs,
            compiled=recipe.compile,
            skip_nonfinite=recipe.on_nonfinite == "skip",
            scheduled=recipe.scheduler is not None or recipe.warmup_steps > 0,
            unfreezes=_freezes(recipe),
        )
        self.streaming = is_streaming(dataset)
        if self.streaming and self.graph_blocker is None:
            self.graph_blocker = "images stream from files through DataLoader workers"
        self.graph = None
        if self.graph_blocker is None:
            self.graph = StepGraph(self._step, self.stepper, self.objective, self.global_batch)
        self.graph_step: int | None = None  # the step at which this process captured its graph
        self.dataset = dataset
        # A test split with its own protocol (In-Shop's query/gallery marks) is scored by it, as `evaluate` does.
        test_files = dataset.files("test") if self.streaming else None
        self.marks = test_files.marks() if test_files is not None else (None, None)
        self.categories = test_files.categories if test_files is not None else None
        device = accelerator.device
        self.train_labels, self.test_labels = dataset.train_labels.to(device), dataset.test_labels.to(device)
        # Images come from sources: a resident tensor on the device, or files streamed by DataLoader workers.
        feed = {"device": device, "num_workers": recipe.num_workers, "prefetch_factor": recipe.prefetch_factor}
        self.sources = {"train": ImageSource(dataset, "train", augment=True, **feed)}
        self.sources["test"] = ImageSource(dataset, "test", **feed)
        # The train split as evaluated: the test-time transform for files, the same tensor when resident.
        self.sources["train-eval"] = ImageSource(dataset, "train", **feed) if self.streaming else self.sources["train"]
        self.train_images = self.sources["train"].images  # what resident steps index (None when streaming)
        self.sampler = build_sampler_of(recipe)
        self.epoch_length = self._order(0).numel()
        self.pseudo_siamese = not accelerator.unwrap_model(model).shares_weights
        self.interrupted, self.interrupted_at = False, 0.0  # set by the signal handler in this process
        self.pid = os.getpid()  # DataLoader workers forked from this process inherit its signal handler
        self.signum = int(signal.SIGINT)  # what stopped the run; another process may have received it
        self.stop_requested = False  # agreed by all processes: stop after this step
        self.saved_step: int | None = None  # step of the last checkpoint this process wrote
        self.scheduler = None  # the prepared learning-rate schedule, if the recipe has one
        self.freezer: BackboneFreezer | None = None  # freezes a backbone encoder for the first epochs/steps

    # -- the loop -------------------------------------------------------------------------
    def fit(self) -> None:
        recipe, state = self.recipe, self.state
        n = self.epoch_length
        total = total_batches(recipe, n, self.global_batch)
        self._trim_history()
        self.reporter.start(total, completed=state.step)
        # Ctrl-C and SIGTERM (a scheduler's preemption notice) both stop cleanly after a checkpoint.
        handled = (signal.SIGINT, signal.SIGTERM) if _in_main_thread() else ()
        previous = {signum: signal.signal(signum, self._request_stop) for signum in handled}
        try:
            ended = not (state.epoch < recipe.epochs and state.step < total) or self._patience_ran_out(state.epoch)
            if recipe.keep_best and ended:
                self._result_embeddings()  # resumed where training had ended: the kept epoch's weights are the run's
            while not ended and state.epoch < recipe.epochs and state.step < total:
                finished_epoch = self._train_epoch(n, total)
                if finished_epoch:
                    state.epoch += 1
                    state.position = 0
                done = state.epoch >= recipe.epochs or state.step >= total
                if finished_epoch or done:  # a run stopped by max_steps mid-epoch still leaves embeddings
                    done = self._end_of_epoch(last=done)
                if done:
                    break
                if self.stop_requested:
                    self._interrupt()
            self._finish()
        finally:
            self.reporter.stop()
            for source in self.sources.values():  # their workers carry the signal handlers restored here
                source.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _order(self, epoch: int) -> torch.Tensor:
        return epoch_order(self.train_labels, self.recipe.seed, epoch, self.sampler)

    def _train_epoch(self, n: int, total: int) -> bool:
        recipe, state, acc = self.recipe, self.state, self.accelerator
        order = self._order(state.epoch)
        # From the resume position on; no further than the run's last step, so workers decode nothing unused.
        steps = local_batches(order, state.position, self.global_batch, acc.process_index, acc.num_processes)
        steps = steps[: max(total - state.step, 0)]
        streamed = None
        if self.streaming:  # each image's augmentation drawn from its place in the epoch: resumes repeat it
            places = local_batches(
                torch.arange(n), state.position, self.global_batch, acc.process_index, acc.num_processes
            )
            seeds = [augmentation_seeds(recipe.seed, state.epoch, local) for _, local in places[: len(steps)]]
            streamed = self.sources["train"]([local for _, local in steps], seeds)
        self.model.train()
        freezing = self.freezer is not None and self.freezer.active
        if freezing:
            self.freezer.update(state.epoch, state.step, force=True)  # model.train() woke a frozen backbone
        window: list[torch.Tensor] = []
        # Training seconds are summed in laps that skip checkpoint writing; every checkpoint records the total so far.
        clock, window_seconds, samples = time.perf_counter(), 0.0, 0
        for batch, _ in steps:
            if freezing:
                self.freezer.update(state.epoch, state.step)
            loss = self._train_step(batch, next(streamed) if streamed is not None else None)
            state.step += 1
            state.position += batch.numel()
            samples += batch.numel()
            window.append(loss)
            last_of_epoch = state.position >= n
            checkpoint_due = bool(recipe.checkpoint_every) and state.step % recipe.checkpoint_every == 0
            checkpoint_due = checkpoint_due and not last_of_epoch  # the epoch end writes one anyway
            if state.step % recipe.log_every == 0 or last_of_epoch or state.step >= total:
                # Copying the losses to the host waits for the device, so the lap covers the queued GPU work too.
                losses = torch.stack(window).float().cpu()
                lap = time.perf_counter() - clock
                state.seconds += lap
                self._log(losses, samples / max(window_seconds + lap, 1e-9))
                window, clock, window_seconds, samples = [], time.perf_counter(), 0.0, 0
                self._sync_stop_request()
            else:
                self.reporter.update(state.step, state.epoch + 1)
                if checkpoint_due:
                    # A checkpoint must never hold weights updated by a non-finite loss.
                    self._check_finite(torch.stack(window).float().cpu(), state.step - len(window) + 1)
                    self._sync_stop_request()
            if checkpoint_due:
                # Writing a checkpoint is not training: the clock skips it, for samples/s and state.seconds.
                lap = time.perf_counter() - clock
                state.seconds += lap
                window_seconds += lap
                self._checkpoint()
                clock = time.perf_counter()
            if self.accelerator.num_processes == 1:
                self.stop_requested = self.interrupted  # no other process to agree with: stop now
            if self.stop_requested:
                return last_of_epoch
        return state.position >= n

    def _train_step(self, batch: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        if self.graph is None or images is not None:
            return self._step(batch, images)
        loss = self.graph(batch)
        if self.graph.captured_at_call == self.graph.calls:
            self.graph_step = self.state.step + 1
            self.reporter.notice(f"Training steps now replay a CUDA graph (captured at step {self.graph_step})")
        return loss

    def _graph_record(self) -> dict[str, Any]:
        """What metrics.json says about CUDA graphs: from which step steps were replayed, or why they were not."""
        if self.graph_step is not None:
            return {"used": True, "captured_at_step": self.graph_step}
        refused = self.graph.refused if self.graph is not None else self.graph_blocker
        return {"used": False, "reason": refused or "too few steps of one batch size to warm up and capture"}

    def _step(self, batch: torch.Tensor, pixels: torch.Tensor | None = None) -> torch.Tensor:
        """One training step on the global ``batch``; ``pixels`` are this process's streamed images (else indexed)."""
        acc = self.accelerator
        local = shard(batch, acc.process_index, acc.num_processes)
        images = (self.train_images[local] if pixels is None else pixels).float().div_(255)
        with acc.accumulate(self.model):
            with acc.autocast():
                embeddings = self.model(images).float()
                ref = self.model(images, tower=1).float() if self.pseudo_siamese else None
            if self.recipe.global_mining and acc.num_processes > 1:
                labels = self.train_labels[batch]
                embeddings = gather_with_grad(embeddings, batch.numel(), acc)
                ref = gather_with_grad(ref, batch.numel(), acc) if ref is not None else None
            else:
                labels = self.train_labels[local]
            # A copy, so pml keeps the (i, i) pairs: image i through each tower is a real positive pair.
            ref_labels = labels.clone() if ref is not None else None
            loss = self.objective(embeddings, labels, ref, ref_labels)
            if self.recipe.on_nonfinite == "skip" and self._nonfinite_anywhere(loss):
                self.stepper.zero_grad(set_to_none=True)
                return loss.detach()
            acc.backward(loss)
            if self.recipe.grad_clip_norm is not None and acc.sync_gradients:
                acc.clip_grad_norm_(self.model.parameters(), self.recipe.grad_clip_norm)
            self.stepper.step()
            self.stepper.zero_grad(set_to_none=True)
            if self.scheduler is not None and acc.sync_gradients and not self.optimizer.step_was_skipped:
                # Once per optimizer step: the schedule counts global steps (each step here is the whole
                # global batch), where accelerate's own step() would advance it once per process.
                self.scheduler.scheduler.step()
        return loss.detach()  # the step's autograd graph is freed now, not when the next loss replaces this one

    def _nonfinite_anywhere(self, loss: torch.Tensor) -> bool:
        """Whether the loss is NaN/inf on any process, so all skip the step together (DDP needs that)."""
        # A host sync every step, accepted only in 'skip' mode, which has to decide now.
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.gather(bad)
        return bool(bad.max() > 0)

    # -- reporting --------------------------------------------------------------------------
    def _check_finite(self, losses: torch.Tensor, first_step: int) -> None:
        """In 'stop' mode, raise MetricLabError naming the first non-finite loss of steps from ``first_step``."""
        finite = torch.isfinite(losses)
        if finite.all() or self.recipe.on_nonfinite != "stop":
            return
        first = int((~finite).nonzero()[0])
        lr = self.optimizer.param_groups[0]["lr"]
        last = Run.latest_checkpoint_in(self.run_dir)
        raise MetricLabError(
            f"the loss became {losses[first].item()} at step {first_step + first} (epoch {self.state.epoch + 1}, "
            f"lr {lr:g}); lower --lr, use --mixed-precision no, or pass --on-nonfinite skip to skip such steps. "
            f"Last good checkpoint (written before that step): {last or 'none'}"
        )

    def _log(self, losses: torch.Tensor, samples_per_s: float) -> None:
        state = self.state
        self._check_finite(losses, state.step - len(losses) + 1)
        finite = torch.isfinite(losses)
        lr = self.optimizer.param_groups[0]["lr"]
        loss = losses[finite].mean().item() if finite.any() else float("nan")
        self.reporter.update(state.step, state.epoch + 1, loss, samples_per_s)
        self.accelerator.log({"loss": loss, "lr": lr, "samples_per_s": samples_per_s}, step=state.step)
        if self.accelerator.is_main_process:
            epoch = state.epoch + state.position / self.epoch_length
            row = {"step": state.step, "epoch": epoch, "loss": loss, "lr": lr, "samples_per_s": samples_per_s}
            row["backbone_lr"] = group_lr(self.optimizer, "backbone")
            append_history(self.run_dir, row)

    def _trim_history(self) -> None:
        """On resume, drop history rows written after the checkpoint we continue from."""
        if self.accelerator.is_main_process:
            trim_history(self.run_dir, self.state.step)

    # -- epochs, checkpoints, the end ---------------------------------------------------------
    def embed_split(self, split: str) -> torch.Tensor:
        """All processes embed their shard of ``split``; every process gets the whole, in order."""
        n = (self.test_labels if split == "test" else self.train_labels).numel()
        acc = self.accelerator
        local = shard(torch.arange(n), acc.process_index, acc.num_processes)
        source = self.sources["test" if split == "test" else "train-eval"]
        model = acc.unwrap_model(self.model)
        size = STREAM_EMBED_BATCH if self.streaming else local.numel() or 1
        with acc.autocast():
            parts = [embed(model, images) for images in source(list(local.split(size)))]
            part = torch.cat(parts) if parts else embed(model, source.take([]))
        return gather_shards(part, n, acc)

    def _end_of_epoch(self, last: bool = False) -> bool:
        """Embed and score the test split, keep the best weights, checkpoint; True when training ends here.

        Training ends at the ``last`` epoch or once ``patience`` epochs have not beaten the best; it then
        leaves the weights and embeddings of the run's result: the best epoch's under ``keep_best``.
        """
        epoch = self._trained_epochs()
        test = self.embed_split("test")
        self._require_finite(test)
        row = None
        if self.accelerator.is_main_process:
            labels = self.test_labels.cpu().numpy()
            test_np = test.cpu().numpy()
            run = self.run_dir
            save_embeddings(run / "embeddings" / f"epoch_{epoch:04d}" / "test.npz", test_np, labels, epoch)
            save_embeddings(run / "embeddings" / "test.npz", test_np, labels, epoch)
            if self.marks[0] is not None:
                marked = query_gallery_metrics(test_np, labels, *self.marks, ks=(1,), metric=self.recipe.metric)
                scores = marked["query_gallery"]
            else:
                scores = retrieval_metrics(test_np, labels, ks=(1,), metric=self.recipe.metric, clustering=False)
            row = {
                "epoch": epoch,
                "precision@1": scores["precision@1"],
                "map@r": scores["map@r"],
                "train_seconds": round(self.state.seconds, 3),
                "step": self.state.step,
                "protocol": "query/gallery" if self.marks[0] is not None else "leave-one-out",
            }
            record = Run(run)
            history = [e for e in record.metrics.get("epochs", []) if e["epoch"] < epoch] + [row]
            record.update_metrics("epochs", history)
            self.accelerator.log(
                {"test_precision@1": row["precision@1"], "test_map@r": row["map@r"]}, step=self.state.step
            )
        patience_ran_out = self._select(epoch, row)
        if row is not None:
            by = self.recipe.keep_best
            kept = f"  best {SELECTION_METRICS[by]}: epoch {self.state.best_epoch}" if by else ""
            self.reporter.notice(
                f"epoch {epoch}: test precision@1 {row['precision@1']:.4f}  MAP@R {row['map@r']:.4f}  "
                f"({self.state.seconds:.1f} s of training){kept}",
                style="cyan",
            )
            if patience_ran_out and not last:
                waited = epoch - self.state.best_epoch
                self.reporter.notice(
                    f"stopping early: {waited} epochs without a better test {SELECTION_METRICS[by]} "
                    f"(patience {self.recipe.patience})",
                    style="yellow",
                )
        stop = last or patience_ran_out
        self._checkpoint()  # the state training stopped in (what a longer run would resume), whatever is kept
        if stop:
            self._result_embeddings(test)
        return stop

    def _select(self, epoch: int, row: dict[str, Any] | None) -> bool:
        """Under ``keep_best``, save the weights of a better epoch; True once ``patience`` epochs did not beat it."""
        recipe, state = self.recipe, self.state
        if recipe.keep_best is None:
            return False
        score = [None if row is None else row[recipe.keep_best]]
        broadcast_object_list(score)  # the main process scored; every process decides alike
        better = score[0] is not None and math.isfinite(score[0])  # a NaN score (nothing to score) is never kept
        if better and (state.best_score is None or score[0] > state.best_score):
            state.best_epoch, state.best_step, state.best_score = epoch, state.step, score[0]
            state.best_by = recipe.keep_best
            save_best(self.accelerator, self.model, self.run_dir)
        return self._patience_ran_out(epoch)

    def _patience_ran_out(self, epoch: int) -> bool:
        """Whether ``patience`` epochs up to ``epoch`` did not beat the best (none counted before a first score)."""
        state, patience = self.state, self.recipe.patience
        return bool(self.recipe.keep_best and patience and state.best_step and epoch - state.best_epoch >= patience)

    def _result_embeddings(self, test: torch.Tensor | None = None) -> None:
        """The run's final weights (the best epoch's under ``keep_best``) and their test and train embeddings
        (``test``: those of the weights now, if already computed)."""
        state, by = self.state, self.recipe.keep_best
        if by and not state.best_step:
            self.reporter.notice(f"no epoch had a test {SELECTION_METRICS[by]} to keep: the last weights are kept")
        elif by and state.best_step != state.step:
            if not load_best(self.accelerator, self.model, self.run_dir):
                raise MetricLabError(
                    f"the weights of epoch {state.best_epoch}, the best by {by}, are missing from "
                    f"{self.run_dir / 'checkpoints' / 'best'}; evaluate the last epoch's checkpoint instead, or "
                    "train again"
                )
            test = None
            self.reporter.notice(
                f"keeping the weights of epoch {state.best_epoch}, the best by test {SELECTION_METRICS[by]}"
            )
        test = self.embed_split("test") if test is None else test
        # The train split is large: embedded once, at the end, not every epoch.
        train = self.embed_split("train") if self.recipe.embed_train else None
        if self.accelerator.is_main_process:
            kept = self._kept_epoch()
            labels = self.test_labels.cpu().numpy()
            save_embeddings(self.run_dir / "embeddings" / "test.npz", test.cpu().numpy(), labels, kept)
            if train is not None:
                save_embeddings(
                    self.run_dir / "embeddings" / "train.npz",
                    train.cpu().numpy(),
                    self.train_labels.cpu().numpy(),
                    kept,
                )

    def _checkpoint(self) -> Path:
        """Write the checkpoint of the current step (see :func:`metriclab.training.checkpoints.save_checkpoint`)."""
        self._require_finite()
        path = save_checkpoint(
            self.accelerator, self.run_dir, self.state, self.miner, self.recipe.keep_checkpoints, self.loss_fn
        )
        self.saved_step = self.state.step
        return path

    def _require_finite(self, embeddings: torch.Tensor | None = None) -> None:
        """MetricLabError naming the step if the weights (or ``embeddings``) hold NaN/inf: never checkpoint those."""
        lr = self.optimizer.param_groups[0]["lr"]
        model = self.accelerator.unwrap_model(self.model)
        require_finite_model(model, self.run_dir, self.state.step, lr, embeddings)

    def _request_stop(self, signum, frame) -> None:
        if os.getpid() != self.pid:  # a DataLoader worker: a terminal's Ctrl-C reaches the whole process group, and
            return  # the training process alone answers it (it stops its workers)
        # `accelerate launch` forwards the terminal's Ctrl-C, so a worker often gets it twice within
        # milliseconds; only a second Ctrl-C a moment later means "abort now".
        if self.interrupted and time.monotonic() - self.interrupted_at > 1.0:
            raise KeyboardInterrupt
        if self.interrupted:
            return
        self.interrupted, self.interrupted_at, self.signum = True, time.monotonic(), signum
        self.reporter.notice("Interrupted: finishing this step and writing a checkpoint (Ctrl-C again to abort)")

    def _sync_stop_request(self) -> None:
        """Agree on stopping: every process stops after the same step, or none does."""
        if self.accelerator.num_processes > 1:
            # Only at steps that sync with the host anyway; a process must never act on its own flag.
            flag = torch.tensor([float(self.interrupted)], device=self.accelerator.device)
            self.stop_requested = bool(self.accelerator.gather(flag).max() > 0)
        else:
            self.stop_requested = self.interrupted

    def _interrupt(self) -> None:
        saved = self.saved_step == self.state.step
        checkpoint = checkpoint_dir(self.run_dir, self.state.step) if saved else self._checkpoint()
        self.reporter.stop()
        self.reporter.notice(
            f"Stopped at step {self.state.step}; checkpoint {checkpoint}. Resume with: --resume {self.run_dir} "
            f"--config {self.run_dir / 'config.json'}",
            style="bold yellow",
        )
        raise SystemExit(128 + self.signum)  # 130 after Ctrl-C, 143 after SIGTERM, as shells report

    def _finish(self) -> None:
        from metriclab.viz.plots import scatter  # matplotlib: imported when a run ends, not at start-up
        from metriclab.viz.projections import project

        acc = self.accelerator
        acc.wait_for_everyone()
        acc.save_model(self.model, str(self.run_dir), safe_serialization=True)
        if not acc.is_main_process:
            return
        run = Run(self.run_dir)
        embeddings, labels = run.embeddings("test")
        # The scores `metriclab evaluate` computes, by the same function; it adds the train gallery.
        scores = evaluate_embeddings(None, None, embeddings, labels, metric=self.recipe.metric)
        scores |= protocol_metrics(embeddings, labels, *self.marks, self.categories, metric=self.recipe.metric)
        final = scores.get("query_gallery", scores["test_loo"])
        run.update_metrics(
            "final",
            {
                **scores,
                "dataset": self.dataset.describe()["source"],
                "train_seconds": round(self.state.seconds, 3),
                "steps": self.state.step,
                "cuda_graph": self._graph_record(),
                **self._kept(),
            },
        )
        points = project(embeddings, method="pca") if embeddings.shape[1] > 2 else embeddings
        method = "" if embeddings.shape[1] == 2 else f" (PCA of {embeddings.shape[1]}-D)"
        scatter(
            points,
            labels,
            self.dataset.classes,
            self.run_dir / "embedding.png",
            title=f"{self.recipe.name}: {self.dataset.extra.get('subset', self.dataset.name)} test embedding, "
            f"{len(labels):,} images{method}",
        )
        self.reporter.stop()
        self.reporter.notice(
            f"test precision@1 {final['precision@1']:.4f}  MAP@R {final['map@r']:.4f}  on {self.dataset.name} "
            f"({self._tested(final)}{self._kept_words()})\nRun written to {self.run_dir}",
            style="bold green",
        )

    def _trained_epochs(self) -> int:
        """Epochs trained, counting one that max_steps stopped midway (its snapshot is labelled with its number)."""
        return self.state.epoch + (1 if self.state.position else 0)

    def _kept_epoch(self) -> int:
        """The epoch whose weights are the run's: the best under ``keep_best`` (once one was scored), else the last."""
        return self.state.best_epoch if self.recipe.keep_best and self.state.best_step else self._trained_epochs()

    def _kept(self) -> dict[str, Any]:
        """metrics.json's record of the epoch kept by ``keep_best`` (empty without it)."""
        if not self.recipe.keep_best:
            return {}
        return {"kept_epoch": {"epoch": self._kept_epoch(), "of": self._trained_epochs(), "by": self.recipe.keep_best}}

    def _kept_words(self) -> str:
        kept = self._kept().get("kept_epoch")
        return (
            f"; epoch {kept['epoch']} of {kept['of']}, the best by test {SELECTION_METRICS[kept['by']]}" if kept else ""
        )

    def _tested(self, scores: dict[str, Any]) -> str:
        if "gallery" in scores:
            return f"{scores['queries']} queries searched in a gallery of {scores['gallery']}"
        return f"{self.dataset.describe()['test_size']} test images"


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
