"""Training progress: a rich bar on a terminal; plain lines when the output is not one (a log file, CI, nohup)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class TrainProgress:
    """``update`` after every optimizer step. Not on a terminal, one line is printed every ``every_steps`` steps
    (default: a twentieth of the run) or ``every_s`` seconds, whichever comes first, and at the last step."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, stream: TextIO | None = None,
                 every_steps: int | None = None, every_s: float = 30.0):
        self.enabled, self.total, self.start = enabled, total, start
        self.stream = stream or sys.stdout
        self.every_steps, self.every_s = every_steps or max(1, total // 20), every_s
        terminal = enabled and self.stream.isatty()
        self._bar = Progress(
            TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TimeRemainingColumn(),
        ) if terminal else None
        self._lines = enabled and not terminal
        self._t0 = self._last_t = time.monotonic()
        self._last_step = start

    def __enter__(self):
        if self._bar:
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=self.total, completed=self.start, info="")
        return self

    def update(self, step: int, loss: float, lr: float) -> None:
        if self._bar:
            self._bar.update(self._task, completed=step, info=f"loss {loss:.4f} lr {lr:.2e}")
        elif self._lines:
            now = time.monotonic()
            if step >= self.total or step - self._last_step >= self.every_steps or now - self._last_t >= self.every_s:
                self._line(step, loss, lr, now)

    def note(self, message: str) -> None:
        """A line above the bar (on a terminal) or among the progress lines (an evaluation's result)."""
        if self._bar:
            self._bar.console.print(message)
        elif self._lines:
            print(message, file=self.stream, flush=True)

    def _line(self, step: int, loss: float, lr: float, now: float) -> None:
        elapsed, done = now - self._t0, step - self.start
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        print(f"step {step}/{self.total} ({100 * step // max(1, self.total)}%)  loss {loss:.4f}  lr {lr:.2e}  "
              f"elapsed {_clock(elapsed)}  eta {_clock(eta)}", file=self.stream, flush=True)
        self._last_step, self._last_t = step, now

    def __exit__(self, *exc):
        if self._bar:
            self._bar.__exit__(*exc)
