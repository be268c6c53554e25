"""The report: aggregate run records into tables, figures, CSV, Markdown and one HTML page.

Only `record.json` files are read (never head weights, never a backbone), so a root with
hundreds of runs reports in seconds. CKA needs features, so it is computed only for
(model, dataset) pairs that have per-layer probe runs, only when asked, and then kept in
`<out>/cka.json` for the next report.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import hashlib
import html
import io
import json
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featcache import atomic
from featcache.columns import (
    baseline_of,
    column_key,
    column_sort,
    is_baseline,
    run_variant,
    with_variant,
)
from featcache.errors import FeatcacheError
from featcache.records import list_runs
from featcache.reference import (
    display_name,
    normalize_dataset,
    paper_dataset_names,
    paper_model,
    paper_models,
    paper_number,
)

FORMATS = ("html", "md", "csv")
METRIC = "balanced_top1"
CKA_FILE = "cka.json"
CKA_MAX_SAMPLES = 2000


# --------------------------------------------------------------------------------------
# Reading records
# --------------------------------------------------------------------------------------



def no_runs_error(runs_root: str | Path) -> FeatcacheError:
    """The one-line error for a root without records: where we looked, how to make runs."""
    root = Path(runs_root)
    where = f"{root} does not exist" if not root.exists() else f"no run records under {root}"
    return FeatcacheError(
        f"{where} (looked for <model>/<dataset>/<run>/record.json); make runs with "
        "`featcache extract --model M --dataset D` then `featcache probe --method linear`, "
        "or point --cache/--runs at the root that holds them")


def _dataset_sort(dataset: str) -> tuple[int, str]:
    d = normalize_dataset(dataset)
    names = paper_dataset_names()
    return (names.index(d) if d in names else len(names), dataset)


def _num(value: Any) -> float | None:
    """A finite float or None (records may hold null, strings or NaN)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def load_records(runs_root: str | Path, problems: list[str] | None = None) -> list[dict]:
    """Every readable run record under `runs_root` (`featcache.records.list_runs`, the same
    loader as `featcache runs`), each with the report's derived `_`-keys added.

    An unreadable or incomplete record is skipped and described in `problems` (never an
    exception): one bad file must not hide a hundred good ones."""
    notes = problems if problems is not None else []
    records = list_runs(Path(runs_root), notes)
    for rec in records:
        _derive(rec)
        if rec["_value"] is None:
            notes.append(f"{rec['path']}: no test {METRIC} in the record; listed in "
                         "results.csv only")
    return records


def _derive(rec: dict) -> dict:
    """Add the report's derived keys (column, value, best layer) to a record in place."""
    rec.setdefault("path", "")
    rec.setdefault("model_dir", rec.get("model"))
    rec.setdefault("seed", 0)
    metrics = rec.get("metrics") if isinstance(rec.get("metrics"), dict) else {}
    rec["_variant"] = run_variant(rec)
    rec["_column"] = with_variant(column_key(str(rec.get("method")), rec.get("layer_set")),
                                  rec["_variant"])
    rec["_value"], rec["_best_layer"] = _run_value(rec, metrics)
    return rec


def _run_value(rec: dict, metrics: dict) -> tuple[float | None, str | None]:
    """The number a run contributes to the table, and for `layers` runs which layer.

    A `layers` run's metrics are those of the layer picked on validation; the layer is the
    per-layer entry with the best validation score. Only when a record lacks those does the
    report fall back to the best test score (optimistic, and said so in the name).
    """
    value = _num(metrics.get(METRIC))
    if rec.get("method") != "layers" or not isinstance(rec.get("per_layer"), list):
        return value, None
    entries = [e for e in rec["per_layer"] if isinstance(e, dict)]

    def name(entry: dict) -> str:
        return f"{entry.get('layer')}.{entry.get('token', 'cls')}"

    by_val = [e for e in entries if _num(e.get("val_" + METRIC)) is not None]
    if value is not None:
        if by_val:
            return value, name(max(by_val, key=lambda e: _num(e.get("val_" + METRIC)) or 0.0))
        selected = rec.get("selected") if isinstance(rec.get("selected"), dict) else {}
        return value, str(selected["layer"]) if selected.get("layer") else None
    by_test = [e for e in entries if _num(e.get(METRIC)) is not None]
    if not by_test:
        return None, None
    best = max(by_test, key=lambda e: _num(e.get(METRIC)) or 0.0)
    return _num(best.get(METRIC)), name(best) + " (test-picked)"


