"""`featcache run SUITE`: a whole benchmark in one command, here or on SLURM."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from featcache.cli.common import console, err_console, print_json, user_errors
from rich.markup import escape

from featcache.text import human_bytes


@user_errors
def run(
    suite: Annotated[str, typer.Argument(
        help="A suite file (TOML; see docs/suites.md) or a shipped suite: paper.")],
    cache: Annotated[Path | None, typer.Option(
        "--cache", help="Cache root (else the suite's `cache` key, env FEATCACHE_CACHE, "
        "~/.cache/featcache).")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Write nothing: print each job, done or to do, with the bytes and "
        "FLOPs it will take.")] = False,
    status: Annotated[bool, typer.Option(
        "--status", help="Show what is queued, running, done and failed; submit nothing.")
    ] = False,
    no_wait: Annotated[bool, typer.Option(
        "--no-wait", help="SLURM: return once everything is submitted (follow with --status,"
        " finish and report with the same command).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the plan or state as JSON.")
                        ] = False,
) -> None:
    """Run a benchmark suite: extract every pair, probe every method and seed, report.
    Done work is skipped; run the same command again to resume or finish."""
    from featcache.suites.runner import SuiteFailed
    from featcache.suites.runner import run as run_suite

    try:
        result = run_suite(suite, cache, dry_run, status, no_wait, view=not json_out)
    except SuiteFailed as exc:
        _show(exc.result, json_out)
        raise
    _show(result, json_out)


def _show(result: dict[str, Any], json_out: bool) -> None:
    if json_out:
        print_json(result)
        return
    from rich.table import Table

    for failure in result.get("resubmitted") or []:
        err_console.print(f"[yellow]resubmitted[/] {escape(failure['unit'])} (job "
                          f"{failure['job']} failed: {escape(str(failure['error']))}; log "
                          f"{failure['log']})",
                          highlight=False, soft_wrap=True)
    rows = result["units"]
    if result["plan"] or any(r["state"] not in ("done",) for r in rows) or len(rows) <= 40:
        table = Table(title=f"suite {result['suite']} ({result['launcher']}), cache "
                      f"{result['cache']}")
        for column in ("unit", "state", "job", "bytes", "FLOPs"):
            table.add_column(column, overflow="fold",
                             justify="right" if column in ("bytes", "FLOPs") else "left")
        for r in rows:
            table.add_row(escape(r["label"]), _state(r["state"]), str(r["job"] or ""),
                          human_bytes(r["bytes"]) if r["bytes"] else "",
                          _flops(r["flops"]))
        console.print(table)
    for failure in result.get("failed") if result["launcher"] == "slurm" else []:
        err_console.print(f"[red]failed[/] {escape(failure['unit'])}: "
                          f"{escape(str(failure['error']))}"
                          + (f" (log {failure['log']})" if failure.get("log") else ""),
                          highlight=False, soft_wrap=True)
    t = result["totals"]
    unknown = f", {t['unknown_costs']} of unknown cost" if t["unknown_costs"] else ""
    console.print(f"{t['done']}/{t['units']} units done; to do: {t['to_do']} "
                  f"({human_bytes(t['bytes'])} of caches, {_flops(t['flops'])} FLOPs"
                  f"{unknown}); state: {result['state_file']}", highlight=False,
                  soft_wrap=True)
    for kind, path in (result.get("report") or {}).items():
        console.print(f"  report {kind}: {path}", highlight=False, soft_wrap=True)


def _state(state: str) -> str:
    colour = {"done": "green", "failed": "red", "RUNNING": "cyan", "PENDING": "yellow"}
    return f"[{colour.get(state, 'white')}]{state}[/]"


def _flops(value: float | None) -> str:
    if not value:
        return "0" if value == 0 else "?"
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f}"


def register(app: typer.Typer) -> None:
    app.command()(run)
