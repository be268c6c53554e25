"""Significance across datasets (Demšar, 2006, JMLR 7:1-30): is a method better than the
linear probe over many datasets, not on one?

- Per method against the baseline (`linear`): the Wilcoxon signed-rank test over the
  datasets both were run on, two-sided, on the mean balanced top-1 per dataset; its
  p-value and the wins / ties / losses. Differences of zero are dropped (Wilcoxon's rule);
  the p-value is exact for up to 50 datasets without tied differences, else the normal
  approximation with the tie correction (scipy.stats.wilcoxon's defaults).
- For all methods: the Friedman test on their ranks per dataset (rank 1 the best; ties
  share their mean rank; the tie-corrected statistic, χ² with k − 1 degrees of freedom),
  and the Nemenyi critical difference CD = q_α √(k(k + 1) / 6N), q_α the studentized
  range quantile over √2 (`scipy.stats.studentized_range`): two methods whose mean ranks
  differ by less than CD are not told apart at level α. The report draws it (the
  critical-difference diagram).

The statistics are computed here; scipy supplies the distributions. The tests check them
against scipy's own tests on the same numbers, and q_α against Demšar's table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

ALPHA = 0.05
BASELINE = "linear"
EXACT_MAX = 50  # datasets: up to this many (without tied differences) the exact p-value


def ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n of ``values`` ascending, ties sharing their mean rank."""
    x = np.asarray(values, dtype=float)
    order = np.argsort(x, kind="stable")
    out = np.empty(len(x))
    sorted_x = x[order]
    start = 0
    while start < len(x):
        end = start
        while end + 1 < len(x) and sorted_x[end + 1] == sorted_x[start]:
            end += 1
        out[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return out


# -- Wilcoxon ----------------------------------------------------------------------------

def wilcoxon(method: Sequence[float], baseline: Sequence[float]) -> dict[str, Any]:
    """Two-sided Wilcoxon signed-rank test of paired scores; wins / ties / losses of
    ``method``. ``statistic``: the smaller of the positive and negative rank sums."""
    d = np.asarray(method, dtype=float) - np.asarray(baseline, dtype=float)
    out: dict[str, Any] = {"n": int(len(d)), "wins": int((d > 0).sum()),
                           "ties": int((d == 0).sum()), "losses": int((d < 0).sum())}
    d = d[d != 0]
    if not len(d):
        return {**out, "statistic": None, "p": None, "exact": None}
    r = ranks(np.abs(d))
    plus, minus = float(r[d > 0].sum()), float(r[d < 0].sum())
    tied = len(np.unique(np.abs(d))) < len(d)
    exact = len(d) <= EXACT_MAX and not tied
    p = _exact_p(plus, len(d)) if exact else _normal_p(plus, r, len(d))
    return {**out, "statistic": min(plus, minus), "p": min(1.0, p), "exact": exact}


def _exact_p(plus: float, n: int) -> float:
    """P(|W+ − n(n+1)/4| ≥ observed) under H0: every sign equally likely, counted by
    dynamic programming over the rank sums (2^n sign patterns)."""
    top = n * (n + 1) // 2
    counts = np.zeros(top + 1)
    counts[0] = 1
    for rank in range(1, n + 1):
        counts[rank:] = counts[rank:] + counts[:-rank].copy()
    k = int(round(min(plus, top - plus)))
    return float(2 * counts[: k + 1].sum() / 2.0 ** n)


def _normal_p(plus: float, r: np.ndarray, n: int) -> float:
    """The normal approximation, variance corrected for tied ranks, no continuity
    correction."""
    from scipy.stats import norm

    mean = n * (n + 1) / 4
    _, t = np.unique(r, return_counts=True)
    var = n * (n + 1) * (2 * n + 1) / 24 - float((t ** 3 - t).sum()) / 48
    if var <= 0:
        return 1.0
    z = (plus - mean) / math.sqrt(var)
    return float(2 * norm.sf(abs(z)))


# -- Friedman and Nemenyi ------------------------------------------------------------------

def friedman(scores: np.ndarray) -> dict[str, Any]:
    """Friedman test of an (N datasets × k methods) score matrix (higher is better):
    the tie-corrected χ², its p-value, and each method's mean rank (1 = best)."""
    from scipy.stats import chi2

    x = np.asarray(scores, dtype=float)
    n, k = x.shape
    r = np.stack([ranks(-row) for row in x])  # rank 1 = the highest score
    mean_ranks = r.mean(0)
    stat = 12 * n / (k * (k + 1)) * float(((mean_ranks - (k + 1) / 2) ** 2).sum())
    ties = sum(float((c ** 3 - c).sum()) for c in (np.unique(row, return_counts=True)[1]
                                                   for row in r))
    correction = 1 - ties / (n * k * (k * k - 1))
    stat = stat / correction if correction > 0 else float("nan")
    p = float(chi2.sf(stat, k - 1)) if math.isfinite(stat) else None
    return {"statistic": stat if math.isfinite(stat) else None, "p": p, "n": n, "k": k,
            "mean_ranks": mean_ranks.tolist()}


def q_alpha(k: int, alpha: float = ALPHA) -> float:
    """Nemenyi's q_α for k methods: the studentized range quantile (infinite degrees of
    freedom) over √2 (Demšar's Table 5a: 1.960 for 2, 2.343 for 3, 2.569 for 4)."""
    from scipy.stats import studentized_range

    return float(studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2))


