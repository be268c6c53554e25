"""Commands that use a trained probe: predict, export-model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from featcache.cli.common import console, err_console, print_json, user_errors

RunArg = Annotated[Path, typer.Argument(
    help="A run folder (`featcache runs` lists them: the path column).")]
WeightsOpt = Annotated[str | None, typer.Option(
    help="The checkpoint file, for runs whose backbone came from one (its SHA-256 is "
         "checked); hub and random weights are found from the run.")]
TABLE_ROWS = 50  # the terminal shows this many; --csv/--json carry every row


@user_errors
def predict(
    run: RunArg,
    inputs: Annotated[list[str] | None, typer.Argument(
        help="Image files, folders (walked recursively) or globs.")] = None,
    dataset: Annotated[str | None, typer.Option(
        help="Predict a dataset split instead (a registry name or wds:/imagefolder:PATH).")
    ] = None,
    split: Annotated[str, typer.Option(help="The split of --dataset.")] = "test",
    top_k: Annotated[int, typer.Option(help="Classes listed per image.")] = 5,
    weights: WeightsOpt = None,
    batch_size: Annotated[int, typer.Option(help="Images per backbone batch.")] = 64,
    workers: Annotated[int | None, typer.Option(
        help="DataLoader workers (default: as extract).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    data_root: Annotated[Path | None, typer.Option(
        help="Where datasets are kept (env FEATCACHE_DATA).")] = None,
    download: Annotated[bool, typer.Option(help="Fetch a missing hub dataset.")] = True,
    csv: Annotated[str | None, typer.Option(
        help="Write every row to this CSV file (- for stdout): item, label, pred, prob, "
             "top2, prob2, ...")] = None,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print every row as JSON (a list of objects) instead of the table.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --csv file.")] = False,
) -> None:
    """Apply a run's probe to new images: its backbone is rebuilt from the cache's
    fingerprint (same weights, checked) and the head scores them as in training. On the
    run's own test split it reproduces the record's test metrics."""
    from featcache.errors import FeatcacheError
    from featcache.progress import Bars
    from featcache.serving.inference import csv_text
    from featcache.serving.inference import predict as run_predict

    if json_out and csv == "-":
        raise FeatcacheError("--json and --csv - both print the rows on standard output; "
                             "choose one (or write the CSV to a file: --csv FILE)")
    quiet = json_out or csv == "-"
    with Bars("img", enabled=not quiet) as bars:
        result = run_predict(run, inputs or [], dataset=dataset, split=split, top_k=top_k,
                             weights=weights, batch_size=batch_size, workers=workers,
                             device=device, data_root=data_root, download=download,
                             csv=None if csv in (None, "-") else csv, overwrite=overwrite,
                             progress=bars)
    say = err_console if quiet else console
    for line in result.unreadable[:10]:
        err_console.print(f"[yellow]warning:[/] not predicted: {line}", highlight=False,
                          soft_wrap=True)
    if len(result.unreadable) > 10:
        err_console.print(f"[yellow]warning:[/] … and {len(result.unreadable) - 10} more "
                          "unreadable images", highlight=False)
    if json_out:
        print_json(result.rows)
    elif csv == "-":
        typer.echo(csv_text(result.rows), nl=False)
    elif csv is None:
        _table(result.rows)
    else:
        say.print(f"[green]wrote[/] {len(result.rows)} rows: {csv}", highlight=False)
    _summary(result, say)


def _table(rows: list[dict]) -> None:
    from rich.table import Table

    table = Table(title=f"predictions ({len(rows)} images)")
    for name in ("item", "label", "pred", "prob", "top-k"):
        table.add_column(name, overflow="fold", justify="right" if name == "prob" else "left")
    for row in rows[:TABLE_ROWS]:
        table.add_row(str(row["item"]), "" if row["label"] is None else str(row["label"]),
                      str(row["pred"]), f"{row['prob']:.3f}",
                      ", ".join(f"{c} {p:.2f}" for c, p in row["top_k"][1:]))
    console.print(table)
    if len(rows) > TABLE_ROWS:
        console.print(f"… {len(rows) - TABLE_ROWS} more rows: --csv FILE or --json for all",
                      highlight=False)


def _summary(result, say) -> None:
    if result.metrics is None:
        return
    m = result.metrics
    say.print(f"balanced top-1 {m['balanced_top1']:.2f} %, top-1 {m['top1']:.2f} % on "
              f"{len(result.rows)} labelled images", highlight=False)
    if result.reproduces_record is True:
        agree = "" if result.agreement is None else \
            f"; {100 * result.agreement:.1f} % of predictions equal the stored ones"
        say.print(f"[green]the run's own test split: its record's test metrics, exactly[/]"
                  f"{agree}", highlight=False)
    elif result.reproduces_record is False:
        from featcache.probing.selection import METRIC_KEYS

        def num(v: object) -> str:
            return f"{v:.4f}" if isinstance(v, (int, float)) else str(v)

        r = result.record_metrics or {}
        k = next(k for k in METRIC_KEYS if r.get(k) != m.get(k))  # False: one differs
        err_console.print(
            f"[yellow]warning:[/] the run's own test split, but the record says {k} "
            f"{num(r.get(k))} (here {num(m.get(k))}): the images, the backbone or the device "
            "differ from extraction's", highlight=False, soft_wrap=True)


@user_errors
def export_model(
    run: RunArg,
    out: Annotated[Path | None, typer.Option(
        help="The .pt2 file (default: RUN/model.pt2); its preprocessing and classes go "
             "beside it as .json.")] = None,
    weights: WeightsOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing files.")] = False,
) -> None:
    """Save a run's backbone, taps and head as one torch.export file: images → class
    probabilities, loadable with torch alone (torch.export.load(FILE).module())."""
    from featcache.serving.deployment import export_model as run_export

    with err_console.status("tracing the model with torch.export …"):
        path = run_export(run, out, weights=weights, overwrite=overwrite)
    console.print(f"[green]wrote[/] {path} and {path.with_suffix('.json')}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the commands to the app."""
    app.command("predict")(predict)
    app.command("export-model")(export_model)
