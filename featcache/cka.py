"""Linear CKA between layers, from the feature cache.

The paper's depth figure shows that early layers are dissimilar to the last one (low CKA)
yet probe nearly as well; this module gives the "similarity" half of that picture for a
user's own cache without touching the backbone.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class CacheLike(Protocol):
    """What `layer_cka_to_last` needs from `featcache.cache.open_cache(...)`."""

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
