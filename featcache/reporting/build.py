"""The report: run records into tables, figures, CSV, Markdown and one HTML page.

Only `record.json` files are read (never head weights, never a backbone), so a root with
hundreds of runs reports in seconds. CKA needs features, so it is computed only for
(model, dataset) pairs that have per-layer probe runs, only when asked, and then kept in
`<out>/cka.json` for the next report. The pieces: `summary` (rows and cells),
`sections` (the page's sections), `pages` (terminal table; the sections as Markdown and
HTML), `figures`, and the CSV here.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from featcache import atomic
from featcache.errors import FeatcacheError
from featcache.reporting.bootstrap import N_RESAMPLES
from featcache.reporting.columns import baseline_of, column_sort
from featcache.reporting.pages import render_table, to_html, to_markdown
from featcache.reporting.reference import paper_number
from featcache.reporting.summary import (
    METRIC,
    ReportData,
    ScoredRun,
    dataset_sort,
    load_records,
    missing_notes,
    no_runs_error,
    per_layer,
    score_runs,
    scored,
    summarize,
)

__all__ = ["FORMATS", "ReportData", "build_report", "csv_rows", "parse_formats",
           "prepare_report", "render_table", "report", "write_csv", "write_report"]

FORMATS = ("html", "md", "csv")
MAX_RESAMPLES = 100_000
MIN_RESAMPLES = 100  # the 2.5th and 97.5th percentiles of fewer are the extremes, not an interval


_CSV_FIRST = ("model", "model_dir", "dataset", "tap", "weights", "method", "layer_set",
              "column", "protocol", "seed", "n_tokens", "test_balanced_top1", "test_top1",
              "test_balanced_top5", "test_top5", "best_layer", "gain_over_linear",
              "cell_gain", "cell_gain_ci_low", "cell_gain_ci_high",
              "cell_gain_ci_excludes_zero", "paper_balanced_top1")


def csv_rows(runs: Sequence[ScoredRun | dict],
             rows: Sequence[dict] = ()) -> list[dict[str, Any]]:
    """One flat dict per run: identity, every test/val metric, the selected hyperparameters.
    ``runs``: `ReportData.runs`, or plain records (scored here)."""
    cells = {(r["model_dir"], r["dataset"]): r["cells"] for r in rows}
    out = []
    for run in sorted(scored(runs, []), key=lambda r: (str(r.record["model_dir"]),
                                           dataset_sort(r.record["dataset"]),
                                           column_sort(r.column), r.record.get("seed") or 0)):
        rec = run.record
        base = cells.get((rec["model_dir"], rec["dataset"]), {}).get(baseline_of(run.column))
        row: dict[str, Any] = {
            "model": rec.get("model"), "model_dir": rec.get("model_dir"),
            "dataset": rec.get("dataset"), "tap": rec.get("tap"), "weights": rec.get("weights"),
            "method": rec.get("method"), "layer_set": rec.get("layer_set"),
            "column": run.column, "protocol": rec.get("protocol"),
            "seed": rec.get("seed"),
            "n_tokens": len(rec["tokens"]) if isinstance(rec.get("tokens"), list) else None,
            "best_layer": run.best_layer,
            "gain_over_linear": (run.value - base["mean"]
                                 if base and run.value is not None else None),
            **_interval_fields(cells.get((rec["model_dir"], rec["dataset"]), {}).get(
                run.column)),
            "paper_balanced_top1": (paper_number(str(rec["model"]), rec["dataset"],
                                                 rec["method"], rec.get("layer_set"))
                                    if not per_layer(rec["method"]) and not run.variant
                                    else None),
        }
        for prefix, key in (("test", "metrics"), ("val", "val_metrics"),
                            ("selected", "selected")):
            part = rec.get(key)
            if isinstance(part, dict):
                for name, value in part.items():
                    if not isinstance(value, (dict, list)):
                        row[f"{prefix}_{name}"] = value
        timings = rec.get("timings")
        if isinstance(timings, dict):
            for name, value in timings.items():
                if not isinstance(value, (dict, list)):
                    row[f"time_{name}"] = value
        row["caches_replaced"] = run.caches_replaced
        row["created"] = rec.get("created")
        row["featcache_version"] = rec.get("featcache_version")
        row["path"] = rec["path"]
        out.append(row)
    return out


def _interval_fields(cell: dict | None) -> dict[str, Any]:
    """The cell's gain and its paired bootstrap 95 % interval (the same on each seed's
    row: the interval is over test images, for the mean over seeds)."""
    ci = (cell or {}).get("ci")
    if not ci:
        return {}
    return {"cell_gain": ci["gain"], "cell_gain_ci_low": ci["low"],
            "cell_gain_ci_high": ci["high"], "cell_gain_ci_excludes_zero": cell["ci_excludes_zero"]}


def write_csv(runs: Sequence[ScoredRun | dict], path: Path, rows: Sequence[dict] = ()) -> Path:
    """results.csv: one row per run; columns are the union over runs, common ones first."""
    flat = csv_rows(runs, rows)
    keys: list[str] = list(_CSV_FIRST)
    for row in flat:
        keys.extend(k for k in row if k not in keys)
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    for row in flat:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in keys})
    return atomic.write_text(path, buffer.getvalue())


def write_paper_layout(rows: Sequence[dict], path: Path) -> Path:
    """paper_layout.csv: a row per model and dataset, the paper's ten experiment columns
    (yours: mean, std, seeds; and the paper's number), in its tables' order."""
    from featcache.reporting.summary import paper_layout

    layout = paper_layout(rows)
    keys = ["model", "model_dir", "dataset"]
    for exp in layout["experiments"]:
        keys += [exp, f"{exp} std", f"{exp} seeds", f"{exp} paper"]
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(keys)
    for row in layout["rows"]:
        line: list[Any] = [row["model"], row["model_dir"], row["dataset"]]
        for exp in layout["experiments"]:
            cell = row["cells"][exp]
            line += [cell["mean"], cell["std"], cell["n"] or None, cell["paper"]]
        writer.writerow(["" if v is None else v for v in line])
    return atomic.write_text(path, buffer.getvalue())


def checked_records(records: list[Any], problems: list[str]) -> tuple[list[Any], dict]:
    """The records that are what their run wrote (`featcache.records.predictions.checked_run`:
    files, identity, every test metric recomputed from the predictions); a record edited
    by hand, a file missing or copied from another run lend no number to the report
    (skipped, with a note). Returns them and their predictions, for the intervals."""
    from featcache.records.predictions import checked_run

    kept, loaded = [], {}
    for rec in records:
        try:
            loaded[rec["path"]] = checked_run(rec)
        except FeatcacheError as exc:
            problems.append(f"skipped: {exc}")
            continue
        kept.append(rec)  # its metrics recomputed in place: `score_runs` reads them
    return kept, loaded


def prepare_report(runs_root: str | Path, out_dir: str | Path | None = None, cka: bool = True,
                   open_cache: Callable[[str], Any] | None = None,
                   resamples: int = N_RESAMPLES) -> ReportData:
    """Load and summarise; raises FeatcacheError when the root holds no usable record.
    ``resamples``: of the paired bootstrap behind each gain's 95 % interval (0: none)."""
    root = Path(runs_root).expanduser()
    problems: list[str] = []
    records = load_records(root, problems)
    if not records and (root / "runs").is_dir():
        records = load_records(root / "runs", problems)
        if records:  # given the cache root instead of its runs folder: say so, carry on
            problems.append(f"read the runs under {root / 'runs'} ({root} holds none itself)")
            root = root / "runs"
    if not records:
        if problems:
            raise FeatcacheError(f"no readable run records under {root}: {problems[0]}")
        from featcache.records.store import misplaced_root

        misplaced_root(root, "--runs")
        raise no_runs_error(root)
    records, predictions = checked_records(records, problems)
    runs = score_runs(records, problems)
    rows = summarize(runs, problems)
    if not rows:
        raise FeatcacheError(f"{len(records)} run records under {root} but none has a test "
                             f"{METRIC}; see results.csv or the records themselves")
    if resamples:
        from featcache.reporting.bootstrap import add_intervals

        add_intervals(rows, problems, resamples, loaded=predictions)
    notes = missing_notes(rows) + problems
    taps = {str(r.get("tap")) for r in records if r.get("tap")}
    if any(row["in_paper"] for row in rows) and taps - {"reference"}:
        notes.append("paper numbers use the reference tap; runs on another tap "
                     f"({', '.join(sorted(taps - {'reference'}))}) are not like for like")
    mark_replaced_caches(runs, notes, open_cache)
    from featcache.reporting.cka import layer_cka

    cka_values = layer_cka(records, Path(out_dir) if out_dir is not None else None,
                           compute=cka, open_cache=open_cache, problems=notes)
    return ReportData(root, records, rows, notes, cka_values, resamples=resamples, runs=runs)


def mark_replaced_caches(runs: list[ScoredRun], notes: list[str],
                         open_cache: Callable[[str], Any] | None = None) -> None:
    """Mark (`caches_replaced` in results.csv, and a note) the runs whose caches were
    replaced at the same path since they were trained (`extract --overwrite` with other
    settings): their numbers stand for the old caches, which are gone. A cache that is
    not there (moved, another machine) is not a replaced one. The mark sits beside the
    record (`ScoredRun.caches_replaced`): the record stays as written."""
    from featcache.reporting.cka import same_fingerprint

    if open_cache is None:
        from featcache.cache.store import open_cache
    opened: dict[str, Any] = {}
    for run in runs:
        rec = run.record
        caches = rec.get("caches") if isinstance(rec.get("caches"), dict) else {}
        prints = rec.get("fingerprints") if isinstance(rec.get("fingerprints"), dict) else {}
        gone = [split for split, path in sorted(caches.items())
                if not same_fingerprint(_opened(str(path), open_cache, opened),
                                        prints.get(split))]
        run.caches_replaced = ",".join(gone) or None
    marked = [r.record for r in runs if r.caches_replaced]
    if marked:
        notes.append(f"{len(marked)} run(s) were trained on caches replaced since at the same "
                     f"path (extract --overwrite), e.g. {marked[0]['path']}: their numbers "
                     "stand for the old caches (results.csv: caches_replaced)")


def _opened(path: str, open_cache: Callable[[str], Any], seen: dict[str, Any]) -> Any:
    """The cache at a path, once per report; None when it cannot be opened."""
    if path not in seen:
        try:
            seen[path] = open_cache(path) if Path(path).exists() else None
        except Exception:  # noqa: BLE001 (a cache that cannot be opened is not checked here)
            seen[path] = None
    return seen[path]


def parse_formats(formats: str | Iterable[str]) -> list[str]:
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    out = []
    for item in (i.strip().lower() for i in items):
        if not item:
            continue
        item = {"markdown": "md", "htm": "html"}.get(item, item)
        if item not in FORMATS:
            raise FeatcacheError(f"unknown report format {item!r}; choose from "
                                 f"{', '.join(FORMATS)}")
        if item not in out:
            out.append(item)
    return out


def write_report(data: ReportData, out_dir: str | Path,
                 formats: str | Iterable[str] = FORMATS) -> dict[str, Path]:
    """Write the chosen formats into `out_dir`; returns {format: path} (+ "figures")."""
    from featcache.reporting import figures as figs

    fmts = parse_formats(formats)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    if "csv" in fmts:
        written["csv"] = write_csv(data.runs, out / "results.csv", data.rows)
        written["paper_layout"] = write_paper_layout(data.rows, out / "paper_layout.csv")
    if "md" in fmts or "html" in fmts:
        rendered = figs.all_figures(data.rows, data.records, data.cka)
        if "md" in fmts:
            fig_dir = out / "figures"
            fig_dir.mkdir(exist_ok=True)
            for fig in rendered:
                atomic.write_bytes(fig_dir / fig.filename, fig.png)
            if rendered:
                written["figures"] = fig_dir
            written["md"] = out / "report.md"
            atomic.write_text(written["md"], to_markdown(data, rendered))
        if "html" in fmts:
            written["html"] = out / "report.html"
            atomic.write_text(written["html"], to_html(data, rendered))
    return written


def report(cache: str | Path | None = None, runs: str | Path | None = None,
           out: str | Path = "report", format: str | Iterable[str] = FORMATS,
           cka: bool = True, resamples: int = N_RESAMPLES) -> ReportData:
    """`featcache report`: summarise every run record under the runs root (default
    <cache root>/runs) and write the chosen formats into ``out`` (an empty ``format``
    writes nothing). The files written are in the result's ``written``."""
    from featcache.options import check_int
    from featcache.records.store import default_runs_root

    formats = parse_formats(format)
    check_int(resamples, "--resamples", 0)
    if 0 < resamples < MIN_RESAMPLES:
        raise FeatcacheError(f"--resamples {resamples} is too few for a 95 % interval: give "
                             f"at least {MIN_RESAMPLES} (1,000 is the default), or 0 for none")
    if resamples > MAX_RESAMPLES:
        raise FeatcacheError(f"--resamples {resamples} is more than a report needs; at most "
                             f"{MAX_RESAMPLES:,} (1,000 gives the interval to about 0.1 "
                             "points)")
    from featcache.cache.stores import local_path

    root = local_path(runs, "--runs") if runs is not None else default_runs_root(cache)
    if formats and Path(out).expanduser().exists() and not Path(out).expanduser().is_dir():
        raise FeatcacheError(f"--out {out} is a file; the report is a folder of files: give "
                             "a folder")
    data = prepare_report(root, out, cka=cka, resamples=resamples)
    if formats:
        data.written = write_report(data, out, formats)
    return data


def build_report(runs_root: str | Path, out_dir: str | Path,
                 formats: str | Iterable[str] = FORMATS, cka: bool = True,
                 open_cache: Callable[[str], Any] | None = None) -> dict[str, Path]:
    """Read every run record under `runs_root` and write the report files into `out_dir`."""
    parse_formats(formats)  # fail on a typo before doing any work
    data = prepare_report(runs_root, out_dir, cka=cka, open_cache=open_cache)
    return write_report(data, out_dir, formats)


