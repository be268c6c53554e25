"""Per-sample test predictions of a run: what lets a report say whether a gain is real.

Each run record keeps, beside `record.json`, `predictions.safetensors`: for every test
image it scored (cache row `index`, true `label`), the predicted class `pred`, the top-k
classes `top_k` (k = min(5, C)) and the `logits` (float32), in test-cache row order. The
record's test metrics are computed from exactly these logits, so the two cannot disagree.
Size: N·(3 + k)·8 + N·C·4 bytes (FER2013's 7,178 test images, 7 classes: 0.66 MB).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featcache.errors import FeatcacheError
from featcache.metrics import balanced
from featcache.records.schema import PREDICTIONS_FILE

TOP_K = 5
_KEYS = ("index", "label", "pred", "top_k", "logits")


@dataclass
class Predictions:
    """One run's test predictions (numpy arrays, one row per scored test image)."""

    index: np.ndarray  # (N,) int64: row of the test cache
    label: np.ndarray  # (N,) int64
    pred: np.ndarray  # (N,) int64
    top_k: np.ndarray  # (N, k) int64, best first
    logits: np.ndarray | None  # (N, C) float32 (None when read without them)

    @property
    def correct(self) -> np.ndarray:
        return self.pred == self.label

    def tensors(self) -> dict[str, torch.Tensor]:
        """What `save` writes (safetensors-ready)."""
        out = {k: torch.from_numpy(np.ascontiguousarray(getattr(self, k))) for k in _KEYS
               if getattr(self, k) is not None}
        return out


def from_logits(logits: torch.Tensor, labels: torch.Tensor, index: np.ndarray) -> Predictions:
    """Predictions from (N, C) logits: argmax and the top-k, as the metrics take them."""
    logits = logits.detach().float().cpu()
    k = min(TOP_K, logits.shape[1])
    return Predictions(index=np.asarray(index, dtype=np.int64),
                       label=labels.detach().cpu().numpy().astype(np.int64),
                       pred=logits.argmax(1).numpy().astype(np.int64),
                       top_k=logits.topk(k, dim=1).indices.numpy().astype(np.int64),
                       logits=logits.numpy())


def load_predictions(run_dir: str | Path, logits: bool = True,
                     record: dict[str, Any] | None = None) -> Predictions | None:
    """A run's predictions, or None for a record written before they were kept. A file
    that is damaged, not the one its record was written with, or that disagrees with the
    record's balanced accuracy is one line naming it and the fix."""
    from safetensors import SafetensorError, safe_open

    from featcache.records.store import array_digest, read_run

    path = Path(run_dir) / PREDICTIONS_FILE
    if not path.is_file():
        return None
    record = read_run(Path(run_dir)) if record is None else record
    try:
        with safe_open(str(path), framework="np") as f:
            keys = set(f.keys())
            wanted = [k for k in _KEYS if k != "logits" or logits]
            if not set(wanted) - {"logits"} <= keys:
                raise ValueError(f"keys {sorted(keys)}")
            arrays = {k: f.get_tensor(k) for k in wanted if k in keys}
    except (OSError, ValueError, SafetensorError) as exc:
        raise FeatcacheError(f"cannot read {path} ({type(exc).__name__}: {exc}); delete its "
                             "run folder and run the same `featcache probe` command again "
                             "(or pass --force)") from None
    n = len(arrays["index"])
    if any(len(a) != n for a in arrays.values()):
        raise FeatcacheError(f"{path}: arrays of different lengths; delete its run folder "
                             "and probe again")
    digests = (record.get("files") or {}).get(PREDICTIONS_FILE) or {}
    if any(k in digests and array_digest(a) != digests[k] for k, a in arrays.items()):
        raise FeatcacheError(f"{path} is not the file its record was written with (damaged "
                             "or replaced); run the same `featcache probe` command again "
                             "with --force")
    out = Predictions(arrays["index"], arrays["label"], arrays["pred"], arrays["top_k"],
                      arrays.get("logits"))
    _check_metric(out, record, path)
    return out


def _check_metric(pred: Predictions, record: dict[str, Any], path: Path) -> None:
    """The record's balanced top-1 was computed from these predictions: they must agree
    (a record edited by hand, or a file from another run, must not lend its numbers)."""
    stated = (record.get("metrics") or {}).get("balanced_top1")
    if not isinstance(stated, (int, float)) or not len(pred.label):
        return
    here = float(balanced(np.bincount(pred.label, weights=pred.correct),
                          np.bincount(pred.label)))
    if abs(here - stated) > 1e-3:
        raise FeatcacheError(f"{path} gives balanced top-1 {here:.4f} but its record says "
                             f"{stated:.4f}: one of them was changed after the run; run the "
                             "same `featcache probe` command again with --force")
