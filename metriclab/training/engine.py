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

import errno
import json
import signal
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed

from metriclab import registry
from metriclab.data import load_dataset
from metriclab.data.sampling import epoch_order, shard
from metriclab.errors import MetricLabError
from metriclab.metrics.retrieval import evaluate_embeddings, retrieval_metrics
from metriclab.models import build_model, embed
from metriclab.recipe import Recipe
from metriclab.runs import Run, append_history, save_embeddings, trim_history, write_config
from metriclab.training.checkpoints import TrainerState, checkpoint_dir, resume, run_directory, save_checkpoint
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

# Errors of the output location that a user can fix (space, quota, permissions, read-only mount).
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}


def train(recipe: Recipe) -> Path:
    """Train ``recipe`` and return its run directory (written by the main process only).

    A new run that fails before writing anything leaves no empty run directory behind;
    a failure to write (full disk, read-only mount) is a MetricLabError naming the last
    good checkpoint, which stays intact.
    """
    for spec in recipe.plugins:
        registry.load_plugin(spec)
    cpu = recipe.cpu or not torch.cuda.is_available()
    # The process group first: the run directory is chosen on the main process and shared,
    # and trackers need it when the Accelerator is created.
    process = PartialState(cpu=cpu)
    run_dir, checkpoint = run_directory(recipe, process)
    try:
        return _train(recipe, cpu, run_dir, checkpoint)
    except OSError as err:
        if err.errno not in _DISK_ERRNOS:
            raise
        last = Run.latest_checkpoint_in(run_dir)
        then = f"continue with --resume {run_dir} (last good checkpoint: {last})" if last else "start the run again"
        raise MetricLabError(
            f"{err.strerror}: {err.filename or run_dir}; free disk space or fix the permissions of the output "
            f"location, then {then}"
        ) from err
    finally:
        if checkpoint is None and process.is_main_process and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # a run that failed before writing anything leaves no empty folder


def _train(recipe: Recipe, cpu: bool, run_dir: Path, checkpoint: Path | None) -> Path:
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

    with accelerator.main_process_first():
        dataset = load_dataset(recipe)
    if dataset.notice:
        reporter.notice(dataset.notice)
    model = build_model(recipe, dataset.input_shape)
    model.fit_input_statistics(dataset.train_images)
    loss_fn, miner = build_objective(recipe, num_classes=len(dataset.classes), embedding_dim=model.embedding_dim)
    freezer = BackboneFreezer(model, recipe.freeze_backbone_epochs, recipe.freeze_backbone_steps)
    optimizer = registry.optimizers.create(
        recipe.optimizer, params=parameter_groups(recipe, model, loss_fn), lr=recipe.lr, **recipe.optimizer_args
    )
    global_batch = recipe.batch_size * accelerator.num_processes
    scheduler = build_scheduler(recipe, optimizer, optimizer_steps(recipe, dataset.train_labels.numel(), global_batch))

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
        reporter.notice(f"Resumed from {checkpoint} (epoch {state.epoch + 1}, step {state.step})", style="green")

    trainer = _Trainer(recipe, accelerator, reporter, run_dir, dataset, model, loss_fn, miner, optimizer, state)
    trainer.scheduler, trainer.freezer = scheduler, freezer
    trainer.fit()
    accelerator.end_training()
    return run_dir


