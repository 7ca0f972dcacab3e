"""Checkpoints of a training run: what one holds, how it is written, and how a run resumes from one.

A checkpoint is ``RUN/checkpoints/step_NNNNNNNN/``: accelerate's ``save_state`` (model.safetensors,
optimizer.bin, random_states_*.pkl), ``loss.safetensors`` for a loss with parameters, and
``trainer_state.json`` (:class:`TrainerState` and the miner's state). It is written under
``.tmp-step_NNNNNNNN`` with trainer_state.json last and only then renamed, so a kill at any moment leaves
the previous checkpoint as the latest (see ``Run.checkpoints_in``); the newest ``keep_checkpoints`` are
kept. A resumed run continues in its own directory (:func:`run_directory`) from the checkpoint
``--resume`` names (:func:`resolve_resume`); :func:`resume` loads torch files weights-only,
so one that asks to run code when unpickled is refused.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file, save_file

from metriclab.errors import MetricLabError
from metriclab.models import load_weights
from metriclab.recipe import Recipe
from metriclab.runs import Run, latest_run_dir, new_run_dir, read_trainer_state, write_trainer_state


@dataclass
class TrainerState:
    """Where training stands; saved as trainer_state.json in every checkpoint."""

    epoch: int = 0
    position: int = 0  # samples of the current epoch's order already consumed
    step: int = 0
    seconds: float = 0.0  # time spent in training steps (not in checkpoints or evaluation)
    best_epoch: int = 0  # keep_best: the epoch whose weights checkpoints/best/ holds (0: none yet)
    best_step: int = 0  # ... the step they were saved at (an epoch cut short by max_steps shares its number)
    best_score: float | None = None  # ... and its score
    best_by: str | None = None  # ... the score's name (keep_best)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """The folder of the checkpoint at ``step``: ``run_dir/checkpoints/step_NNNNNNNN``."""
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def save_checkpoint(
    accelerator: Accelerator, run_dir: Path, state: TrainerState, miner: Any, keep: int, loss: Any = None
) -> Path:
    """Write the checkpoint of ``state.step`` atomically, keep the newest ``keep``, and return its folder.

    A ``loss`` with parameters or buffers (proxies, class centres) is saved beside the model as
    ``loss.safetensors``: accelerate saves only what was prepared, and the loss is not.

    Every process calls it (accelerate saves collectively); only the main process renames and prunes.
    Only names ``step_NNNNNNNN`` holding trainer_state.json (written last, inside the temporary folder)
    count as checkpoints, so a kill at any moment leaves the previous one as the latest. A failure to
    write raises MetricLabError naming the last good checkpoint, which stays intact.
    """
    final = checkpoint_dir(run_dir, state.step)
    folder = final.parent
    tmp = folder / f".tmp-{final.name}"
    try:
        if accelerator.is_main_process:
            _remove_unfinished(folder)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            miner_state = miner.state() if hasattr(miner, "state") else None
            if loss_state := _tensor_state(loss):
                save_file(loss_state, str(tmp / LOSS_FILE))
            best = best_dir(run_dir) / "model.safetensors"
            if state.best_step and best.is_file():  # this state's best weights, so a resume from here keeps them
                _link_or_copy(best, tmp / BEST_FILE)
            write_trainer_state(tmp, asdict(state), miner_state)
            _swap_in(tmp, final)  # resumed from an earlier checkpoint: it is replaced, never deleted first
            for stale in Run.checkpoints_in(run_dir)[:-keep]:
                shutil.rmtree(stale, ignore_errors=True)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written checkpoint, whatever stopped it
        if not isinstance(err, OSError) and not any(sign in str(err) for sign in _WRITE_FAILURES):
            raise
        if isinstance(err, OSError):
            cause = f"{err.strerror or err}" + (f": {err.filename}" if err.filename else "")
        else:
            cause = str(err).strip().splitlines()[0]
        last = Run.latest_checkpoint_in(run_dir)
        raise MetricLabError(
            f"could not write checkpoint {final} ({cause}); free disk space or choose a writable "
            f"--output-dir, then continue with --resume {run_dir}. Last good checkpoint (intact): {last or 'none'}"
        ) from err
    accelerator.wait_for_everyone()
    return final


LOSS_FILE = "loss.safetensors"
BEST_FILE = "best.safetensors"  # keep_best: the weights of the checkpoint's best epoch (a hard link where possible)


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename the complete folder ``tmp`` to ``final``, the folder it replaces moved aside until then."""
    old = final.with_name(f".old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` as a hard link to ``source`` (no space: the best is replaced by renaming, never written in place),
    or a copy where the filesystem has no links."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def restore_best(checkpoint: Path, run_dir: Path) -> bool:
    """Put a checkpoint's best weights back as the run's best (main process); False if it holds none."""
    source = Path(checkpoint) / BEST_FILE
    if not source.is_file():
        return False
    final = best_dir(run_dir)
    tmp = final.with_name(".tmp-best")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _link_or_copy(source, tmp / "model.safetensors")
    _swap_in(tmp, final)
    return True


def _tensor_state(loss: Any) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a loss module (empty for most losses), as contiguous CPU tensors."""
    if not isinstance(loss, torch.nn.Module):
        return {}
    return {name: value.detach().cpu().contiguous() for name, value in loss.state_dict().items()}


def load_loss_state(checkpoint: Path, loss: Any) -> bool:
    """Load a checkpoint's loss.safetensors into ``loss`` in place; False if the loss has state the checkpoint
    lacks (one written before losses were saved)."""
    if not isinstance(loss, torch.nn.Module) or not loss.state_dict():
        return True
    path = Path(checkpoint) / LOSS_FILE
    if not path.is_file():
        return False
    try:
        loss.load_state_dict(load_file(str(path)))
    except Exception as err:  # noqa: BLE001 - safetensors and torch raise several types
        raise MetricLabError(
            f"cannot load {path} into the loss ({str(err).strip().splitlines()[0]}); resume with the options the run "
            f"was started with (--config {Path(checkpoint).parent.parent / 'config.json'}) or from another checkpoint"
        ) from err
    return True


def best_dir(run_dir: Path) -> Path:
    """The folder of the best epoch's weights so far (``keep_best``): ``run_dir/checkpoints/best``."""
    return Path(run_dir) / "checkpoints" / "best"


def save_best(accelerator: Accelerator, model: torch.nn.Module, run_dir: Path) -> None:
    """Write ``model``'s weights as the best so far, replacing the previous best only once whole.

    Every process calls it (accelerate gathers the weights collectively); the main process writes.
    """
    final = best_dir(run_dir)
    tmp = final.with_name(".tmp-best")
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_model(model, str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _swap_in(tmp, final)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MetricLabError(
            f"could not write the best epoch's weights to {final} ({err.strerror or err}); free disk space or "
            f"choose a writable --output-dir, then continue with --resume {run_dir}"
        ) from err
    accelerator.wait_for_everyone()


def load_best(accelerator: Accelerator, model: torch.nn.Module, run_dir: Path) -> bool:
    """Load the best epoch's weights into ``model`` on every process; False (model unchanged) if there are none."""
    accelerator.wait_for_everyone()
    path = best_dir(run_dir) / "model.safetensors"
    if not path.is_file():
        return False
    load_weights(accelerator.unwrap_model(model), path)
    return True


# safetensors (SafetensorError) and torch (RuntimeError) report a failed write in their own exception types,
# not as OSError: "Error while serializing: IoError(Os { code: 28, kind: StorageFull, ... })", "PytorchStreamWriter
# failed writing file data/0: file write failed".
_WRITE_FAILURES = ("IoError", "os error", "No space", "StorageFull", "QuotaExceeded", "ReadOnlyFilesystem",
                   "PytorchStreamWriter failed", "file write failed", "unexpected pos")  # fmt: skip


# Messages of a checkpoint that does not fit what the options build (torch's load_state_dict, optimizers).
_MISMATCH = ("Error(s) in loading state_dict", "size mismatch", "Missing key(s)", "Unexpected key(s)",
             "parameter group", "number of parameter groups")  # fmt: skip
# Messages of a damaged file (safetensors' header checks, torch's zip reader, a truncated pickle).
_DAMAGED = ("SafetensorError", "deserializing", "PytorchStreamReader", "truncated", "invalid load key",
            "central directory")  # fmt: skip


def _trainer_state(checkpoint: Path, saved: dict[str, Any]) -> TrainerState:
    """``saved`` (trainer_state.json's state) as a TrainerState; MetricLabError naming a field of the wrong type."""
    path = checkpoint / "trainer_state.json"
    try:
        state = TrainerState(**saved)
    except TypeError as err:
        raise MetricLabError(f"{path} is damaged ({err}); resume from an earlier checkpoint") from err
    numbers = (("epoch", int), ("position", int), ("step", int), ("seconds", (int, float)))
    numbers += (("best_epoch", int), ("best_step", int))
    if state.best_score is not None:
        numbers += (("best_score", (int, float)),)
    for name, kind in numbers:
        value = getattr(state, name)
        if not isinstance(value, kind) or isinstance(value, bool) or value < 0:
            raise MetricLabError(
                f"{path} is damaged: '{name}' is {value!r}, not a non-negative number; resume from an earlier "
                f"checkpoint in {checkpoint.parent} (pass its folder to --resume)"
            )
    return state


def require_finite_model(
    model: torch.nn.Module, run_dir: Path, step: int, lr: float, embeddings: torch.Tensor | None = None
) -> None:
    """Raise MetricLabError if ``model``'s weights (or the ``embeddings`` they gave) hold NaN or inf.

    Checked before every checkpoint, so a checkpoint called good never holds such weights: a finite loss
    can still give a non-finite update (too high a learning rate), which no loss check sees.
    """
    finite = torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()
    what = "weights"
    if bool(finite) and embeddings is not None:
        finite, what = torch.isfinite(embeddings).all(), "test embeddings"
    if bool(finite):
        return
    last = Run.latest_checkpoint_in(run_dir)
    raise MetricLabError(
        f"the model's {what} hold NaN or inf at step {step} (lr {lr:g}): a training update diverged, so no "
        "checkpoint was written for that step; lower --lr (or use --mixed-precision no) and start the run again. "
        f"Last good checkpoint: {last or 'none'}"
    )


def _remove_unfinished(folder: Path) -> None:
    """Delete the temporary checkpoint folders a killed run left in ``folder``."""
    for stale in [*folder.glob(".tmp-step_*"), *folder.glob(".old-step_*")]:
        shutil.rmtree(stale, ignore_errors=True)


def resolve_resume(recipe: Recipe) -> Path:
    """The complete checkpoint that ``recipe.resume`` names; MetricLabError if there is none.

    A checkpoint folder names itself; a run directory its latest checkpoint; ``"latest"`` the latest of
    ``recipe.output_dir`` if given, else of the recipe's newest run.
    """
    target = Path(recipe.output_dir) if recipe.resume == "latest" and recipe.output_dir else None
    if recipe.resume == "latest" and target is None:
        target = latest_run_dir(recipe.name)
    target = target or Path(recipe.resume)
    if target.name.startswith((".tmp-", ".old-")):
        raise MetricLabError(
            f"{target} is a checkpoint that was never completed (training stopped while writing it); "
            f"pass the run directory {target.parent.parent} to resume from its latest complete checkpoint"
        )
    if (target / "trainer_state.json").is_file():
        return target
    checkpoint = Run.latest_checkpoint_in(target)
    if checkpoint is None and not target.exists():
        raise MetricLabError(f"{target} does not exist; pass --resume the run directory to continue")
    if checkpoint is None:
        raise MetricLabError(
            f"{target} holds no complete checkpoint to resume from; start a new run instead: drop --resume and "
            f"choose a new --output-dir, or delete {target} (rm -r {target}) and run again with --output-dir {target}"
        )
    return checkpoint


_FREE_ON_RESUME = ("resume", "output_dir")  # where a resumed run continues from: different by nature


def changed_options(recipe: Recipe, run_dir: Path, processes: int = 1) -> list[str]:
    """``field value (started with value)`` for each option of ``recipe`` that differs from the run's start
    (its config.json), so a resume with a forgotten or mistyped option says so before it trains on.

    The batch is judged as the global batch on ``processes`` processes: 2 x 32 continued as 1 x 64 is the same
    training, as 1 x 32 is not.
    """
    try:
        config = Run(run_dir).config
    except MetricLabError:
        return []
    started = config.get("recipe", {})
    now = json.loads(json.dumps(recipe.to_dict()))  # tuples as lists, as config.json holds them
    changed = []
    if (started_global := config.get("global_batch_size")) is not None:  # what the training depends on
        batch = now.get("batch_size")
        now["batch_size"] = started.get("batch_size")
        if batch * processes != started_global:
            changed.append(f"global batch {batch * processes} = {processes} x {batch} (started with {started_global})")
    # The data are recorded by absolute path: the same place said otherwise is no change.
    if _same_place(now.get("data_dir"), started.get("data_dir")):
        now["data_dir"] = started["data_dir"]
    roots = (now.get("dataset_args") or {}).get("dataset_root"), (started.get("dataset_args") or {}).get("dataset_root")
    if _same_place(*roots):
        now["dataset_args"] = {**now["dataset_args"], "dataset_root": roots[1]}
    return changed + [
        f"{name} {now[name]!r} (started with {started[name]!r})"
        for name in now
        if name in started and name not in _FREE_ON_RESUME and now[name] != started[name]
    ]


def _same_place(a: Any, b: Any) -> bool:
    """Whether two path options name the same place (both set and different as text)."""
    if not (isinstance(a, str) and isinstance(b, str) and a != b):
        return False
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def run_directory(recipe: Recipe, process: PartialState) -> tuple[Path, Path | None]:
    """``(run directory, checkpoint to resume from or None)``, chosen on the main process and shared with all.

    A new run gets a new directory; a resumed run continues in its own. A user error raises MetricLabError
    on every process, so none is left waiting.
    """
    result: list[Any] = [None, None, None]
    if process.is_main_process:
        try:
            if recipe.resume:
                checkpoint = resolve_resume(recipe)
                result = [str(checkpoint.parent.parent), str(checkpoint), None]
            else:
                result = [str(new_run_dir(recipe.name, recipe.output_dir)), None, None]
        except MetricLabError as err:
            result = [None, None, str(err)]
    if process.num_processes > 1:
        broadcast_object_list(result)
    if result[2] is not None:
        raise MetricLabError(result[2])
    return Path(result[0]), (Path(result[1]) if result[1] else None)


def resume(accelerator: Accelerator, checkpoint: Path, miner: Any) -> TrainerState:
    """Load ``checkpoint`` into the prepared objects and ``miner``; return where training stands.

    Untrusted files (a pickle that would run code), files that do not fit the model, and a damaged
    trainer_state.json raise MetricLabError.
    """
    from accelerate.utils import load

    # accelerate loads the random states inside a bare `except Exception` (a refused pickle would pass
    # silently), so this process's file is tried first, the same way: weights_only=True.
    random_states = checkpoint / f"random_states_{accelerator.process_index}.pkl"
    try:
        if random_states.is_file():
            load(random_states)
        accelerator.load_state(str(checkpoint))
    except pickle.UnpicklingError as err:
        raise MetricLabError(
            f"refused to load checkpoint {checkpoint}: a file in it is not a weights-only torch file (it asks to "
            "run code when unpickled), so it was not loaded; it may have been tampered with. Resume only from "
            "checkpoints you trust, e.g. an earlier one in checkpoints/, or start a new run"
        ) from err
    except Exception as err:
        # safetensors, torch and accelerate raise many types; only the causes below are explained, the rest kept.
        text = f"{type(err).__name__}: {err}"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if any(sign in text for sign in _MISMATCH):
            raise MetricLabError(
                f"checkpoint {checkpoint} does not fit the model and optimizer these options build ({first}); resume "
                f"with the options the run was started with (e.g. --config {checkpoint.parent.parent / 'config.json'}"
                f" --resume {checkpoint.parent.parent})"
            ) from err
        if isinstance(err, (OSError, EOFError)) or any(sign in text for sign in _DAMAGED):
            raise MetricLabError(
                f"cannot read checkpoint {checkpoint} ({first}): a file in it is damaged or missing; resume from an "
                f"earlier checkpoint in {checkpoint.parent} (pass its folder to --resume) or start a new run"
            ) from err
        raise
    saved_state, miner_state = read_trainer_state(checkpoint)
    state = _trainer_state(checkpoint, saved_state)
    if miner is not None and hasattr(miner, "load_state") and miner_state is not None:
        miner.load_state(miner_state)
    if accelerator.is_main_process:
        # A run killed after its last checkpoint resumes straight to the end and writes none that would clean up.
        _remove_unfinished(checkpoint.parent)
    return state
