"""Significance across datasets: our Wilcoxon, Friedman and Nemenyi against scipy's tests
on the same numbers, and q_α against Demšar's published table."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from featcache.reporting.significance import (
    critical_difference,
    friedman,
    q_alpha,
    ranks,
    significance,
    wilcoxon,
)


def test_wilcoxon_exact_equals_scipy() -> None:
    rng = np.random.default_rng(0)
    for n in (5, 12, 20, 40):
        a = rng.normal(70, 10, size=n)
        b = a + rng.normal(0.8, 1.5, size=n)
        ours = wilcoxon(b, a)
        theirs = stats.wilcoxon(b, a, method="exact")
        assert ours["exact"] is True
        assert ours["statistic"] == pytest.approx(theirs.statistic)
        assert ours["p"] == pytest.approx(theirs.pvalue, rel=1e-9)
        assert ours["wins"] + ours["losses"] == n


def test_wilcoxon_with_ties_and_zeros_equals_scipys_approximation() -> None:
    rng = np.random.default_rng(1)
    base = np.round(rng.normal(70, 5, size=30), 0)
    other = base + np.round(rng.normal(0.5, 1.2, size=30), 0)  # whole points: ties, zeros
    ours = wilcoxon(other, base)
    assert ours["exact"] is False and ours["ties"] > 0
    theirs = stats.wilcoxon(other, base, zero_method="wilcox", correction=False,
                            method="approx")
    assert ours["statistic"] == pytest.approx(theirs.statistic)
    assert ours["p"] == pytest.approx(theirs.pvalue, rel=1e-9)
    d = other - base
    assert (ours["wins"], ours["ties"], ours["losses"]) == (
        int((d > 0).sum()), int((d == 0).sum()), int((d < 0).sum()))


def test_friedman_equals_scipy_with_and_without_ties() -> None:
    rng = np.random.default_rng(2)
    scores = rng.normal(70, 5, size=(14, 4)) + np.array([0, 1, 2, 3])
    tied = np.round(scores / 3)  # many ties within a dataset
    for x in (scores, tied):
        ours = friedman(x)
        theirs = stats.friedmanchisquare(*x.T)
        assert ours["statistic"] == pytest.approx(theirs.statistic, rel=1e-12)
        assert ours["p"] == pytest.approx(theirs.pvalue, rel=1e-9)
        want = np.mean([stats.rankdata(-row) for row in x], axis=0)
        np.testing.assert_allclose(ours["mean_ranks"], want)


def test_ranks_share_ties() -> None:
    np.testing.assert_array_equal(ranks([3, 1, 3, 2]), stats.rankdata([3, 1, 3, 2]))


def test_nemenyi_critical_values_are_demsars() -> None:
    """Demšar (2006), Table 5(a), α = 0.05."""
    for k, q in ((2, 1.960), (3, 2.343), (4, 2.569), (5, 2.728), (6, 2.850), (10, 3.164)):
        assert q_alpha(k) == pytest.approx(q, abs=1e-3)
    # his example: 4 methods, 14 datasets → CD = 1.25
    assert critical_difference(4, 14) == pytest.approx(1.25, abs=0.005)


def _row(model: str, dataset: str, **means: float) -> dict:
    return {"model_dir": model, "dataset": dataset,
            "cells": {c: {"mean": v} for c, v in means.items()}}


def test_significance_from_report_rows() -> None:
    rng = np.random.default_rng(3)
    rows = []
    for d in range(8):
        lin = float(rng.normal(70, 8))
        rows.append(_row("m", f"d{d}", linear=lin, **{"alf:all": lin + 2 + d % 3,
                                                      "knn": lin - 3 + rng.normal()}))
    rows.append(_row("m", "d8", linear=60.0, knn=50.0))  # alf not run here
    rows.append(_row("solo", "d0", linear=1.0, knn=2.0))  # one dataset: no test
    out = significance(rows)
    assert [e["model_dir"] for e in out] == ["m"]
    entry = out[0]
    assert entry["wilcoxon"]["alf:all"]["n"] == 8 and entry["wilcoxon"]["alf:all"]["wins"] == 8
    assert entry["wilcoxon"]["knn"]["n"] == 9
    # tied differences (2, 3, 4 points): the normal approximation, not an exact
    # distribution that assumes distinct ranks (scipy's "auto" would take the latter)
    assert entry["wilcoxon"]["alf:all"]["exact"] is False
    assert entry["wilcoxon"]["alf:all"]["p"] == pytest.approx(
        stats.wilcoxon([r["cells"]["alf:all"]["mean"] for r in rows[:8]],
                       [r["cells"]["linear"]["mean"] for r in rows[:8]],
                       method="approx").pvalue)
    fr = entry["friedman"]
    assert fr["methods"] == ["linear", "alf:all", "knn"] and fr["n"] == 8  # complete block
    assert fr["mean_ranks"][1] == 1.0  # ALF best on every dataset
    assert entry["critical_difference"] == pytest.approx(critical_difference(3, 8))


def test_cd_figure_draws() -> None:
    from featcache.reporting.significance import cd_figure

    rows = [_row("m", f"d{d}", linear=70.0 + d, alf=72.0 + d, knn=60.0 + 2 * d)
            for d in range(6)]
    fig = cd_figure(significance(rows)[0])
    assert fig.axes and any("CD =" in t.get_text() for t in fig.axes[0].texts)