def critical_difference(k: int, n: int, alpha: float = ALPHA) -> float:
    """Mean ranks further apart than this differ at level α (Nemenyi)."""
    return q_alpha(k, alpha) * math.sqrt(k * (k + 1) / (6 * n))


# -- from the report's rows ----------------------------------------------------------------

def score_table(rows: Sequence[dict], model_dir: str) -> tuple[list[str], list[str],
                                                                np.ndarray]:
    """One model's (datasets × columns) mean balanced top-1, a complete block design:
    every column, on the datasets that have them all; when fewer than two datasets do,
    the columns run on every dataset instead."""
    mine = [r for r in rows if r.get("model_dir") == model_dir]
    cols = _columns(mine)
    complete = [r for r in mine if all(_mean(r, c) is not None for c in cols)]
    if len(complete) < 2:
        complete = mine
        cols = [c for c in cols if all(_mean(r, c) is not None for r in mine)]
    table = np.asarray([[float(_mean(r, c)) for c in cols] for r in complete])  # type: ignore
    return [r["dataset"] for r in complete], cols, table.reshape(len(complete), len(cols))


def significance(rows: Sequence[dict], baseline: str = BASELINE,
                 alpha: float = ALPHA) -> list[dict[str, Any]]:
    """Per model with at least two datasets: Wilcoxon of each column against the baseline
    (over the datasets both were run on), and Friedman with the Nemenyi critical difference
    over the columns and datasets of `score_table`."""
    out = []
    for model_dir in dict.fromkeys(r.get("model_dir") for r in rows):
        mine = [r for r in rows if r.get("model_dir") == model_dir]
        if len(mine) < 2:
            continue
        entry: dict[str, Any] = {"model_dir": model_dir, "baseline": baseline,
                                 "alpha": alpha, "wilcoxon": {}}
        cols = _columns(mine)
        for col in cols:
            base = _baseline_of(col, cols, baseline)
            if base is None or col == base or _split(col) == baseline:
                continue
            pairs = [(_mean(r, col), _mean(r, base)) for r in mine
                     if _mean(r, col) is not None and _mean(r, base) is not None]
            if len(pairs) >= 2:
                a, b = zip(*pairs, strict=True)
                entry["wilcoxon"][col] = {**wilcoxon(a, b), "baseline": base}
        datasets, cols, table = score_table(rows, model_dir)
        if len(cols) >= 2 and len(datasets) >= 2:
            entry["friedman"] = {**friedman(table), "methods": cols, "datasets": datasets}
            entry["critical_difference"] = critical_difference(len(cols), len(datasets),
                                                               alpha)
        if entry["wilcoxon"] or "friedman" in entry:
            out.append(entry)
    return out


def _split(col: str) -> str:
    from featcache.reporting.columns import split_column

    return split_column(col)[0]


def _baseline_of(col: str, cols: list[str], baseline: str) -> str | None:
    """The baseline's column of the same variant (as the report's gains), else its
    first column."""
    from featcache.reporting.columns import split_column, with_variant

    same = with_variant(baseline, split_column(col)[1])
    if same in cols:
        return same
    return next((c for c in cols if _split(c) == baseline), None)


