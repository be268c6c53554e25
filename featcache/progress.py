"""Rich progress bars for long work (extraction, probing): count, rate, ETA."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second, in the unit the bar counts (images, steps)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.1f} {self.unit}/s", style="cyan")


class Bars:
    """A thin, reusable wrapper: start(desc, total) → task; advance(task, n); stop(task)."""

    def __init__(self, unit: str = "img", console: Console | None = None,
                 enabled: bool = True) -> None:
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            RateColumn(unit),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console or Console(stderr=True),
            disable=not enabled,
            transient=False,
        )
        self._live = False

    def __enter__(self) -> Bars:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if self._live:
            if exc_type is not None:  # leave the error message alone on the screen
                self.progress.live.transient = True
            self.progress.stop()
            self._live = False

    def start(self, description: str, total: int) -> Any:
        if not self._live:  # the display starts with the first bar: no blank line if none
            self.progress.start()
            self._live = True
        return self.progress.add_task(description, total=total)

    def grow(self, task: Any, n: int) -> None:
        """Raise a task's total when more work turns up (a grid's size is known late)."""
        current = self.progress.tasks[task].total or 0
        self.progress.update(task, total=current + n)

    def advance(self, task: Any, n: int = 1) -> None:
        self.progress.advance(task, n)

    def stop(self, task: Any) -> None:
        self.progress.stop_task(task)
