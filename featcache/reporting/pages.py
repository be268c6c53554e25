"""The report's pages: the terminal table (rich), Markdown and one self-contained HTML
page (inline CSS, figures as base64 PNG)."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import re
from collections.abc import Sequence
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


def cell_parts(cell: dict, col: str) -> list[tuple[str, str]]:
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


_RICH = {"value": "", "gain+": "green", "gain-": "red", "ci": "dim", "layer": "dim",
         "paper": "dim"}


def summary_table(rows: Sequence[dict], title: str | None = None) -> Any:
    """The terminal table (rich): model × dataset rows, method columns."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, show_lines=True, header_style="bold")
    # Names may fold onto several lines; numbers never (a cropped number is a wrong number).
    table.add_column("model", overflow="fold", ratio=2, min_width=10)
    table.add_column("dataset", overflow="fold", ratio=1, min_width=8)
    cols = columns_of(rows)
    for col in cols:  # the variant (`[grid=quick]`: not rich markup) on a line of its own
        table.add_column(escape(col).replace(" \\[", "\n\\["), justify="right",
                         no_wrap=True, min_width=11)
    for row in rows:
        cells = []
        for col in cols:
            cell = row["cells"][col]
            if cell is None:
                cells.append("[dim]—[/]")
                continue
            cells.append("\n".join(text.replace(" ± ", "±") if kind == "value"
                                   else f"[{_RICH[kind]}]{text}[/]"
                                   for kind, text in cell_parts(cell, col)))
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


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _cell_text(cell: dict | None, col: str) -> str:
    """A Markdown cell (the paper's numbers have their own section there)."""
    if cell is None:
        return "—"
    marks = {"value": f"{{}} (n={cell['n']})", "gain+": "{}", "gain-": "{}", "ci": "{}",
             "layer": "@{}"}
    return " ".join(marks[kind].format(text) for kind, text in cell_parts(cell, col)
                    if kind in marks)


_PAPER_SCOPE = ("The paper reports " + ", ".join(paper_models()) + " (reference tap) on "
                + ", ".join(d for d in paper_dataset_names() if d != "imagenet1k")
                + " with methods linear, attentive, concat and alf (layer sets last, "
                  "middle+last, quarterly, all).")


def _gain_or_dash(pair: dict, key: str) -> str:
    return "—" if pair.get(key) is None or is_baseline(pair["column"]) else f"{pair[key]:+.2f}"


def _legend(resamples: int) -> str:
    intervals = (f"with its paired bootstrap 95 % interval over test images in brackets "
                 f"({resamples:,} resamples); * = the interval excludes 0, so the gain is "
                 "not an accident of which test images were drawn. ") if resamples else \
        "(no intervals: --resamples 0). "
    return _LEGEND.format(intervals=intervals)


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


def _layout_text(cell: dict) -> str:
    """"68.30 ± 0.41 (paper 67.90)", "— (paper 67.90)" or "—"."""
    text = "—" if cell["mean"] is None else fmt_cell(cell)
    return text + (f" (paper {cell['paper']:.2f})" if cell["paper"] is not None else "")


def to_markdown(data: ReportData, figures: Sequence[Any] = ()) -> str:
    """report.md: the tables, paper comparison, figures (PNG files) and notes."""
    rows, cols = data.rows, columns_of(data.rows)
    lines = [
        "# featcache report", "",
        f"{len(data.records)} runs, {len(rows)} model/dataset pairs, read from "
        f"`{data.runs_root}` on {_now()}.", "",
        "## Balanced accuracy", "", _legend(data.resamples), "",
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
    layout = paper_layout(rows)
    if layout["rows"]:
        exps = layout["experiments"]
        lines += ["", "### In the paper's layout", "", _LAYOUT_NOTE, "",
                  "| model | dataset | " + " | ".join(exps) + " |",
                  "|---|---|" + "---:|" * len(exps)]
        for lrow in layout["rows"]:
            lines.append(f"| {lrow['model_dir']} | {lrow['display']} | "
                         + " | ".join(_layout_text(lrow["cells"][e]) for e in exps) + " |")
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
    classes = {"gain+": "gain pos", "gain-": "gain neg", "ci": "sub", "layer": "sub",
               "paper": "sub"}
    parts = []
    for kind, text in cell_parts(cell, col):
        if kind == "value":
            parts += [_esc(text), f'<span class="sub"> n={cell["n"]}</span>']
        else:
            parts.append(f'<br><span class="{classes[kind]}">{_esc(text)}</span>')
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
        "<p>" + re.sub(r"`([^`]+)`", r"<code>\1</code>", _esc(_legend(data.resamples))) + "</p>",
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
    layout = paper_layout(rows)
    if layout["rows"]:
        exps = layout["experiments"]
        h += ["<h3>In the paper's layout</h3>", f'<p class="sub">{_esc(_LAYOUT_NOTE)}</p>',
              '<div class="scroll"><table><thead><tr><th class="l">model</th>'
              '<th class="l">dataset</th>' + "".join(f"<th>{_esc(e)}</th>" for e in exps)
              + "</tr></thead><tbody>"]
        for lrow in layout["rows"]:
            h.append(f'<tr><td class="l">{_esc(lrow["model_dir"])}</td>'
                     f'<td class="l">{_esc(lrow["display"])}</td>'
                     + "".join(f"<td>{_esc(_layout_text(lrow['cells'][e]))}</td>"
                               for e in exps) + "</tr>")
        h.append("</tbody></table></div>")
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
