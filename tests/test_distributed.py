"""torchrun: whole shards split across ranks; rank 0 creates, prints and finalises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import TIMM_TINY, TIMM_TINY_KW, model_args

from featcache import distributed as dist
from featcache.cache.store import Cache, open_cache
from featcache.errors import FeatcacheError
from featcache.extracting.run import ExtractOptions, extract

pytestmark = pytest.mark.usefixtures("torch_one_thread")

ARRAYS = ("cls", "ap", "last_tokens", "labels", "valid", "done")


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 7, 16])
@pytest.mark.parametrize("parts", [1, 2, 3, 4])
def test_split_evenly_is_contiguous_disjoint_complete_and_balanced(n, parts):
    items = list(range(100, 100 + n))
    slices = [dist.split_evenly(items, p, parts) for p in range(parts)]
    assert [x for s in slices for x in s] == items  # in order, disjoint, complete
    sizes = [len(s) for s in slices]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the first ranks take the extra ones
    for s in slices:
        assert s == items[items.index(s[0]):items.index(s[0]) + len(s)] if s else True


def test_split_of_unfinished_shards_only():
    todo = [1, 4, 5, 6, 9]  # shards without a done flag, on resume
    assert dist.split_evenly(todo, 0, 2) == [1, 4, 5]
    assert dist.split_evenly(todo, 1, 2) == [6, 9]


def test_without_torchrun_this_is_rank_0_of_1(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert not dist.is_distributed()
    assert (dist.rank(), dist.world_size(), dist.env_rank()) == (0, 1, 0)
    assert dist.broadcast_object({"a": 1}) == {"a": 1}
    dist.barrier()
    with dist.session():
        assert dist.world_size() == 1


def opts(wds_path: Path, root: Path, **kw) -> ExtractOptions:
    base = dict(model=TIMM_TINY, dataset=f"wds:{wds_path}", split=("train",),
                weights="random", model_arg=dict(TIMM_TINY_KW), cache=root,
                batch_size=8, shard_size=16, workers=0, all_tokens=True)
    base.update(kw)
    return ExtractOptions(**base)


def test_ranks_write_only_their_shards_and_only_rank_0_finalises(wds_path, tmp_path,
                                                                monkeypatch):
    """Two ranks simulated one after the other in this process (the torchrun test below
    runs them for real): 3 shards, rank 0 owns [0, 1], rank 1 owns [2]."""
    (ref,) = extract(opts(wds_path, tmp_path / "ref"))
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "barrier", lambda: None)
    monkeypatch.setattr(dist, "broadcast_object", lambda obj: obj)
    monkeypatch.setattr(dist, "all_sum", lambda values: values)
    monkeypatch.setattr(dist, "rank", lambda: 0)
    with pytest.raises(FeatcacheError, match="1 shards are still missing"):
        extract(opts(wds_path, tmp_path / "c"))  # rank 1 never ran: rank 0 says so
    path = tmp_path / "c" / ref.path.relative_to(tmp_path / "ref")
    assert open_cache(path).done().tolist() == [True, True, False]
    # rank 1 gets rank 0's broadcasts: the status and the path it writes, then the shards
    # left before anyone wrote
    monkeypatch.setattr(dist, "rank", lambda: 1)
    monkeypatch.setattr(dist, "broadcast_object",
                        lambda obj: ("written", "", str(path)) if isinstance(obj, tuple)
                        else [0, 1, 2])
    monkeypatch.setattr(Cache, "done", lambda self: np.zeros(3, dtype=bool))
    (part,) = extract(opts(wds_path, tmp_path / "c"))
    assert (part.status, part.shards_written, part.n_written) == ("partial", 1, 8)
    monkeypatch.undo()
    cache = open_cache(path)
    assert cache.done().all() and not cache.complete  # written, but nobody finalised
    (last,) = extract(opts(wds_path, tmp_path / "c"))  # rank 0 of 1: only finalises
    assert (last.status, last.shards_written) == ("resumed", 0)
    assert open_cache(path).complete
    for name in ARRAYS:
        a = zarr.open_array(str(path / name), mode="r")[...]
        b = zarr.open_array(str(ref.path / name), mode="r")[...]
        assert a.tobytes() == b.tobytes(), name


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_give_the_one_process_cache(wds_path, tmp_path):
    root = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "featcache", "extract", "--model", TIMM_TINY, "--weights", "random",
           *model_args(TIMM_TINY_KW), "--dataset", f"wds:{wds_path}", "--split", "train,test",
           "--cache", str(root), "--batch-size", "4", "--shard-size", "8", "--all-tokens",
           "--workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400,
                         cwd=Path(__file__).parents[1])
    assert run.returncode == 0, run.stdout + run.stderr
    # only rank 0 speaks: one summary line per split, with every rank's shards counted
    assert run.stdout.count("wrote") == 2, run.stdout
    assert "5 shards on 2 ranks" in run.stdout and "3 shards on 2 ranks" in run.stdout
    single = extract(opts(wds_path, tmp_path / "one", split=("train", "test"), batch_size=4,
                          shard_size=8))
    for one in single:
        path = root / one.path.relative_to(tmp_path / "one")
        ddp = open_cache(path)
        assert ddp.complete and ddp.layout == open_cache(one.path).layout
        assert ddp.attrs["environment"]["world_size"] == 2
        assert ddp.done().all() and ddp.layout.n_shards == {"train": 5, "test": 3}[one.split]
        g1 = zarr.open_group(str(one.path), mode="r")
        g2 = zarr.open_group(str(path), mode="r")
        for name in ("labels", "valid", "done"):  # every sample in its place
            np.testing.assert_array_equal(g2[name][...], g1[name][...])
        for name in ("cls", "ap", "last_tokens"):  # docs/cache-format.md: bitwise equal
            a, b = g2[name][...], g1[name][...]
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), (one.split, name)


# ------------------------------------------------------------------ probing under torchrun

PROBE_SPEC = dict(n_blocks=3, dim=16, n_classes=3, n_train=240, n_test=90, shard_size=32,
                  seed=5)


def torchrun(*args: object, script: str | None = None) -> subprocess.CompletedProcess:
    """`featcache ARGS` on 2 CPU ranks (gloo), or a script that patches, then runs it."""
    target = ["-c", script] if script else ["-m", "featcache"]
    if script:  # torchrun runs files, not -c: write it beside the test
        path = Path(args[0]).parent / "rank_script.py"
        path.write_text(script)
        target = [str(path)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", *target, *(str(a) for a in (args[1:] if script else args))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400,
                          cwd=Path(__file__).parents[1])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["alf", "layers"])
def test_grid_parallel_probe_equals_one_process_bitwise(tmp_path, method):
    """Ranks take whole config groups (here one config each: --memory-gb tiny), rank 0
    gathers the validation scores, refits, writes: the record, head and predictions equal
    a one-process run's byte for byte."""
    from probecache import SynthSpec, make_pair

    from featcache.probing.run import probe

    root = tmp_path / "cache"
    make_pair(root, SynthSpec(**PROBE_SPEC, signal={("block1", "ap"): 1.0}))
    args = ["--method", method, "--cache", root, "--grid", "quick", "--epochs", 2,
            "--min-steps", 20, "--memory-gb", 1e-6]
    run = torchrun("probe", *args, "--runs", tmp_path / "ddp", "--json")
    assert run.returncode == 0, run.stdout + run.stderr
    (row,) = json.loads(run.stdout)  # rank 0 alone prints
    (one,) = probe(method=method, cache=root, runs=tmp_path / "one", grid="quick", epochs=2,
                   min_steps=20, memory_gb=1e-6, threads=1)
    ddp = Path(row["path"])
    assert ddp.name == one.path.name and row["status"] == "trained"
    a, b = json.loads((ddp / "record.json").read_text()), json.loads(
        (one.path / "record.json").read_text())
    for key in ("metrics", "selected", "grid", "val_metrics", "per_class", "attention",
                "per_layer"):
        assert a[key] == b[key], key
    for name in ("head.safetensors", "predictions.safetensors"):
        assert (ddp / name).read_bytes() == (one.path / name).read_bytes(), name
    assert len(list((tmp_path / "ddp").rglob("record.json"))) == 1  # one writer


