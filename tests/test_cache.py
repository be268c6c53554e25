"""The on-disk format: layout, reading subsets, listing, HDF5 export, locking."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from conftest import TIMM_TINY, TIMM_TINY_KW

from featcache.cache.commands import export_hdf5
from featcache.cache.files import remove_leftovers, write_lock
from featcache.cache.fingerprint import fingerprint_diff
from featcache.cache.store import (
    Layout,
    cache_path,
    choose_shard_size,
    default_cache_root,
    find_caches,
    model_dir_name,
    open_cache,
)
from featcache.errors import FeatcacheError
from featcache.extracting.run import ExtractOptions, extract

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def cache_root(wds_path, tmp_path_factory) -> Path:
    """train (40 images, 3 shards of 16) and test (20, 2 shards), with all tokens."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("caches")
    extract(ExtractOptions(model=TIMM_TINY, dataset=f"wds:{wds_path}", weights="random",
                           model_arg=TIMM_TINY_KW, cache=root, batch_size=8,
                           shard_size=16, workers=0, all_tokens=True))
    torch.set_num_threads(threads)
    return root


@pytest.fixture()
def train_cache(cache_root):
    (found,) = [c for c in find_caches(cache_root) if c.split == "train"]
    return found


@pytest.mark.parametrize("kind", ["cls", "ap"])
@pytest.mark.parametrize("layers", [None, [0], [3], [1, 3], [0, 1, 2, 3]])
@pytest.mark.parametrize("rows", [None, slice(0, 16), slice(5, 37), slice(39, 40)])
def test_read_subsets_equal_slices_of_the_full_array(train_cache, kind, layers, rows):
    full = zarr.open_array(str(train_cache.path / kind), mode="r")[...]  # plain zarr
    assert full.shape == (40, 4, 48) and full.dtype == np.float16
    part = train_cache.read(kind, layers, rows)
    want = full[rows if rows is not None else slice(None)]
    if layers is not None:
        want = want[:, layers]
    assert part.dtype == want.dtype and part.tobytes() == want.tobytes()


def test_read_last_tokens_and_layer_names(train_cache):
    full = train_cache.read("last_tokens")
    assert full.shape == (40, 17, 48)
    assert full.tobytes() == zarr.open_array(str(train_cache.path / "last_tokens"),
                                             mode="r")[...].tobytes()
    np.testing.assert_array_equal(train_cache.read("last_tokens", rows=slice(10, 20)),
                                  full[10:20])
    # the final layer's CLS is token 0 of the last layer's tokens
    np.testing.assert_array_equal(train_cache.read("cls", [3])[:, 0], full[:, 0])
    assert train_cache.layer_index(["final", "block0"]) == [3, 0]
    with pytest.raises(FeatcacheError, match="no layer 'block9'"):
        train_cache.layer_index(["block9"])


def test_metadata_and_summary(train_cache, wds_data):
    c = train_cache
    assert c.layer_names == ["block0", "block1", "block2", "final"]
    assert c.layer_dims == [48, 48, 48, 48]
    assert c.class_names == wds_data.class_names
    assert (c.n, c.dim, c.complete) == (40, 48, True)
    np.testing.assert_array_equal(c.labels(), wds_data.splits["train"].labels)
    assert c.valid().all()
    assert c.layout == Layout(40, 4, 48, 16, 17, 48)
    fp = c.fingerprint
    assert fp["model"]["model"] == TIMM_TINY and fp["model"]["weights"] == "random:0"
    assert fp["model"]["tap"] == "reference" and fp["compute_dtype"] == "float32"
    assert fp["dataset"]["split"] == "train" and fp["dataset"]["n"] == 40
    summary = c.summary()
    for key in ("path", "model", "dataset", "split", "tap", "n", "layers", "complete"):
        assert key in summary
    assert summary["shards"] == summary["shards_done"] == 3
    assert c.mode == "r"


