"""The extraction loop: resume after interruption (bitwise), fingerprint refusal, locking,
unreadable images, shard-aligned batches."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from cliutil import kill_9_when, slow_extract
from conftest import TIMM_TINY, TIMM_TINY_KW, model_args

from featcache import sources as ds
from featcache.cache.files import write_lock
from featcache.cache.store import Cache, Layout, open_cache
from featcache.errors import FeatcacheError, FingerprintMismatch
from featcache.extracting.run import ExtractOptions, ShardBatches, extract

pytestmark = pytest.mark.usefixtures("torch_one_thread")

ARRAYS = ("cls", "ap", "last_tokens", "labels", "valid", "done")


def options(dataset: str, root: Path, **kw) -> ExtractOptions:
    base = dict(model=TIMM_TINY, dataset=dataset, split=("train",), weights="random",
                model_arg=dict(TIMM_TINY_KW), cache=root, batch_size=8, shard_size=16,
                workers=0, all_tokens=True)
    base.update(kw)
    return ExtractOptions(**base)


def arrays(path: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(path), mode="r")
    return {name: g[name][...] for name in ARRAYS if name in g}


def assert_bitwise_equal(a: Path, b: Path) -> None:
    x, y = arrays(a), arrays(b)
    assert set(x) == set(y)
    for name in x:
        assert x[name].dtype == y[name].dtype
        assert x[name].tobytes() == y[name].tobytes(), name


def snapshot(path: Path) -> dict[str, tuple[str, int]]:
    """Every file under a cache: content hash and modification time."""
    out = {}
    for f in sorted(Path(path).rglob("*")):
        if f.is_file():
            out[str(f.relative_to(path))] = (hashlib.sha256(f.read_bytes()).hexdigest(),
                                             f.stat().st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def reference(wds_path, tmp_path_factory) -> Path:
    """An uninterrupted extraction of the train split (40 images: shards 16 + 16 + 8)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    (result,) = extract(options(f"wds:{wds_path}", tmp_path_factory.mktemp("ref")))
    torch.set_num_threads(threads)
    assert result.status == "written" and result.shards_written == 3
    return result.path


class Interrupting:
    """A dataset that stops the run (Ctrl-C, or a crash) after `after` images."""

    def __init__(self, inner, after: int, exc: BaseException) -> None:
        self.inner, self.after, self.exc, self.count = inner, after, exc, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)

    def load(self, i: int):
        self.count += 1
        if self.count > self.after:
            raise self.exc
        return self.inner.load(i)


def patch_open_dataset(monkeypatch, after: int, exc: BaseException) -> None:
    real = ds.open_dataset
    monkeypatch.setattr(ds, "open_dataset",
                        lambda *a, **k: Interrupting(real(*a, **k), after, exc))


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), MemoryError("boom")],
                         ids=["ctrl-c", "crash"])
def test_resume_after_interruption_is_bitwise_identical(wds_path, reference, tmp_path,
                                                        monkeypatch, exc):
    opts = options(f"wds:{wds_path}", tmp_path)
    patch_open_dataset(monkeypatch, 20, exc)  # dies inside the 2nd shard (images 16..31)
    with pytest.raises(type(exc)):
        extract(opts)
    monkeypatch.undo()
    path = tmp_path / reference.relative_to(reference.parents[2])
    cache = open_cache(path)
    assert cache.done().tolist() == [True, False, False]
    assert not cache.complete
    (result,) = extract(opts)
    assert result.status == "resumed"
    assert result.shards_written == 2  # only the missing shards
    assert result.n_written == 24
    assert_bitwise_equal(path, reference)
    assert open_cache(path).complete
    (again,) = extract(opts)  # complete: a no-op that says so
    assert again.status == "complete" and again.shards_written == 0


def test_a_writer_failure_keeps_finished_shards(wds_path, reference, tmp_path, monkeypatch):
    real = Cache.write_shard
    calls = []

    def failing(self, shard, data):
        calls.append(shard)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real(self, shard, data)

    monkeypatch.setattr(Cache, "write_shard", failing)
    with pytest.raises(FeatcacheError, match="No space left on device.*re-run"):
        extract(options(f"wds:{wds_path}", tmp_path))
    monkeypatch.undo()
    path = tmp_path / reference.relative_to(reference.parents[2])
    assert open_cache(path).done().tolist() == [True, False, False]
    (result,) = extract(options(f"wds:{wds_path}", tmp_path))
    assert (result.status, result.shards_written) == ("resumed", 2)
    assert_bitwise_equal(path, reference)


