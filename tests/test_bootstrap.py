"""The paired bootstrap behind each gain's 95 % interval, against closed forms.

- One class: balanced accuracy is accuracy, and the gain is a difference of two paired
  Bernoulli means, whose standard error is sqrt((p10 + p01 - (p10 - p01)^2) / N).
- Several classes of unequal sizes: the delta method gives the variance of a balanced
  accuracy difference, sum_c var_c(d) / (C^2 n_c).
- Seeds: the point gain is the difference of seed-mean balanced accuracies (scikit-learn).
- The report: intervals from real runs' predictions, in the cells and in results.csv.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from probecache import SynthSpec, make_pair
from sklearn.metrics import balanced_accuracy_score

from featcache.errors import FeatcacheError
from featcache.probing.run import probe
from featcache.reporting.bootstrap import PairedBootstrap
from featcache.reporting.build import report

Z = 1.959963984540054  # the standard normal's 97.5th percentile


def paired(n: int, p11: float, p10: float, p01: float, rng: np.random.Generator):
    """Correctness of two probes on n images with the given joint probabilities."""
    outcome = rng.choice(4, size=n, p=[p11, p10, p01, 1 - p11 - p10 - p01])
    return np.isin(outcome, (0, 1)), np.isin(outcome, (0, 2))


def test_one_class_matches_the_paired_proportions_closed_form():
    rng = np.random.default_rng(0)
    a, b = paired(4000, 0.5, 0.2, 0.1, rng)
    labels = np.zeros(len(a), dtype=np.int64)
    ci = PairedBootstrap(labels, 1, n_resamples=4000, seed=1).gain(a, b)
    p10, p01 = np.mean(a & ~b), np.mean(~a & b)
    se = 100 * np.sqrt((p10 + p01 - (p10 - p01) ** 2) / len(a))
    point = 100 * (a.mean() - b.mean())
    assert ci["gain"] == pytest.approx(point, abs=1e-9)
    # Monte Carlo error of a 2.5 % quantile from 4000 resamples: about 0.04 se
    assert ci["low"] == pytest.approx(point - Z * se, abs=0.2 * se)
    assert ci["high"] == pytest.approx(point + Z * se, abs=0.2 * se)


def test_unequal_classes_match_the_delta_method():
    rng = np.random.default_rng(2)
    parts = [paired(3000, 0.6, 0.15, 0.05, rng), paired(600, 0.3, 0.1, 0.2, rng),
             paired(1200, 0.4, 0.3, 0.1, rng)]
    a = np.concatenate([p[0] for p in parts])
    b = np.concatenate([p[1] for p in parts])
    labels = np.concatenate([np.full(len(p[0]), c) for c, p in enumerate(parts)])
    ci = PairedBootstrap(labels, 3, n_resamples=4000, seed=3).gain(a, b)
    d = a.astype(float) - b.astype(float)
    C = len(parts)
    point = 100 * np.mean([d[labels == c].mean() for c in range(C)])
    se = 100 * np.sqrt(sum(d[labels == c].var() / (labels == c).sum()
                           for c in range(C)) / C**2)
    assert ci["gain"] == pytest.approx(point, abs=1e-6)
    assert ci["low"] == pytest.approx(point - Z * se, abs=0.25 * se)
    assert ci["high"] == pytest.approx(point + Z * se, abs=0.25 * se)


def test_seeds_average_and_a_fixed_seed_repeats():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 5, size=700)
    a = rng.random((3, 700)) < 0.7
    b = rng.random((2, 700)) < 0.6
    boot = PairedBootstrap(labels, 5, n_resamples=300, seed=0)
    ci = boot.gain(a, b)
    mean_ba = [np.mean([balanced_accuracy_score(labels, np.where(c, labels, (labels + 1) % 5))
                        for c in runs]) for runs in (a, b)]
    assert ci["gain"] == pytest.approx(100 * (mean_ba[0] - mean_ba[1]), abs=1e-4)
    assert ci["low"] < ci["gain"] < ci["high"]
    assert PairedBootstrap(labels, 5, n_resamples=300, seed=0).gain(a, b) == ci
    assert boot.gain(a, a)["low"] == boot.gain(a, a)["high"] == 0.0


def test_resamples_streamed_in_chunks_equal_resamples_kept(monkeypatch):
    from featcache.reporting import bootstrap

    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, size=500)
    a, b = rng.random(500) < 0.8, rng.random(500) < 0.5
    kept = PairedBootstrap(labels, 3, n_resamples=200, seed=7).gain(a, b)
    monkeypatch.setattr(bootstrap, "_MAX_WEIGHT_BYTES", 0)
    streamed = PairedBootstrap(labels, 3, n_resamples=200, seed=7)
    assert streamed._weights is None
    assert streamed.gain(a, b) == kept


@pytest.mark.usefixtures("torch_one_thread")
def test_the_report_gives_each_gain_its_interval(tmp_path):
    spec = SynthSpec(n_blocks=4, dim=32, n_classes=4, n_train=400, n_test=300, seed=2,
                     signal={("block2", "ap"): 1.0})
    make_pair(tmp_path / "cache", spec)
    quick = dict(cache=tmp_path / "cache", grid="quick")
    threads = torch.get_num_threads()
    probe(method="linear", seeds="0,1", **quick)
    probe(method="alf", **quick)
    torch.set_num_threads(threads)
    data = report(cache=tmp_path / "cache", out=tmp_path / "report", format="csv,md",
                  cka=False)
    (row,) = data.rows
    cell = row["cells"]["alf:all [grid=quick]"]
    assert cell["ci"]["gain"] == pytest.approx(cell["gain"], abs=1e-3)
    assert cell["ci"]["low"] > 0 and cell["ci_excludes_zero"]  # the planted signal is real
    assert row["cells"]["linear [grid=quick]"].get("ci") is None
    with open(data.written["csv"]) as handle:
        rows = list(csv.DictReader(handle))
    alf = next(r for r in rows if r["method"] == "alf")
    assert float(alf["cell_gain_ci_low"]) == pytest.approx(cell["ci"]["low"])
    assert alf["cell_gain_ci_excludes_zero"] == "True"
    text = data.written["md"].read_text()
    assert f"[{cell['ci']['low']:+.2f}, {cell['ci']['high']:+.2f}]" in text
    assert "(1,000 resamples)" in text
    no_ci = report(cache=tmp_path / "cache", out=tmp_path / "r2", format="md", cka=False,
                   resamples=0)
    assert no_ci.rows[0]["cells"]["alf:all [grid=quick]"].get("ci") is None
    assert "no intervals: --resamples 0" in no_ci.written["md"].read_text()
    few = report(cache=tmp_path / "cache", out=tmp_path / "r3", format="md", cka=False,
                 resamples=250)
    assert "(250 resamples)" in few.written["md"].read_text()
    with pytest.raises(FeatcacheError, match="too few for a 95 % interval"):
        report(cache=tmp_path / "cache", out=tmp_path / "r4", format="", resamples=2)
