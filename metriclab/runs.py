"""The run directory: the contract between training and the CLI.

Layout (``format_version`` 1)::

    RUN/
      config.json               resolved recipe, components with all arguments, dataset and its
                                source, versions, processes, device, format_version
      model.safetensors         final weights of the Siamese network (safetensors only)
      checkpoints/step_00000120/  accelerate ``save_state`` + ``trainer_state.json``; written under a
                                ``.tmp-`` name and renamed when complete, so a listed one is whole
      checkpoints/best/         ``keep_best``: model.safetensors of the best epoch so far (its epoch, step
                                and score are in trainer_state.json, each checkpoint's own copy in its
                                best.safetensors); model.safetensors becomes it at the end
      embeddings/test.npz       test embeddings, refreshed after every epoch; at the end those of the final
                                weights (the kept epoch's under ``keep_best``): ``embeddings``
                                float32 (N, D), ``labels`` int64 (N,), ``epoch`` int
                                (read with ``np.load(allow_pickle=False)``)
      embeddings/epoch_0003/test.npz   one snapshot of the test split per epoch (animations)
      embeddings/train.npz      train embeddings at the end of training (same format;
                                ``embed_train=False`` skips them)
      history.csv               loss curve: step, epoch, loss, lr, samples_per_s, backbone_lr (lr of a
                                backbone encoder's parameters; the same as lr without one)
      metrics.json              {"epochs": [...], "final": {...}, "evaluations": {...}}
      embedding.png             2-D scatter of the test embedding at the end of training

This module is the only one that reads or writes these files (checkpoints' torch files aside, which
accelerate writes and :mod:`metriclab.training.checkpoints` loads weights-only). Nothing in a run
directory is ever unpickled: arrays are ``.npz`` read with ``allow_pickle=False``, weights are
safetensors, JSON is JSON.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from metriclab.errors import MetricLabError

FORMAT_VERSION = 1
_CHECKPOINT = re.compile(r"^step_(\d{8})$")
HISTORY_COLUMNS = ("step", "epoch", "loss", "lr", "samples_per_s", "backbone_lr")
# OSErrors of a location a user can fix: space, quota, permissions, read-only mount, a file where a folder should be.
DISK_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST}
)


def new_file_mode() -> int:
    """The permissions a plain ``open(path, "w")`` would give a new file (0o666 less the umask).

    ``tempfile.mkstemp`` makes files readable by their owner only; files written through one are set to
    this, so a shared run directory stays readable by the group as its umask says.
    """
    try:  # Linux says without changing it (setting it, even back, races with other threads creating files)
        status = Path("/proc/self/status").read_text()
        umask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0)
        os.umask(umask)
    return 0o666 & ~umask


def temporary_beside(path: Path, suffix: str = "") -> tuple[int, str]:
    """``(descriptor, name)`` of a new temporary file in ``path``'s folder, to be renamed to ``path`` when complete;
    its permissions are those a new file gets (:func:`new_file_mode`), not ``mkstemp``'s owner-only ones."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.", suffix=suffix)
    if hasattr(os, "fchmod"):  # not on Windows before Python 3.13, where mkstemp's files are not private anyway
        os.fchmod(fd, new_file_mode())
    return fd, tmp


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` via a temporary file and rename, so readers never see half a file."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = temporary_beside(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.filename is None:  # a failed write names no file: name the one being written
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """Atomically write pretty JSON."""
    write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def strict_json(value: Any) -> Any:
    """``value`` with NaN/inf floats replaced by None, so the result is strict JSON."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    """Write the run's config.json (what ``metriclab.training.components.describe_run`` returns)."""
    write_json(Path(run_dir) / "config.json", config)


def append_history(run_dir: Path, row: dict[str, float]) -> None:
    """Append one row (the :data:`HISTORY_COLUMNS`) to history.csv, writing the header first if it is new."""
    path = Path(run_dir) / "history.csv"
    new = not path.exists()
    line = f"{row['step']},{row['epoch']:.4f},{row['loss']:.6g},{row['lr']:.6g},{row['samples_per_s']:.1f}"
    line += f",{row.get('backbone_lr', row['lr']):.6g}\n"
    try:
        with path.open("a") as handle:
            if new:
                handle.write(",".join(HISTORY_COLUMNS) + "\n")
            handle.write(line)
    except OSError as err:
        if err.filename is None:  # a failed write names no file: name the one being written
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def trim_history(run_dir: Path, step: int) -> None:
    """Keep only the whole history.csv rows up to ``step`` (on resume; a kill can cut the last row short)."""
    path = Path(run_dir) / "history.csv"
    if path.exists():
        lines = path.read_text().splitlines()
        # The file's own header (a run written before a column was added has fewer); none if a kill cut it.
        has_header = bool(lines) and lines[0].split(",")[0] == HISTORY_COLUMNS[0]
        header = lines[0] if has_header else ",".join(HISTORY_COLUMNS)
        width = len(header.split(","))
        kept = [header] + [
            line
            for line in (lines[1:] if has_header else lines)
            if _whole_row(line, width) and int(float(line.split(",")[0])) <= step
        ]
        write_atomic(path, "\n".join(kept) + "\n")


def _whole_row(line: str, width: int = len(HISTORY_COLUMNS)) -> bool:
    """Whether ``line`` is a complete history.csv row of ``width`` columns."""
    fields = line.split(",")
    if len(fields) != width:
        return False
    try:
        for value in fields:
            float(value)
    except ValueError:
        return False
    return True


def write_trainer_state(checkpoint: Path, state: dict[str, Any], miner: Any) -> None:
    """Write a checkpoint's trainer_state.json: where training stands and the miner's state (written last)."""
    write_json(Path(checkpoint) / "trainer_state.json", {"state": state, "miner": miner})


def read_trainer_state(checkpoint: Path) -> tuple[dict[str, Any], Any]:
    """``(state, miner state)`` of a checkpoint's trainer_state.json; MetricLabError if it is damaged."""
    path = Path(checkpoint) / "trainer_state.json"
    try:
        saved = json.loads(path.read_text())
        return dict(saved["state"]), saved.get("miner")
    except (ValueError, TypeError, KeyError) as err:
        raise MetricLabError(f"{path} is damaged ({err}); resume from an earlier checkpoint") from err


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    """The JSON object in ``path``; MetricLabError naming the file and ``fix`` if it is not one (or not UTF-8)."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise MetricLabError(
            f"{path} is not UTF-8 text (byte {err.start} is 0x{err.object[err.start]:02x}); {fix}"
        ) from err
    except json.JSONDecodeError as err:
        raise MetricLabError(f"{path} is not valid JSON ({err}); {fix}") from err
    except FileNotFoundError as err:
        raise MetricLabError(f"{path} does not exist; {fix}") from err
    except OSError as err:
        raise MetricLabError(f"cannot read {path} ({err.strerror}); {fix}") from err
    if not isinstance(data, dict):
        raise MetricLabError(f"{path} holds a JSON {type(data).__name__}, not an object; {fix}")
    return data


def new_run_dir(name: str, output_dir: str | None) -> Path:
    """Create a fresh run directory: ``output_dir`` if given (must not hold a run), else ``runs/NAME/TIMESTAMP``."""
    if output_dir is not None:
        path = Path(output_dir)
        if path.exists() and not path.is_dir():
            raise MetricLabError(f"output directory {path} is a file; choose a new --output-dir")
        if path.exists() and any(path.iterdir()):
            if Run.latest_checkpoint_in(path) is not None:
                then = f"or continue that run with --resume {path}"
            elif (path / "config.json").is_file():  # a run killed before its first checkpoint: nothing to resume
                then = f"or, to start that run over, delete it (rm -r {path}); it has no checkpoint to resume from"
            else:
                then = "or empty it first"
            raise MetricLabError(
                f"output directory {path} already exists and is not empty; choose a new --output-dir, {then}"
            )
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path("runs") / name / stamp
        suffix = 1
        while path.exists():
            suffix += 1
            path = Path("runs") / name / f"{stamp}-{suffix}"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MetricLabError(
            f"cannot create run directory {path}: {err.strerror}; choose a writable --output-dir"
        ) from err
    return path


def latest_run_dir(name: str, root: str | Path = "runs") -> Path:
    """The newest run of recipe ``name`` under ``root`` that has a checkpoint (for ``--resume``)."""
    base = Path(root) / name
    candidates = sorted(p for p in base.glob("*") if p.is_dir() and Run.latest_checkpoint_in(p) is not None)
    if not candidates:
        raise MetricLabError(
            f"no run of '{name}' with a checkpoint under {base}; pass --resume RUN_DIR with the run to continue"
        )
    return max(candidates, key=lambda p: p.stat().st_mtime)


class Run:
    """Read access to one run directory (see the module docstring for its layout)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise MetricLabError(f"{self.path} is not a directory; pass a run directory written by a recipe")
        if not (self.path / "config.json").is_file():
            inside = [c.parent for c in (*self.path.glob("*/config.json"), *self.path.glob("*/*/config.json"))]
            if inside:  # a folder of runs, e.g. runs/ or runs/<recipe name>
                newest = max(inside, key=lambda p: (p / "config.json").stat().st_mtime)
                raise MetricLabError(
                    f"{self.path} is not a run but holds {len(inside)} run{'s' * (len(inside) > 1)}; "
                    f"pass one of them, e.g. the newest: {newest}"
                )
            raise MetricLabError(
                f"{self.path} is not a metriclab run (no config.json); pass a directory written by a recipe, "
                "e.g. runs/mnist_siamese/<timestamp>"
            )

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def name(self) -> str:
        """A short display name: the run's recipe name and folder."""
        return f"{self.config.get('recipe', {}).get('name', '?')}/{self.path.name}"

    @property
    def config(self) -> dict[str, Any]:
        """The parsed config.json."""
        return read_json_object(
            self.path / "config.json", "the run is damaged: restore config.json, or retrain (it cannot be rebuilt)"
        )

    @property
    def metrics(self) -> dict[str, Any]:
        """The parsed metrics.json (empty if training has not finished an epoch)."""
        path = self.path / "metrics.json"
        if not path.is_file():
            return {}
        return read_json_object(
            path, "restore it, or delete it (its per-epoch scores are lost; `metriclab evaluate` writes a new one)"
        )

    def update_metrics(self, key: str, value: Any) -> None:
        """Set ``metrics[key] = value`` in metrics.json atomically."""
        metrics = self.metrics
        metrics[key] = value
        write_json(self.path / "metrics.json", metrics)

    @property
    def weights_path(self) -> Path:
        """Where the final weights are (may not exist yet)."""
        return self.path / "model.safetensors"

    def embeddings_path(self, split: str = "test", epoch: int | None = None) -> Path:
        """Path of the latest (or one epoch's) embeddings of ``split``."""
        folder = self.path / "embeddings"
        return folder / f"{split}.npz" if epoch is None else folder / f"epoch_{epoch:04d}" / f"{split}.npz"

    def has_embeddings(self, split: str = "test") -> bool:
        """Whether the run holds embeddings for ``split``."""
        return self.embeddings_path(split).is_file()

    def embeddings(self, split: str = "test", epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(embeddings float32 (N, D), labels int64 (N,))``, validated (finite, matching lengths)."""
        path = self.embeddings_path(split, epoch)
        if not path.is_file():
            raise MetricLabError(
                f"{self.path} has no {split} embeddings ({path.relative_to(self.path)} is missing); "
                f"run `metriclab evaluate {self.path}` to embed from the saved weights"
            )
        return load_embeddings(path)

    def snapshot_epochs(self) -> list[int]:
        """Epochs that have a test-embedding snapshot, in order."""
        folder = self.path / "embeddings"
        return sorted(int(p.name.split("_")[1]) for p in folder.glob("epoch_*") if (p / "test.npz").is_file())

    def history(self) -> list[dict[str, float]]:
        """Rows of history.csv as dicts of floats."""
        path = self.path / "history.csv"
        if not path.is_file():
            return []
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise MetricLabError(f"cannot read {path} ({err}); restore it or delete it (no loss curve then)") from err
        lines = text.splitlines()
        if not lines:
            return []
        header = lines[0].split(",")
        rows = []
        for number, line in enumerate(lines[1:], start=2):
            last = number == len(lines) and not text.endswith("\n")  # cut short by a kill: resuming trims it too
            if _whole_row(line, len(header)):  # a run written before a column was added has fewer
                rows.append(dict(zip(header, map(float, line.split(",")), strict=True)))
            elif not last:
                raise MetricLabError(
                    f"{path} line {number} is not a row of {','.join(header)} numbers ({line[:60]!r}); "
                    "correct or delete that line"
                )
        return rows

    @staticmethod
    def checkpoints_in(path: Path) -> list[Path]:
        """Complete checkpoints under ``path/checkpoints``, oldest first.

        Complete means named ``step_NNNNNNNN`` and holding trainer_state.json (written last): a
        ``.tmp-`` folder or a step folder without it was cut short and is never used.
        """
        folder = Path(path) / "checkpoints"
        complete = [
            p for p in folder.glob("step_*") if _CHECKPOINT.match(p.name) and (p / "trainer_state.json").is_file()
        ]
        return sorted(complete, key=lambda p: int(p.name[5:]))

    @staticmethod
    def latest_checkpoint_in(path: Path) -> Path | None:
        """The highest-step complete checkpoint under ``path/checkpoints`` (see :meth:`checkpoints_in`)."""
        complete = Run.checkpoints_in(path)
        return complete[-1] if complete else None


def save_embeddings(path: Path, embeddings: np.ndarray, labels: np.ndarray, epoch: int) -> None:
    """Atomically write one split's embeddings in the documented ``.npz`` format."""
    import io

    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, embeddings=embeddings.astype(np.float32), labels=labels.astype(np.int64), epoch=np.int64(epoch))
    write_atomic(path, buffer.getvalue())


def load_embeddings(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate an embeddings ``.npz`` without unpickling anything."""
    try:
        with np.load(path, allow_pickle=False) as data:
            embeddings, labels = data["embeddings"], data["labels"]
    except (ValueError, KeyError, OSError) as err:
        raise MetricLabError(
            f"{path} is not a valid embeddings file ({err}); expected .npz with 'embeddings' and 'labels' arrays"
        ) from err
    if embeddings.ndim != 2 or labels.shape != (embeddings.shape[0],):
        raise MetricLabError(
            f"{path}: embeddings {embeddings.shape} and labels {labels.shape} do not match; expected (N, D) and (N,)"
        )
    if not np.isfinite(embeddings).all():
        bad = int((~np.isfinite(embeddings)).any(axis=1).sum())
        raise MetricLabError(
            f"{path}: {bad} embeddings contain NaN or inf (training diverged?); "
            "re-embed with `metriclab evaluate --reembed` or retrain with a lower learning rate"
        )
    return embeddings, labels