@pytest.mark.slow
def test_kill_9_then_rerun_the_same_command(wds_path, reference, tmp_path):
    """A real SIGKILL of the CLI once a shard's done flag is set; the rerun finishes it."""
    root = tmp_path / "c"
    path = root / reference.relative_to(reference.parents[2])
    cli = ["extract", "--model", TIMM_TINY, "--weights", "random", *model_args(TIMM_TINY_KW),
           "--dataset", f"wds:{wds_path}", "--split", "train", "--cache", str(root),
           "--batch-size", "8", "--shard-size", "16", "--all-tokens", "--workers", "1",
           "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the child's, and the rerun's
    child = slow_extract(cli, 2)  # a kill lands mid-run
    kill_9_when(child, lambda: (path / "done" / "zarr.json").exists() and bool(
        zarr.open_array(str(path / "done"), mode="r")[...].any()), poll=0.02)
    assert child.returncode == -signal.SIGKILL
    before = zarr.open_array(str(path / "done"), mode="r")[...]
    assert 1 <= before.sum() < 3
    rerun = subprocess.run([sys.executable, "-m", "featcache", *cli], env=env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    import json

    (row,) = json.loads(rerun.stdout)
    assert row["status"] == "resumed"
    assert row["shards_written"] == 3 - int(before.sum())
    assert_bitwise_equal(path, reference)
    final = subprocess.run([sys.executable, "-m", "featcache", *cli[:-1]], env=env,
                           capture_output=True, text=True, timeout=300)
    assert final.returncode == 0 and "already complete" in final.stdout


@pytest.mark.parametrize("change,setting", [
    (dict(model_arg={**TIMM_TINY_KW, "depth": 2}), "model.model_kwargs.depth: 3 → 2"),
    (dict(dtype="bf16"), "compute_dtype: float32 → bfloat16"),
    (dict(all_tokens=False), "all_tokens: True → False"),
])
def test_other_settings_are_refused_and_the_old_cache_is_untouched(wds_path, reference,
                                                                   tmp_path, change, setting):
    import shutil

    root = tmp_path / "c"
    path = root / reference.relative_to(reference.parents[2])
    shutil.copytree(reference, path)
    before = snapshot(path)
    with pytest.raises(FingerprintMismatch) as info:
        extract(options(f"wds:{wds_path}", root, **change))
    assert setting in str(info.value)
    assert "--overwrite" in str(info.value)
    assert snapshot(path) == before
    (result,) = extract(options(f"wds:{wds_path}", root, overwrite=True, **change))
    assert result.status == "written"
    replaced = open_cache(path)
    assert replaced.complete and snapshot(path) != before
    assert not list(path.parent.glob(".*.old-*")) and not list(path.parent.glob(".*.tmp-*"))


def test_changed_dataset_content_is_refused(tmp_path):
    from fakedata import make_wds

    data = tmp_path / "data"
    make_wds(data, {"train": 20}, shards=2, image_size=32, seed=0)
    extract(options(f"wds:{data}", tmp_path / "c"))
    (path,) = [p.parent for p in (tmp_path / "c").rglob("train/zarr.json")]
    before = snapshot(path)
    import shutil

    shutil.rmtree(data)
    make_wds(data, {"train": 20}, shards=2, image_size=32, seed=1)  # same size, new images
    with pytest.raises(FingerprintMismatch, match=r"dataset\.identity\.sha256"):
        extract(options(f"wds:{data}", tmp_path / "c"))
    assert snapshot(path) == before


def test_other_tap_or_seed_is_a_distinct_cache(wds_path, reference, tmp_path):
    import shutil

    root = tmp_path / "c"
    path = root / reference.relative_to(reference.parents[2])
    shutil.copytree(reference, path)
    before = snapshot(path)
    (residual,) = extract(options(f"wds:{wds_path}", root, tap="residual"))
    (seed,) = extract(options(f"wds:{wds_path}", root, weights="random:1"))
    assert residual.path.parts[-3].endswith("@residual@random-0")
    assert seed.path.parts[-3].endswith("@random-1")
    assert len({residual.path, seed.path, path}) == 3
    assert snapshot(path) == before
    # and the fingerprint check names them, should two ever meet at one path
    from featcache.cache.fingerprint import check_fingerprint

    fp = open_cache(path).fingerprint
    other = {**fp, "model": {**fp["model"], "tap": "residual", "weights": "random:1"}}
    with pytest.raises(FingerprintMismatch, match="model.tap: reference → residual"):
        check_fingerprint(open_cache(path), other)


def test_a_second_extraction_at_once_is_refused(wds_path, reference, tmp_path):
    import shutil

    root = tmp_path / "c"
    path = root / reference.relative_to(reference.parents[2])
    shutil.copytree(reference, path)
    zarr.open_array(str(path / "done"), mode="r+")[1] = False  # an unfinished cache
    zarr.open_group(str(path), mode="r+").attrs["complete"] = False
    before = snapshot(path)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, time\n"
         f"f = open({str(path.parent / '.train.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
         "print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FeatcacheError, match="another featcache process is writing"):
            extract(options(f"wds:{wds_path}", root))
        with pytest.raises(FeatcacheError, match="another featcache process is writing"):
            extract(options(f"wds:{wds_path}", root, overwrite=True, tap="reference",
                            model_arg={**TIMM_TINY_KW, "depth": 2}))
    finally:
        holder.kill()
        holder.wait()
    assert snapshot(path) == before
    # and when the holder is this very process (another thread of the same program)
    with write_lock(path), pytest.raises(FeatcacheError, match="another featcache process"):
        extract(options(f"wds:{wds_path}", root))
    (result,) = extract(options(f"wds:{wds_path}", root))
    assert (result.status, result.shards_written) == ("resumed", 1)
    assert_bitwise_equal(path, reference)


def test_unreadable_image_is_named_or_skipped_and_recorded(tmp_path):
    from fakedata import make_wds

    clean = tmp_path / "clean"
    bad = tmp_path / "bad"
    make_wds(clean, {"train": 20}, shards=2, image_size=32)
    make_wds(bad, {"train": 20}, shards=2, image_size=32, corrupt={"train": [3]})
    with pytest.raises(FeatcacheError) as info:
        extract(options(f"wds:{bad}", tmp_path / "c"))
    text = str(info.value)
    assert "train/0.tar:s0000003" in text and "split 'train'" in text and "--skip-bad" in text
    (result,) = extract(options(f"wds:{bad}", tmp_path / "c", skip_bad=True))
    assert result.n_skipped == 1
    cache = open_cache(result.path)
    valid = cache.valid()
    assert valid.tolist() == [i != 3 for i in range(20)]
    assert not cache.read("cls")[3].any() and not cache.read("last_tokens")[3].any()
    assert cache.attrs["n_skipped"] == 1
    assert cache.attrs["skipped"] == [{"index": 3, "key": "train/0.tar:s0000003"}]
    (ok,) = extract(options(f"wds:{clean}", tmp_path / "c2"))
    good = open_cache(ok.path)
    for kind in ("cls", "ap"):  # every other row is what a clean dataset gives
        np.testing.assert_array_equal(cache.read(kind)[valid], good.read(kind)[valid])


def test_batches_never_cross_a_shard():
    layout = Layout(n=40, n_layers=4, dim=8, shard_size=16)
    batches = list(ShardBatches(layout, [0, 1, 2], 6))
    assert [b[0] for b in batches] == [0, 6, 12, 16, 22, 28, 32, 38]
    for b in batches:
        assert len({i // 16 for i in b}) == 1
        assert b == list(range(b[0], b[-1] + 1))
    assert sum(len(b) for b in batches) == 40
    assert len(ShardBatches(layout, [0, 1, 2], 6)) == len(batches)
    assert list(ShardBatches(layout, [2], 6)) == [list(range(32, 38)), [38, 39]]


def test_workers_and_default_options(wds_path, reference, tmp_path):
    """DataLoader workers (a separate process decoding) give the same bytes."""
    (result,) = extract(options(f"wds:{wds_path}", tmp_path, workers=1))
    assert_bitwise_equal(result.path, reference)
    assert result.images_per_s > 0
    cache = open_cache(result.path)
    assert cache.attrs["environment"]["world_size"] == 1
    assert cache.attrs["timings"]["extract_s"] > 0


@pytest.mark.parametrize("cpus,requested,device,expected", [
    (2, None, "cpu", (0, None)),  # decode inline: a worker would preempt a compute thread
    (4, None, "cpu", (0, None)),
    (16, None, "cpu", (2, 14)),  # one worker per 8 cores, the compute threads make room
    (2, 1, "cpu", (1, None)),  # asked for: given, threads untouched on small machines
    (32, 3, "cpu", (3, 16)),
    (16, None, "cuda", (8, None)),  # on a GPU the CPUs only decode
    (4, None, "cuda", (3, None)),
])
def test_plan_workers(monkeypatch, cpus, requested, device, expected):
    import torch

    import featcache.extracting.run as fe

    monkeypatch.setattr(fe, "_available_cpus", lambda: cpus)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    assert fe.plan_workers(torch.device(device), requested) == expected


def test_a_killed_writers_orphaned_workers_are_waited_for(tmp_path):
    """kill -9 of a writer leaves its forked DataLoader workers holding the inherited lock
    for a few seconds: the next writer waits for them instead of refusing."""
    import fcntl
    import signal

    from featcache.cache.files import write_lock

    path = tmp_path / "cache"
    lock = tmp_path / ".cache.lock"
    released = tmp_path / "released"  # the orphan's last act before it exits
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, time\n"
         f"f = open({str(lock)!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
         "f.seek(0); f.truncate(); f.write(str(os.getpid())); f.flush()\n"
         "if os.fork() == 0:\n"
         f"    time.sleep(3); open({str(released)!r}, 'w').close(); os._exit(0)\n"
         "print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    # the premise: the orphan still holds the lock
    with open(lock, "a+") as probe, pytest.raises(BlockingIOError):
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with write_lock(path):
        assert released.exists()  # got the lock only once the orphan had let go