@pytest.mark.slow
def test_an_error_on_one_rank_stops_all_with_one_line(tmp_path):
    from probecache import SynthSpec, make_pair

    root = tmp_path / "cache"
    make_pair(root, SynthSpec(**PROBE_SPEC))
    script = (
        "import os, sys\n"
        "from featcache.probing import train\n"
        "real = train.fit_grid\n"
        "def broken(*a, **k):\n"
        "    if os.environ['RANK'] == '1':\n"
        "        raise MemoryError('rank one ran out')\n"
        "    return real(*a, **k)\n"
        "train.fit_grid = broken\n"
        "from featcache.cli.main import app\n"
        "sys.argv[0] = 'featcache'\n"
        "app()\n")
    run = torchrun(tmp_path / "x", "probe", "--method", "linear", "--cache", root, "--runs",
                   tmp_path / "runs", "--grid", "quick", "--epochs", 1, "--min-steps", 5,
                   "--memory-gb", 1e-6, script=script)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rank 1 failed" in errors[0] and "ran out" in errors[0], \
        run.stderr[-3000:]
    # no traceback from the workers (torchrun's launcher prints its own summary of them)
    assert not [line for line in run.stderr.splitlines()
                if line.strip().startswith("File ") and "/featcache/" in line]
    assert not list((tmp_path / "runs").rglob("record.json"))