# --------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------
def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1; None for a single seed)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def _created(rec: dict) -> str:
    return str(rec.get("created") or "")


def _cache_ids(rec: dict) -> str | None:
    settings = rec.get("settings") if isinstance(rec.get("settings"), dict) else {}
    caches = settings.get("caches") if isinstance(settings.get("caches"), dict) else None
    return None if caches is None else f"{caches.get('train')}/{caches.get('test')}"


def separate_variants(records: list[dict], notes: list[str]) -> None:
    """Keep apart, in their own columns, runs whose labels alone would not: runs trained
    on an earlier cache at the same path (labelled `cache=<id>`) and runs whose settings
    differ in something the label does not name (labelled `#<settings id>`)."""
    by_pair: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for rec in records:
        by_pair[(str(rec["model_dir"]), str(rec["dataset"]))].append(rec)
    for (model_dir, dataset), recs in by_pair.items():
        with_ids = [r for r in recs if _cache_ids(r)]
        if with_ids:
            current = _cache_ids(max(with_ids, key=_created))
            old = [r for r in with_ids if _cache_ids(r) != current]
            for rec in old:
                _relabel(rec, f"cache={str(_cache_ids(rec))[:6]}")
            if old:
                notes.append(f"{model_dir}/{dataset}: {len(old)} runs were trained on an "
                             "earlier cache at the same path; they stand apart (cache=…)")
        ids: dict[str, set[str]] = defaultdict(set)
        for rec in recs:
            if rec.get("settings_id"):
                ids[rec["_column"]].add(str(rec["settings_id"]))
        for col, seen in ids.items():
            if len(seen) < 2:
                continue
            for rec in recs:
                if rec["_column"] == col and rec.get("settings_id"):
                    _relabel(rec, f"#{str(rec['settings_id'])[:6]}")
            notes.append(f"{model_dir}/{dataset} {col}: runs with different settings share "
                         "a label; each settings id has its own column (#…)")


def _relabel(rec: dict, extra: str) -> None:
    rec["_variant"] = ", ".join(v for v in (rec["_variant"], extra) if v)
    rec["_column"] = with_variant(
        column_key(str(rec.get("method")), rec.get("layer_set")), rec["_variant"])


def summarize(records: Iterable[dict], problems: list[str] | None = None) -> list[dict]:
    """One row per (model, dataset) with a cell per method column, in a stable order.

    A cell is the mean ± sample std over seeds of test balanced top-1 (%), its gain over
    the linear baseline of the same pair (difference of means), and the paper's number
    where the paper has one. A column some pair lacks is `None` in that row's `cells` and
    listed in its `missing`. When one seed was run twice, the newest record counts.
    """
    notes = problems if problems is not None else []
    records = [rec if "_column" in rec else _derive(rec) for rec in records]
    separate_variants(records, notes)
    groups: dict[tuple[str, str], dict[str, dict[int, dict]]] = defaultdict(
        lambda: defaultdict(dict))
    columns: set[str] = set()
    for rec in records:
        if rec.get("_value") is None:
            continue
        key = (str(rec["model_dir"]), str(rec["dataset"]))
        col = rec["_column"]
        columns.add(col)
        seeds = groups[key][col]
        seed = int(rec.get("seed") or 0)
        if seed in seeds:
            older, newer = sorted((seeds[seed], rec), key=_created)
            notes.append(f"{key[0]}/{key[1]} {col} seed {seed} was run twice; using "
                         f"{newer['path']}")
            seeds[seed] = newer
        else:
            seeds[seed] = rec
    ordered = sorted(columns, key=column_sort)
    rows: list[dict] = []
    for (model_dir, dataset) in sorted(groups, key=lambda k: (k[0], _dataset_sort(k[1]))):
        by_col = groups[(model_dir, dataset)]
        any_rec = next(iter(next(iter(by_col.values())).values()))
        model = str(any_rec.get("model") or model_dir)
        cells: dict[str, dict | None] = {}
        for col in ordered:
            runs = by_col.get(col)
            if not runs:
                cells[col] = None
                continue
            seeds = sorted(runs)
            values = [runs[s]["_value"] for s in seeds]
            mean, std = _mean_std(values)
            first = runs[seeds[0]]
            best = [runs[s]["_best_layer"] for s in seeds if runs[s]["_best_layer"]]
            cells[col] = {
                "method": first["method"],
                "layer_set": first.get("layer_set"),
                "n": len(values),
                "seeds": seeds,
                "values": values,
                "mean": mean,
                "std": std,
                "gain": None,
                "paper": (paper_number(model, dataset, first["method"], first.get("layer_set"))
                          if first["method"] != "layers" and not first["_variant"] else None),
                "best_layer": max(set(best), key=best.count) if best else None,
            }
        for col, cell in cells.items():
            base = cells.get(baseline_of(col))
            if cell is not None and base is not None:
                cell["gain"] = cell["mean"] - base["mean"]
        taps = sorted({str(r.get("tap")) for runs in by_col.values() for r in runs.values()
                       if r.get("tap")})
        rows.append({
            "model": model,
            "model_dir": model_dir,
            "dataset": dataset,
            "display": display_name(dataset),
            "tap": taps[0] if len(taps) == 1 else (",".join(taps) or None),
            "in_paper": paper_model(model) is not None
            and paper_number(model, dataset, "linear") is not None,
            "cells": cells,
            "missing": [c for c in ordered if cells[c] is None],
        })
    return rows


