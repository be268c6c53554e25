"""Claims of the docs tested where they are hardest (issue 19): `verify --repair` clears
exactly the damaged shards and its printed command, pasted into a shell, rewrites exactly
those; metadata damage; `Cache.read` against plain zarr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from cliutil import run
from conftest import TIMM_TINY, TIMM_TINY_KW, model_args, one_thread

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# batches of 4 in shards of 8: a command that left out --batch-size (default 64) would
# compute each shard in one batch, which rounds differently
TINY = ["--model", TIMM_TINY, "--weights", "random", *model_args(TIMM_TINY_KW)]
SHAPE = ["--batch-size", 4, "--shard-size", 8, "--workers", 0]


@pytest.fixture(scope="module")
def clean(wds_path, tmp_path_factory) -> Path:
    """The train split (40 images, 5 shards of 8) of a clean cache root."""
    with one_thread():
        root = tmp_path_factory.mktemp("claims")
        result = run("extract", *TINY, "--dataset", f"wds:{wds_path}", "--split", "train",
                     "--cache", root, *SHAPE)
    assert result.exit_code == 0, result.output
    return root


def split_dir(root: Path) -> Path:
    (path,) = [p.parent for p in root.rglob("zarr.json") if (p.parent / "cls").is_dir()]
    return path


def shard_files(cache: Path, shard: int) -> list[Path]:
    """Every array's file of one shard (the features' shard files, the 1-D chunks)."""
    out = [cache / kind / "c" / str(shard) / "0" / "0" for kind in ("cls", "ap")]
    return out + [cache / name / "c" / str(shard) for name in ("labels", "valid", "done")]


def stamp(path: Path) -> tuple[int, int, bytes]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, path.read_bytes()


def flags(cache: Path) -> list[bool]:
    return zarr.open_array(str(cache / "done"), mode="r")[...].tolist()


def test_repair_clears_exactly_the_damaged_shards_and_its_command_rewrites_exactly_those(
        copy, clean):
    cache = split_dir(copy)
    (cache / "cls/c/1/0/0").unlink()
    data = bytearray((cache / "ap/c/3/0/0").read_bytes())
    data[len(data) // 3] ^= 0x10
    (cache / "ap/c/3/0/0").write_bytes(bytes(data))
    kept = {p: stamp(p) for k in (0, 2, 4) for p in shard_files(cache, k)}

    repaired = run("verify", cache, "--repair")
    assert repaired.exit_code == 1, repaired.output  # fsck: found and repaired
    assert flags(cache) == [True, False, True, False, True]
    assert not any(p.exists() for k in (1, 3) for p in shard_files(cache, k)[:2])
    assert {p: stamp(p) for p in kept} == kept  # the sound shards untouched
    again = run("verify", cache)
    assert again.exit_code == 0 and "2 not written yet" in again.output, again.output

    (line,) = [x for x in repaired.output.splitlines() if "recompute them with:" in x]
    command = line.split("recompute them with: ", 1)[1]
    assert "--batch-size 4" in command
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}  # the clean cache's thread count
    pasted = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True,
                            timeout=300, cwd=copy.parent)
    assert pasted.returncode == 0, pasted.stdout + pasted.stderr
    assert "2 shards" in pasted.stdout, pasted.stdout  # wrote the two cleared shards
    assert {p: stamp(p) for p in kept} == kept  # and nothing else
    assert flags(cache) == [True] * 5
    clean_dir = split_dir(clean)
    for kind in ("cls", "ap", "labels", "valid", "done"):
        a = zarr.open_array(str(cache / kind), mode="r")[...]
        b = zarr.open_array(str(clean_dir / kind), mode="r")[...]
        assert a.tobytes() == b.tobytes(), kind
    for k in (1, 3):  # the rewritten shard files are the clean ones, byte for byte
        for p, q in zip(shard_files(cache, k), shard_files(clean_dir, k), strict=True):
            assert p.read_bytes() == q.read_bytes(), p


def edit_json(path: Path, change) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("array,edit", [
    ("cls", lambda m: m.update(data_type="float32")),
    ("labels", lambda m: m.update(data_type="int32")),
])
def test_an_edited_dtype_is_metadata_damage(copy, tmp_path, array, edit):
    """docs/cache-format.md: an edited dtype is caught when the cache is opened."""
    from cliutil import assert_user_error

    cache = split_dir(copy)
    edit_json(cache / array / "zarr.json", edit)
    verified = run("verify", cache)
    assert verified.exit_code == 2 and "metadata" in verified.output, verified.output
    probed = run("probe", "--method", "linear", "--cache", copy, "--runs", tmp_path / "r",
                 "--grid", "quick", "--epochs", 1, "--min-steps", 5)
    assert_user_error(probed, "metadata", "--overwrite")


# -- probe: shots per class, and what makes two runs different runs ----------------------

def planted_cache(root: Path, **overrides) -> Path:
    from probecache import SynthSpec, make_pair

    spec = dict(n_blocks=2, dim=8, n_classes=4, n_train=160, n_test=40, shard_size=32,
                signal={("final", "cls"): 2.0}, class_balance=(0.55, 0.25, 0.15, 0.05),
                seed=3)
    make_pair(root, SynthSpec(**{**spec, **overrides}))
    return root


def test_shots_take_k_of_every_class(tmp_path, monkeypatch):
    """Per class, on imbalanced classes (one with fewer than K): not just the total."""
    import featcache.probing.run as fp
    from featcache.cache.store import find_caches
    from featcache.probing.run import probe

    root = planted_cache(tmp_path / "cache")
    drawn: list[np.ndarray] = []
    real = fp.sample_shots

    def spy(y, shots, seed):
        picks = real(y, shots, seed)
        drawn.append(np.asarray(y)[picks])
        return picks

    monkeypatch.setattr(fp, "sample_shots", spy)
    (train,) = [c for c in find_caches(root) if c.split == "train"]
    counts = np.bincount(train.labels(), minlength=4)
    assert counts.min() < 8 < counts.max()  # the test's premise: one class is short
    results = probe(method="linear", cache=root, runs=tmp_path / "runs", shots=8,
                    seeds=(0, 1), grid="quick", epochs=1, min_steps=5)
    assert [r.status for r in results] == ["trained"] * 2
    assert len(drawn) == 2 and drawn[0].tobytes() != b""
    for labels, r in zip(drawn, results, strict=True):
        assert np.bincount(labels, minlength=4).tolist() == np.minimum(counts, 8).tolist()
        assert read_n_train(r.path) == int(np.minimum(counts, 8).sum())


def read_n_train(path: Path) -> int:
    return json.loads((path / "record.json").read_text())["n_train"]


@pytest.mark.parametrize("variant", [
    {"shots": 5}, {"protocol": "clean"}, {"epochs": 2}, {"lrs": (0.05,)}, {"wds": (0.01,)},
    {"val_fraction": 0.3}, {"min_steps": 6},
])
def test_other_options_are_other_runs(tmp_path, variant):
    """A run is done once per settings: a 5-shot run is not the full one, nor is a run
    under another protocol or recipe (it trains, beside the first, not 'skipped')."""
    from featcache.probing.run import probe

    root = planted_cache(tmp_path / "cache")
    base = dict(method="linear", cache=root, runs=tmp_path / "runs", grid="quick", epochs=1,
                min_steps=5)
    (first,) = probe(**base)
    (again,) = probe(**base)
    assert (first.status, again.status, again.path) == ("trained", "skipped", first.path)
    (other,) = probe(**{**base, **variant})
    assert other.status == "trained" and other.path != first.path
    (other_again,) = probe(**{**base, **variant})
    assert other_again.status == "skipped" and other_again.path == other.path


def test_a_clean_runs_gain_is_over_the_linear_run_of_its_protocol(tmp_path):
    """docs/method.md: a `clean` run's gain is over the clean linear run, not the paper's."""
    from runrecords import write_record

    from featcache.reporting.summary import load_records, summarize

    runs = tmp_path / "runs"
    for method, layer_set, protocol, seed, acc in (
            ("linear", "last", "paper", 0, 50.0), ("linear", "last", "clean", 1, 60.0),
            ("alf", "all", "paper", 0, 65.0), ("alf", "all", "clean", 1, 67.0)):
        options = {"protocol": protocol} if protocol != "paper" else {}
        write_record(runs, method=method, layer_set=layer_set, seed=seed, protocol=protocol,
                     options=options, metrics={"balanced_top1": acc, "top1": acc})
    (row,) = summarize(load_records(runs))
    cells = row["cells"]
    assert cells["alf:all"]["gain"] == pytest.approx(15.0)
    assert cells["alf:all [protocol=clean]"]["gain"] == pytest.approx(7.0)
    assert cells["linear [protocol=clean]"]["mean"] == 60.0


def test_a_resume_with_another_batch_size_agrees_within_rounding(wds_path, clean, tmp_path,
                                                                   monkeypatch):
    """docs/cache-format.md: another --batch-size on resume is allowed; the shards it
    writes agree with an uninterrupted run's within float rounding (fp16 storage), the
    shards written before are untouched."""
    from featcache.cache.store import Cache

    real, calls = Cache.write_shard, []

    def dies_on_the_third(self, shard, data):
        calls.append(shard)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, shard, data)

    monkeypatch.setattr(Cache, "write_shard", dies_on_the_third)
    args = ["extract", *TINY, "--dataset", f"wds:{wds_path}", "--split", "train", "--cache",
            tmp_path / "c", "--shard-size", 8, "--workers", 0]
    assert run(*args, "--batch-size", 4).exit_code == 130
    monkeypatch.undo()
    cache = split_dir(tmp_path / "c")
    assert flags(cache) == [True, True, False, False, False]
    resumed = run(*args, "--batch-size", 3)  # batches of 3, 3, 2 in each shard of 8
    assert resumed.exit_code == 0 and "resumed" in resumed.output, resumed.output
    reference = split_dir(clean)
    for kind in ("cls", "ap"):
        got = zarr.open_array(str(cache / kind), mode="r")[...]
        want = zarr.open_array(str(reference / kind), mode="r")[...]
        assert got[:16].tobytes() == want[:16].tobytes()  # written before: the same bytes
        np.testing.assert_allclose(got[16:].astype(np.float32), want[16:].astype(np.float32),
                                   rtol=2 ** -9, atol=1e-4)  # one or two fp16 ulps
