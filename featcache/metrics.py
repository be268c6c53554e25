"""Classification metrics in percent, vectorised over a leading config axis.

The paper reports balanced top-1 accuracy (mean per-class recall) in percent; top-1,
top-5 and balanced top-5 come along. ``MetricAccumulator`` streams batches so a whole grid
can be scored without holding (G, N, C) logits in memory.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["TOP5_MIN_CLASSES", "MetricAccumulator", "balanced", "classification_metrics"]

TOP5_MIN_CLASSES = 6  # with 5 classes or fewer every top-5 is trivially right


class MetricAccumulator:
    """Accumulates per-class hit counts for G configs over batches of logits.

    Feed ``update(logits, y)`` with logits (N, C) or (G, N, C); ``compute()`` returns the
    same dict as ``classification_metrics``. Counts stay on the logits' device until
    ``compute`` so scoring adds no host syncs per batch.
    """

    def __init__(self, n_classes: int, k: int = 5) -> None:
        if n_classes < 1:
            raise ValueError("n_classes must be ≥ 1")
        self.n_classes = n_classes
        self.k = min(k, n_classes)
        self._squeeze: bool | None = None
        self._hits1: Tensor | None = None  # (G, C)
        self._hitsk: Tensor | None = None  # (G, C)
        self._counts: Tensor | None = None  # (C,)

    def update(self, logits: Tensor, y: Tensor) -> None:
        """Add one batch: logits (N, C) or (G, N, C), integer labels y (N,)."""
        logits = torch.as_tensor(logits)
        squeeze = logits.dim() == 2
        if squeeze:
            logits = logits.unsqueeze(0)
        if logits.dim() != 3 or logits.shape[2] != self.n_classes:
            raise ValueError(
                f"logits must be (N, {self.n_classes}) or (G, N, {self.n_classes}), "
                f"got {tuple(logits.shape)}"
            )
        if self._squeeze is not None and squeeze != self._squeeze:
            raise ValueError("mixing (N, C) and (G, N, C) logits in one accumulator")
        self._squeeze = squeeze
        y = torch.as_tensor(y, device=logits.device).long().flatten()
        if y.numel() != logits.shape[1]:
            raise ValueError(f"{y.numel()} labels for {logits.shape[1]} rows of logits")
        G, C = logits.shape[0], self.n_classes
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= C):
            raise ValueError(f"labels must lie in [0, {C})")
        if self._hits1 is None:
            z = dict(device=logits.device, dtype=torch.float64)
            self._hits1, self._hitsk = torch.zeros(G, C, **z), torch.zeros(G, C, **z)
            self._counts = torch.zeros(C, **z)
        hit1 = logits.argmax(dim=2) == y  # (G, N)
        topk = logits.topk(self.k, dim=2).indices  # (G, N, k)
        hitk = (topk == y.view(1, -1, 1)).any(dim=2)
        self._hits1.index_add_(1, y, hit1.to(torch.float64))
        self._hitsk.index_add_(1, y, hitk.to(torch.float64))
        self._counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))

    def compute(self) -> dict:
        """Metrics in percent: floats for (N, C) input, lists over configs for (G, N, C).

        ``per_class`` (top-1 recall per class) is None for classes absent from y.
        Balanced scores average over the classes present in y (sklearn's convention).
        """
        if self._counts is None:
            raise ValueError("no samples were scored")
        counts = self._counts.cpu()
        hits1, hitsk = self._hits1.cpu(), self._hitsk.cpu()
        n = counts.sum()
        present = counts > 0
        rec1 = hits1[:, present] / counts[present]
        reck = hitsk[:, present] / counts[present]
        per_class = torch.full_like(hits1, float("nan"))
        per_class[:, present] = rec1
        res = {
            "top1": (100 * hits1.sum(1) / n).tolist(),
            "top5": (100 * hitsk.sum(1) / n).tolist(),
            "balanced_top1": (100 * rec1.mean(1)).tolist(),
            "balanced_top5": (100 * reck.mean(1)).tolist(),
            "per_class": [[None if v != v else 100 * v for v in row] for row in per_class.tolist()],
        }
        if self._squeeze:
            res = {key: val[0] for key, val in res.items()}
        res["k"] = self.k
        res["n"] = int(n.item())
        return res


def classification_metrics(logits: Tensor, y: Tensor, n_classes: int) -> dict:
    """top1, top5, balanced_top1, balanced_top5 (percent; top-k with k = min(5, C)) and
    per-class top-1 recall, for logits (N, C) or, vectorised, (G, N, C)."""
    acc = MetricAccumulator(n_classes)
    acc.update(logits, y)
    return acc.compute()


def balanced(hits: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mean over present classes of hits / count, in percent (per row: a resample, or one
    run's counts): the paired bootstrap's and a predictions file's balanced top-1."""
    present = counts > 0
    rate = np.divide(hits, counts, out=np.zeros_like(hits, dtype=np.float64), where=present)
    return 100 * rate.sum(-1) / np.maximum(present.sum(-1), 1)