def columns_of(rows: Sequence[dict]) -> list[str]:
    """The method columns of a summary, in display order."""
    return list(rows[0]["cells"]) if rows else []


def model_means(rows: Sequence[dict]) -> list[dict]:
    """Per model and column: mean over datasets of the per-dataset means and gains.

    Each entry says over how many of the model's datasets it is taken, so a column run on
    fewer datasets is visibly not comparable; `paper` is the paper's mean over the same
    datasets when the paper has every one of them.
    """
    by_model: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_model[row["model_dir"]].append(row)
    out = []
    for model_dir, mrows in by_model.items():
        entry: dict[str, Any] = {"model_dir": model_dir, "model": mrows[0]["model"],
                                 "n_datasets": len(mrows), "cells": {}}
        for col in columns_of(rows):
            present = [r["cells"][col] for r in mrows if r["cells"][col] is not None]
            if not present:
                entry["cells"][col] = None
                continue
            gains = [c["gain"] for c in present if c["gain"] is not None]
            papers = [c["paper"] for c in present]
            entry["cells"][col] = {
                "mean": sum(c["mean"] for c in present) / len(present),
                "gain": sum(gains) / len(gains) if len(gains) == len(present) else None,
                "paper": (sum(papers) / len(papers)
                          if all(p is not None for p in papers) else None),
                "n_datasets": len(present),
            }
        out.append(entry)
    return out


def missing_notes(rows: Sequence[dict], limit: int = 8) -> list[str]:
    """One line per column that some pairs lack, naming them (the first `limit`)."""
    notes = []
    for col in columns_of(rows):
        lacking = [f"{r['model_dir']}/{r['dataset']}" for r in rows if r["cells"][col] is None]
        if not lacking:
            continue
        shown = ", ".join(lacking[:limit]) + (f" and {len(lacking) - limit} more"
                                                if len(lacking) > limit else "")
        notes.append(f"{col} not run for {len(lacking)} of {len(rows)} model/dataset "
                     f"pairs: {shown}")
    if rows and not any(is_baseline(c) for c in columns_of(rows)):
        notes.append("no linear baseline runs: gains cannot be computed "
                     "(`featcache probe --method linear`)")
    return notes


def summary_json(rows: Sequence[dict], notes: Sequence[str] = ()) -> dict[str, Any]:
    """The summary as plain JSON-able data (what `featcache report --json` prints)."""
    return {"metric": f"test {METRIC} (%)", "columns": columns_of(rows), "rows": list(rows),
            "means": model_means(rows), "notes": list(notes)}


# --------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------
def fmt_cell(cell: dict | None, digits: int = 2) -> str:
    """"68.30 ± 0.41" (one seed: "68.30"), or "—" for a method not run."""
    if cell is None:
        return "—"
    text = f"{cell['mean']:.{digits}f}"
    if cell.get("std") is not None:
        text += f" ± {cell['std']:.{digits}f}"
    return text


def fmt_gain(gain: float | None, digits: int = 2) -> str:
    return "" if gain is None else f"{gain:+.{digits}f}"


