"""The report's page as one model: its sections, in order, built once from `ReportData`.

`pages.to_markdown` and `pages.to_html` render this same list of blocks, so the two pages
cannot drift apart: a section added here appears in both. A block says what it shows
(a heading, a paragraph, a table of tagged cells, the figures, the notes); each renderer
says only how (Markdown syntax, HTML with its classes).

A table cell is plain text, None (a method not run), or its parts tagged by kind, in the
order they are read: ("value", "68.30 ± 0.41"), ("n", "3"), ("gain+", "+1.20*"), ("ci",
"[+0.31, +2.02]"), ("layer", "block7.cls"), ("paper", "paper 67.90"), and for the means
over datasets ("avg+"/"avg-" their gain, "cover" the datasets they cover, "avg-paper").
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from featcache.reporting.columns import is_baseline
from featcache.reporting.reference import paper_dataset_names, paper_models
from featcache.reporting.summary import (
    ReportData,
    columns_of,
    fmt_cell,
    fmt_gain,
    model_means,
    paper_layout,
    paper_pairs,
)

Part = tuple[str, str]
Cell = str | list[Part] | None


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    """Text with `code` in backticks; ``style``: "meta" (the byline), "sub" (small print)."""

    text: str
    style: str = ""


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[Cell]]
    left: int  # the leading columns that name things (left-aligned)


@dataclass(frozen=True)
class Figures:
    figures: Sequence[Any]  # rendered figures: title, question, filename, png


@dataclass(frozen=True)
class Notes:
    items: list[str]


Block = Heading | Paragraph | Table | Figures | Notes

PAPER_SCOPE = ("The paper reports " + ", ".join(paper_models()) + " (reference tap) on "
               + ", ".join(d for d in paper_dataset_names() if d != "imagenet1k")
               + " with methods linear, attentive, concat and alf (layer sets last, "
                 "middle+last, quarterly, all).")

_LEGEND = ("Test balanced top-1 accuracy (%): mean ± sample std over seeds (n = seeds); "
           "the signed number is the gain over the linear baseline (the model's own "
           "embedding at the last layer: CLS for the paper's models) of the "
           "same model and dataset, {intervals}"
           "— = that method was not run for that pair. "
           "`layers` = the single-layer linear probe whose layer was picked on validation "
           "(the layer is named). "
           "Columns: `concat:<layers>` = linear probe on concatenated CLS+AP tokens; "
           "`alf:all` = attentive layer fusion over every layer's CLS+AP. A model without "
           "a class token contributes AP alone, and one with a pool of its own adds it at "
           "the last layer (each run's record names its tokens).")

_LAYOUT_NOTE = ("Your runs of the paper's recipe in the ten columns of its per-dataset "
                "tables (results.csv's companion paper_layout.csv has the same), the "
                "paper's number in parentheses where model and dataset are in it.")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def legend(resamples: int) -> str:
    intervals = (f"with its paired bootstrap 95 % interval over test images in brackets "
                 f"({resamples:,} resamples); * = the interval excludes 0, so the gain is "
                 "not an accident of which test images were drawn. ") if resamples else \
        "(no intervals: --resamples 0). "
    return _LEGEND.format(intervals=intervals)


def cell_parts(cell: dict, col: str) -> list[Part]:
    """What a table cell says, in order and tagged, for every page to style its own way:
    the value, its gain over linear ("gain+" / "gain-"), the best layer, the paper's."""
    parts = [("value", fmt_cell(cell))]
    if not is_baseline(col) and cell["gain"] is not None:
        real = "*" if cell.get("ci_excludes_zero") else ""
        parts.append(("gain+" if cell["gain"] >= 0 else "gain-", fmt_gain(cell["gain"]) + real))
        if cell.get("ci"):
            parts.append(("ci", f"[{cell['ci']['low']:+.2f}, {cell['ci']['high']:+.2f}]"))
    if cell.get("best_layer"):
        parts.append(("layer", str(cell["best_layer"])))
    if cell["paper"] is not None:
        parts.append(("paper", f"paper {cell['paper']:.2f}"))
    return parts


def sections(data: ReportData, figures: Sequence[Any] = ()) -> list[Block]:
    """The page, top to bottom."""
    rows = data.rows
    return [
        Heading(1, "featcache report"),
        Paragraph(f"{len(data.records)} runs, {len(rows)} model/dataset pairs, read from "
                  f"`{data.runs_root}` on {now()}.", "meta"),
        Heading(2, "Balanced accuracy"),
        Paragraph(legend(data.resamples)),
        *_means(rows), *_per_pair(rows), *_beside_paper(rows), *_paper_layout(rows),
        *_more_tables(data),
        *([Figures(figures)] if figures else []),
        Heading(2, "Notes"),
        Notes(list(data.notes) or ["none: every method was run for every pair."]),
    ]


