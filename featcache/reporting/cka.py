"""Linear CKA between layers, from the feature cache.

The paper's depth figure shows that early layers are dissimilar to the last one (low CKA)
yet probe nearly as well; this module gives the "similarity" half of that picture for a
user's own cache without touching the backbone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from featcache import atomic
from featcache.cache.kinds import FEATURE_KINDS
from featcache.errors import FeatcacheError


class CacheLike(Protocol):
    """What `layer_cka_to_last` needs from `featcache.cache.store.open_cache(...)`."""

    n: int
    layer_names: list[str]
    layer_dims: list[int]

    def read(self, kind: str, layers: list[int] | None = None,
             rows: slice | None = None) -> np.ndarray: ...


def _centred(x: Any) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D feature matrix (n, d), got shape {a.shape}")
    return a - a.mean(axis=0, keepdims=True)


def linear_cka(x: Any, y: Any) -> float:
    """Linear CKA of two feature matrices over the same n samples (n x d1, n x d2).

    CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with column-centred Xc, Yc, in
    float64. When n exceeds the widths this feature-space form costs n*d^2 instead of the
    n^2*d of the Gram (HSIC) form; otherwise the Gram form is used. Returns NaN when either
    matrix is constant (CKA is undefined there).
    """
    xc, yc = _centred(x), _centred(y)
    if xc.shape[0] != yc.shape[0]:
        raise ValueError(f"row counts differ: {xc.shape[0]} vs {yc.shape[0]}")
    n, d1 = xc.shape
    d2 = yc.shape[1]
    if n > max(d1, d2):
        cross = np.linalg.norm(yc.T @ xc) ** 2
        nx = np.linalg.norm(xc.T @ xc)
        ny = np.linalg.norm(yc.T @ yc)
    else:
        kx, ky = xc @ xc.T, yc @ yc.T  # centred Grams: Xc Xc^T is already H K H
        cross = float(np.sum(kx * ky))
        nx = np.linalg.norm(kx)
        ny = np.linalg.norm(ky)
    denom = nx * ny
    if denom <= 0.0 or not np.isfinite(denom):
        return float("nan")
    return float(cross / denom)


def sample_blocks(n: int, max_samples: int, seed: int = 0, n_blocks: int = 16
                  ) -> list[slice]:
    """Deterministic row subsample as a few contiguous blocks spread over the dataset.

    Contiguous blocks keep reads to a handful of cache chunks; spreading them over
    `n_blocks` equal segments avoids taking only the first classes of a class-sorted set.
    """
    if n <= max_samples:
        return [slice(0, n)]
    n_blocks = max(1, min(n_blocks, max_samples))
    size = max_samples // n_blocks
    extra = max_samples - size * n_blocks
    seg = n / n_blocks
    rng = np.random.default_rng(seed)
    out: list[slice] = []
    for b in range(n_blocks):
        want = size + (1 if b < extra else 0)
        lo, hi = int(round(b * seg)), int(round((b + 1) * seg))
        start = lo + int(rng.integers(0, max(1, hi - lo - want + 1)))
        out.append(slice(start, min(start + want, hi)))
    return out


def layer_cka_to_last(cache: CacheLike, kind: str = "cls", max_samples: int = 2000,
                      seed: int = 0) -> list[float]:
    """Linear CKA of every cached layer's `kind` token to the last layer's, in cache order.

    Reads at most `max_samples` rows (deterministic in `seed`), drops rows the cache marks
    invalid, and uses each layer at its true width, so zero padding never enters.
    """
    names = list(cache.layer_names)
    dims = list(getattr(cache, "layer_dims", None) or [])
    blocks = sample_blocks(int(cache.n), max_samples, seed)
    feats = np.concatenate([np.asarray(cache.read(kind, rows=s)) for s in blocks], axis=0)
    valid = getattr(cache, "valid", None)
    if callable(valid):  # rows of unreadable images hold zeros; keep them out
        mask = np.asarray(valid(), dtype=bool)
        feats = feats[np.concatenate([mask[s] for s in blocks])]
    if feats.ndim != 3 or feats.shape[1] != len(names):
        raise ValueError(f"cache.read returned shape {feats.shape} for {len(names)} layers")
    widths = dims if len(dims) == len(names) else [feats.shape[2]] * len(names)
    last = _centred(feats[:, -1, : widths[-1]])
    last_norm = float(np.linalg.norm(last.T @ last))  # shared by every layer: compute once
    out = []
    for i in range(len(names)):
        x = _centred(feats[:, i, : widths[i]])
        denom = float(np.linalg.norm(x.T @ x)) * last_norm
        if denom <= 0.0 or not np.isfinite(denom):
            out.append(float("nan"))
        else:
            out.append(float(np.linalg.norm(last.T @ x) ** 2 / denom))
    return out


# -- the report's layer similarities (only for pairs with per-layer runs; kept in cka.json)


CKA_FILE = "cka.json"
CKA_MAX_SAMPLES = 2000


def _cka_key(fingerprint: Any, kind: str) -> str:
    """A cache's CKA is keyed by its fingerprint, not its path: a cache replaced at the
    same path (`extract --overwrite` with other settings) is another key."""
    from featcache.records.store import settings_id

    blob = json.dumps([settings_id(fingerprint), kind, CKA_MAX_SAMPLES], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def layer_cka(records: Sequence[dict], out_dir: Path | None, compute: bool = True,
              open_cache: Callable[[str], Any] | None = None,
              problems: list[str] | None = None) -> dict[tuple[str, str], dict]:
    """{(model_dir, dataset): {"layers": [...], "cls": [...], "ap": [...]}} for depth plots.

    (Imported lazily by the report: only reports with per-layer runs need it.)

    Values come from `<out>/cka.json` when present for the same cache and fingerprint;
    otherwise, when `compute` is true, from the test cache (train when no test) of the
    pair's `layers` runs. A pair whose cache cannot be opened is noted and left out.
    """
    from featcache.reporting.summary import per_layer

    notes = problems if problems is not None else []
    store_path = out_dir / CKA_FILE if out_dir is not None else None
    store: dict[str, Any] = {}
    if store_path is not None and store_path.is_file():
        try:
            store = json.loads(store_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            store = {}
    pairs: dict[tuple[str, str], dict] = {}
    for rec in records:
        pair = (str(rec["model_dir"]), str(rec["dataset"]))
        if per_layer(rec.get("method")) and (  # the newest: on the cache there now
                pair not in pairs or str(rec.get("created")) > str(pairs[pair].get("created"))):
            pairs[pair] = rec
    out: dict[tuple[str, str], dict] = {}
    skipped: list[str] = []
    changed = False
    for (model_dir, dataset), rec in sorted(pairs.items()):
        caches = rec.get("caches") if isinstance(rec.get("caches"), dict) else {}
        split = "test" if caches.get("test") else "train"
        path = caches.get(split)
        if not path:
            skipped.append(f"{model_dir}/{dataset}: the record names no cache")
            continue
        fps = rec.get("fingerprints") if isinstance(rec.get("fingerprints"), dict) else {}
        key = _cka_key(fps.get(split), "cls+ap")
        if key in store:
            out[(model_dir, dataset)] = store[key]
            continue
        if not compute:
            continue
        try:
            result = _compute_cka(str(path), open_cache, fps.get(split))
        except FeatcacheError as exc:
            skipped.append(f"{model_dir}/{dataset}: {exc}")
            continue
        except Exception as exc:  # a broken cache must not sink the whole report
            skipped.append(f"{model_dir}/{dataset}: cannot read {path} "
                           f"({type(exc).__name__}: {exc})")
            continue
        result.update({"model_dir": model_dir, "dataset": dataset, "cache": str(path)})
        store[key] = result
        out[(model_dir, dataset)] = result
        changed = True
    if len(skipped) <= 3:
        notes.extend(f"CKA skipped for {s}" for s in skipped)
    else:
        notes.append(f"CKA skipped for {len(skipped)} of {len(pairs)} model/dataset pairs "
                     f"with per-layer runs, e.g. {skipped[0]}; depth plots show accuracy only "
                     "(use --no-cka to skip the attempt)")
    if changed and store_path is not None:
        try:
            store_path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_text(store_path, json.dumps(store, indent=1))
        except OSError as exc:
            notes.append(f"could not keep CKA values in {store_path}: {exc}")
    return out


def _compute_cka(path: str, open_cache: Callable[[str], Any] | None,
                 fingerprint: Any = None) -> dict[str, Any]:
    from featcache.reporting.cka import layer_cka_to_last

    if open_cache is None:
        if not Path(path).exists():
            raise FeatcacheError(f"cache {path} not found (moved or on another machine?)")
        from featcache.cache.store import open_cache as _open

        open_cache = _open
    cache = open_cache(path)
    if not same_fingerprint(cache, fingerprint):
        raise FeatcacheError(f"the cache at {path} was replaced since its runs (extract "
                             "--overwrite?); its CKA would not describe them")
    kinds = getattr(cache, "token_kinds", FEATURE_KINDS)  # a model without CLS has no curve
    out: dict[str, Any] = {"layers": list(cache.layer_names), "max_samples": CKA_MAX_SAMPLES}
    for kind in FEATURE_KINDS:
        if kind in kinds:
            out[kind] = layer_cka_to_last(cache, kind, CKA_MAX_SAMPLES)
    return out


def same_fingerprint(cache: Any, fingerprint: Any) -> bool:
    """Whether an opened cache is the one a run names (a cache that states no fingerprint,
    or a record that names none, cannot be told apart: taken as the same)."""
    from featcache.records.store import settings_id

    now = getattr(cache, "fingerprint", None)
    if not isinstance(now, dict) or not isinstance(fingerprint, dict):
        return True
    return settings_id(now) == settings_id(fingerprint)