def _freezes(recipe: Recipe) -> bool:
    return recipe.freeze_backbone_epochs > 0 or recipe.freeze_backbone_steps > 0


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
        self.graph = None
        if self.graph_blocker is None:
            self.graph = StepGraph(self._step, self.stepper, self.objective, self.global_batch)
        self.graph_step: int | None = None  # the step at which this process captured its graph
        self.dataset = dataset
        device = accelerator.device
        self.train_images, self.train_labels = dataset.train_images.to(device), dataset.train_labels.to(device)
        self.test_images, self.test_labels = dataset.test_images.to(device), dataset.test_labels.to(device)
        self.pseudo_siamese = not accelerator.unwrap_model(model).shares_weights
        self.interrupted, self.interrupted_at = False, 0.0  # set by the signal handler in this process
        self.signum = int(signal.SIGINT)  # what stopped the run; another process may have received it
        self.stop_requested = False  # agreed by all processes: stop after this step
        self.saved_step: int | None = None  # step of the last checkpoint this process wrote
        self.scheduler = None  # the prepared learning-rate schedule, if the recipe has one
        self.freezer: BackboneFreezer | None = None  # freezes a backbone encoder for the first epochs/steps

    # -- the loop -------------------------------------------------------------------------
    def fit(self) -> None:
        recipe, state = self.recipe, self.state
        n = self.train_labels.numel()
        total = total_batches(recipe, n, self.global_batch)
        self._trim_history()
        self.reporter.start(total, completed=state.step)
        # Ctrl-C and SIGTERM (a scheduler's preemption notice) both stop cleanly after a checkpoint.
        handled = (signal.SIGINT, signal.SIGTERM) if _in_main_thread() else ()
        previous = {signum: signal.signal(signum, self._request_stop) for signum in handled}
        try:
            while state.epoch < recipe.epochs and state.step < total:
                finished_epoch = self._train_epoch(n, total)
                if finished_epoch:
                    state.epoch += 1
                    state.position = 0
                done = state.epoch >= recipe.epochs or state.step >= total
                if finished_epoch or done:  # a run stopped by max_steps mid-epoch still leaves embeddings
                    self._end_of_epoch(last=done)
                if self.stop_requested and not done:
                    self._interrupt()
            self._finish()
        finally:
            self.reporter.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _train_epoch(self, n: int, total: int) -> bool:
        recipe, state = self.recipe, self.state
        order = epoch_order(self.train_labels, recipe.seed, state.epoch, recipe.sampler, recipe.m_per_class)
        self.model.train()
        freezing = self.freezer is not None and self.freezer.active
        if freezing:
            self.freezer.update(state.epoch, state.step, force=True)  # model.train() woke a frozen backbone
        window: list[torch.Tensor] = []
        # Training seconds are summed in laps that skip checkpoint writing; every checkpoint records the total so far.
        clock, window_seconds, samples = time.perf_counter(), 0.0, 0
        while state.position < n:
            if state.step >= total:
                return False
            batch = order[state.position : state.position + self.global_batch]
            if freezing:
                self.freezer.update(state.epoch, state.step)
            loss = self._train_step(batch)
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
        return True

    def _train_step(self, batch: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            return self._step(batch)
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

    def _step(self, batch: torch.Tensor) -> torch.Tensor:
        acc = self.accelerator
        local = shard(batch, acc.process_index, acc.num_processes)
        images = self.train_images[local].float().div_(255)
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
            epoch = state.epoch + state.position / self.train_labels.numel()
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
        images = self.test_images if split == "test" else self.train_images
        n = images.shape[0]
        acc = self.accelerator
        local = shard(torch.arange(n, device=images.device), acc.process_index, acc.num_processes)
        with acc.autocast():
            part = embed(acc.unwrap_model(self.model), images[local])
        return gather_shards(part, n, acc)

    def _end_of_epoch(self, last: bool = False) -> None:
        # Completed epochs; a run stopped mid-epoch (max_steps) labels its snapshot with the epoch in progress.
        epoch = self.state.epoch + (1 if self.state.position else 0)
        test = self.embed_split("test")
        # The train split is large: embedded once, at the end, not every epoch.
        train = self.embed_split("train") if self.recipe.embed_train and last else None
        if self.accelerator.is_main_process:
            labels = self.test_labels.cpu().numpy()
            test_np = test.cpu().numpy()
            run = self.run_dir
            save_embeddings(run / "embeddings" / f"epoch_{epoch:04d}" / "test.npz", test_np, labels, epoch)
            save_embeddings(run / "embeddings" / "test.npz", test_np, labels, epoch)
            if train is not None:
                save_embeddings(
                    run / "embeddings" / "train.npz", train.cpu().numpy(), self.train_labels.cpu().numpy(), epoch
                )
            scores = retrieval_metrics(test_np, labels, ks=(1,), metric=self.recipe.metric, clustering=False)
            row = {
                "epoch": epoch,
                "precision@1": scores["precision@1"],
                "map@r": scores["map@r"],
                "train_seconds": round(self.state.seconds, 3),
                "step": self.state.step,
            }
            record = Run(run)
            history = [e for e in record.metrics.get("epochs", []) if e["epoch"] < epoch] + [row]
            record.update_metrics("epochs", history)
            self.accelerator.log(
                {"test_precision@1": row["precision@1"], "test_map@r": row["map@r"]}, step=self.state.step
            )
            self.reporter.notice(
                f"epoch {epoch}: test precision@1 {row['precision@1']:.4f}  MAP@R {row['map@r']:.4f}  "
                f"({self.state.seconds:.1f} s of training)",
                style="cyan",
            )
        self._checkpoint()

    def _checkpoint(self) -> Path:
        """Write the checkpoint of the current step (see :func:`metriclab.training.checkpoints.save_checkpoint`)."""
        path = save_checkpoint(self.accelerator, self.run_dir, self.state, self.miner, self.recipe.keep_checkpoints)
        self.saved_step = self.state.step
        return path

    def _request_stop(self, signum, frame) -> None:
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
            f"Stopped at step {self.state.step}; checkpoint {checkpoint}. Resume with: --resume {self.run_dir}",
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
        final = scores["test_loo"]
        run.update_metrics(
            "final",
            {
                **scores,
                "dataset": self.dataset.describe()["source"],
                "train_seconds": round(self.state.seconds, 3),
                "steps": self.state.step,
                "cuda_graph": self._graph_record(),
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
            f"({self.dataset.describe()['test_size']} test images)\nRun written to {self.run_dir}",
            style="bold green",
        )


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
