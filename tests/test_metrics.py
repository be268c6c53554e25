"""Metrics against sklearn on random data, vectorised over configs, in percent."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, recall_score, top_k_accuracy_score

from featcache.metrics import MetricAccumulator, classification_metrics


def _sk_balanced_topk(scores: np.ndarray, y: np.ndarray, k: int) -> float:
    """Mean over present classes of per-class top-k recall (sklearn per class)."""
    labels = np.arange(scores.shape[1])
    recalls = []
    for c in np.unique(y):
        m = y == c
        recalls.append(top_k_accuracy_score(y[m], scores[m], k=k, labels=labels))
    return float(np.mean(recalls))


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("n_classes", [6, 12, 30])
def test_matches_sklearn(n_classes: int) -> None:
    rng = np.random.default_rng(n_classes)
    n = 300
    # skewed labels; one class deliberately absent when C is large enough
    p = rng.dirichlet(np.ones(n_classes))
    if n_classes > 3:
        p[1] = 0
        p /= p.sum()
    y = rng.choice(n_classes, size=n, p=p)
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), y] += 0.8  # better than chance, not perfect
    m = classification_metrics(torch.tensor(logits), torch.tensor(y), n_classes)
    k = min(5, n_classes)
    labels = np.arange(n_classes)
    pred = logits.argmax(1)
    assert m["k"] == k and m["n"] == n
    assert m["top1"] == pytest.approx(100 * np.mean(pred == y))
    assert m["balanced_top1"] == pytest.approx(100 * balanced_accuracy_score(y, pred))
    assert m["top5"] == pytest.approx(100 * top_k_accuracy_score(y, logits, k=k, labels=labels))
    assert m["balanced_top5"] == pytest.approx(100 * _sk_balanced_topk(logits, y, k))
    rec = recall_score(y, pred, labels=labels, average=None, zero_division=np.nan)
    for got, want in zip(m["per_class"], rec, strict=True):
        if math.isnan(want):
            assert got is None
        else:
            assert got == pytest.approx(100 * want)


def test_vectorised_over_configs_and_streaming() -> None:
    g = torch.Generator().manual_seed(0)
    G, N, C = 4, 257, 10
    logits = torch.randn(G, N, C, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    logits[:2, torch.arange(N), y] += 1.5
    batched = classification_metrics(logits, y, C)
    for gi in range(G):
        single = classification_metrics(logits[gi], y, C)
        for key in ("top1", "top5", "balanced_top1", "balanced_top5"):
            assert batched[key][gi] == pytest.approx(single[key])
        assert batched["per_class"][gi] == pytest.approx(single["per_class"])
    acc = MetricAccumulator(C)
    for chunk in torch.arange(N).split(50):
        acc.update(logits[:, chunk], y[chunk])
    streamed = acc.compute()
    for key in ("top1", "top5", "balanced_top1", "balanced_top5"):
        assert streamed[key] == pytest.approx(batched[key])


def test_percent_and_edge_cases() -> None:
    y = torch.tensor([0, 0, 1, 2])
    perfect = torch.nn.functional.one_hot(y, 3).double()
    m = classification_metrics(perfect, y, 3)
    assert m["top1"] == m["balanced_top1"] == m["top5"] == 100.0
    assert m["k"] == 3  # k = min(5, C)
    with pytest.raises(ValueError):
        classification_metrics(perfect, torch.tensor([0, 0, 1, 3]), 3)
    with pytest.raises(ValueError):
        classification_metrics(perfect[:, :2], y, 3)
