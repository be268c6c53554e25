"""`featcache report`: summarise every run record under a root (no backbone, no weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from featcache.cli.common import console, err_console, print_json, user_errors


@user_errors
def report(
    cache: Annotated[Path | None, typer.Option(
        help="Cache root; run records are read from ROOT/runs. Default: $FEATCACHE_CACHE or "
             "~/.cache/featcache.")] = None,
    runs: Annotated[Path | None, typer.Option(
        help="Runs root to read instead of <cache root>/runs.")] = None,
    out: Annotated[Path, typer.Option(help="Folder for the report files.")] = Path("report"),
    format: Annotated[str, typer.Option(
        help="Comma-separated: html, md, csv (empty: no files).")] = "html,md,csv",
    cka: Annotated[bool, typer.Option(
        help="Compute layer CKA from the caches (--no-cka: only values already in "
             "<out>/cka.json are used).")] = True,
    resamples: Annotated[int, typer.Option(
        help="Resamples of the paired bootstrap over test images behind each gain's 95 % "
             "interval: 100 to 100,000, or 0 for no intervals.")] = 1000,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print the summary as JSON instead of the table.")] = False,
) -> None:
    """Tables, figures and CSV from every run record: mean ± std over seeds, gain over
    the linear probe with its 95 % interval, ALF attention, accuracy by depth with CKA, and
    the paper's numbers."""
    from featcache.reporting.build import render_table
    from featcache.reporting.build import report as make_report

    with err_console.status("reading run records …"):
        data = make_report(cache=cache, runs=runs, out=out, format=format, cka=cka,
                           resamples=resamples)
    if json_out:
        print_json(data.as_json())
    else:
        render_table(data.rows, console, data.notes)
    say = err_console if json_out else console
    for kind, path in data.written.items():
        say.print(f"[green]wrote[/] {kind}: {path}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the `report` command to the app."""
    app.command("report")(report)
