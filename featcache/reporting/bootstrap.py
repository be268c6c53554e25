"""Is a gain real? A paired bootstrap over test images of a method's gain over linear.

A gain in the report is a difference of balanced top-1 accuracies on one test set. Both
probes are scored on the same images, so the resampling is paired: each resample draws N
test images with replacement and recomputes both probes' balanced accuracy on exactly
those (with several seeds, each probe's mean over its seeds). The 95 % interval is the
2.5th–97.5th percentile of the resampled gains (1,000 resamples, seeded: a report is
reproducible). It measures how much the gain depends on which test images were drawn;
the ± beside a value measures the seeds.

Vectorised: a resample is a row of counts W (R × N, how often each image was drawn), so
a probe's per-class hits over all resamples are one matrix product W · (onehot(y) ⊙ c).
Balanced accuracy is linear in the hits once the class counts are fixed, so the gain of
A over B needs one product with the per-image difference of their (seed-averaged)
correctness. Classes a resample happens to miss are left out of its mean (the metrics'
convention for absent classes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from featcache.metrics import balanced
from featcache.reporting.columns import baseline_of, is_baseline

N_RESAMPLES = 1000
LEVEL = 0.95
_MAX_WEIGHT_BYTES = 512 << 20  # resample counts kept per test set (N = 50,000: 200 MB)


class PairedBootstrap:
    """The resamples of one test set (its labels), shared by every comparison on it."""

    def __init__(self, labels: np.ndarray, n_classes: int | None = None,
                 n_resamples: int = N_RESAMPLES, seed: int = 0) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        n = len(self.labels)
        if n == 0:
            raise ValueError("no test images to resample")
        self.n_classes = int(n_classes or self.labels.max() + 1)
        self.n_resamples = int(n_resamples)
        self.seed = seed
        self._onehot = np.zeros((n, self.n_classes), dtype=np.float32)
        self._onehot[np.arange(n), self.labels] = 1.0
        self._chunk = max(1, min(self.n_resamples, (64 << 20) // (4 * n)))
        keep = self.n_resamples * n * 4 <= _MAX_WEIGHT_BYTES
        self._weights: list[np.ndarray] | None = list(self._draw()) if keep else None
        self._counts = [w @ self._onehot for w in self._chunks()]  # (R, C) per chunk

    def _draw(self) -> Any:
        """Count matrices (r, N), chunk by chunk, from one seeded stream."""
        rng = np.random.default_rng(self.seed)
        n = len(self.labels)
        for start in range(0, self.n_resamples, self._chunk):
            r = min(self._chunk, self.n_resamples - start)
            idx = rng.integers(0, n, size=(r, n))
            flat = (idx + (np.arange(r) * n)[:, None]).ravel()
            yield np.bincount(flat, minlength=r * n).reshape(r, n).astype(np.float32)

    def _chunks(self) -> Any:
        return iter(self._weights) if self._weights is not None else self._draw()

    def gain(self, correct_a: np.ndarray, correct_b: np.ndarray,
             level: float = LEVEL) -> dict[str, float]:
        """Balanced top-1 of A minus B in points: on the test set itself (`gain`) and the
        percentile interval over the resamples (`low`, `high`). ``correct_*``: (seeds, N)
        or (N,) booleans, per test image in the labels' order."""
        a = np.atleast_2d(np.asarray(correct_a, dtype=np.float64)).mean(0)
        b = np.atleast_2d(np.asarray(correct_b, dtype=np.float64)).mean(0)
        if a.shape != self.labels.shape or b.shape != self.labels.shape:
            raise ValueError(f"correctness of {a.shape} / {b.shape} for {self.labels.shape} "
                             "labels")
        diff = self._onehot * (a - b).astype(np.float32)[:, None]  # (N, C)
        gains = np.concatenate([balanced(w @ diff, counts)
                                for w, counts in zip(self._chunks(), self._counts,
                                                     strict=True)])
        onehot = self._onehot.astype(np.float64)  # the point estimate in float64
        point = float(balanced((a - b) @ onehot, onehot.sum(0))[()])
        tail = 100 * (1 - level) / 2
        low, high = np.percentile(gains, [tail, 100 - tail])
        return {"gain": point, "low": float(low), "high": float(high),
                "resamples": self.n_resamples, "level": level}


# -- the report's cells ---------------------------------------------------------------------

def add_intervals(rows: Sequence[dict], notes: list[str], n_resamples: int = N_RESAMPLES,
                  seed: int = 0, loaded: dict[str, Any] | None = None) -> None:
    """Give every non-baseline cell with a linear baseline its paired bootstrap interval
    (`ci`: {gain, low, high, ...}, `ci_excludes_zero`), from the runs' per-sample test
    predictions. Cells whose runs lack them, or were scored on other test images, get
    `ci` None, and one note says why. ``loaded``: predictions already read, by run path.
    """
    from featcache.errors import FeatcacheError
    from featcache.records.predictions import load_predictions

    loaded = dict(loaded or {})
    why: dict[str, int] = {}
    damaged = "damaged"  # a predictions file that cannot be read (noted once, by name)

    def runs_of(cell: dict) -> list[Any] | str | None:
        out = []
        for path in cell.get("paths") or []:
            if path not in loaded:
                try:
                    loaded[path] = load_predictions(path, logits=False)
                except FeatcacheError as exc:
                    notes.append(f"no interval from {path}: {exc}")
                    loaded[path] = damaged
            if loaded[path] is None or loaded[path] is damaged:
                return loaded[path]
            out.append(loaded[path])
        return out or None

    for row in rows:
        boot: PairedBootstrap | None = None
        for col, cell in row["cells"].items():
            if cell is None or is_baseline(col):
                continue
            cell["ci"], cell["ci_excludes_zero"] = None, False
            base = row["cells"].get(baseline_of(col))
            if base is None:
                continue
            mine, theirs = runs_of(cell), runs_of(base)
            if mine is damaged or theirs is damaged:
                continue
            if mine is None or theirs is None:
                reason = ("their runs were made before per-sample predictions were kept "
                          "(probe again with --force for intervals)")
                why[reason] = why.get(reason, 0) + 1
                continue
            ref = theirs[0]
            if any(len(p.index) != len(ref.index) or not np.array_equal(p.index, ref.index)
                   or not np.array_equal(p.label, ref.label) for p in (*mine, *theirs)):
                reason = "their runs were scored on different test images (another cache)"
                why[reason] = why.get(reason, 0) + 1
                continue
            if boot is None or not np.array_equal(boot.labels, ref.label):
                boot = PairedBootstrap(ref.label, None, n_resamples, seed)
            ci = boot.gain(np.stack([p.correct for p in mine]),
                           np.stack([p.correct for p in theirs]))
            cell["ci"] = ci
            cell["ci_excludes_zero"] = ci["low"] > 0 or ci["high"] < 0
    for reason, count in why.items():
        notes.append(f"{count} gain(s) have no 95 % interval: {reason}")
