"""Run records summarised: one row per (model, dataset), a cell per method column.

What every output of the report (terminal table, CSV, Markdown, HTML, figures) is made
from. Only `record.json` files are read (never head weights, never a backbone), so a root
with hundreds of runs summarises in well under a second.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featcache.errors import FeatcacheError
from featcache.probing.methods import method_of
from featcache.records.schema import run_variant
from featcache.records.store import list_runs
from featcache.reporting.bootstrap import N_RESAMPLES
from featcache.reporting.columns import (
    baseline_of,
    column_key,
    column_sort,
    is_baseline,
    with_variant,
)
from featcache.reporting.reference import (
    display_name,
    normalize_dataset,
    paper_dataset_names,
    paper_experiments,
    paper_model,
    paper_number,
    paper_value,
)

METRIC = "balanced_top1"


def per_layer(method: object) -> bool:
    """A method whose record holds one probe per layer (`layers`): its number is the layer
    chosen on validation, and the paper has none."""
    spec = method_of(method)
    return spec is not None and spec.per_layer


def no_runs_error(runs_root: str | Path) -> FeatcacheError:
    """The one-line error for a root without records: where we looked, how to make runs."""
    root = Path(runs_root)
    where = f"{root} does not exist" if not root.exists() else f"no run records under {root}"
    return FeatcacheError(
        f"{where} (looked for <model>/<dataset>/<run>/record.json); make runs with "
        "`featcache extract --model M --dataset D` then `featcache probe --method linear`, "
        "or point --cache/--runs at the root that holds them")


def dataset_sort(dataset: str) -> tuple[int, str]:
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


@dataclass
class ScoredRun:
    """A run record as the report reads it: the record itself (never changed: it is what
    `featcache runs`, the figures and the CSV read) and what the report derives from it."""

    record: dict
    variant: str  # what sets it apart from the paper's recipe ("" for none)
    column: str  # its table column, with the variant in brackets
    value: float | None  # its test balanced top-1 (%); None: it has none
    best_layer: str | None  # `layers` runs: the layer picked on validation
    caches_replaced: str | None = None  # the splits whose caches were replaced since


def score(rec: dict) -> ScoredRun:
    """The report's view of a record: its column, its number, its best layer."""
    rec.setdefault("path", "")
    rec.setdefault("model_dir", rec.get("model"))
    rec.setdefault("seed", 0)
    metrics = rec.get("metrics") if isinstance(rec.get("metrics"), dict) else {}
    variant = run_variant(rec)
    column = with_variant(column_key(str(rec.get("method")), rec.get("layer_set")), variant)
    return ScoredRun(rec, variant, column, *_run_value(rec, metrics))


def load_records(runs_root: str | Path, problems: list[str] | None = None) -> list[dict]:
    """Every readable run record under `runs_root` (`featcache.records.store.list_runs`,
    the same loader as `featcache runs`).

    An unreadable or incomplete record is skipped and described in `problems` (never an
    exception): one bad file must not hide a hundred good ones."""
    notes = problems if problems is not None else []
    records = list_runs(Path(runs_root), notes)
    for rec in records:
        if score(rec).value is None:
            notes.append(f"{rec['path']}: no test {METRIC} in the record; listed in "
                         "results.csv only")
    return records


def score_runs(records: Iterable[dict | ScoredRun], notes: list[str]) -> list[ScoredRun]:
    """The records scored, with runs that their labels alone would mix kept apart."""
    runs = [rec if isinstance(rec, ScoredRun) else score(rec) for rec in records]
    separate_variants(runs, notes)
    return runs


def scored(records: Iterable[dict | ScoredRun], notes: list[str]) -> list[ScoredRun]:
    """Runs scored once: as given when they all are (`score_runs` output), else scored."""
    items = list(records)
    if all(isinstance(r, ScoredRun) for r in items):
        return [r for r in items if isinstance(r, ScoredRun)]
    return score_runs(items, notes)


