"""Synthetic featcache caches for probe tests: real Zarr caches, chosen per-layer content.

`make_pair` writes `<root>/<model_dir>/<dataset>/{train,test}` through the same
`create_cache` → `write_shard` → `finalize` path the extractor takes, with a fingerprint
shaped like a real one (`featcache.extracting.run.build_fingerprint`). What each token holds is
chosen by the test:

- every (layer, kind) token is `offset + noise` (an offset common to all samples, as real
  ViT features have, and isotropic Gaussian noise of norm ≈ 1);
- `signal={("block2", "ap"): 3.0}` adds `3.0 · prototype[class]` to that token only
  (prototypes of norm ≈ 1, one per class and token); everything else carries no class;
- `all_tokens=T` also stores T tokens of the final layer: token 0 is the final CLS, the
  others noise, plus `token_signal` planted in one patch token.

Values are stored as float16, like real caches; `expected_tokens` returns the same
L2-normalised float32 features a probe should see, for independent references (sklearn).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featcache.cache.store import Cache, Layout, cache_path, create_cache, open_cache

MODEL = "synth-vit"


@dataclass
class SynthSpec:
    """What a synthetic model/dataset pair looks like."""

    n_blocks: int = 4
    dim: int = 32
    n_classes: int = 4
    n_train: int = 240
    n_test: int = 120
    signal: dict[tuple[str, str], float] = field(default_factory=dict)
    noise: float = 1.0
    offset: float = 1.0
    all_tokens: int | None = None  # number of last-layer tokens to store (None: none)
    token_signal: tuple[int, float] | None = None  # (patch token index, strength)
    shard_size: int = 64
    seed: int = 0
    model: str = MODEL
    tap: str = "reference"
    probe_token: str = "cls"
    class_balance: tuple[float, ...] | None = None  # class probabilities (None: uniform)
    token_kinds: tuple[str, ...] = ("cls", "ap")  # ("ap", "pool"): a model without CLS
    class_sorted: bool = False  # samples in class order, as many datasets store them

    @property
    def layer_names(self) -> list[str]:
        return [*(f"block{i}" for i in range(self.n_blocks)), "final"]


def fingerprint(spec: SynthSpec, dataset: str, split: str, n: int,
                **model_overrides: Any) -> dict[str, Any]:
    """Shaped like `featcache.extracting.run.build_fingerprint` of a timm model."""
    names = spec.layer_names
    model = {
        "model": spec.model,
        "backend": "timm",
        "arch": "synthetic_vit",
        "pretrained": None,
        "model_kwargs": {"depth": spec.n_blocks, "embed_dim": spec.dim},
        "weights": "random:0",
        "tap": spec.tap,
        "preprocess": {"input_size": [3, 32, 32], "interpolation": "bicubic",
                       "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_pct": 1.0},
        "layer_names": names,
        "layer_dims": [spec.dim] * len(names),
        "n_prefix_tokens": int("cls" in spec.token_kinds),
        "n_tokens": spec.all_tokens or 17,
    }
    if list(spec.token_kinds) != ["cls", "ap"]:  # as Backbone.describe writes it
        model["token_kinds"] = list(spec.token_kinds)
    model.update(model_overrides)
    return {
        "model": model,
        "dataset": {"name": dataset, "split": split, "n": n,
                    "identity": {"source": "synthetic", "seed": spec.seed, "split": split},
                    "class_names": [f"class{c}" for c in range(spec.n_classes)]},
        "compute_dtype": "float32",
        "storage_dtype": "float16",
        "all_tokens": spec.all_tokens is not None,
    }


def _stable_hash(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode())


def _token_values(spec: SynthSpec, key: str, y: np.ndarray, rng: np.random.Generator,
                  strength: float) -> np.ndarray:
    """offset + noise (+ strength · prototype[y]) for one token of every sample."""
    base = np.random.default_rng([spec.seed, _stable_hash(key)])
    offset = base.normal(size=spec.dim) / np.sqrt(spec.dim) * spec.offset
    protos = base.normal(size=(spec.n_classes, spec.dim)) / np.sqrt(spec.dim)
    x = offset + spec.noise * rng.normal(size=(len(y), spec.dim)) / np.sqrt(spec.dim)
    if strength:
        x = x + strength * protos[y]
    return x


def make_split(root: Path, spec: SynthSpec, split: str, n: int, dataset: str = "synth",
               model_dir: str | None = None, complete: bool = True,
               **model_overrides: Any) -> Cache:
    """Write one split's cache; `complete=False` leaves its last shard unwritten."""
    rng = np.random.default_rng([spec.seed, _stable_hash(split)])
    p = None if spec.class_balance is None else np.asarray(spec.class_balance, float)
    y = rng.choice(spec.n_classes, size=n, p=None if p is None else p / p.sum())
    if spec.class_sorted:  # every shard then holds one or two classes
        y = np.sort(y)
    names = spec.layer_names
    arrays: dict[str, np.ndarray] = {}
    for kind in ("cls", "ap"):
        if kind in spec.token_kinds:
            arrays[kind] = np.stack(
                [_token_values(spec, f"{name}.{kind}", y, rng,
                               spec.signal.get((name, kind), 0.0))
                 for name in names], axis=1).astype(np.float16)
    if "pool" in spec.token_kinds:
        arrays["pool"] = _token_values(spec, "final.pool", y, rng, spec.signal.get(
            ("final", "pool"), 0.0))[:, None].astype(np.float16)
    if spec.all_tokens:
        T = spec.all_tokens
        first = arrays["cls" if "cls" in arrays else "ap"][:, -1].astype(np.float64)
        toks = [first]
        for t in range(1, T):
            strength = 0.0
            if spec.token_signal and spec.token_signal[0] == t:
                strength = spec.token_signal[1]
            toks.append(_token_values(spec, f"final.token{t}", y, rng, strength))
        arrays["last_tokens"] = np.stack(toks, axis=1).astype(np.float16)
    fp = fingerprint(spec, dataset, split, n, **model_overrides)
    layout = Layout(n, len(names), spec.dim, spec.shard_size, spec.all_tokens,
                    spec.dim if spec.all_tokens else None, has_cls="cls" in spec.token_kinds,
                    pool_dim=spec.dim if "pool" in spec.token_kinds else None)
    path = cache_path(root, model_dir or spec.model, dataset, split)
    probe_token = spec.probe_token if spec.probe_token in spec.token_kinds \
        else spec.token_kinds[-1]
    cache = create_cache(path, fp, layout, y, fp["dataset"]["class_names"], names,
                         [spec.dim] * len(names), {"probe_token": probe_token})
    shards = range(layout.n_shards - (0 if complete else 1))
    # every array of a shard, as the extractor writes them
    arrays["labels"] = np.asarray(y, dtype=np.int64)
    arrays["valid"] = np.ones(n, dtype=bool)
    for shard in shards:
        rows = layout.rows(shard)
        cache.write_shard(shard, {k: v[rows] for k, v in arrays.items()})
    cache.finalize({"timings": {"extract_s": 0.0}})
    return open_cache(path)


def make_pair(root: Path, spec: SynthSpec | None = None, dataset: str = "synth",
              model_dir: str | None = None, **kwargs: Any) -> tuple[Cache, Cache]:
    """Train and test caches of one synthetic model/dataset pair."""
    spec = spec or SynthSpec(**kwargs)
    train = make_split(root, spec, "train", spec.n_train, dataset, model_dir)
    test = make_split(root, spec, "test", spec.n_test, dataset, model_dir)
    return train, test


def expected_tokens(cache: Cache, tokens: list[str]) -> np.ndarray:
    """(N, T, D) float32 of the named tokens ("block2.ap"), each L2-normalised: computed
    here from the stored float16 values, independently of featcache.probing.run."""
    out = []
    for token in tokens:
        name, kind = token.split(".")
        index = 0 if kind == "pool" else cache.layer_names.index(name)
        raw = np.asarray(cache.group[kind][:, index], np.float32)
        out.append(raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12))
    return np.stack(out, axis=1)
