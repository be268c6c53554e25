"""The report's figures (matplotlib, Agg, no pyplot state), each answering a paper question.

1. Does fusing layers beat the linear probe, and where?  -> gain overview + gain heatmap
2. Which layers does the ALF head attend to per task?    -> attention heatmaps
3. Are early layers dissimilar yet still predictive?     -> accuracy by depth beside CKA
4. Do my numbers match the published ones?               -> yours-vs-paper scatter
Every function returns None when the records hold nothing for it, so a report on a
partial set of runs simply has fewer figures (and its notes say what is missing).
"""

from __future__ import annotations

import io
import math
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg", force=False)

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from featcache.probing.methods import method_of  # noqa: E402
from featcache.registry import FIGURES  # noqa: E402
from featcache.reporting.columns import baseline_of, is_baseline  # noqa: E402
from featcache.reporting.reference import display_name  # noqa: E402
from featcache.reporting.summary import dataset_sort, paper_pairs, per_layer  # noqa: E402
from featcache.text import slug  # noqa: E402

DPI = 100
ANNOTATE_LIMIT = 400  # cells per figure above which only summary cells get numbers
LINE_PANELS_MAX = 6  # datasets per model drawn as line panels; more become heatmaps
TIGHT_MAX_AREA = 150.0  # square inches; smaller figures are cropped to a tight bbox
_MARKERS = "osD^vP*Xh<>p"


@dataclass
class RenderedFigure:
    """A figure as PNG bytes plus what it is for (used as caption in md/html)."""

    title: str
    question: str
    filename: str
    png: bytes


def to_png(fig: Figure, dpi: int = DPI) -> bytes:
    """Render a figure to PNG bytes (Agg canvas, no display needed).

    Small figures are cropped to their tight bounding box so a long title or legend is
    never cut off; large ones (many panels, where that costs a second full draw) rely on
    constrained layout alone.
    """
    buf = io.BytesIO()
    width, height = fig.get_size_inches()
    tight = "tight" if width * height <= TIGHT_MAX_AREA else None
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches=tight)
    return buf.getvalue()


def _colours(keys: Sequence[str]) -> dict[str, Any]:
    """A stable colour per method column, the same in every figure."""
    cmap = matplotlib.colormaps["tab10"]
    return {k: cmap(i % 10) for i, k in enumerate(keys)}


def _layer_pos(name: str) -> float:
    """Depth order of a layer name: "block3" -> 3, "final" after every block."""
    if name in ("final", "last", "head", "out"):
        return 1e6
    m = re.search(r"(\d+)$", name)
    return float(m.group(1)) if m else 1e5


def _short_layer(name: str) -> str:
    return re.sub(r"^block", "b", name)


def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = max(1, min(max_cols, n))
    return math.ceil(n / cols), cols


def _models(rows: Sequence[dict]) -> list[str]:
    seen: list[str] = []
    for row in rows:
        if row["model_dir"] not in seen:
            seen.append(row["model_dir"])
    return seen