def summary_table(rows: Sequence[dict], title: str | None = None) -> Any:
    """The terminal table (rich): model × dataset rows, method columns."""
    from rich.table import Table

    table = Table(title=title, show_lines=True, header_style="bold")
    # Names may fold onto several lines; numbers never (a cropped number is a wrong number).
    table.add_column("model", overflow="fold", ratio=2)
    table.add_column("dataset", overflow="fold", ratio=1)
    cols = columns_of(rows)
    for col in cols:
        table.add_column(col, justify="right", no_wrap=True, min_width=11)
    for row in rows:
        cells = []
        for col in cols:
            cell = row["cells"][col]
            if cell is None:
                cells.append("[dim]—[/]")
                continue
            lines = [fmt_cell(cell).replace(" ± ", "±")]
            if not is_baseline(col) and cell["gain"] is not None:
                colour = "green" if cell["gain"] >= 0 else "red"
                lines.append(f"[{colour}]{fmt_gain(cell['gain'])}[/]")
            if cell.get("best_layer"):
                lines.append(f"[dim]{cell['best_layer']}[/]")
            if cell["paper"] is not None:
                lines.append(f"[dim]paper {cell['paper']:.2f}[/]")
            cells.append("\n".join(lines))
        table.add_row(row["model_dir"], row["display"], *cells)
    return table


def render_table(rows: Sequence[dict], console: Any = None, notes: Sequence[str] = ()) -> None:
    """Print the summary table, then the notes (missing methods, skipped records)."""
    if console is None:
        from rich.console import Console

        console = Console()
    n_runs = sum(c["n"] for r in rows for c in r["cells"].values() if c)
    console.print(summary_table(
        rows, title=f"test balanced top-1 (%) — mean ± std over seeds, gain over linear "
                    f"({n_runs} runs)"))
    for note in notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------
_CSV_FIRST = ("model", "model_dir", "dataset", "tap", "weights", "method", "layer_set",
              "column", "protocol", "seed", "n_tokens", "test_balanced_top1", "test_top1",
              "test_balanced_top5", "test_top5", "best_layer", "gain_over_linear",
              "paper_balanced_top1")


def csv_rows(records: Sequence[dict], rows: Sequence[dict] = ()) -> list[dict[str, Any]]:
    """One flat dict per run: identity, every test/val metric, the selected hyperparameters."""
    cells = {(r["model_dir"], r["dataset"]): r["cells"] for r in rows}
    out = []
    for rec in sorted(records, key=lambda r: (str(r["model_dir"]), _dataset_sort(r["dataset"]),
                                             column_sort(r["_column"]), r.get("seed") or 0)):
        base = cells.get((rec["model_dir"], rec["dataset"]), {}).get(baseline_of(rec["_column"]))
        row: dict[str, Any] = {
            "model": rec.get("model"), "model_dir": rec.get("model_dir"),
            "dataset": rec.get("dataset"), "tap": rec.get("tap"), "weights": rec.get("weights"),
            "method": rec.get("method"), "layer_set": rec.get("layer_set"),
            "column": rec["_column"], "protocol": rec.get("protocol"),
            "seed": rec.get("seed"),
            "n_tokens": len(rec["tokens"]) if isinstance(rec.get("tokens"), list) else None,
            "best_layer": rec.get("_best_layer"),
            "gain_over_linear": (rec["_value"] - base["mean"]
                                 if base and rec["_value"] is not None else None),
            "paper_balanced_top1": (paper_number(str(rec["model"]), rec["dataset"],
                                                 rec["method"], rec.get("layer_set"))
                                    if rec["method"] != "layers" and not rec["_variant"]
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
        row["created"] = rec.get("created")
        row["featcache_version"] = rec.get("featcache_version")
        row["path"] = rec["path"]
        out.append(row)
    return out


def write_csv(records: Sequence[dict], path: Path, rows: Sequence[dict] = ()) -> Path:
    """results.csv: one row per run; columns are the union over runs, common ones first."""
    flat = csv_rows(records, rows)
    keys: list[str] = list(_CSV_FIRST)
    for row in flat:
        keys.extend(k for k in row if k not in keys)
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    for row in flat:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in keys})
    return atomic.write_text(path, buffer.getvalue())