@pytest.mark.slow
@pytest.mark.parametrize("method,tolerance", [("alf", 2.5), ("linear", 0.5), ("layers", 0.5)])
def test_data_parallel_probe_matches_one_process(tmp_path, method, tolerance):
    """Each rank holds half the shards; global batches, jitter, dropout, loss, summed
    gradients and global BatchNorm statistics make the run the one-process run up to
    float rounding: test balanced top-1 within `tolerance` points (the attentive head's
    BatchNorm null space turns rounding into a visible walk, see test_train), and the
    same hyperparameters selected."""
    from probecache import SynthSpec, make_pair

    from featcache.probing.run import probe

    root = tmp_path / "cache"
    make_pair(root, SynthSpec(**PROBE_SPEC, signal={("block1", "ap"): 2.0}))
    args = ["--method", method, "--cache", root, "--grid", "quick", "--epochs", 2,
            "--min-steps", 20]
    run = torchrun("probe", *args, "--runs", tmp_path / "ddp", "--parallel", "data", "--json")
    assert run.returncode == 0, run.stdout + run.stderr
    (row,) = json.loads(run.stdout)
    (one,) = probe(method=method, cache=root, runs=tmp_path / "one", grid="quick", epochs=2,
                   min_steps=20, threads=1)
    rec = json.loads((Path(row["path"]) / "record.json").read_text())
    assert (rec["config"]["parallel"], rec["config"]["ranks"]) == ("data", 2)
    assert rec["config"]["feature_placement"] == "data-parallel"
    # its own run: sums over ranks round otherwise, and the identity says so
    assert Path(row["path"]).name != one.path.name
    assert rec["settings"]["data_parallel_ranks"] == 2
    assert rec["selected"] == one.selected
    assert abs(rec["metrics"]["balanced_top1"] - one.metrics["balanced_top1"]) <= tolerance
    # every config's loss curve summed over ranks (layers: one config per layer)
    mine = json.loads((one.path / "record.json").read_text())["curves"]
    for key, want in mine.items():
        np.testing.assert_allclose(rec["curves"][key], want, rtol=1e-3, err_msg=key)
    assert rec["predictions"]["n"] == PROBE_SPEC["n_test"]


@pytest.mark.slow
def test_a_damaged_shard_on_one_data_parallel_rank_stops_all_with_one_line(tmp_path):
    """Rank 1 alone reads the last shard: its damage must stop rank 0 too (rank 0 used to
    wait in the first collective of training forever)."""
    from probecache import SynthSpec, make_pair

    root = tmp_path / "cache"
    train, _ = make_pair(root, SynthSpec(**PROBE_SPEC))
    last = max((train.path / "ap" / "c").iterdir(), key=lambda d: int(d.name))
    chunk = next(f for f in last.rglob("*") if f.is_file())
    chunk.write_bytes(chunk.read_bytes()[:50])
    run = torchrun("probe", "--method", "alf", "--cache", root, "--runs", tmp_path / "runs",
                   "--grid", "quick", "--epochs", 1, "--min-steps", 5, "--parallel", "data")
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "featcache verify" in errors[0], run.stderr[-3000:]
    assert not list((tmp_path / "runs").rglob("record.json"))
