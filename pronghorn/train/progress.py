"""A rich progress bar for the training loop (plain log lines when the output is not a terminal)."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.total, self.start = total, start
        self._bar = Progress(
            TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TimeRemainingColumn(),
        ) if enabled else None

    def __enter__(self):
        if self._bar:
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=self.total, completed=self.start, info="")
        return self

    def update(self, step: int, loss: float, lr: float) -> None:
        if self._bar:
            self._bar.update(self._task, completed=step, info=f"loss {loss:.4f} lr {lr:.2e}")

    def __exit__(self, *exc):
        if self._bar:
            self._bar.__exit__(*exc)
