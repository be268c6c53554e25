"""Differential fuzz of the cache reader (docs/cache-format.md, "Nothing damaged reads as
data"): random caches, random reads and random damage.

- Sound cache: `Cache.read(kind, layers, rows)` and `read_into` return exactly (bit for
  bit) what plain zarr returns for the same selection.
- One damaged file (a flipped byte, a truncation, extra bytes, a deletion): opening the
  cache and checking its files (what probe, export and verify do first), then every
  read, either refuses with a FeatcacheError or returns the clean cache's values bit
  for bit.
  A shard file swapped for another valid one is the known hole (docs) and is not drawn.

A small seeded run by default (20 damages); the full one (250) is marked slow.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from probecache import SynthSpec, fingerprint

from featcache.cache.store import TOKEN_KIND, Layout, create_cache, open_cache
from featcache.errors import FeatcacheError


def random_cache(path: Path, rng: np.random.Generator) -> Path:
    """A complete cache of random shape, written as the extractor writes it."""
    n = int(rng.integers(1, 90))
    n_layers, dim = int(rng.integers(1, 5)), int(rng.integers(1, 12))
    shard = int(min(n, 2 ** rng.integers(0, 6)))
    tokens = int(rng.integers(1, 5)) if rng.random() < 0.5 else None
    layout = Layout(n, n_layers, dim, shard, tokens, int(rng.integers(1, 7)) if tokens else None,
                    has_cls=bool(rng.random() < 0.7),
                    pool_dim=int(rng.integers(1, 6)) if rng.random() < 0.3 else None)
    names = [f"block{i}" for i in range(n_layers - 1)] + ["final"]
    spec = SynthSpec(n_blocks=n_layers - 1, dim=dim, n_classes=3)
    labels = rng.integers(0, 3, n)
    cache = create_cache(path, fingerprint(spec, "fuzz", "train", n), layout, labels,
                         ["a", "b", "c"], names, [dim] * n_layers,
                         {"probe_token": layout.token_kinds[0]})
    values = {name: rng.normal(size=cache.group[name].shape).astype(np.float16)
              for name in cache.arrays if name not in ("labels", "valid")}
    values["labels"], values["valid"] = labels, rng.random(n) < 0.9
    for k in range(layout.n_shards):
        rows = layout.rows(k)
        cache.write_shard(k, {name: v[rows] for name, v in values.items()})
    assert cache.finalize()
    return path


def plain(path: Path, name: str) -> np.ndarray:
    return zarr.open_array(str(path / name), mode="r")[...]


def random_selection(rng: np.random.Generator, n: int, n_layers: int):
    start = int(rng.integers(0, n))
    rows = slice(start, int(rng.integers(start + 1, n + 1)))
    if rng.random() < 0.3:
        return rows, None
    layers = rng.permutation(n_layers)[: int(rng.integers(1, n_layers + 1))]
    return rows, [int(i) for i in layers]


def check_reads_equal_zarr(path: Path, rng: np.random.Generator) -> None:
    cache = open_cache(path)
    for name in cache.arrays:
        if name in ("labels", "valid", "done"):
            continue
        truth = plain(path, name)
        for _ in range(3):
            rows, layers = random_selection(rng, cache.n, truth.shape[1])
            if name == TOKEN_KIND or name == "pool":
                layers = None
            want = truth[rows] if layers is None else truth[rows][:, layers]
            got = cache.read(name, layers, rows)
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), (name, rows)
            if layers is not None:  # the probes' path: each layer into its own column
                out = np.zeros((want.shape[0], len(layers) + 1, truth.shape[2]), np.float16)
                cache.read_into(name, layers, rows, out, list(range(1, len(layers) + 1)))
                assert out[:, 1:].tobytes() == want.tobytes() and not out[:, 0].any()
    assert cache.labels().tobytes() == plain(path, "labels").tobytes()
    assert cache.valid().tobytes() == plain(path, "valid").tobytes()


def damage(path: Path, rng: np.random.Generator) -> tuple[str, Path, bytes]:
    """Damage one file of one array; returns what was done, and how to undo it."""
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.parent != path)
    target = files[int(rng.integers(len(files)))]
    before = target.read_bytes()
    data = bytearray(before)
    how = ["flip", "truncate", "append", "delete"][int(rng.integers(4))]
    if how == "delete" or not data:
        target.unlink()
        return f"deleted {target}", target, before
    if how == "flip":
        data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
    elif how == "truncate":
        data = data[: int(rng.integers(len(data)))]
    else:
        data += rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8).tobytes()
    target.write_bytes(bytes(data))
    return f"{how} {target}", target, before


def refused_or_equal(read, want: np.ndarray, what: str) -> None:
    try:
        got = read()
    except FeatcacheError:
        return
    assert got.tobytes() == want.tobytes(), what


def check_damaged(path: Path, truth: dict[str, np.ndarray], rng: np.random.Generator) -> None:
    what, target, before = damage(path, rng)
    try:
        check_damaged_reads(path, truth, rng, what)
    finally:
        target.write_bytes(before)


def check_damaged_reads(path: Path, truth: dict[str, np.ndarray], rng: np.random.Generator,
                        what: str) -> None:
    try:  # what probe, export and verify do first: open, then look for lost files
        cache = open_cache(path)
        cache.check_files()
    except FeatcacheError:
        return
    for name in cache.arrays:
        if name in ("labels", "valid", "done"):
            continue
        refused_or_equal(lambda name=name: cache.read(name), truth[name], what)
        rows, _ = random_selection(rng, cache.n, 1)
        refused_or_equal(lambda name=name, rows=rows: cache.read(name, None, rows),
                         truth[name][rows], what)
    refused_or_equal(cache.labels, truth["labels"], what)
    refused_or_equal(cache.valid, truth["valid"], what)
    try:  # a lost flag only ever makes a shard unfinished, never finished
        done = cache.done()
    except FeatcacheError:
        return
    assert done.dtype == bool and done.shape == truth["done"].shape, what


def fuzz(tmp_path: Path, seed: int, n_caches: int, n_damages: int) -> None:
    """Each cache is damaged `n_damages` times, one file at a time (each undone after)."""
    rng = np.random.default_rng(seed)
    for i in range(n_caches):
        path = random_cache(tmp_path / f"c{i}", rng)
        check_reads_equal_zarr(path, rng)
        truth = {name: plain(path, name) for name in [*open_cache(path).arrays, "done"]}
        for _ in range(n_damages):
            check_damaged(path, truth, rng)
        shutil.rmtree(path)


def test_fuzz_small(tmp_path):
    fuzz(tmp_path, seed=19, n_caches=4, n_damages=5)


@pytest.mark.slow
@pytest.mark.parametrize("part", range(5))
def test_fuzz_250_damages(tmp_path, part):
    """In five parts (each well under the per-test timeout): 50 caches, 250 damages,
    ~0.45 s each on this machine (850, as once run by hand, would cost the suite 6 min)."""
    fuzz(tmp_path, seed=250 + part, n_caches=10, n_damages=5)
