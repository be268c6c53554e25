"""kill -9 where it hurts (docs/cache-format.md, "Re-running the same command"): in the
middle of a shard's files (a zarr `*.partial` left behind, a shard written but not
flagged), and inside an `--overwrite` swap (between its two renames, before them, before
the old copy is deleted). Each time the same command, run again, ends with a cache
bitwise equal to an uninterrupted run, and nothing of the kill left beside it.

The child kills itself (SIGKILL, no clean-up of any kind) at the chosen write or rename,
which a kill from outside could only hit by chance."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import TIMM_TINY, TIMM_TINY_KW, model_args

from featcache.cache.store import open_cache
from featcache.extracting.run import ExtractOptions, extract

pytestmark = pytest.mark.usefixtures("torch_one_thread")

ARRAYS = ("cls", "ap", "last_tokens", "labels", "valid", "done")

# KILL_AT: "put:<key suffix>" (half of that file written to its .partial, then killed),
# "put-before:<key suffix>" (killed before that file is written), "replace:<name part>"
# (killed before an os.replace whose source contains it), "rmtree:<name part>".
CHILD = """
import os, shutil, signal, sys
kind, _, target = os.environ["KILL_AT"].partition(":")

def die():
    os.kill(os.getpid(), signal.SIGKILL)

from zarr.storage import _local
real_put = _local._put
def put(path, value, exclusive=False):
    if str(path).endswith(target) and kind == "put":
        data = bytes(value.as_buffer_like())
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".0123.partial"), "wb") as f:
            f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
        die()
    if str(path).endswith(target) and kind == "put-before":
        die()
    return real_put(path, value, exclusive)
_local._put = put

real_replace, real_rmtree = os.replace, shutil.rmtree
def replace(src, dst, *a, **k):
    if kind == "replace" and os.path.basename(str(src)).endswith(target):
        die()
    return real_replace(src, dst, *a, **k)
def rmtree(path, *a, **k):
    if kind == "rmtree" and target in os.path.basename(str(path)):
        die()
    return real_rmtree(path, *a, **k)
os.replace, shutil.rmtree = replace, rmtree

from featcache.cli.main import app
sys.argv[0] = "featcache"
app()
"""


def options(wds_path: Path, root: Path, **kw) -> ExtractOptions:
    base = dict(model=TIMM_TINY, dataset=f"wds:{wds_path}", split=("train",),
                weights="random", model_arg=dict(TIMM_TINY_KW), cache=root, batch_size=8,
                shard_size=16, workers=0, all_tokens=True)
    return ExtractOptions(**{**base, **kw})


def cli(wds_path: Path, root: Path, *extra: str) -> list[str]:
    return ["extract", "--model", TIMM_TINY, "--weights", "random",
            *model_args(TIMM_TINY_KW), "--dataset", f"wds:{wds_path}", "--split", "train",
            "--cache", str(root), "--batch-size", "8", "--shard-size", "16", "--workers", "0",
            *extra]


def killed(args: list[str], at: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KILL_AT": at}
    child = subprocess.run([sys.executable, "-c", CHILD, *args], env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, (child.returncode, child.stderr[-2000:])


def assert_bitwise_equal(a: Path, b: Path) -> None:
    x, y = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    assert sorted(x.array_keys()) == sorted(y.array_keys())
    for name in ARRAYS:
        if name in y:
            assert x[name][...].tobytes() == y[name][...].tobytes(), name


def leftovers(path: Path) -> list[Path]:
    """What a killed writer may leave: zarr's unfinished writes, old and half-built
    copies, a replacement."""
    beside = [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]
    return beside + list(path.rglob("*.partial"))


@pytest.fixture(scope="module")
def reference(wds_path, tmp_path_factory) -> Path:
    """Uninterrupted, with all tokens (40 images: shards of 16 + 16 + 8)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    (result,) = extract(options(wds_path, tmp_path_factory.mktemp("ref")))
    torch.set_num_threads(threads)
    return result.path


def where(root: Path, reference: Path) -> Path:
    return root / reference.relative_to(reference.parents[2])


@pytest.mark.parametrize("at,flags", [
    ("put:ap/c/1/0/0", [True, False, False]),  # half a shard file, in a .partial
    pytest.param("put-before:done/c/1", [True, False, False],  # every file, not the flag
                 marks=pytest.mark.slow),
])
def test_killed_inside_a_shard_write(wds_path, reference, tmp_path, at, flags):
    root = tmp_path / "c"
    killed(cli(wds_path, root, "--all-tokens"), at)
    path = where(root, reference)
    assert zarr.open_array(str(path / "done"), mode="r")[...].tolist() == flags
    if at.startswith("put:"):
        assert list(path.rglob("*.partial"))  # the test's premise: a half-written file
    (result,) = extract(options(wds_path, root))  # the same command again
    assert (result.status, result.shards_written) == ("resumed", 2)
    assert_bitwise_equal(path, reference)
    assert leftovers(path) == [] and open_cache(path).complete


@pytest.mark.parametrize("at,state", [
    ("replace:.next", "old aside, replacement complete"),  # between the two renames
    pytest.param("replace:train", "old in place, replacement complete",
                 marks=pytest.mark.slow),  # before the first rename
    pytest.param("rmtree:.old-", "replacement in place, old copy aside",
                 marks=pytest.mark.slow),
    pytest.param("put:last_tokens/c/2/0/0", "old in place, replacement half built",
                 marks=pytest.mark.slow),
])
def test_killed_inside_an_overwrite_swap(wds_path, reference, tmp_path, at, state):
    """The old cache (CLS/AP only) is replaced by one with all tokens: killed anywhere,
    the same `--overwrite` command again gives the replacement, and the old cache is
    never lost before it is complete."""
    root = tmp_path / "c"
    old = extract(options(wds_path, root, all_tokens=False))[0].path
    assert old == where(root, reference)
    killed(cli(wds_path, root, "--all-tokens", "--overwrite"), at)
    nxt = old.with_name(f".{old.name}.next")
    olds = list(old.parent.glob(f".{old.name}.old-*"))
    if state.startswith("old aside"):
        assert not old.exists() and len(olds) == 1 and open_cache(nxt).complete
    elif state.startswith("old in place"):
        assert not open_cache(old).has_all_tokens and open_cache(old).complete
        assert nxt.is_dir() and open_cache(nxt).complete == ("complete" in state)
    else:
        assert open_cache(old).has_all_tokens and len(olds) == 1
    (result,) = extract(options(wds_path, root, overwrite=True))
    assert result.status in ("complete", "resumed", "written")
    assert_bitwise_equal(old, reference)
    assert leftovers(old) == [] and open_cache(old).complete
    assert np.asarray(open_cache(old).done()).all()