def test_zarr_array_layout(train_cache):
    """Shards of whole samples (the unit of writing); inner chunks of one layer each; a
    crc32c per chunk; fills that cannot pass for data (format 2)."""
    from zarr.codecs import Crc32cCodec

    group = zarr.open_group(str(train_cache.path), mode="r")
    for kind in ("cls", "ap", "last_tokens"):
        arr = group[kind]
        assert arr.dtype == np.float16 and arr.compressors == (Crc32cCodec(),)
        assert np.isnan(arr.fill_value)
    for kind in ("cls", "ap"):
        arr = group[kind]
        assert arr.shape == (40, 4, 48)
        assert arr.shards == (16, 4, 48)
        assert arr.chunks == (16, 1, 48)
    assert group["last_tokens"].chunks == (16, 17, 48)
    assert group["last_tokens"].shards == (16, 17, 48)
    assert group["labels"].dtype == np.int64 and group["labels"].chunks == (16,)
    assert group["labels"].fill_value == -1
    assert group["valid"].dtype == np.bool_ and group["valid"].chunks == (16,)
    assert group["done"].shape == (3,) and group["done"].chunks == (1,)
    for kind in ("labels", "valid", "done"):
        assert group[kind].compressors == (Crc32cCodec(),)
    attrs = group.attrs.asdict()
    assert attrs["featcache"]["format"] == 4 and attrs["token_kinds"] == ["cls", "ap"]
    # one identity row (one object) per shard: tag, then 4 + 4 + 1 + 1 + 1 chunk crcs
    assert group["identity"].shape == (3, 12) and group["identity"].chunks == (1, 12)
    assert attrs["complete"] is True and attrs["n_shards"] == 3 and attrs["shard_size"] == 16


def test_plain_zarr_reading_matches(train_cache):
    """What docs/cache-format.md shows: another tool needs only zarr."""
    g = zarr.open_group(str(train_cache.path), mode="r")
    names = g.attrs["layer_names"]
    final_cls = g["cls"][:, names.index("final"), : g.attrs["layer_dims"][-1]]
    np.testing.assert_array_equal(final_cls, train_cache.read("cls", [3])[:, 0])


def test_find_caches_and_hidden_folders(cache_root, tmp_path):
    found = find_caches(cache_root)
    assert sorted(c.split for c in found) == ["test", "train"]
    assert find_caches(tmp_path / "nothing-here") == []
    # a half-built cache (hidden tmp folder) is never listed
    hidden = found[0].path.with_name(f".{found[0].path.name}.tmp-1")
    import shutil

    shutil.copytree(found[0].path, hidden)
    try:
        assert len(find_caches(cache_root)) == 2
        assert remove_leftovers(found[0].path) == [hidden]
        assert not hidden.exists()
    finally:
        shutil.rmtree(hidden, ignore_errors=True)


def test_open_cache_errors(tmp_path):
    with pytest.raises(FeatcacheError, match="no featcache cache"):
        open_cache(tmp_path)
    zarr.open_group(str(tmp_path / "g"), mode="w")
    with pytest.raises(FeatcacheError, match="not a featcache cache"):
        open_cache(tmp_path / "g")


def test_export_hdf5_roundtrip(train_cache, tmp_path):
    out = export_hdf5(train_cache, tmp_path / "x.h5")
    g = zarr.open_group(str(train_cache.path), mode="r")
    with h5py.File(out, "r") as h5:
        assert set(h5) == {"cls", "ap", "last_tokens", "labels", "valid"}
        for name in h5:
            assert h5[name].dtype == g[name].dtype
            np.testing.assert_array_equal(h5[name][...], g[name][...])
        attrs = {k: h5.attrs[k] for k in h5.attrs}
    for key, value in g.attrs.asdict().items():
        got = attrs[key]
        if not isinstance(value, (int, float, str)):
            got = json.loads(got)
        assert got == value, key
    with pytest.raises(FeatcacheError, match="exists"):
        export_hdf5(train_cache, out)
    export_hdf5(train_cache, out, overwrite=True)


def test_fingerprint_diff_names_settings_before_derived_fields():
    old = {"model": {"model_kwargs": {"depth": 3}, "layer_names": ["a", "b"], "tap": "x"},
           "dataset": {"identity": {"location": "/a", "sha256": "1"}}}
    new = {"model": {"model_kwargs": {"depth": 2}, "layer_names": ["a"], "tap": "x"},
           "dataset": {"identity": {"location": "/b", "sha256": "1"}}}
    diff = fingerprint_diff(old, new)
    assert diff[0] == "model.model_kwargs.depth: 3 → 2"
    assert diff[1].startswith("model.layer_names")
    assert len(diff) == 2  # a moved copy of the same data is not a different setting