# -- 1. gains --------------------------------------------------------------------------
def gain_overview(rows: Sequence[dict]) -> Figure | None:
    """Mean gain over linear per method, one group of bars per model (error: std over datasets)."""
    cols = [c for c in (list(rows[0]["cells"]) if rows else []) if not is_baseline(c)]
    models = _models(rows)
    stats: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row in rows:
        for col in cols:
            cell = row["cells"][col]
            if cell is not None and cell["gain"] is not None:
                stats[(row["model_dir"], col)].append(cell["gain"])
    if not stats:
        return None
    colours = _colours(list(rows[0]["cells"]))
    width = 0.8 / max(1, len(cols))
    fig = Figure(figsize=(max(6.0, 1.2 + len(models) * (0.35 * len(cols) + 0.6)), 4.2),
                 layout="constrained")
    ax = fig.add_subplot()
    for j, col in enumerate(cols):
        xs, ys, es, ns = [], [], [], []
        for i, model in enumerate(models):
            vals = stats.get((model, col))
            if not vals:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(float(np.mean(vals)))
            es.append(float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0)
            ns.append(len(vals))
        if xs:
            ax.bar(xs, ys, width=width * 0.95, yerr=es, capsize=2, color=colours[col],
                   label=col, edgecolor="white", linewidth=0.5)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels(models, rotation=15 if len(models) > 3 else 0, ha="right"
                       if len(models) > 3 else "center")
    ax.set_ylabel("gain over linear (balanced top-1, points)")
    ax.set_title("Mean gain over the linear baseline across datasets")
    # as many legend columns as fit: four variant labels side by side ("alf:all [epochs=2,
    # grid=quick, min_steps=20]") are wider than the figure and collapse its layout
    longest = max(len(c) for c in cols)
    ax.legend(fontsize=8, ncols=max(1, min(4, len(cols), 72 // longest)), loc="best")
    ax.grid(axis="y", alpha=0.3)
    return fig


def gain_heatmap(rows: Sequence[dict]) -> Figure | None:
    """Per model: datasets × methods, coloured and labelled by gain over linear; — = not run."""
    cols = [c for c in (list(rows[0]["cells"]) if rows else []) if not is_baseline(c)]
    models = _models(rows)
    if not cols or not any(r["cells"].get(baseline_of(c)) for r in rows for c in cols):
        return None
    mats = {}
    for model in models:
        mrows = [r for r in rows if r["model_dir"] == model]
        with_mean = len(mrows) > 1  # a mean over one dataset would repeat its row
        mat = np.full((len(mrows) + int(with_mean), len(cols)), np.nan)
        for i, row in enumerate(mrows):
            for j, col in enumerate(cols):
                cell = row["cells"][col]
                if cell is not None and cell["gain"] is not None:
                    mat[i, j] = cell["gain"]
        if with_mean:
            with np.errstate(all="ignore"):
                for j in range(len(cols)):
                    col_vals = mat[:-1, j]
                    if np.isfinite(col_vals).any():
                        mat[-1, j] = np.nanmean(col_vals)
        mats[model] = (mat, [r["display"] for r in mrows] + (["mean"] if with_mean else []),
                       with_mean)
    # Clip the colour scale at the 95th percentile so one huge gain (SVHN) does not wash
    # out the rest; the numbers and the colour bar's arrows say where it is clipped.
    every = np.concatenate([m[0].ravel() for m in mats.values()])
    every = np.abs(every[np.isfinite(every)])
    vmax = max(0.5, float(np.percentile(every, 95))) if every.size else 1.0
    nrows, ncols = _grid(len(models))
    tallest = max(len(m[1]) for m in mats.values())
    # Column names at 45° take height: a variant label ("alf:all [epochs=1, grid=quick]")
    # collapsed a one-dataset panel to nothing without these extra inches.
    labels_h = 0.06 * max(0, max(len(c) for c in cols) - 10)
    fig = Figure(figsize=(ncols * (2.4 + 0.75 * len(cols)),
                          nrows * (1.4 + 0.32 * tallest + labels_h)), layout="constrained")
    cmap = matplotlib.colormaps["RdBu"].with_extremes(bad="#eeeeee")
    image = None
    # Text is the slow part of matplotlib: number every cell only while that stays cheap
    # (the tables carry every number anyway); the mean row is always numbered.
    annotate_all = sum(m[0].size for m in mats.values()) <= ANNOTATE_LIMIT
    for k, model in enumerate(models):
        mat, labels, with_mean = mats[model]
        ax = fig.add_subplot(nrows, ncols, k + 1)
        image = ax.imshow(np.ma.masked_invalid(mat), cmap=cmap, vmin=-vmax, vmax=vmax,
                          aspect="auto")
        numbered = range(mat.shape[0]) if annotate_all else [mat.shape[0] - 1]
        for i in numbered:
            for j in range(mat.shape[1]):
                v = mat[i, j]
                text = "—" if not np.isfinite(v) else f"{v:+.1f}"
                dark = np.isfinite(v) and abs(v) > 0.6 * vmax
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="white" if dark else "black",
                        fontweight="bold" if with_mean and i == mat.shape[0] - 1
                        else "normal")
        if with_mean:
            ax.axhline(mat.shape[0] - 1.5, color="black", linewidth=0.8)
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels(cols, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_title(model, fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=fig.axes, shrink=0.8, label="gain over linear (points)",
                     extend="both" if every.size and every.max() > vmax else "neither")
    return fig


# -- 2. ALF attention --------------------------------------------------------------------
def _attention_of(rec: dict) -> tuple[list[str], list[float]] | None:
    att = rec.get("attention")
    if not isinstance(att, dict) or not isinstance(att.get("mean"), list):
        return None
    tokens = att.get("tokens") or rec.get("tokens")
    if not isinstance(tokens, list) or len(tokens) != len(att["mean"]):
        return None
    try:
        return [str(t) for t in tokens], [float(v) for v in att["mean"]]
    except (TypeError, ValueError):
        return None


def attention_heatmaps(records: Sequence[dict], dataset_label: Any = None) -> Figure | None:
    """Per model (and ALF layer set): datasets × input tokens, mean attention over seeds."""
    label = dataset_label or (lambda d: d)
    groups: dict[tuple[str, str], dict[str, list[tuple[list[str], list[float]]]]] = (
        defaultdict(lambda: defaultdict(list)))
    for rec in records:
        spec = method_of(rec.get("method"))
        if spec is None or not spec.heatmap:
            continue
        att = _attention_of(rec)
        if att is not None:
            groups[(str(rec["model_dir"]), str(rec.get("layer_set") or "all"))][
                str(rec["dataset"])].append(att)
    if not groups:
        return None

    # One panel per model: ALF over all layers when run, else its widest layer set.
    best: dict[str, tuple[str, str]] = {}
    cur_width: dict[str, int] = {}
    for model, layer_set in groups:
        width = max(len(t) for runs in groups[(model, layer_set)].values() for t, _ in runs)
        cur = best.get(model)
        if cur is None or (layer_set == "all", width) > (cur[1] == "all", cur_width[model]):
            best[model] = (model, layer_set)
            cur_width[model] = width
    panels = []
    for key in sorted(best.values()):
        (model, layer_set), by_ds = key, groups[key]
        tokens: list[str] = []
        for runs in by_ds.values():
            for toks, _ in runs:
                tokens.extend(t for t in toks if t not in tokens)
        datasets = sorted(by_ds, key=dataset_sort)
        mat = np.full((len(datasets), len(tokens)), np.nan)
        for i, ds in enumerate(datasets):
            acc = np.zeros(len(tokens))
            cnt = np.zeros(len(tokens))
            for toks, weights in by_ds[ds]:
                for t, w in zip(toks, weights, strict=True):
                    acc[tokens.index(t)] += w
                    cnt[tokens.index(t)] += 1
            with np.errstate(invalid="ignore"):
                mat[i] = np.where(cnt > 0, acc / np.maximum(cnt, 1), np.nan)
        panels.append((f"{model} — alf:{layer_set}", datasets, tokens, mat))
    most_tokens = max(len(p[2]) for p in panels)
    nrows, ncols = _grid(len(panels), 2 if most_tokens <= 30 else 1)
    tallest = max(len(p[1]) for p in panels)
    fig = Figure(figsize=(ncols * max(6.0, 2.6 + 0.2 * most_tokens),
                          nrows * (1.7 + 0.24 * tallest)), layout="constrained")
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#eeeeee")
    annotate = sum(p[3].size for p in panels) <= ANNOTATE_LIMIT
    for k, (title, datasets, tokens, mat) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        image = ax.imshow(np.ma.masked_invalid(mat), cmap=cmap, aspect="auto", vmin=0)
        ax.set_title(title, fontsize=10)
        ax.set_yticks(range(len(datasets)))
        ax.set_yticklabels([label(d) for d in datasets], fontsize=8)
        ax.set_xticks(range(len(tokens)))
        ax.set_xticklabels([_short_layer(t) for t in tokens], rotation=90, fontsize=7)
        if annotate:
            top = np.nanmax(mat) if np.isfinite(mat).any() else 1.0
            for i in range(mat.shape[0]):
                for j in range(mat.shape[1]):
                    if np.isfinite(mat[i, j]):
                        ax.text(j, i, f"{100 * mat[i, j]:.0f}", ha="center", va="center",
                                fontsize=6, color="black" if mat[i, j] > 0.6 * top else "white")
        fig.colorbar(image, ax=ax, shrink=0.9, label="mean attention")
    return fig


# -- 3. depth ---------------------------------------------------------------------------
def _per_layer_curves(recs: Sequence[dict]) -> dict[str, dict[str, float]]:
    """{token kind: {layer: mean balanced top-1 over seeds}} from `layers` runs."""
    sums: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for rec in recs:
        for entry in rec.get("per_layer") or []:
            if not isinstance(entry, dict):
                continue
            try:
                value = float(entry["balanced_top1"])
            except (KeyError, TypeError, ValueError):
                continue
            sums[str(entry.get("token", "cls"))][str(entry.get("layer"))].append(value)
    return {tok: {layer: float(np.mean(v)) for layer, v in d.items()} for tok, d in sums.items()}


def _is_knn(rec: dict) -> bool:
    from featcache.probing.methods import method_of

    spec = method_of(rec.get("method"))
    return spec is not None and spec.head == "knn"


def depth_figure(model_dir: str, records: Sequence[dict], rows: Sequence[dict],
                 cka: dict[tuple[str, str], dict], dataset_label: Any = None) -> Figure | None:
    """Per dataset of one model: probe accuracy by layer (left axis) beside CKA to the last
    layer (right axis), with the linear and ALF results as reference lines."""
    label = dataset_label or (lambda d: d)

    by_ds: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        if per_layer(rec.get("method")) and str(rec["model_dir"]) == model_dir:
            by_ds[str(rec["dataset"])].append(rec)
    knn = {d: [r for r in recs if _is_knn(r)] for d, recs in by_ds.items()}
    by_ds = {d: [r for r in recs if not _is_knn(r)] for d, recs in by_ds.items()}
    datasets = sorted((d for d in by_ds if _per_layer_curves(by_ds[d])
                       or _per_layer_curves(knn[d])), key=dataset_sort)
    if not datasets:
        return None
    if len(datasets) > LINE_PANELS_MAX:  # (linear probes by depth; k-NN in the JSON)
        return _depth_heatmaps(model_dir, {d: _per_layer_curves(by_ds[d]) for d in datasets},
                               cka, label)
    cells = {r["dataset"]: r["cells"] for r in rows if r["model_dir"] == model_dir}
    nrows, ncols = _grid(len(datasets))
    fig = Figure(figsize=(max(6.5, 4.6 * ncols), 3.4 * nrows + 0.9), layout="constrained")
    handles: dict[str, Any] = {}
    for k, ds in enumerate(datasets):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        curves = _per_layer_curves(by_ds[ds])
        sim = cka.get((model_dir, ds)) or {}
        layers = {layer for c in [*curves.values(), *_per_layer_curves(knn[ds]).values()]
                  for layer in c} | set(sim.get("layers") or [])
        order = sorted(layers, key=lambda n: (_layer_pos(n), n))
        x = {name: i for i, name in enumerate(order)}
        for tok, style in (("cls", "-o"), ("ap", "-s")):
            curve = curves.get(tok)
            if curve:
                names = sorted(curve, key=lambda n: x[n])
                (h,) = ax.plot([x[n] for n in names], [curve[n] for n in names], style,
                               markersize=3, label=f"probe {tok.upper()}",
                               color="#0969da" if tok == "cls" else "#bf8700")
                handles.setdefault(h.get_label(), h)
        for tok, curve in _per_layer_curves(knn[ds]).items():  # k-NN by depth, dashed
            names = sorted(curve, key=lambda n: x.get(n, len(x)))
            (h,) = ax.plot([x[n] for n in names if n in x], [curve[n] for n in names if n in x],
                           "--^" if tok == "cls" else "--v", markersize=3,
                           label=f"k-NN {tok.upper()}",
                           color="#0969da" if tok == "cls" else "#bf8700", alpha=0.7)
            handles.setdefault(h.get_label(), h)
        for col, colour, ls in (("linear", "black", "--"), ("alf:all", "#8250df", ":")):
            cell = (cells.get(ds) or {}).get(col)
            if cell is not None:
                h = ax.axhline(cell["mean"], color=colour, linestyle=ls, linewidth=1.2,
                               label=f"{col} (mean)")
                handles.setdefault(h.get_label(), h)
        ax.set_ylabel("balanced top-1 (%)", fontsize=8)
        ax.set_title(label(ds), fontsize=10)
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels([_short_layer(n) for n in order], rotation=90, fontsize=7)
        ax.grid(alpha=0.3)
        ax2 = ax.twinx()
        ax2.set_ylim(0, 1.05)
        if sim.get("layers"):
            for tok, ls in (("cls", "-"), ("ap", "--")):
                vals = sim.get(tok)
                if vals and len(vals) == len(sim["layers"]):
                    pts = [(x[n], v) for n, v in zip(sim["layers"], vals, strict=True)
                           if v is not None and np.isfinite(v)]
                    if pts:
                        (h,) = ax2.plot(*zip(*pts, strict=True), ls, color="#6e7781",
                                        linewidth=1.2, alpha=0.9,
                                        label=f"CKA to last ({tok.upper()})")
                        handles.setdefault(h.get_label(), h)
            ax2.set_ylabel("linear CKA to last layer", fontsize=8, color="#57606a")
        else:
            ax2.set_yticks([])
            ax2.text(0.98, 0.03, "CKA: not computed", transform=ax.transAxes, ha="right",
                     fontsize=7, color="#6e7781")
    fig.suptitle(f"{model_dir}\naccuracy by depth beside similarity to the last layer",
                 fontsize=10)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center",
               ncols=min(3 * ncols, len(handles)), fontsize=8)
    return fig


def _depth_heatmaps(model_dir: str, curves: dict[str, dict[str, dict[str, float]]],
                    cka: dict[tuple[str, str], dict], label: Any) -> Figure:
    """The many-datasets form of the depth figure: datasets × layers, four panels side by
    side: accuracy minus the last layer's (CLS, AP), then CKA to the last layer (CLS, AP)."""
    datasets = list(curves)
    layers: set[str] = set()
    for ds in datasets:
        layers |= {layer for c in curves[ds].values() for layer in c}
        layers |= set((cka.get((model_dir, ds)) or {}).get("layers") or [])
    order = sorted(layers, key=lambda n: (_layer_pos(n), n))
    col = {name: j for j, name in enumerate(order)}
    last = order[-1]
    acc = {tok: np.full((len(datasets), len(order)), np.nan) for tok in ("cls", "ap")}
    sim = {tok: np.full((len(datasets), len(order)), np.nan) for tok in ("cls", "ap")}
    for i, ds in enumerate(datasets):
        for tok in ("cls", "ap"):
            curve = curves[ds].get(tok) or {}
            ref = curve.get(last)
            for name, value in curve.items():
                if ref is not None:
                    acc[tok][i, col[name]] = value - ref
            entry = cka.get((model_dir, ds)) or {}
            vals = entry.get(tok) or []
            for name, value in zip(entry.get("layers") or [], vals, strict=False):
                if value is not None and np.isfinite(value):
                    sim[tok][i, col[name]] = value
    span = max(1.0, float(np.nanmax(np.abs(np.concatenate([a.ravel() for a in acc.values()]))))
               if any(np.isfinite(a).any() for a in acc.values()) else 1.0)
    fig = Figure(figsize=(4 * (0.9 + 0.22 * len(order)) + 2.0, 1.8 + 0.24 * len(datasets)),
                 layout="constrained")
    axes = fig.subplots(1, 4, sharey=True)
    diverging = matplotlib.colormaps["RdBu"].with_extremes(bad="#eeeeee")
    sequential = matplotlib.colormaps["viridis"].with_extremes(bad="#eeeeee")
    panels = ((acc["cls"], "probe CLS − last layer", diverging, -span, span),
              (acc["ap"], "probe AP − last layer", diverging, -span, span),
              (sim["cls"], "CKA to last (CLS)", sequential, 0.0, 1.0),
              (sim["ap"], "CKA to last (AP)", sequential, 0.0, 1.0))
    images = []
    for ax, (mat, title, cmap, lo, hi) in zip(axes, panels, strict=True):
        images.append(ax.imshow(np.ma.masked_invalid(mat), cmap=cmap, vmin=lo, vmax=hi,
                                aspect="auto"))
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels([_short_layer(n) for n in order], rotation=90, fontsize=7)
    axes[0].set_yticks(range(len(datasets)))
    axes[0].set_yticklabels([label(d) for d in datasets], fontsize=8)
    fig.colorbar(images[1], ax=list(axes[:2]), shrink=0.8, label="balanced top-1 (points)")
    fig.colorbar(images[3], ax=list(axes[2:]), shrink=0.8, label="linear CKA")
    fig.suptitle(f"{model_dir}: accuracy by depth beside similarity to the last layer "
                 "(grey: not available)", fontsize=10)
    return fig


# -- 4. paper -----------------------------------------------------------------------------
def paper_scatter(rows: Sequence[dict]) -> Figure | None:
    """Your balanced accuracy against the published one, per (model, dataset, method)."""

    pairs = paper_pairs(rows)
    if not pairs:
        return None
    cols = list(rows[0]["cells"])
    colours = _colours(cols)
    models = sorted({p["model_dir"] for p in pairs})
    fig = Figure(figsize=(6.4, 6.0), layout="constrained")
    ax = fig.add_subplot()
    vals = [p["yours"] for p in pairs] + [p["paper"] for p in pairs]
    lo, hi = min(vals), max(vals)
    pad = max(1.0, 0.05 * (hi - lo))
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="#8c959f", linewidth=1,
            linestyle="--", label="yours = paper")
    for col in cols:
        for k, model in enumerate(models):
            sel = [p for p in pairs if p["column"] == col and p["model_dir"] == model]
            if not sel:
                continue
            ax.errorbar([p["paper"] for p in sel], [p["yours"] for p in sel],
                        yerr=[p["std"] or 0.0 for p in sel], fmt=_MARKERS[k % len(_MARKERS)],
                        color=colours[col], markersize=6, capsize=2, linestyle="none",
                        label=col if k == min(i for i, m in enumerate(models) if any(
                            p["model_dir"] == m and p["column"] == col for p in pairs))
                        else None)
    if len(pairs) <= 30:
        for p in pairs:
            ax.annotate(p["display"], (p["paper"], p["yours"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points", color="#57606a")
    if len(models) > 1:
        for i, m in enumerate(models):
            ax.plot([], [], _MARKERS[i % len(_MARKERS)], color="#57606a", label=m)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_aspect("equal")
    ax.set_xlabel("paper: balanced top-1 (%)")
    ax.set_ylabel("yours: balanced top-1 (%), mean ± std over seeds")
    ax.set_title("Your runs beside the published numbers")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return fig


# -- all --------------------------------------------------------------------------------
@dataclass(frozen=True)
class FigureInput:
    """What a figure is drawn from: the summary rows, the run records and the layer CKA."""

    rows: Sequence[dict]
    records: Sequence[dict]
    cka: dict[tuple[str, str], dict]


@dataclass(frozen=True)
class FigureSpec:
    """A report figure. ``draw(FigureInput)`` returns a matplotlib Figure, or None when the
    records hold nothing for it; with ``per_model`` it is drawn once per model,
    ``draw(FigureInput, model_dir)``. The file is `<name>.png` (`<name>_<model>.png`)."""

    name: str
    draw: Callable[..., Figure | None]
    title: str
    question: str
    per_model: bool = False


def register_figure(name: str, draw: Callable[..., Figure | None] | None = None, *,
                    title: str, question: str = "", per_model: bool = False,
                    replace_existing: bool = False) -> Any:
    """Add a figure to every report (`featcache report`'s HTML and Markdown): called with
    ``draw`` or used as a decorator on it."""
    def add(func: Callable[..., Figure | None]) -> Callable[..., Figure | None]:
        FIGURES.add(name, FigureSpec(name, func, title, question, per_model),
                    replace=replace_existing)
        return func

    return add(draw) if draw is not None else add


def all_figures(rows: Sequence[dict], records: Sequence[dict],
                cka: dict[tuple[str, str], dict]) -> list[RenderedFigure]:
    """Every registered figure the records support, rendered to PNG (closed after)."""
    data = FigureInput(rows, records, cka)
    out: list[RenderedFigure] = []
    for _, spec in FIGURES.items():
        drawn = ([(f"{spec.title} — {m}", f"{spec.name}_{slug(m)}.png", spec.draw(data, m))
                  for m in _models(rows)] if spec.per_model
                 else [(spec.title, f"{spec.name}.png", spec.draw(data))])
        for title, filename, fig in drawn:
            if fig is not None:
                out.append(RenderedFigure(title, spec.question, filename, to_png(fig)))
                fig.clear()
    return out


register_figure(
    "gain_overview", lambda d: gain_overview(d.rows),
    title="Gain over the linear baseline, per model",
    question="Does reading more layers (concat, ALF) beat the linear probe of the last "
             "layer's embedding (CLS for the paper's models), "
    "on average over your datasets? Bars: mean gain; whiskers: std over datasets.")
register_figure(
    "gain_heatmap", lambda d: gain_heatmap(d.rows),
    title="Gain over the linear baseline, per dataset",
    question="Where does it help? Gain in points of balanced accuracy per dataset and method "
    "(last row: mean); grey — = method not run for that pair.")
register_figure(
    "alf_attention", lambda d: attention_heatmaps(d.records, display_name),
    title="ALF attention over input tokens",
    question="Which layers does the attentive layer-fusion head read for each task? Mean "
    "attention weight per input token (CLS/AP of each layer), averaged over test images "
    "and seeds (numbers: %).")
register_figure(
    "depth", lambda d, model: depth_figure(model, d.records, d.rows, d.cka, display_name),
    title="Accuracy by depth beside CKA",
    question="Are early layers dissimilar to the last one (low CKA, grey) while still "
    "predictive (per-layer linear probes; k-NN by depth dashed, where `knn-layers` ran)? "
    "Dashed horizontal: linear baseline; dotted: ALF.",
    per_model=True)
register_figure(
    "critical_difference", lambda d, model: _cd_figure(d.rows, model),
    title="Critical-difference diagram",
    question="Which methods are told apart across datasets? Mean rank per method (1 = best) "
    "over the datasets every method was run on; methods joined by a bar differ by less than "
    "Nemenyi's critical difference (α = 0.05; Demšar 2006).", per_model=True)


def _cd_figure(rows: Sequence[dict], model_dir: str) -> Figure | None:
    from featcache.reporting.significance import cd_figure, significance

    entry = next((e for e in significance([r for r in rows if r["model_dir"] == model_dir])
                  if e.get("friedman") and e["friedman"]["k"] >= 3), None)
    return cd_figure(entry) if entry is not None else None


register_figure(
    "paper_comparison", lambda d: paper_scatter(d.rows),
    title="Your numbers beside the paper's",
    question="For models and datasets in Ciernik et al. (2026): does your balanced accuracy "
    "match the published one? Points on the diagonal agree.")
