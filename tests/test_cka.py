"""Linear CKA: agreement with the HSIC (Gram) form, invariances, and the cache walk."""

from __future__ import annotations

import numpy as np
import pytest

from featcache.reporting.cka import layer_cka_to_last, linear_cka, sample_blocks


def hsic_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Direct definition: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), K = XX^T, centred by H."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k = h @ (x @ x.T) @ h
    lm = h @ (y @ y.T) @ h
    return float(np.trace(k @ lm) / np.sqrt(np.trace(k @ k) * np.trace(lm @ lm)))


@pytest.mark.parametrize("n,d1,d2", [(200, 16, 24), (30, 64, 40), (50, 50, 50)])
def test_matches_gram_form(n: int, d1: int, d2: int) -> None:
    rng = np.random.default_rng(n + d1)
    x = rng.normal(size=(n, d1)) + 3.0  # an offset, so centring matters
    y = x[:, : min(d1, d2)] @ rng.normal(size=(min(d1, d2), d2)) + rng.normal(size=(n, d2))
    assert linear_cka(x, y) == pytest.approx(hsic_cka(x, y), rel=1e-9, abs=1e-12)


def test_invariances_and_identity() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 32))
    q, _ = np.linalg.qr(rng.normal(size=(32, 32)))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, x @ q) == pytest.approx(1.0)          # orthogonal transform
    assert linear_cka(x, 7.5 * x) == pytest.approx(1.0)        # isotropic scaling
    assert linear_cka(x, x + 4.0) == pytest.approx(1.0)        # translation (centred)
    assert linear_cka(x, x @ q) == pytest.approx(linear_cka(x @ q, x))  # symmetric
    # float16 input (the cache's dtype) is computed in float64, still exactly 1 with itself
    assert linear_cka(x.astype(np.float16), x.astype(np.float16)) == pytest.approx(1.0)


def test_unrelated_data_is_low() -> None:
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(2000, 8)), rng.normal(size=(2000, 8))
    value = linear_cka(x, y)
    assert 0.0 <= value < 0.05
    # a non-isotropic map lowers CKA below 1 but keeps it well above unrelated data
    assert 0.3 < linear_cka(x, x * np.array([10, 1, 1, 1, 1, 1, 1, 0.1])) < 1.0


def test_constant_and_shape_errors() -> None:
    assert np.isnan(linear_cka(np.ones((10, 3)), np.random.default_rng(0).normal(size=(10, 3))))
    with pytest.raises(ValueError):
        linear_cka(np.zeros((10, 3)), np.zeros((9, 3)))


def test_sample_blocks_deterministic_and_spread() -> None:
    a = sample_blocks(100_000, 2000, seed=3)
    assert a == sample_blocks(100_000, 2000, seed=3)
    assert a != sample_blocks(100_000, 2000, seed=4)
    assert sum(s.stop - s.start for s in a) == 2000
    assert a[0].start < 100_000 / 16 and a[-1].stop > 100_000 * 15 / 16
    assert all(x.stop <= y.start for x, y in zip(a, a[1:], strict=False))
    assert sample_blocks(500, 2000) == [slice(0, 500)]


class FakeCache:
    """Duck-typed stand-in for featcache.cache.store.Cache: zero-padded layers, fp16."""

    def __init__(self, n: int = 600, dims: tuple[int, ...] = (8, 8, 8, 6)) -> None:
        rng = np.random.default_rng(0)
        self.n = n
        self.layer_names = [f"block{i}" for i in range(len(dims) - 1)] + ["final"]
        self.layer_dims = list(dims)
        width = max(dims)
        base = rng.normal(size=(n, dims[-1]))
        data = {}
        for kind in ("cls", "ap"):
            arr = np.zeros((n, len(dims), width), dtype=np.float16)
            arr[:, -1, : dims[-1]] = base
            arr[:, -2, : dims[-1]] = base @ np.linalg.qr(rng.normal(size=(6, 6)))[0]  # same
            arr[:, 0, : dims[0]] = rng.normal(size=(n, dims[0]))  # unrelated
            mix = np.concatenate([base, rng.normal(size=(n, dims[1] - dims[-1]))], axis=1)
            arr[:, 1, : dims[1]] = mix + rng.normal(size=(n, dims[1]))  # in between
            data[kind] = arr
        self.data = data
        self.reads: list[slice | None] = []

    def read(self, kind: str, layers: list[int] | None = None,
             rows: slice | None = None) -> np.ndarray:
        self.reads.append(rows)
        arr = self.data[kind][rows if rows is not None else slice(None)]
        return arr if layers is None else arr[:, layers]


def test_layer_cka_to_last_on_fake_cache() -> None:
    cache = FakeCache()
    values = layer_cka_to_last(cache, "cls", max_samples=400, seed=0)
    assert len(values) == 4
    assert values[-1] == pytest.approx(1.0)
    assert values[-2] == pytest.approx(1.0, abs=1e-3)
    assert values[0] < 0.2 < values[1] < 0.95
    assert all(r is not None and r.step in (None, 1) for r in cache.reads)  # contiguous
    assert values == layer_cka_to_last(cache, "cls", max_samples=400, seed=0)
    whole = layer_cka_to_last(cache, "ap", max_samples=10_000)  # all rows: compare exactly
    feats = cache.data["ap"]
    for i, dim in enumerate(cache.layer_dims):
        assert whole[i] == pytest.approx(linear_cka(feats[:, i, :dim], feats[:, -1, :6]))


def test_layer_cka_to_last_on_real_cache(tmp_path) -> None:
    cache_mod = pytest.importorskip("featcache.cache.store")
    n, dims = 300, [8, 8, 6]
    layout = cache_mod.Layout(n=n, n_layers=3, dim=8, shard_size=128)
    cache = cache_mod.create_cache(
        tmp_path / "c", {"model": {"model": "fake"}, "dataset": {"name": "d", "split": "test"}},
        layout, np.zeros(n, dtype=np.int64), ["a"], ["block0", "block1", "final"], dims)
    rng = np.random.default_rng(0)
    last = rng.normal(size=(n, 6))
    feats = np.zeros((n, 3, 8), dtype=np.float16)
    feats[:, 0] = rng.normal(size=(n, 8))
    feats[:, 1, :6] = last @ np.linalg.qr(rng.normal(size=(6, 6)))[0]
    feats[:, 2, :6] = last
    for shard in range(layout.n_shards):
        rows = layout.rows(shard)
        cache.write_shard(shard, {"cls": feats[rows], "ap": feats[rows],  # as extract does:
                                  "labels": np.zeros(rows.stop - rows.start, np.int64),
                                  "valid": np.ones(rows.stop - rows.start, bool)})
    values = layer_cka_to_last(cache_mod.open_cache(tmp_path / "c"), "cls", max_samples=200)
    assert values[2] == pytest.approx(1.0) and values[1] == pytest.approx(1.0, abs=1e-3)
    assert values[0] < 0.2
