"""The training loop, once: ``train(recipe)`` on accelerate, from data to a complete run directory.

Data lives on the training device as uint8 tensors; each step indexes its shard of the
global batch there, embeds it, gathers the global batch from all processes (so mining
and the loss see what one process with the whole batch would), and steps. The host is
consulted only every ``log_every`` steps (loss, speed, non-finite check) and at epoch ends.
"""

from __future__ import annotations

import inspect
import json
import math
import platform
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, set_seed

import metriclab
from metriclab import registry
from metriclab.data import Dataset
from metriclab.distributed import gather_shards, gather_with_grad
from metriclab.errors import MetricLabError
from metriclab.model import SiameseNetwork, build_model, embed, resolved_arguments
from metriclab.progress import Reporter
from metriclab.recipe import Recipe
from metriclab.runs import FORMAT_VERSION, Run, latest_run_dir, new_run_dir, save_embeddings, write_atomic, write_json
from metriclab.sampling import epoch_order, shard


@dataclass
class TrainerState:
    """Where training stands; saved as trainer_state.json in every checkpoint."""

    epoch: int = 0
    position: int = 0  # samples of the current epoch's order already consumed
    step: int = 0
    seconds: float = 0.0


def train(recipe: Recipe) -> Path:
    """Train ``recipe`` and return its run directory (written by the main process only)."""
    for spec in recipe.plugins:
        registry.load_plugin(spec)
    cpu = recipe.cpu or not torch.cuda.is_available()
    # The process group first: the run directory is chosen on the main process and shared,
    # and trackers need it when the Accelerator is created.
    run_dir, checkpoint = _run_directory(recipe, PartialState(cpu=cpu))
    try:
        accelerator = Accelerator(
            cpu=cpu,
            mixed_precision=recipe.mixed_precision,
            gradient_accumulation_steps=recipe.gradient_accumulation_steps,
            log_with=recipe.log_with,
            project_dir=str(run_dir),
        )
    except (ValueError, ImportError) as err:
        raise MetricLabError(f"cannot set up training ({err}); check --log-with and --mixed-precision") from err
    reporter = Reporter(enabled=accelerator.is_main_process)
    set_seed(recipe.seed)

    with accelerator.main_process_first():
        dataset = load_dataset(recipe)
    if dataset.notice:
        reporter.notice(dataset.notice)
    model = build_model(recipe, dataset.input_shape)
    loss_fn, miner = build_objective(recipe, num_classes=len(dataset.classes))
    optimizer = registry.optimizers.create(
        recipe.optimizer,
        params=list(model.parameters()) + list(loss_fn.parameters()),
        lr=recipe.lr,
        **recipe.optimizer_args,
    )
    global_batch = recipe.batch_size * accelerator.num_processes
    if global_batch < 2:
        raise MetricLabError(
            "the global batch holds fewer than 2 samples, so no pair can be formed; raise --batch-size"
        )

    if accelerator.is_main_process and checkpoint is None:
        write_json(run_dir / "config.json", describe_run(recipe, dataset, accelerator, model))
    if recipe.log_with:
        accelerator.init_trackers(recipe.name, config=_flat(recipe.to_dict()))

    if recipe.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    loss_fn.to(accelerator.device)
    state = TrainerState()
    if checkpoint is not None:
        state = _resume(accelerator, checkpoint, miner, reporter)

    trainer = _Trainer(recipe, accelerator, reporter, run_dir, dataset, model, loss_fn, miner, optimizer, state)
    trainer.fit()
    accelerator.end_training()
    return run_dir


def load_dataset(recipe: Recipe) -> Dataset:
    """The recipe's dataset, passing ``data_dir`` to factories that accept it."""
    factory = registry.datasets.get(recipe.dataset)
    args = dict(recipe.dataset_args)
    if recipe.data_dir is not None:
        if "data_dir" not in inspect.signature(factory).parameters:
            raise MetricLabError(f"dataset '{recipe.dataset}' does not read from a directory; drop --data-dir")
        args["data_dir"] = recipe.data_dir
    return registry.datasets.create(recipe.dataset, **args)


