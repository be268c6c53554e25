"""The live view of a suite: a bar over its units (and the commands' own bars under it)
locally; a table of jobs and their SLURM states while a cluster runs them."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from featcache.progress import Bars
from featcache.suites.plan import Unit


class SuiteView:
    def __init__(self, todo: int, enabled: bool = True, console: Console | None = None) -> None:
        self.bars = Bars("it", console=console, enabled=enabled)
        self.enabled = enabled
        self.todo = todo
        self.task: Any = None
        self.failed: list[tuple[Unit, str]] = []

    def __enter__(self) -> SuiteView:
        self.bars.__enter__()
        if self.todo:
            self.task = self.bars.start("suite", self.todo)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bars.__exit__(*exc)

    def started(self, unit: Unit) -> None:
        if self.task is not None:
            self.bars.progress.update(self.task, description=f"suite: {unit.label}")

    def finished(self, unit: Unit, error: str | None) -> None:
        if self.task is not None:
            self.bars.advance(self.task)
        if error is not None:
            self.failed.append((unit, error))
            if self.enabled:
                self.bars.progress.console.print(
                    f"[red]failed[/] {escape(unit.label)}: {escape(' '.join(error.split()))}",
                    highlight=False, soft_wrap=True)


def jobs_table(rows: list[dict[str, Any]], title: str) -> Table:
    """Units and their jobs: what is queued, running, done and failed."""
    table = Table(title=title)
    for column in ("unit", "job", "state", "log / error"):
        table.add_column(column, overflow="fold")
    colours = {"done": "green", "failed": "red", "RUNNING": "cyan", "PENDING": "yellow"}
    for row in rows:
        state = row["state"]
        colour = colours.get(state, "white")
        table.add_row(escape(row["unit"]), str(row.get("job") or ""), f"[{colour}]{state}[/]",
                      escape(row.get("error") or row.get("log") or ""))
    return table