def _means(rows: Sequence[dict]) -> list[Block]:
    cols = columns_of(rows)
    body: list[list[Cell]] = [[e["model_dir"], *(_mean_cell(e, c) for c in cols)]
                              for e in model_means(rows)]
    return [Heading(3, "Means over datasets"),
            Paragraph("Mean of per-dataset means (gain over linear); [k/N] = datasets the "
                      "column covers; paper = the paper's mean over the same datasets.", "sub"),
            Table(["model", *cols], body, left=1)]


def _mean_cell(entry: dict, col: str) -> Cell:
    c = entry["cells"][col]
    if c is None:
        return None
    parts: list[Part] = [("value", f"{c['mean']:.2f}")]
    if not is_baseline(col) and c["gain"] is not None:
        parts.append(("avg+" if c["gain"] >= 0 else "avg-", fmt_gain(c["gain"])))
    parts.append(("cover", f"{c['n_datasets']}/{entry['n_datasets']}"))
    if c["paper"] is not None:
        parts.append(("avg-paper", f"paper {c['paper']:.2f}"))
    return parts


def _per_pair(rows: Sequence[dict]) -> list[Block]:
    cols = columns_of(rows)
    body: list[list[Cell]] = [
        [row["model_dir"], row["display"], *(_pair_cell(row["cells"][c], c) for c in cols)]
        for row in rows]
    return [Heading(3, "Per model and dataset"),
            Table(["model", "dataset", *cols], body, left=2)]


def _pair_cell(cell: dict | None, col: str) -> Cell:
    if cell is None:
        return None
    parts = cell_parts(cell, col)
    return [parts[0], ("n", str(cell["n"])), *parts[1:]]


def _gain_or_dash(pair: dict, key: str) -> str:
    return "—" if pair.get(key) is None or is_baseline(pair["column"]) else f"{pair[key]:+.2f}"


def _beside_paper(rows: Sequence[dict]) -> list[Block]:
    pairs = paper_pairs(rows)
    if not pairs:
        return [Heading(2, "Beside the paper"),
                Paragraph("None of these model/dataset/method combinations is in the paper. "
                          f"{PAPER_SCOPE}")]
    body: list[list[Cell]] = []
    for p in pairs:
        yours = f"{p['yours']:.2f}" + (f" ± {p['std']:.2f}" if p["std"] is not None else "")
        delta: list[Part] = [("gain+" if p["delta"] >= 0 else "gain-", f"{p['delta']:+.2f}")]
        body.append([p["model_dir"], p["display"], p["column"], yours, f"{p['paper']:.2f}",
                     delta, _gain_or_dash(p, "gain"), _gain_or_dash(p, "paper_gain")])
    return [Heading(2, "Beside the paper"),
            Paragraph("Published balanced top-1 of Ciernik et al. (2026) for the same model, "
                      "dataset and method (reference tap, one seed)."),
            Table(["model", "dataset", "method", "yours", "paper", "yours − paper",
                   "your gain over linear", "paper's gain over linear"], body, left=3)]


def _layout_text(cell: dict) -> str:
    """"68.30 ± 0.41 (paper 67.90)", "— (paper 67.90)" or "—"."""
    text = "—" if cell["mean"] is None else fmt_cell(cell)
    return text + (f" (paper {cell['paper']:.2f})" if cell["paper"] is not None else "")


def _paper_layout(rows: Sequence[dict]) -> list[Block]:
    layout = paper_layout(rows)
    if not layout["rows"]:
        return []
    exps = layout["experiments"]
    body: list[list[Cell]] = [
        [r["model_dir"], r["display"], *(_layout_text(r["cells"][e]) for e in exps)]
        for r in layout["rows"]]
    return [Heading(3, "In the paper's layout"), Paragraph(_LAYOUT_NOTE, "sub"),
            Table(["model", "dataset", *exps], body, left=2)]


def _more_tables(data: ReportData) -> list[Block]:
    """Significance across datasets, results under shift: where the runs have them (each
    a titled table of plain text cells, left-aligned as Markdown has always shown them)."""
    from featcache.reporting import significance, under_shift

    out: list[Block] = []
    for table in (significance.section(data.rows), under_shift.section(data.records)):
        if table:
            out += [Heading(2, table["title"]), Paragraph(table["intro"], "sub"),
                    Table(list(table["header"]), [list(r) for r in table["rows"]],
                          left=len(table["header"]))]
    return out