# --------------------------------------------------------------------------------------
# CKA (only for pairs with per-layer runs; cached in <out>/cka.json)
# --------------------------------------------------------------------------------------
def _cka_key(cache_path: str, fingerprint: Any, kind: str) -> str:
    blob = json.dumps([cache_path, fingerprint, kind, CKA_MAX_SAMPLES], sort_keys=True,
                      default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def layer_cka(records: Sequence[dict], out_dir: Path | None, compute: bool = True,
              open_cache: Callable[[str], Any] | None = None,
              problems: list[str] | None = None) -> dict[tuple[str, str], dict]:
    """{(model_dir, dataset): {"layers": [...], "cls": [...], "ap": [...]}} for depth plots.

    Values come from `<out>/cka.json` when present for the same cache and fingerprint;
    otherwise, when `compute` is true, from the test cache (train when no test) of the
    pair's `layers` runs. A pair whose cache cannot be opened is noted and left out.
    """
    notes = problems if problems is not None else []
    store_path = out_dir / CKA_FILE if out_dir is not None else None
    store: dict[str, Any] = {}
    if store_path is not None and store_path.is_file():
        try:
            store = json.loads(store_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            store = {}
    pairs: dict[tuple[str, str], dict] = {}
    for rec in records:
        if rec.get("method") == "layers":
            pairs.setdefault((str(rec["model_dir"]), str(rec["dataset"])), rec)
    out: dict[tuple[str, str], dict] = {}
    skipped: list[str] = []
    changed = False
    for (model_dir, dataset), rec in sorted(pairs.items()):
        caches = rec.get("caches") if isinstance(rec.get("caches"), dict) else {}
        split = "test" if caches.get("test") else "train"
        path = caches.get(split)
        if not path:
            skipped.append(f"{model_dir}/{dataset}: the record names no cache")
            continue
        fps = rec.get("fingerprints") if isinstance(rec.get("fingerprints"), dict) else {}
        key = _cka_key(str(path), fps.get(split), "cls+ap")
        if key in store:
            out[(model_dir, dataset)] = store[key]
            continue
        if not compute:
            continue
        try:
            result = _compute_cka(str(path), open_cache)
        except FeatcacheError as exc:
            skipped.append(f"{model_dir}/{dataset}: {exc}")
            continue
        except Exception as exc:  # a broken cache must not sink the whole report
            skipped.append(f"{model_dir}/{dataset}: cannot read {path} "
                           f"({type(exc).__name__}: {exc})")
            continue
        result.update({"model_dir": model_dir, "dataset": dataset, "cache": str(path)})
        store[key] = result
        out[(model_dir, dataset)] = result
        changed = True
    if len(skipped) <= 3:
        notes.extend(f"CKA skipped for {s}" for s in skipped)
    else:
        notes.append(f"CKA skipped for {len(skipped)} of {len(pairs)} model/dataset pairs "
                     f"with per-layer runs, e.g. {skipped[0]}; depth plots show accuracy only "
                     "(use --no-cka to skip the attempt)")
    if changed and store_path is not None:
        try:
            store_path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_text(store_path, json.dumps(store, indent=1))
        except OSError as exc:
            notes.append(f"could not keep CKA values in {store_path}: {exc}")
    return out


def _compute_cka(path: str, open_cache: Callable[[str], Any] | None) -> dict[str, Any]:
    from featcache.cka import layer_cka_to_last

    if open_cache is None:
        if not Path(path).exists():
            raise FeatcacheError(f"cache {path} not found (moved or on another machine?)")
        from featcache.cache import open_cache as _open

        open_cache = _open
    cache = open_cache(path)
    return {"layers": list(cache.layer_names),
            "cls": layer_cka_to_last(cache, "cls", CKA_MAX_SAMPLES),
            "ap": layer_cka_to_last(cache, "ap", CKA_MAX_SAMPLES),
            "max_samples": CKA_MAX_SAMPLES}


# --------------------------------------------------------------------------------------
# The whole report
# --------------------------------------------------------------------------------------
@dataclass
class ReportData:
    """Everything the writers need, computed once from the records."""

    runs_root: Path
    records: list[dict]
    rows: list[dict]
    notes: list[str] = field(default_factory=list)
    cka: dict[tuple[str, str], dict] = field(default_factory=dict)
    written: dict[str, Path] = field(default_factory=dict)  # {format: path} once written

    def as_json(self) -> dict[str, Any]:
        out = summary_json(self.rows, self.notes)
        out["runs_root"] = str(self.runs_root)
        out["n_runs"] = len(self.records)
        return out


def prepare_report(runs_root: str | Path, out_dir: str | Path | None = None, cka: bool = True,
                   open_cache: Callable[[str], Any] | None = None) -> ReportData:
    """Load and summarise; raises FeatcacheError when the root holds no usable record."""
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
        raise no_runs_error(root)
    rows = summarize(records, problems)
    if not rows:
        raise FeatcacheError(f"{len(records)} run records under {root} but none has a test "
                             f"{METRIC}; see results.csv or the records themselves")
    notes = missing_notes(rows) + problems
    taps = {str(r.get("tap")) for r in records if r.get("tap")}
    if any(row["in_paper"] for row in rows) and taps - {"reference"}:
        notes.append("paper numbers use the reference tap; runs on another tap "
                     f"({', '.join(sorted(taps - {'reference'}))}) are not like for like")
    cka_values = layer_cka(records, Path(out_dir) if out_dir is not None else None,
                           compute=cka, open_cache=open_cache, problems=notes)
    return ReportData(root, records, rows, notes, cka_values)


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
    from featcache import figures as figs

    fmts = parse_formats(formats)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    if "csv" in fmts:
        written["csv"] = write_csv(data.records, out / "results.csv", data.rows)
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
           cka: bool = True) -> ReportData:
    """`featcache report`: summarise every run record under the runs root (default
    <cache root>/runs) and write the chosen formats into ``out`` (an empty ``format``
    writes nothing). The files written are in the result's ``written``."""
    from featcache.records import default_runs_root

    formats = parse_formats(format)
    root = Path(runs).expanduser() if runs is not None else default_runs_root(cache)
    data = prepare_report(root, out, cka=cka)
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


# --------------------------------------------------------------------------------------
# Markdown and HTML
# --------------------------------------------------------------------------------------
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _cell_text(cell: dict | None, col: str) -> str:
    if cell is None:
        return "—"
    text = f"{fmt_cell(cell)} (n={cell['n']})"
    if not is_baseline(col) and cell["gain"] is not None:
        text += f" {fmt_gain(cell['gain'])}"
    if cell.get("best_layer"):
        text += f" @{cell['best_layer']}"
    return text


def paper_pairs(rows: Sequence[dict]) -> list[dict]:
    """Every (model, dataset, column) where the paper has a number beside the user's."""
    out = []
    for row in rows:
        paper_lin = paper_number(row["model"], row["dataset"], "linear")
        for col, cell in row["cells"].items():
            if cell is not None and cell["paper"] is not None:
                out.append({"model_dir": row["model_dir"], "model": row["model"],
                            "dataset": row["dataset"], "display": row["display"],
                            "column": col, "yours": cell["mean"], "std": cell["std"],
                            "n": cell["n"], "paper": cell["paper"],
                            "delta": cell["mean"] - cell["paper"], "gain": cell["gain"],
                            "paper_gain": (cell["paper"] - paper_lin if paper_lin is not None
                                           else None)})
    return out


_PAPER_SCOPE = ("The paper reports " + ", ".join(paper_models()) + " (reference tap) on "
                + ", ".join(d for d in paper_dataset_names() if d != "imagenet1k")
                + " with methods linear, attentive, concat and alf (layer sets last, "
                  "middle+last, quarterly, all).")


def _gain_or_dash(pair: dict, key: str) -> str:
    return "—" if pair.get(key) is None or is_baseline(pair["column"]) else f"{pair[key]:+.2f}"


_LEGEND = ("Test balanced top-1 accuracy (%): mean ± sample std over seeds (n = seeds); "
           "the signed number is the gain over the linear baseline (last-layer CLS) of the "
           "same model and dataset; — = that method was not run for that pair. "
           "`layers` = the single-layer linear probe whose layer was picked on validation "
           "(the layer is named). "
           "Columns: `concat:<layers>` = linear probe on concatenated CLS+AP tokens; "
           "`alf:all` = attentive layer fusion over every layer's CLS+AP.")


def to_markdown(data: ReportData, figures: Sequence[Any] = ()) -> str:
    """report.md: the tables, paper comparison, figures (PNG files) and notes."""
    rows, cols = data.rows, columns_of(data.rows)
    lines = [
        "# featcache report", "",
        f"{len(data.records)} runs, {len(rows)} model/dataset pairs, read from "
        f"`{data.runs_root}` on {_now()}.", "",
        "## Balanced accuracy", "", _LEGEND, "",
        "### Means over datasets", "",
        "Mean of per-dataset means (gain over linear); [k/N] = datasets the column "
        "covers; paper = the paper's mean over the same datasets.", "",
        "| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for entry in model_means(rows):
        parts = []
        for col in cols:
            c = entry["cells"][col]
            if c is None:
                parts.append("—")
                continue
            text = f"{c['mean']:.2f}"
            if not is_baseline(col) and c["gain"] is not None:
                text += f" ({fmt_gain(c['gain'])})"
            text += f" [{c['n_datasets']}/{entry['n_datasets']}]"
            if c["paper"] is not None:
                text += f" paper {c['paper']:.2f}"
            parts.append(text)
        lines.append(f"| {entry['model_dir']} | " + " | ".join(parts) + " |")
    lines += ["", "### Per model and dataset", "",
              "| model | dataset | " + " | ".join(cols) + " |",
              "|---|---|" + "---:|" * len(cols)]
    for row in rows:
        lines.append(f"| {row['model_dir']} | {row['display']} | "
                     + " | ".join(_cell_text(row["cells"][c], c) for c in cols) + " |")
    pairs = paper_pairs(rows)
    lines += ["", "## Beside the paper", ""]
    if pairs:
        lines += ["Published balanced top-1 of Ciernik et al. (2026) for the same model, "
                  "dataset and method (reference tap, one seed).", "",
                  "| model | dataset | method | yours | paper | yours − paper "
                  "| your gain over linear | paper's gain over linear |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]
        for p in pairs:
            yours = f"{p['yours']:.2f}" + (f" ± {p['std']:.2f}" if p["std"] is not None else "")
            lines.append(f"| {p['model_dir']} | {p['display']} | {p['column']} | {yours} | "
                         f"{p['paper']:.2f} | {p['delta']:+.2f} | {_gain_or_dash(p, 'gain')} "
                         f"| {_gain_or_dash(p, 'paper_gain')} |")
    else:
        lines.append(f"None of these model/dataset/method combinations is in the paper. "
                     f"{_PAPER_SCOPE}")
    if figures:
        lines += ["", "## Figures", ""]
        for fig in figures:
            lines += [f"### {fig.title}", "", fig.question, "",
                      f"![{fig.title}](figures/{fig.filename})", ""]
    lines += ["", "## Notes", ""]
    lines += [f"- {n}" for n in data.notes] or ["- none: every method was run for every pair."]
    return "\n".join(lines) + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;
max-width:1200px;color:#1b1f24;padding:0 16px}
h1{margin-bottom:4px}h2{margin-top:36px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.meta{color:#57606a}table{border-collapse:collapse;margin:12px 0;font-size:14px}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:right;vertical-align:top}
th{background:#f6f8fa}td.l,th.l{text-align:left}
.gain.pos{color:#1a7f37}.gain.neg{color:#cf222e}.sub{color:#57606a;font-size:12px}
.absent{color:#8c959f;text-align:center}
figure{margin:20px 0}figure img{max-width:100%;height:auto;border:1px solid #eaeef2}
figcaption{color:#57606a;margin-bottom:6px}
.notes li{margin:2px 0}.scroll{overflow-x:auto}
"""


def _esc(text: Any) -> str:
    return html.escape(str(text))


def _html_cell(cell: dict | None, col: str) -> str:
    if cell is None:
        return '<td class="absent" title="not run">—</td>'
    parts = [_esc(fmt_cell(cell)), f'<span class="sub"> n={cell["n"]}</span>']
    if not is_baseline(col) and cell["gain"] is not None:
        cls = "pos" if cell["gain"] >= 0 else "neg"
        parts.append(f'<br><span class="gain {cls}">{_esc(fmt_gain(cell["gain"]))}</span>')
    if cell.get("best_layer"):
        parts.append(f'<br><span class="sub">{_esc(cell["best_layer"])}</span>')
    if cell["paper"] is not None:
        parts.append(f'<br><span class="sub">paper {cell["paper"]:.2f}</span>')
    return "<td>" + "".join(parts) + "</td>"


def to_html(data: ReportData, figures: Sequence[Any] = ()) -> str:
    """report.html: one self-contained page (inline CSS, figures as base64 PNG)."""
    rows, cols = data.rows, columns_of(data.rows)
    h: list[str] = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>featcache report</title>", f"<style>{_CSS}</style></head><body>",
        "<h1>featcache report</h1>",
        f'<p class="meta">{len(data.records)} runs, {len(rows)} model/dataset pairs, read '
        f"from <code>{_esc(data.runs_root)}</code> on {_esc(_now())}.</p>",
        "<h2>Balanced accuracy</h2>",
        "<p>" + re.sub(r"`([^`]+)`", r"<code>\1</code>", _esc(_LEGEND)) + "</p>",
    ]
    h += ["<h3>Means over datasets</h3>",
          '<p class="sub">Mean of per-dataset means; [k/N] = datasets the column covers; '
          "paper = the paper's mean over the same datasets.</p>",
          '<div class="scroll"><table><thead><tr><th class="l">model</th>'
          + "".join(f"<th>{_esc(c)}</th>" for c in cols) + "</tr></thead><tbody>"]
    for entry in model_means(rows):
        tds = []
        for col in cols:
            c = entry["cells"][col]
            if c is None:
                tds.append('<td class="absent">—</td>')
                continue
            txt = f"{c['mean']:.2f} <span class=\"sub\">[{c['n_datasets']}/" \
                  f"{entry['n_datasets']}]</span>"
            if not is_baseline(col) and c["gain"] is not None:
                cls = "pos" if c["gain"] >= 0 else "neg"
                txt += f'<br><span class="gain {cls}">{fmt_gain(c["gain"])}</span>'
            if c["paper"] is not None:
                txt += f'<br><span class="sub">paper {c["paper"]:.2f}</span>'
            tds.append(f"<td>{txt}</td>")
        h.append(f'<tr><td class="l">{_esc(entry["model_dir"])}</td>{"".join(tds)}</tr>')
    h.append("</tbody></table></div>")
    h += ["<h3>Per model and dataset</h3>",
          '<div class="scroll"><table><thead><tr><th class="l">model</th><th class="l">dataset'
          "</th>" + "".join(f"<th>{_esc(c)}</th>" for c in cols) + "</tr></thead><tbody>"]
    for row in rows:
        h.append(f'<tr><td class="l">{_esc(row["model_dir"])}</td>'
                 f'<td class="l">{_esc(row["display"])}</td>'
                 + "".join(_html_cell(row["cells"][c], c) for c in cols) + "</tr>")
    h.append("</tbody></table></div>")
    pairs = paper_pairs(rows)
    h.append("<h2>Beside the paper</h2>")
    if pairs:
        h += ["<p>Published balanced top-1 of Ciernik et al. (2026) for the same model, "
              "dataset and method (reference tap, one seed).</p>",
              '<div class="scroll"><table><thead><tr><th class="l">model</th>'
              '<th class="l">dataset</th><th class="l">method</th><th>yours</th><th>paper</th>'
              "<th>yours − paper</th><th>your gain over linear</th>"
              "<th>paper's gain over linear</th></tr></thead><tbody>"]
        for p in pairs:
            yours = f"{p['yours']:.2f}" + (f" ± {p['std']:.2f}" if p["std"] is not None else "")
            cls = "pos" if p["delta"] >= 0 else "neg"
            h.append(f'<tr><td class="l">{_esc(p["model_dir"])}</td>'
                     f'<td class="l">{_esc(p["display"])}</td><td class="l">{_esc(p["column"])}'
                     f"</td><td>{yours}</td><td>{p['paper']:.2f}</td>"
                     f'<td class="gain {cls}">{p["delta"]:+.2f}</td>'
                     f"<td>{_gain_or_dash(p, 'gain')}</td>"
                     f"<td>{_gain_or_dash(p, 'paper_gain')}</td></tr>")
        h.append("</tbody></table></div>")
    else:
        h.append("<p>None of these model/dataset/method combinations is in the paper. "
                 f"{_esc(_PAPER_SCOPE)}</p>")
    if figures:
        h.append("<h2>Figures</h2>")
        for fig in figures:
            b64 = base64.b64encode(fig.png).decode("ascii")
            h.append(f'<figure id="{_esc(fig.filename.rsplit(".", 1)[0])}"><h3>'
                     f"{_esc(fig.title)}</h3><figcaption>{_esc(fig.question)}</figcaption>"
                     f'<img alt="{_esc(fig.title)}" src="data:image/png;base64,{b64}">'
                     "</figure>")
    h.append('<h2>Notes</h2><ul class="notes">')
    h += [f"<li>{_esc(n)}</li>" for n in data.notes] or [
        "<li>none: every method was run for every pair.</li>"]
    h.append("</ul></body></html>")
    return "\n".join(h) + "\n"
