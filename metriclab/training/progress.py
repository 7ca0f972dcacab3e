"""The one place training reports to the user: a rich progress bar and short notices.

Only the main process reports; the others get a silent reporter.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Reporter:
    """Progress bar with loss and samples/s, plus notices; silent when ``enabled`` is False."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.console = Console(stderr=True)
        self._progress: Progress | None = None
        self._task = None

    def notice(self, message: str, style: str = "yellow") -> None:
        """Print a one-line notice (above the bar while training)."""
        if self.enabled:
            (self._progress.console if self._progress else self.console).print(message, style=style, highlight=False)

    def start(self, total_steps: int, completed: int = 0) -> None:
        """Show the bar for ``total_steps`` optimisation steps."""
        if not self.enabled:
            return
        self._progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]} samples/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
        )
        self._progress.start()
        self._task = self._progress.add_task(
            "train", total=total_steps, completed=completed, epoch="-", loss="-", speed="-"
        )

    def update(self, step: int, epoch: int, loss: float | None = None, samples_per_s: float | None = None) -> None:
        """Move the bar to ``step``; loss and speed are shown when given."""
        if self._progress is None:
            return
        fields = {"epoch": epoch}
        if loss is not None:
            fields["loss"] = f"{loss:.4f}"
        if samples_per_s is not None:
            fields["speed"] = f"{samples_per_s:,.0f}"
        self._progress.update(self._task, completed=step, **fields)

    def stop(self) -> None:
        """Remove the bar (idempotent)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
