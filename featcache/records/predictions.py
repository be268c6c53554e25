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
    record = read_run(Path(run_dir)) if record is None else record
    if not path.is_file():
        if PREDICTIONS_FILE in (record.get("files") or {}):
            raise FeatcacheError(f"{Path(run_dir)}: its record lists {PREDICTIONS_FILE} but "
                                 "the file is missing (damaged run); run the same `featcache "
                                 "probe` command again with --force")
        return None
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


def test_metrics(pred: Predictions, n_classes: int | None = None
                 ) -> dict[str, float | None]:
    """Top-1, top-5, balanced top-1 and balanced top-5 in percent, from the predictions
    alone, as the probe scores them (`featcache.probing.selection.logit_metrics`: top-k with
    k = min(5, C), the stored top-k's width; no top-5 below 6 classes, where every one is
    trivially right). ``n_classes`` unknown: top-5 as the stored top-k gives it."""
    from featcache.metrics import TOP5_MIN_CLASSES

    size = max(int(pred.label.max()) + 1, n_classes or 0)
    counts = np.bincount(pred.label, minlength=size)
    hit_k = (pred.top_k == pred.label[:, None]).any(1)
    out: dict[str, float | None] = {}
    for name, hits in (("1", pred.correct), ("5", hit_k)):
        out[f"top{name}"] = float(100 * hits.mean())
        out[f"balanced_top{name}"] = float(balanced(
            np.bincount(pred.label, weights=hits, minlength=size), counts))
    if n_classes is not None and n_classes < TOP5_MIN_CLASSES:
        out["top5"] = out["balanced_top5"] = None
    return out


def _n_classes(record: dict[str, Any], pred: Predictions) -> int | None:
    """The run's class count: the record's, else its class names', else (below 5) the
    stored top-k's width."""
    names = (record.get("per_class") or {}).get("class_names") \
        if isinstance(record.get("per_class"), dict) else None
    for n in (record.get("n_classes"), len(names) if isinstance(names, list) else None):
        if isinstance(n, int) and n > 0:
            return n
    width = pred.top_k.shape[1] if pred.top_k.ndim == 2 else 0
    return width if 0 < width < 5 else None


def _check_metric(pred: Predictions, record: dict[str, Any], path: Path) -> None:
    """Every test metric of the record was computed from these predictions: they must
    agree (a record edited by hand, or a file from another run, must not lend its
    numbers). The report and `runs` then take the numbers computed here."""
    if not len(pred.label):
        return
    stated = record.get("metrics") or {}
    here = test_metrics(pred, _n_classes(record, pred))
    for key, value in here.items():
        said = stated.get(key)
        if value is None and said is None:
            continue
        if value is None or not isinstance(said, (int, float)) or abs(value - said) > 1e-3:
            shown = f"{said:.4f}" if isinstance(said, (int, float)) else repr(said)
            name = key.replace("_", " ").replace("top", "top-")
            given = "none" if value is None else f"{value:.4f}"
            raise FeatcacheError(f"{path} gives {name} {given} but its record says "
                                 f"{shown}: one of them was changed after the run; run the "
                                 "same `featcache probe` command again with --force")


def checked_run(record: dict[str, Any]) -> Predictions | None:
    """A listed run checked whole (`featcache.records.store.check_record`, then its predictions
    against every test metric), its metrics replaced by the ones its predictions give:
    what `runs` and the report show is computed, never only read. None for a record made
    before predictions were kept (its numbers are the record's; docs/records.md)."""
    from featcache.records.store import check_record

    check_record(record)
    pred = load_predictions(record["path"], logits=False, record=record)
    if pred is not None and len(pred.label):
        stated = record.get("metrics") or {}
        here = test_metrics(pred, _n_classes(record, pred))
        # the record's own float where it is the same number (torch's sums and numpy's
        # differ in the last bits: predict compares a rerun with the record exactly)
        record["metrics"] = {**stated, **{k: v for k, v in here.items() if v is None or
                                          abs(v - (stated.get(k) or 0.0)) > 1e-9}}
    return pred