def _columns(rows: Sequence[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in (r.get("cells") or {}) if c not in cols]
    return cols


def _mean(row: dict, col: str) -> float | None:
    cell = (row.get("cells") or {}).get(col)
    return None if cell is None else cell.get("mean")


def cd_figure(entry: dict[str, Any]) -> Any:
    """The critical-difference diagram of one model's Friedman entry: methods on the
    mean-rank axis (1, the best, on the left), bars joining groups whose ranks are within
    the critical difference."""
    from matplotlib.figure import Figure

    fr = entry["friedman"]
    names, mean = fr["methods"], np.asarray(fr["mean_ranks"])
    k, cd = len(names), entry["critical_difference"]
    order = np.argsort(mean, kind="stable")
    fig = Figure(figsize=(7.0, 1.6 + 0.28 * k), layout="constrained")
    ax = fig.add_subplot()
    ax.set_xlim(0.5, k + 0.5)
    ax.set_ylim(k + 1.5, -1.2)
    ax.set_xticks(range(1, k + 1))
    ax.xaxis.tick_top()
    ax.set_yticks([])
    for side in ("right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    for row, j in enumerate(order):
        y = row + 1
        ax.plot([mean[j], mean[j]], [-1.2, y], color="#57606a", linewidth=0.8)
        ax.text(mean[j] + 0.05, y, f"{names[j]} ({mean[j]:.2f})", va="center", fontsize=8)
    for g, (lo, hi) in enumerate(_cliques(mean[order], cd)):
        ax.plot([mean[order][lo] - 0.03, mean[order][hi] + 0.03], [0.35 + 0.22 * g] * 2,
                color="black", linewidth=3)
    ax.plot([1, 1 + cd], [-0.7, -0.7], color="#cf222e", linewidth=2)
    ax.text(1 + cd + 0.05, -0.7, f"CD = {cd:.2f}", va="center", fontsize=8,
            color="#cf222e")
    p = fr["p"]
    fig.suptitle(f"{entry['model_dir']}: mean rank over {fr['n']} datasets (Friedman p = "
                 f"{p:.3g}; Nemenyi α = {entry['alpha']})" if p is not None else
                 entry["model_dir"], fontsize=9)
    return fig


def _cliques(sorted_ranks: np.ndarray, cd: float) -> list[tuple[int, int]]:
    """Maximal runs of methods (in rank order) whose extreme ranks lie within CD."""
    out: list[tuple[int, int]] = []
    for lo in range(len(sorted_ranks)):
        hi = lo
        while hi + 1 < len(sorted_ranks) and sorted_ranks[hi + 1] - sorted_ranks[lo] < cd:
            hi += 1
        if hi > lo and not any(a <= lo and hi <= b for a, b in out):
            out.append((lo, hi))
    return out


def section(rows: Sequence[dict], baseline: str = BASELINE) -> dict[str, Any] | None:
    """The report's table "Significance across datasets": a row per model and method
    (Wilcoxon against the baseline), the model's Friedman test beside it."""
    results = significance(rows, baseline)
    if not results:
        return None
    body = []
    for entry in results:
        fr = entry.get("friedman") or {}
        friedman_text = "—" if fr.get("p") is None else \
            f"p = {fr['p']:.3g} ({fr['k']} methods, {fr['n']} datasets; CD " \
            f"{entry['critical_difference']:.2f})"
        for col, w in entry["wilcoxon"].items():
            rank = _rank_of(fr, col)
            body.append([entry["model_dir"], col, str(w["n"]),
                         f"{w['wins']}/{w['ties']}/{w['losses']}",
                         "—" if w["p"] is None else f"{w['p']:.3g}", rank, friedman_text])
    return {"title": "Significance across datasets",
            "intro": (f"Per method against {baseline}: the Wilcoxon signed-rank test over the "
                      "datasets both were run on (mean balanced top-1 per dataset; two-sided), "
                      "wins/ties/losses; per model: the Friedman test over the methods run on "
                      "every dataset, the methods' mean rank (1 = best) and Nemenyi's critical "
                      "difference at α = 0.05 (Demšar 2006); the critical-difference diagram "
                      "is among the figures."),
            "header": ["model", "method", "datasets", f"wins/ties/losses vs {baseline}",
                       "Wilcoxon p", "mean rank", "Friedman"],
            "rows": body, "data": results}


def _rank_of(friedman_entry: dict, col: str) -> str:
    methods = friedman_entry.get("methods") or []
    if col not in methods:
        return "—"
    return f"{friedman_entry['mean_ranks'][methods.index(col)]:.2f}"
