"""The report's pages: the terminal table (rich), Markdown and one self-contained HTML
page (inline CSS, figures as base64 PNG). Markdown and HTML render the same model of the
page's sections (`sections.sections`): only the syntax is here."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from typing import Any

from featcache.reporting.sections import (
    Block,
    Cell,
    Figures,
    Heading,
    Notes,
    Paragraph,
    Table,
    cell_parts,
    sections,
)
from featcache.reporting.summary import ReportData, columns_of

_RICH = {"value": "", "gain+": "green", "gain-": "red", "ci": "dim", "layer": "dim",
         "paper": "dim"}


def summary_table(rows: Sequence[dict], title: str | None = None,
                  columns: Sequence[str] | None = None) -> Any:
    """The terminal table (rich): model × dataset rows, method columns (``columns``: a
    subset of them, as `render_table` splits them to fit the terminal)."""
    from rich.table import Table

    table = Table(title=title, show_lines=True, header_style="bold")
    # Names and numbers are never broken inside a word (a cropped number is a wrong
    # number): `render_table` gives each table only the columns that fit.
    table.add_column("model", no_wrap=True)
    table.add_column("dataset", no_wrap=True)
    cols = list(columns_of(rows) if columns is None else columns)
    for col in cols:
        table.add_column(_header(col), justify="right", no_wrap=True)
    for row in rows:
        table.add_row(row["model_dir"], row["display"], *(_rich_cell(row, col) for col in cols))
    return table


def _header(col: str) -> str:
    """A method column's label: the variant (`[grid=quick]`: not rich markup) below the
    method, one setting a line, so that the label wraps at its commas, never in a word."""
    from rich.markup import escape

    return escape(col).replace(" \\[", "\n\\[").replace(", ", ",\n")


def _rich_cell(row: dict, col: str) -> str:
    cell = row["cells"][col]
    if cell is None:
        return "[dim]—[/]"
    return "\n".join(text.replace(" ± ", "±") if kind == "value" else f"[{_RICH[kind]}]{text}[/]"
                     for kind, text in cell_parts(cell, col))


def _width(text: str) -> int:
    from rich.text import Text

    return max((len(line) for line in Text.from_markup(text).plain.splitlines()), default=0)


def column_groups(rows: Sequence[dict], width: int) -> list[list[str]]:
    """The method columns in groups that fit `width` beside the model and dataset
    columns (each column: its widest line plus 3 for padding and a rule): 80 columns
    get two or three methods a table, wider terminals more."""
    names = 3 + max(_width(r["model_dir"]) for r in rows) + 3 + max(
        _width(r["display"]) for r in rows) + 1
    groups: list[list[str]] = [[]]
    used = names
    for col in columns_of(rows):
        need = 3 + max(_width(_header(col)), *(_width(_rich_cell(r, col)) for r in rows))
        if groups[-1] and used + need > width:
            groups.append([])
            used = names
        groups[-1].append(col)
        used += need
    return groups


def render_table(rows: Sequence[dict], console: Any = None, notes: Sequence[str] = ()) -> None:
    """Print the summary table (split by method columns where the terminal is too narrow
    for all of them), then the notes (missing methods, skipped records)."""
    if console is None:
        from rich.console import Console

        console = Console()
    n_runs = sum(c["n"] for r in rows for c in r["cells"].values() if c)
    title = (f"test balanced top-1 (%) — mean ± std over seeds, gain over linear "
             f"({n_runs} runs)")
    groups = column_groups(rows, console.width) if rows else [[]]
    for i, cols in enumerate(groups):
        part = f" — part {i + 1} of {len(groups)}" if len(groups) > 1 else ""
        console.print(summary_table(rows, title + part, cols))
    for note in notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)


# How each part of a cell reads in Markdown (None: left out: the paper's number of a cell
# has its own section there)
_MD_PART = {"value": "{}", "n": "(n={})", "gain+": "{}", "gain-": "{}", "ci": "{}",
            "layer": "@{}", "paper": None, "avg+": "({})", "avg-": "({})", "cover": "[{}]",
            "avg-paper": "{}"}


def _md_cell(cell: Cell) -> str:
    if cell is None:
        return "—"
    if isinstance(cell, str):
        return cell
    return " ".join(_MD_PART[kind].format(text) for kind, text in cell
                    if _MD_PART[kind] is not None)


def _md_block(block: Block) -> list[str]:
    if isinstance(block, Heading):
        return ["#" * block.level + " " + block.text]
    if isinstance(block, Paragraph):
        return [block.text]
    if isinstance(block, Table):
        n = len(block.header)
        return ["| " + " | ".join(block.header) + " |",
                "|" + "---|" * block.left + "---:|" * (n - block.left),
                *("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows)]
    if isinstance(block, Figures):
        lines = ["## Figures", ""]
        for fig in block.figures:
            lines += [f"### {fig.title}", "", fig.question, "",
                      f"![{fig.title}](figures/{fig.filename})", ""]
        return lines
    return [f"- {item}" for item in block.items]


def to_markdown(data: ReportData, figures: Sequence[Any] = ()) -> str:
    """report.md: the tables, paper comparison, figures (PNG files) and notes."""
    lines: list[str] = []
    for block in sections(data, figures):
        lines += _md_block(block)
        if not isinstance(block, Notes):  # the last block
            lines.append("")
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


# How each part of a cell reads in HTML: (its class, whether it starts a line of its own)
_HTML_PART = {"value": ("", False), "n": ("sub", False), "cover": ("sub", False),
              "gain+": ("gain pos", True), "gain-": ("gain neg", True),
              "avg+": ("gain pos", True), "avg-": ("gain neg", True), "ci": ("sub", True),
              "layer": ("sub", True), "paper": ("sub", True), "avg-paper": ("sub", True)}
_HTML_TEXT = {"n": " n={}", "cover": " [{}]"}


def _html_cell(cell: Cell, left: bool = False) -> str:
    if cell is None:
        return '<td class="absent" title="not run">—</td>'
    if isinstance(cell, str):
        return f'<td class="l">{_esc(cell)}</td>' if left else f"<td>{_esc(cell)}</td>"
    # the count and coverage sit beside the value; the rest below it, in order
    parts = sorted(cell, key=lambda p: 0 if p[0] == "value" else 1 if p[0] in _HTML_TEXT else 2)
    first, rest = parts[0], parts[1:]
    out = [_esc(first[1])]
    for kind, text in rest:
        cls, line = _HTML_PART[kind]
        text = _HTML_TEXT.get(kind, "{}").format(text)
        out.append(("<br>" if line else "") + f'<span class="{cls}">{_esc(text)}</span>')
    cls = _HTML_PART[first[0]][0]
    return (f'<td class="{cls}">' if cls else "<td>") + "".join(out) + "</td>"


def _html_table(table: Table) -> list[str]:
    head = "".join(f'<th class="l">{_esc(h)}</th>' if i < table.left else f"<th>{_esc(h)}</th>"
                   for i, h in enumerate(table.header))
    rows = ["<tr>" + "".join(_html_cell(c, i < table.left) for i, c in enumerate(row))
            + "</tr>" for row in table.rows]
    return [f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>', *rows,
            "</tbody></table></div>"]


def _html_figures(block: Figures) -> list[str]:
    out = ["<h2>Figures</h2>"]
    for fig in block.figures:
        b64 = base64.b64encode(fig.png).decode("ascii")
        out.append(f'<figure id="{_esc(fig.filename.rsplit(".", 1)[0])}"><h3>'
                   f"{_esc(fig.title)}</h3><figcaption>{_esc(fig.question)}</figcaption>"
                   f'<img alt="{_esc(fig.title)}" src="data:image/png;base64,{b64}">'
                   "</figure>")
    return out


def _html_block(block: Block) -> list[str]:
    if isinstance(block, Heading):
        return [f"<h{block.level}>{_esc(block.text)}</h{block.level}>"]
    if isinstance(block, Paragraph):
        text = re.sub(r"`([^`]+)`", r"<code>\1</code>", _esc(block.text))
        return [f'<p class="{block.style}">{text}</p>' if block.style else f"<p>{text}</p>"]
    if isinstance(block, Table):
        return _html_table(block)
    if isinstance(block, Figures):
        return _html_figures(block)
    return ['<ul class="notes">', *(f"<li>{_esc(item)}</li>" for item in block.items), "</ul>"]


def to_html(data: ReportData, figures: Sequence[Any] = ()) -> str:
    """report.html: one self-contained page (inline CSS, figures as base64 PNG)."""
    h: list[str] = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>featcache report</title>", f"<style>{_CSS}</style></head><body>"]
    for block in sections(data, figures):
        h += _html_block(block)
    h.append("</body></html>")
    return "\n".join(h) + "\n"