def test_naming_and_roots(monkeypatch, tmp_path):
    assert model_dir_name("clip-vit-b16", "reference", "hub:x") == "clip-vit-b16"
    assert model_dir_name("clip-vit-b16", "residual", "hub:x") == "clip-vit-b16@residual"
    assert model_dir_name("timm:vit_tiny", "reference", "random:3") == "timm-vit_tiny@random-3"
    assert model_dir_name("vit-s16", "reference",
                          "file:sha256:0123456789abcdef") == "vit-s16@file-0123456789"
    assert cache_path(tmp_path, "m", "d", "train") == tmp_path / "m" / "d" / "train"
    monkeypatch.setenv("FEATCACHE_CACHE", str(tmp_path / "env"))
    assert default_cache_root() == tmp_path / "env"
    monkeypatch.delenv("FEATCACHE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_root() == tmp_path / "xdg" / "featcache"


def test_choose_shard_size():
    assert choose_shard_size(2 * 2 * 25 * 1024) == 512  # ViT-L CLS+AP: 64 MiB / 100 KiB
    assert choose_shard_size(2 * 2 * 13 * 768) == 1024  # ViT-B: capped at 1024
    assert choose_shard_size(2 * 257 * 1024) == 64  # all tokens of ViT-L/14
    assert choose_shard_size(1 << 40) == 1


def test_write_lock_refuses_a_second_writer(tmp_path):
    path = tmp_path / "m" / "d" / "train"
    with write_lock(path):
        errors: list[Exception] = []

        def second() -> None:
            try:
                with write_lock(path):
                    pass
            except FeatcacheError as exc:
                errors.append(exc)

        thread = threading.Thread(target=second)
        thread.start()
        thread.join()
        assert errors and "another featcache process is writing" in str(errors[0])
    with write_lock(path):  # released: free again
        pass


def test_write_lock_held_by_another_process(tmp_path):
    path = tmp_path / "train"
    lock_file = tmp_path / ".train.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys, time\n"
         f"f = open({str(lock_file)!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
         "print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FeatcacheError, match="another featcache process"), write_lock(path):
            pass
    finally:
        holder.kill()
        holder.wait()


def test_little_padding_on_disk(wds_path, tmp_path):
    """Zarr pads edge chunks to full size: the shard is capped at N and inner chunks are a
    few rows, so the stored bytes stay at the raw fp16 size (plus the shard index)."""
    (result,) = extract(ExtractOptions(model=TIMM_TINY, dataset=f"wds:{wds_path}",
                                       split=("test",), weights="random",
                                       model_arg=TIMM_TINY_KW, cache=tmp_path,
                                       workers=0, all_tokens=True))
    cache = open_cache(result.path)
    assert cache.layout.shard_size == 20  # never more than N
    for name, row_bytes in (("cls", 4 * 48 * 2), ("ap", 4 * 48 * 2),
                            ("last_tokens", 17 * 48 * 2)):
        on_disk = sum(f.stat().st_size for f in (result.path / name / "c").rglob("*")
                      if f.is_file())
        raw = 20 * row_bytes
        assert raw <= on_disk <= raw + 1024, (name, on_disk, raw)  # + the shard index


def test_inner_chunks_tile_the_shard():
    from featcache.cache.store import _inner_rows

    assert _inner_rows(1024, 64) == 64
    assert _inner_rows(100, 64) == 50
    assert _inner_rows(97, 64) == 1
    assert _inner_rows(16, 20) == 16


def test_a_cache_written_by_another_tool_with_zarr_alone(tmp_path):
    """docs/cache-format.md, 'Writing a compatible cache': the minimum featcache reads."""
    path = tmp_path / "mymodel" / "mydata" / "train"
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    rng = np.random.default_rng(0)
    cls = rng.normal(size=(10, 3, 8)).astype(np.float16)
    g.create_array("cls", data=cls)
    g.create_array("ap", data=cls[::-1].copy())
    g.create_array("labels", data=np.arange(10) % 2)
    g.create_array("valid", data=np.ones(10, dtype=bool))
    g.create_array("done", data=np.ones(1, dtype=bool))
    g.attrs.update({"featcache": {"format": 1, "version": "external"},
                    "fingerprint": {"model": {"model": "mine", "weights": "w", "tap": "t"},
                                    "dataset": {"name": "mydata", "split": "train"}},
                    "layer_names": ["block0", "block1", "final"], "layer_dims": [8, 8, 8],
                    "class_names": ["a", "b"], "n": 10, "dim": 8, "shard_size": 10,
                    "n_shards": 1, "n_tokens": None, "token_dim": None, "complete": True})
    (found,) = find_caches(tmp_path)
    assert found.complete and found.summary()["model"] == "mine"
    np.testing.assert_array_equal(found.read("cls", [2], slice(2, 5)), cls[2:5, [2]])
    assert found.labels().dtype == np.int64 and found.valid().all()