def build_objective(recipe: Recipe, num_classes: int) -> tuple[torch.nn.Module, Any]:
    """The recipe's loss (with ``num_classes``/``embedding_size`` injected where accepted) and miner."""
    context = {"num_classes": num_classes, "embedding_size": recipe.embedding_dim}
    loss_args = {**_accepted(registry.losses.get(recipe.loss), context), **recipe.loss_args}
    loss_fn = registry.losses.create(recipe.loss, **loss_args)
    miner = None
    if recipe.miner:
        miner_args = {**_accepted(registry.miners.get(recipe.miner), {"seed": recipe.seed}), **recipe.miner_args}
        miner = registry.miners.create(recipe.miner, **miner_args)
    return loss_fn, miner


def _accepted(factory: Any, context: dict[str, Any]) -> dict[str, Any]:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}
    return {k: v for k, v in context.items() if k in params}


def describe_run(recipe: Recipe, dataset: Dataset, accelerator: Accelerator, model: SiameseNetwork) -> dict:
    """The config.json of a run: resolved recipe, components with every argument, data source, environment."""
    components = {}
    for kind, name, args in [
        ("encoder", recipe.encoder, {"embedding_dim": recipe.embedding_dim, **recipe.encoder_args}),
        ("loss", recipe.loss, recipe.loss_args),
        ("miner", recipe.miner, recipe.miner_args),
        ("optimizer", recipe.optimizer, {"lr": recipe.lr, **recipe.optimizer_args}),
        ("dataset", recipe.dataset, recipe.dataset_args),
    ]:
        if name:
            entry = registry.registry(kind)
            factory = entry.get(name)
            source = next(e.source for e in entry.entries(name))
            components[kind] = {"name": name, "source": source, "args": resolved_arguments(factory, args)}
    versions = {}
    for package in ("metriclab", "torch", "torchvision", "pytorch-metric-learning", "accelerate", "numpy"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "format_version": FORMAT_VERSION,
        "recipe": recipe.to_dict(),
        "components": components,
        "dataset": dataset.describe(),
        "num_processes": accelerator.num_processes,
        "global_batch_size": recipe.batch_size * accelerator.num_processes,
        "device": str(accelerator.device),
        "device_name": torch.cuda.get_device_name() if accelerator.device.type == "cuda" else platform.processor(),
        "mixed_precision": recipe.mixed_precision,
        "parameters": sum(p.numel() for p in model.parameters()),
        "versions": {**versions, "python": platform.python_version(), "metriclab_module": metriclab.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _flat(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in data.items()}


def _run_directory(recipe: Recipe, accelerator: PartialState) -> tuple[Path, Path | None]:
    """Create (or find, when resuming) the run directory on the main process and share it."""
    result: list[Any] = [None, None, None]
    if accelerator.is_main_process:
        try:
            if recipe.resume:
                checkpoint = _resolve_resume(recipe)
                result = [str(checkpoint.parent.parent), str(checkpoint), None]
            else:
                result = [str(new_run_dir(recipe.name, recipe.output_dir)), None, None]
        except MetricLabError as err:
            result = [None, None, str(err)]
    if accelerator.num_processes > 1:
        broadcast_object_list(result)
    if result[2] is not None:
        raise MetricLabError(result[2])
    return Path(result[0]), (Path(result[1]) if result[1] else None)


def _resolve_resume(recipe: Recipe) -> Path:
    target = Path(recipe.output_dir) if recipe.resume == "latest" and recipe.output_dir else None
    if recipe.resume == "latest" and target is None:
        target = latest_run_dir(recipe.name)
    target = target or Path(recipe.resume)
    if (target / "trainer_state.json").is_file():
        return target
    checkpoint = Run.latest_checkpoint_in(target)
    if checkpoint is None:
        raise MetricLabError(f"{target} holds no complete checkpoint to resume from; start a new run instead")
    return checkpoint


def _resume(accelerator: Accelerator, checkpoint: Path, miner: Any, reporter: Reporter) -> TrainerState:
    accelerator.load_state(str(checkpoint))
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    state = TrainerState(**saved["state"])
    if miner is not None and hasattr(miner, "load_state") and saved.get("miner") is not None:
        miner.load_state(saved["miner"])
    reporter.notice(f"Resumed from {checkpoint} (epoch {state.epoch + 1}, step {state.step})", style="green")
    return state


class _Trainer:
    """The loop and its bookkeeping; one instance per ``train`` call."""

    def __init__(self, recipe, accelerator, reporter, run_dir, dataset, model, loss_fn, miner, optimizer, state):
        self.recipe, self.accelerator, self.reporter, self.run_dir = recipe, accelerator, reporter, run_dir
        self.model, self.loss_fn, self.miner, self.optimizer, self.state = model, loss_fn, miner, optimizer, state
        self.dataset = dataset
        device = accelerator.device
        self.train_images, self.train_labels = dataset.train_images.to(device), dataset.train_labels.to(device)
        self.test_images, self.test_labels = dataset.test_images.to(device), dataset.test_labels.to(device)
        self.global_batch = recipe.batch_size * accelerator.num_processes
        self.pseudo_siamese = not accelerator.unwrap_model(model).shares_weights
        self.stop_requested = False

    # -- the loop -------------------------------------------------------------------------
    def fit(self) -> None:
        recipe, state = self.recipe, self.state
        n = self.train_labels.numel()
        steps_per_epoch = math.ceil(n / self.global_batch)
        total = steps_per_epoch * recipe.epochs
        if recipe.max_steps is not None:
            total = min(total, recipe.max_steps)
        self._trim_history()
        self.reporter.start(total, completed=state.step)
        previous = signal.signal(signal.SIGINT, self._request_stop) if _in_main_thread() else None
        try:
            while state.epoch < recipe.epochs and state.step < total:
                finished_epoch = self._train_epoch(n, total)
                if finished_epoch:
                    state.epoch += 1
                    state.position = 0
                done = state.epoch >= recipe.epochs or state.step >= total
                if finished_epoch or done:  # a run stopped by max_steps mid-epoch still leaves embeddings
                    self._end_of_epoch(last=done)
                if self.stop_requested:
                    self._interrupt()
            self._finish()
        finally:
            self.reporter.stop()
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def _train_epoch(self, n: int, total: int) -> bool:
        recipe, state = self.recipe, self.state
        order = epoch_order(self.train_labels, recipe.seed, state.epoch, recipe.sampler, recipe.m_per_class)
        self.model.train()
        window: list[torch.Tensor] = []
        clock, samples = time.perf_counter(), 0
        while state.position < n:
            if state.step >= total:
                return False
            batch = order[state.position : state.position + self.global_batch]
            loss = self._step(batch)
            state.step += 1
            state.position += batch.numel()
            samples += batch.numel()
            window.append(loss.detach())
            last_of_epoch = state.position >= n
            if state.step % recipe.log_every == 0 or last_of_epoch or state.step >= total:
                elapsed = time.perf_counter() - clock
                state.seconds += elapsed
                self._log(window, samples / max(elapsed, 1e-9))
                window, clock, samples = [], time.perf_counter(), 0
                self._check_stop_request()
            else:
                self.reporter.update(state.step, state.epoch + 1)
            if recipe.checkpoint_every and state.step % recipe.checkpoint_every == 0 and not last_of_epoch:
                self.save_checkpoint()
            if self.stop_requested:
                return last_of_epoch
        return True

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
            indices = self.miner(embeddings, labels, ref, ref_labels) if self.miner is not None else None
            loss = self.loss_fn(embeddings, labels, indices, ref, ref_labels)
            if self.recipe.on_nonfinite == "skip" and not torch.isfinite(loss):
                # A host sync every step, accepted only in 'skip' mode, which has to decide now.
                self.optimizer.zero_grad(set_to_none=True)
                return loss
            acc.backward(loss)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss

    # -- reporting --------------------------------------------------------------------------
    def _log(self, window: list[torch.Tensor], samples_per_s: float) -> None:
        state = self.state
        losses = torch.stack(window).float().cpu()
        finite = torch.isfinite(losses)
        lr = self.optimizer.param_groups[0]["lr"]
        if not finite.all() and self.recipe.on_nonfinite == "stop":
            first = int((~finite).nonzero()[0])
            step = state.step - len(window) + first + 1
            raise MetricLabError(
                f"the loss became {losses[first].item()} at step {step} (epoch {state.epoch + 1}, lr {lr:g}); "
                "lower --lr, use --mixed-precision no, or pass --on-nonfinite skip to skip such steps. "
                "The last checkpoint in checkpoints/ is intact."
            )
        loss = losses[finite].mean().item() if finite.any() else float("nan")
        self.reporter.update(state.step, state.epoch + 1, loss, samples_per_s)
        self.accelerator.log({"loss": loss, "lr": lr, "samples_per_s": samples_per_s}, step=state.step)
        if self.accelerator.is_main_process:
            path = self.run_dir / "history.csv"
            new = not path.exists()
            with path.open("a") as handle:
                if new:
                    handle.write("step,epoch,loss,lr,samples_per_s\n")
                handle.write(
                    f"{state.step},{state.epoch + state.position / self.train_labels.numel():.4f},"
                    f"{loss:.6g},{lr:.6g},{samples_per_s:.1f}\n"
                )

    def _trim_history(self) -> None:
        """On resume, drop history rows written after the checkpoint we continue from."""
        path = self.run_dir / "history.csv"
        if self.accelerator.is_main_process and path.exists():
            lines = path.read_text().splitlines()
            kept = [lines[0]] + [line for line in lines[1:] if int(line.split(",")[0]) <= self.state.step]
            write_atomic(path, "\n".join(kept) + "\n")

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
        from metriclab.retrieval import retrieval_metrics

        epoch = self.state.epoch
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
        self.save_checkpoint()

    def save_checkpoint(self) -> Path:
        """Write a complete checkpoint atomically (temporary name, then rename) and prune old ones."""
        acc, state = self.accelerator, self.state
        folder = self.run_dir / "checkpoints"
        final = folder / f"step_{state.step:08d}"
        tmp = folder / f".tmp-step_{state.step:08d}"
        try:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            acc.wait_for_everyone()
            acc.save_state(str(tmp))
            acc.wait_for_everyone()
            if acc.is_main_process:
                miner_state = self.miner.state() if hasattr(self.miner, "state") else None
                write_json(tmp / "trainer_state.json", {"state": asdict(state), "miner": miner_state})
                if final.exists():
                    shutil.rmtree(final)
                tmp.rename(final)
                complete = sorted(p for p in folder.glob("step_*") if p.is_dir())
                for old in complete[: -self.recipe.keep_checkpoints]:
                    shutil.rmtree(old, ignore_errors=True)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            last = Run.latest_checkpoint_in(self.run_dir)
            raise MetricLabError(
                f"could not write checkpoint {final} ({err.strerror or err}); free disk space or choose a writable "
                f"--output-dir. Last good checkpoint: {last or 'none'}"
            ) from err
        acc.wait_for_everyone()
        return final

    def _request_stop(self, signum, frame) -> None:
        if self.stop_requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.stop_requested = True
        self.reporter.notice("Interrupted: finishing this step and writing a checkpoint (Ctrl-C again to abort)")

    def _check_stop_request(self) -> None:
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([float(self.stop_requested)], device=self.accelerator.device)
            self.stop_requested = bool(self.accelerator.gather(flag).max() > 0)

    def _interrupt(self) -> None:
        checkpoint = self.save_checkpoint()
        self.reporter.stop()
        self.reporter.notice(
            f"Stopped at step {self.state.step}; checkpoint {checkpoint}. Resume with: --resume {self.run_dir}",
            style="bold yellow",
        )
        raise SystemExit(130)

    def _finish(self) -> None:
        from metriclab.plots import scatter
        from metriclab.projections import project
        from metriclab.retrieval import retrieval_metrics

        acc = self.accelerator
        acc.wait_for_everyone()
        acc.save_model(self.model, str(self.run_dir), safe_serialization=True)
        if not acc.is_main_process:
            return
        run = Run(self.run_dir)
        embeddings, labels = run.embeddings("test")
        final = retrieval_metrics(embeddings, labels, ks=(1, 5, 10), metric=self.recipe.metric)
        run.update_metrics(
            "final",
            {
                "test_loo": final,
                "dataset": self.dataset.describe()["source"],
                "train_seconds": round(self.state.seconds, 3),
                "steps": self.state.step,
            },
        )
        points = project(embeddings, method="pca") if embeddings.shape[1] > 2 else embeddings
        method = "" if embeddings.shape[1] == 2 else f" (PCA of {embeddings.shape[1]}-D)"
        scatter(
            points,
            labels,
            self.dataset.classes,
            self.run_dir / "embedding.png",
            title=f"{self.recipe.name}: {self.dataset.name} test embedding{method}",
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