def _run_value(rec: dict, metrics: dict) -> tuple[float | None, str | None]:
    """The number a run contributes to the table, and for `layers` runs which layer.

    A `layers` run's metrics are those of the layer picked on validation; the layer is the
    per-layer entry with the best validation score. Only when a record lacks those does the
    report fall back to the best test score (optimistic, and said so in the name).
    """
    value = _num(metrics.get(METRIC))
    if not per_layer(rec.get("method")) or not isinstance(rec.get("per_layer"), list):
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


def separate_variants(runs: list[ScoredRun], notes: list[str]) -> None:
    """Keep apart, in their own columns, runs whose labels alone would not: runs trained
    on an earlier cache at the same path (labelled `cache=<id>`) and runs whose settings
    differ in something the label does not name (labelled `#<settings id>`)."""
    by_pair: dict[tuple[str, str], list[ScoredRun]] = defaultdict(list)
    for run in runs:
        by_pair[(str(run.record["model_dir"]), str(run.record["dataset"]))].append(run)
    for (model_dir, dataset), recs in by_pair.items():
        with_ids = [r for r in recs if _cache_ids(r.record)]
        if with_ids:
            current = _cache_ids(max(with_ids, key=lambda r: _created(r.record)).record)
            old = [r for r in with_ids if _cache_ids(r.record) != current]
            for run in old:
                _relabel(run, f"cache={str(_cache_ids(run.record))[:6]}")
            if old:
                notes.append(f"{model_dir}/{dataset}: {len(old)} runs were trained on an "
                             "earlier cache at the same path; they stand apart (cache=…)")
        ids: dict[str, set[str]] = defaultdict(set)
        for run in recs:
            if run.record.get("settings_id"):
                ids[run.column].add(str(run.record["settings_id"]))
        for col, seen in ids.items():
            if len(seen) < 2:
                continue
            for run in recs:
                if run.column == col and run.record.get("settings_id"):
                    _relabel(run, f"#{str(run.record['settings_id'])[:6]}")
            notes.append(f"{model_dir}/{dataset} {col}: runs with different settings share "
                         "a label; each settings id has its own column (#…)")


def _relabel(run: ScoredRun, extra: str) -> None:
    rec = run.record
    run.variant = ", ".join(v for v in (run.variant, extra) if v)
    run.column = with_variant(column_key(str(rec.get("method")), rec.get("layer_set")),
                              run.variant)


def summarize(records: Iterable[dict | ScoredRun],
              problems: list[str] | None = None) -> list[dict]:
    """One row per (model, dataset) with a cell per method column, in a stable order.

    A cell is the mean ± sample std over seeds of test balanced top-1 (%), its gain over
    the linear baseline of the same pair (difference of means), and the paper's number
    where the paper has one. A column some pair lacks is `None` in that row's `cells` and
    listed in its `missing`. When one seed was run twice, the newest record counts.
    ``records``: plain records, or runs already scored (`score_runs`).
    """
    notes = problems if problems is not None else []
    runs = scored(records, notes)
    groups: dict[tuple[str, str], dict[str, dict[int, ScoredRun]]] = defaultdict(
        lambda: defaultdict(dict))
    columns: set[str] = set()
    for run in runs:
        rec = run.record
        if run.value is None:
            continue
        key = (str(rec["model_dir"]), str(rec["dataset"]))
        col = run.column
        columns.add(col)
        seeds = groups[key][col]
        seed = int(rec.get("seed") or 0)
        if seed in seeds:
            older, newer = sorted((seeds[seed], run), key=lambda r: _created(r.record))
            notes.append(f"{key[0]}/{key[1]} {col} seed {seed} was run twice; using "
                         f"{newer.record['path']}")
            seeds[seed] = newer
        else:
            seeds[seed] = run
    ordered = sorted(columns, key=column_sort)
    rows: list[dict] = []
    for (model_dir, dataset) in sorted(groups, key=lambda k: (k[0], dataset_sort(k[1]))):
        by_col = groups[(model_dir, dataset)]
        any_rec = next(iter(next(iter(by_col.values())).values())).record
        model = str(any_rec.get("model") or model_dir)
        cells: dict[str, dict | None] = {}
        for col in ordered:
            runs = by_col.get(col)
            if not runs:
                cells[col] = None
                continue
            seeds = sorted(runs)
            values = [runs[s].value for s in seeds]
            mean, std = _mean_std(values)  # type: ignore[arg-type] (None was skipped above)
            first, variant = runs[seeds[0]].record, runs[seeds[0]].variant
            best = [runs[s].best_layer for s in seeds if runs[s].best_layer]
            cells[col] = {
                "method": first["method"],
                "layer_set": first.get("layer_set"),
                "n": len(values),
                "seeds": seeds,
                "values": values,
                "paths": [runs[s].record["path"] for s in seeds],
                "mean": mean,
                "std": std,
                "gain": None,
                "paper": (paper_number(model, dataset, first["method"], first.get("layer_set"))
                          if not per_layer(first["method"]) and not variant else None),
                "best_layer": max(best, key=best.count) if best else None,  # ties: the first seed's
            }
        for col, cell in cells.items():
            base = cells.get(baseline_of(col))
            if cell is not None and base is not None:
                cell["gain"] = cell["mean"] - base["mean"]
        taps = sorted({str(r.record.get("tap")) for runs in by_col.values()
                       for r in runs.values() if r.record.get("tap")})
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


