"""`featcache report`: summarise every run record under a root (no backbone, no weights)."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.common import console, err_console, print_json, user_errors


def register(app: typer.Typer) -> None:
    """Add the `report` command to the app."""
    app.command("report")(report)


@user_errors
def report(
    cache: Path | None = typer.Option(
        None, "--cache", help="Cache root; run records are read from ROOT/runs. "
        "Default: $FEATCACHE_CACHE or ~/.cache/featcache."),
    runs: Path | None = typer.Option(
        None, "--runs", help="Runs root to read instead of <cache root>/runs."),
    out: Path = typer.Option(Path("report"), "--out", help="Folder for the report files."),
    fmt: str = typer.Option("html,md,csv", "--format",
                            help="Comma-separated: html, md, csv (empty: files off)."),
    no_cka: bool = typer.Option(False, "--no-cka",
                                help="Do not compute layer CKA from the caches (values "
                                "already in <out>/cka.json are still used)."),
    as_json: bool = typer.Option(False, "--json",
                                 help="Print the summary as JSON instead of the table."),
) -> None:
    """Tables, figures and CSV from every run record: mean ± std over seeds, gain over
    the linear probe, ALF attention, accuracy by depth with CKA, and the paper's numbers."""
    from featcache.report import (
        parse_formats,
        prepare_report,
        render_table,
        write_report,
    )
    from featcache.runs import default_runs_root

    formats = parse_formats(fmt)
    root = runs if runs is not None else default_runs_root(cache)
    with err_console.status(f"reading run records under {root} …"):
        data = prepare_report(root, out, cka=not no_cka)
    if as_json:
        print_json(data.as_json())
    else:
        render_table(data.rows, console, data.notes)
    written = write_report(data, out, formats) if formats else {}
    say = err_console if as_json else console
    for kind, path in written.items():
        say.print(f"[green]wrote[/] {kind}: {path}", highlight=False)
