"""The report's table "Under shift": the evaluations `featcache evaluate`
(`featcache.serving.shift`) keeps beside each run, in `<run>/shift/<dataset>-<split>.json`,
read back for `report.md`/`report.html` and `report.json`'s `under_shift`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SHIFT_DIR = "shift"


def shift_results(run_dir: str | Path) -> list[dict[str, Any]]:
    """A run's kept evaluations (unreadable files are skipped)."""
    folder = Path(run_dir) / SHIFT_DIR
    out = []
    for file in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            item = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(item, dict) and isinstance(item.get("metrics"), dict):
            out.append(item)
    return out


def shift_table(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Every run's kept evaluations: {"columns": test sets, "rows": [{run…, "cells":
    {test set: metrics}}]}; rows are runs, in the records' order."""
    from featcache.probing.methods import method_of

    columns: list[str] = []
    rows = []
    for rec in records:
        found = shift_results(rec["path"])
        if not found:
            continue
        cells = {}
        for item in found:
            name = f"{item.get('test_dataset')} ({item.get('split')})"
            cells[name] = item["metrics"]
            if name not in columns:
                columns.append(name)
        spec = method_of(rec.get("method"))
        rows.append({"model_dir": rec.get("model_dir"), "dataset": rec.get("dataset"),
                     "column": spec.column(rec.get("layer_set")) if spec else rec.get("method"),
                     "seed": rec.get("seed"), "path": rec.get("path"),
                     "own_test": (rec.get("metrics") or {}).get("balanced_top1"),
                     "cells": cells})
    return {"columns": columns, "rows": rows}


def section(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The report's table "Under shift": balanced top-1 of each run on the test sets it
    was evaluated on (`featcache evaluate`), beside its own test set's."""
    table = shift_table(records)
    if not table["rows"]:
        return None
    body = []
    for row in table["rows"]:
        cells = [row["cells"].get(c) for c in table["columns"]]
        body.append([str(row["model_dir"]), str(row["dataset"]), str(row["column"]),
                     str(row["seed"]), _pct(row["own_test"]),
                     *(_pct(c.get("balanced_top1")) if c else "—" for c in cells)])
    return {"title": "Under shift",
            "intro": ("Balanced top-1 (%) of each run's selected probe on other test sets of "
                      "the same backbone (`featcache evaluate`; classes matched by name, "
                      "logits restricted to a test set's classes), beside its own test set."),
            "header": ["model", "trained on", "method", "seed", "own test",
                       *table["columns"]],
            "rows": body, "data": table}


def _pct(value: Any) -> str:
    return "—" if not isinstance(value, (int, float)) else f"{value:.2f}"