@dataclass
class ReportData:
    """Everything the writers need, computed once from the records (`prepare_report`)."""

    runs_root: Path
    records: list[dict]  # the run records, as read (what figures get)
    rows: list[dict]  # one per (model, dataset): `summarize`
    notes: list[str] = field(default_factory=list)
    cka: dict[tuple[str, str], dict] = field(default_factory=dict)
    written: dict[str, Path] = field(default_factory=dict)  # {format: path} once written
    resamples: int = N_RESAMPLES  # of each gain's bootstrap interval (0: none)
    runs: list[ScoredRun] = field(default_factory=list)  # the records scored: results.csv

    def as_json(self) -> dict[str, Any]:
        out = summary_json(self.rows, self.notes)
        from featcache.reporting import significance, under_shift

        out["significance"] = significance.significance(self.rows)
        out["under_shift"] = under_shift.shift_table(self.records)
        out["runs_root"] = str(self.runs_root)
        out["n_runs"] = len(self.records)
        return out


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
            "means": model_means(rows), "paper_layout": paper_layout(rows),
            "notes": list(notes)}


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




def paper_layout(rows: Sequence[dict]) -> dict[str, Any]:
    """The user's runs in the paper's table layout: its ten experiment columns (CLS
    linear; all tokens attentive; CLS+AP linear and attentive for last, middle+last,
    quarterly, all), each cell the user's mean ± std beside the paper's number where model
    and dataset match. Only runs of the paper's recipe fill it (no variant)."""
    from featcache.registry import METHODS

    column_of = {label: spec.column(layer_set) for _, spec in METHODS.items()
                 for layer_set, label in spec.paper.items()}
    experiments = [e for e in paper_experiments() if e in column_of]
    out = []
    for row in rows:
        cells: dict[str, dict[str, Any]] = {}
        for exp in experiments:
            cell = row["cells"].get(column_of[exp])
            cells[exp] = {"column": column_of[exp],
                          "mean": None if cell is None else cell["mean"],
                          "std": None if cell is None else cell["std"],
                          "n": 0 if cell is None else cell["n"],
                          "paper": paper_value(row["model"], row["dataset"], exp)}
        if any(c["mean"] is not None for c in cells.values()):
            out.append({"model": row["model"], "model_dir": row["model_dir"],
                        "dataset": row["dataset"], "display": row["display"],
                        "cells": cells})
    return {"experiments": experiments, "rows": out}
