"""Fault injection: damaged caches, folders and roots, tried as a hostile user would.

For every damage: exit code 2, one `error:` line naming the problem, no traceback, no
number printed as trained, and every file that was there before byte-for-byte unchanged.
Property: after any single damage to a cache, either `probe` refuses, or
`verify --repair` + the same `extract` restore a cache bitwise equal to the clean one.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr
from cliutil import assert_user_error, run
from conftest import TIMM_TINY, TIMM_TINY_KW, model_args, one_thread

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TINY = ["--model", TIMM_TINY, "--weights", "random", *model_args(TIMM_TINY_KW)]
SHAPE = ["--batch-size", 8, "--shard-size", 16, "--workers", 0]
QUICK = ["--grid", "quick", "--epochs", 1, "--min-steps", 5]


def extract_args(wds_path: Path, root: Path, *extra: object) -> list[object]:
    """The clean cache's command (every extract of these tests must match it)."""
    return ["extract", *TINY, "--dataset", f"wds:{wds_path}", "--cache", root, *SHAPE,
            "--all-tokens", *extra]


@pytest.fixture(scope="module")
def clean(wds_path, tmp_path_factory) -> Path:
    """A clean cache root: train (40) and test (20) images, 16-sample shards, all tokens."""
    with one_thread():
        root = tmp_path_factory.mktemp("clean")
        result = run(*extract_args(wds_path, root))
    assert result.exit_code == 0, result.output
    return root


def split_dir(root: Path, split: str = "train") -> Path:
    (path,) = [p.parent for p in root.rglob("zarr.json") if p.parent.name == split
               and (p.parent / "cls").is_dir()]
    return path


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def data_files(root: Path) -> dict[str, bytes]:
    """Every chunk and array metadata file (not the group's attributes, which hold the
    extraction's timings)."""
    return {k: v for k, v in snapshot(root).items()
            if not k.endswith("zarr.json") or k.count("/") > 3}


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def set_label(cache: Path, index: int, value: int) -> None:
    zarr.open_array(str(cache / "labels"), mode="r+")[index] = value


def edit_json(path: Path, change) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


# name: (damage, fragments of the probe's one line, repairable shard by shard)
DAMAGES = {
    "cls shard deleted": (lambda c: (c / "cls/c/1/0/0").unlink(),
                          ["shard 1 of 'cls'", "missing", "featcache verify"], True),
    "ap shard truncated": (lambda c: truncate(c / "ap/c/0/0/0"),
                           ["shard 0 of 'ap'", "checksum"], True),
    "cls byte flipped": (lambda c: flip(c / "cls/c/2/0/0", -200),  # in the final layer
                         ["shard 2 of 'cls'", "checksum"], True),
    "shard index flipped": (lambda c: flip(c / "ap/c/1/0/0", -6), ["shard 1 of 'ap'"], True),
    "tokens shard deleted": (lambda c: (c / "last_tokens/c/0/0/0").unlink(),
                             ["shard 0 of 'last_tokens'", "missing"], True),
    "labels chunk deleted": (lambda c: (c / "labels/c/1").unlink(),
                             ["shard 1 of 'labels'", "missing"], True),
    "labels chunk flipped": (lambda c: flip(c / "labels/c/0", 3),
                             ["shard 0 of 'labels'", "checksum"], True),
    "label out of range": (lambda c: set_label(c, 20, 99),
                           ["shard 1 of 'labels'", "not the ones written"], True),
    "valid chunk deleted": (lambda c: (c / "valid/c/2").unlink(),
                            ["shard 2 of 'valid'", "missing"], True),
    "done chunk deleted": (lambda c: (c / "done/c/2").unlink(), ["incomplete"], True),
    "array shape edited": (lambda c: edit_json(c / "cls/zarr.json",
                                               lambda m: m.update(shape=[40, 4, 40])),
                           ["metadata", "damaged", "--overwrite"], False),
    "group zarr.json malformed": (lambda c: (c / "zarr.json").write_text("{ not json"),
                                  ["metadata", "damaged"], False),
    "attribute of the wrong type": (lambda c: edit_json(
        c / "zarr.json", lambda m: m["attributes"].update(layer_names="block0")),
        ["metadata", "damaged"], False),
}


@pytest.mark.parametrize("name", list(DAMAGES))
def test_damaged_cache_is_refused_in_one_line(copy, tmp_path, name):
    damage, fragments, _ = DAMAGES[name]
    damage(split_dir(copy))
    before = snapshot(copy)
    # a method that reads the damaged array (a probe reads only what it needs, and checks
    # all it reads)
    method = "attentive" if "tokens" in name else "alf"
    result = run("probe", "--method", method, "--cache", copy, "--runs", tmp_path / "runs",
                 *QUICK)
    assert_user_error(result, *fragments)
    assert "trained" not in result.stdout
    assert not list((tmp_path / "runs").rglob("record.json"))  # no number recorded
    assert snapshot(copy) == before  # refusing changed nothing


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DAMAGES))
def test_any_single_damage_is_refused_or_repaired_bitwise(copy, clean, wds_path, name):
    damage, _, repairable = DAMAGES[name]
    cache = split_dir(copy)
    damage(cache)
    verified = run("verify", cache)
    assert "Traceback" not in verified.output
    if name == "done chunk deleted":  # a lost flag is a shard not written yet (docs)
        assert verified.exit_code == 0 and "1 not written yet" in verified.output
    else:
        assert verified.exit_code == 2, verified.output
    if repairable:
        repaired = run("verify", cache, "--repair")
        # fsck's convention: 1 when damage was found and repaired
        assert repaired.exit_code == (1 if verified.exit_code == 2 else 0), repaired.output
        redo = run(*extract_args(wds_path, copy))
    else:
        assert verified.exit_code == 2 and "--overwrite" in verified.output
        redo = run(*extract_args(wds_path, copy, "--overwrite"))
    assert redo.exit_code == 0, redo.output
    assert data_files(copy) == data_files(clean)
    assert run("verify", "--cache", copy).exit_code == 0


def test_verify_names_every_damaged_shard(copy):
    cache = split_dir(copy)
    (cache / "cls/c/1/0/0").unlink()
    flip(cache / "ap/c/2/0/0", 100)
    result = run("verify", cache, "--json")
    assert result.exit_code == 2
    (report,) = json.loads(result.stdout)
    assert sorted(report["damaged"]) == ["1", "2"]
    assert "file missing" in report["damaged"]["1"][0] and "checksum" in report["damaged"]["2"][0]
    assert report["extract_command"].startswith("featcache extract --model")
    assert run("verify", cache, "--repair").exit_code == 1  # found and repaired
    assert run("verify", cache).exit_code == 0  # (the shards are now simply not written)
    assert not (cache / "ap/c/2/0/0").exists()  # cleared: recomputed by the next extract


def test_old_format_caches_stay_readable(copy, wds_path, tmp_path):
    """A format-1 cache (no checksums, zero fills) still probes; extract refuses to add to
    it and says how to replace it."""
    cache = split_dir(copy)
    for split in ("train", "test"):
        edit_json(split_dir(copy, split) / "zarr.json",
                  lambda m: m["attributes"]["featcache"].update(format=1))
    result = run("probe", "--method", "linear", "--cache", copy, "--runs", tmp_path / "r",
                 *QUICK, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["status"] == "trained"
    assert run("info", cache).exit_code == 0
    assert_user_error(run(*extract_args(wds_path, copy, "--split", "train")),
                      "format-1 cache from an older featcache", "--overwrite")


def test_a_format_2_cache_resumes_bitwise(copy, wds_path):
    """Format 3 only added layouts for models without CLS or with a pool: an unfinished
    format-2 cache of a CLS model (someone upgraded mid-extraction) is finished, not
    refused, and equals the clean cache."""
    cache = split_dir(copy)
    before = data_files(cache)

    def as_format_2(meta: dict) -> None:
        meta["attributes"]["featcache"]["format"] = 2
        meta["attributes"].pop("token_kinds")
        meta["attributes"]["complete"] = False

    edit_json(cache / "zarr.json", as_format_2)
    zarr.open_group(str(cache), mode="r+")["done"][1] = False
    (cache / "ap/c/1/0/0").unlink()
    result = run(*extract_args(wds_path, copy))
    assert result.exit_code == 0, result.output
    assert data_files(cache) == before


def test_overwrite_keeps_the_old_cache_until_the_new_one_is_complete(copy, wds_path,
                                                                      monkeypatch):
    from featcache.extracting import run as extraction

    cache = split_dir(copy)
    before = snapshot(cache)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(extraction, "_run_loop", killed)
    result = run(*extract_args(wds_path, copy, "--overwrite", "--model-arg", "depth=2"))
    assert result.exit_code == 130
    assert snapshot(cache) == before  # the old cache is whole and in place
    nxt = cache.with_name(f".{cache.name}.next")
    assert (nxt / "zarr.json").is_file()  # the replacement, unfinished
    refused = run(*extract_args(wds_path, copy, "--model-arg", "depth=2"))
    assert_user_error(refused, "--overwrite resumes it")
    monkeypatch.undo()
    done = run(*extract_args(wds_path, copy, "--overwrite", "--model-arg", "depth=2"))
    assert done.exit_code == 0, done.output
    assert not nxt.exists()
    info = json.loads(run("info", cache, "--json").stdout)
    assert info["fingerprint"]["model"]["model_kwargs"]["depth"] == 2 and info["complete"]


# ------------------------------------------------------------------ bad inputs, bad paths


@pytest.mark.parametrize("args,fragments", [
    (["--workers", -1], ["--workers must be at least 0"]),
    (["--batch-size", 10**20], ["--batch-size is too large"]),
])
def test_bad_extract_numbers_create_nothing(wds_path, tmp_path, args, fragments):
    root = tmp_path / "cache"
    assert_user_error(run(*extract_args(wds_path, root), *args), *fragments)
    assert not root.exists()


@pytest.mark.parametrize("args,fragments", [
    (["--seeds", "-1"], ["--seeds must be at least 0"]),
    (["--seeds", "1" * 20], ["--seeds is too large"]),
    (["--epochs", "9" * 20], ["--epochs is too large"]),
])
def test_bad_probe_numbers(clean, tmp_path, args, fragments):
    assert_user_error(run("probe", "--cache", clean, "--runs", tmp_path, *args), *fragments)


def test_cache_root_that_is_a_file(wds_path, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    assert_user_error(run(*extract_args(wds_path, target)), str(target))
    assert_user_error(run("probe", "--cache", target), "is a file")
    assert target.read_text() == "x"


def test_lock_path_that_is_a_directory(copy, wds_path):
    cache = split_dir(copy)
    lock = cache.with_name(f".{cache.name}.lock")
    assert not lock.exists()  # writers leave no lock file behind
    lock.mkdir()
    assert_user_error(run(*extract_args(wds_path, copy)), "is a directory")


def test_export_out_checks(copy, tmp_path):
    cache = split_dir(copy)
    assert_user_error(run("export", cache, "--out", tmp_path / "missing" / "x.h5"),
                      "does not exist")
    folder = tmp_path / "folder"
    folder.mkdir()
    assert_user_error(run("export", cache, "--out", folder, "--overwrite"), "is a folder")
    flip(cache / "cls/c/0/0/0", 100)
    assert_user_error(run("export", cache, "--out", tmp_path / "y.h5"), "checksum")
    assert not list(tmp_path.glob("*y.h5*"))  # no half-written file, no temporary


def test_damaged_run_records_are_skipped_and_counted(tmp_path):
    runs = tmp_path / "runs"
    for name, text in (("a", "[1, 2]"), ("b", '{"metrics": "high", "method": "linear"}'),
                       ("c", "{trunc")):
        folder = runs / "m" / "d" / name
        folder.mkdir(parents=True)
        (folder / "record.json").write_text(text)
    result = run("runs", "--runs", runs)
    assert result.exit_code == 0 and "Traceback" not in result.output
    assert "3 unreadable record(s) skipped" in result.stderr
    assert "delete" in result.stderr  # how to fix it
    assert_user_error(run("report", "--runs", runs, "--out", tmp_path / "out"),
                      "no readable run records")


def test_device_index_is_named(clean, tmp_path):
    assert_user_error(run("probe", "--cache", clean, "--runs", tmp_path, "--device", "cuda:7"),
                      "cuda:7")


def test_option_warnings(clean, tmp_path):
    result = run("probe", "--cache", clean, "--runs", tmp_path, "--method", "concat",
                 "--token", "ap", "--layers", "", *QUICK)
    assert result.exit_code == 0, result.output
    assert "warning: --token applies to linear, layers and knn only" in result.stderr
    assert "warning: --layers is empty" in result.stderr
    shots = run("probe", "--cache", clean, "--runs", tmp_path, "--method", "linear",
                "--shots", 50, *QUICK)
    assert shots.exit_code == 0, shots.output
    assert shots.stderr.count("warning: --shots 50") == 1  # once, not once per seed


# ------------------------------------------------------------------ image folders


def folder_dataset(tmp_path: Path, classes: dict[str, int]) -> Path:
    from fakedata import class_image, encode

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, (cls, n) in enumerate(classes.items()):
            d = tmp_path / "data" / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (d / f"{i}.png").write_bytes(encode(class_image(c, 4, 32, rng), "png"))
    return tmp_path / "data"


@pytest.mark.parametrize("hole,fragments", [
    ("empty class", ["holds no image files"]),
    ("one class", ["one class folder", "at least 2 classes"]),
    ("dangling link", ["broken symbolic link"]),
    ("link loop", ["loops"]),
])
def test_image_folder_holes_are_refused(tmp_path, hole, fragments):
    data = folder_dataset(tmp_path, {"a": 3, "b": 3} if hole != "one class" else {"a": 3})
    if hole == "empty class":
        (data / "train" / "c").mkdir()
    elif hole == "dangling link":
        (data / "train" / "a" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    elif hole == "link loop":
        (data / "train" / "a" / "x.png").symlink_to(data / "train" / "a" / "y.png")
        (data / "train" / "a" / "y.png").symlink_to(data / "train" / "a" / "x.png")
    root = tmp_path / "cache"
    result = run("extract", *TINY, "--dataset", f"imagefolder:{data}", "--cache", root)
    assert_user_error(result, *fragments)
    assert not list(root.rglob("zarr.json"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder: permissions cannot "
                    "make one unreadable")
def test_unreadable_class_folder_is_refused(tmp_path):
    data = folder_dataset(tmp_path, {"a": 3, "b": 3})
    (data / "train" / "b").chmod(0)
    try:
        result = run("extract", *TINY, "--dataset", f"imagefolder:{data}", "--cache",
                     tmp_path / "cache")
    finally:
        (data / "train" / "b").chmod(0o755)
    assert_user_error(result, "cannot read folder")


# ------------------------------------------------------------------ read-only and full disks


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` made read-only: a read-only bind mount (as root, whom permissions do not
    stop), else permissions."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    if not _mount("--bind", str(folder), str(folder)):
        pytest.skip("no read-only bind mount here (needs mount privileges)")
    if not _mount("-o", "remount,ro,bind", str(folder)):
        subprocess.run(["umount", str(folder)], capture_output=True)
        pytest.skip("no read-only bind mount here (needs mount privileges)")
    try:
        yield
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


@contextlib.contextmanager
def tiny_disk(folder: Path, size: str):
    """A tmpfs of `size` at `folder`: writes beyond it fail with ENOSPC."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                       str(folder)):
        pytest.skip("cannot mount a small tmpfs here (needs root and mount privileges)")
    try:
        yield
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def test_read_only_root(copy, wds_path, tmp_path):
    before = snapshot(copy)
    with read_only(copy):
        done = run(*extract_args(wds_path, copy))  # complete: a no-op, no lock needed
        assert done.exit_code == 0 and "already complete" in done.stdout, done.output
        assert run("info", split_dir(copy)).exit_code == 0
        assert run("verify", "--cache", copy).exit_code == 0
        # fails before training, not after
        assert_user_error(run("probe", "--method", "linear", "--cache", copy, *QUICK),
                          "cannot write run records", "--runs")
        assert_user_error(run("report", "--cache", copy, "--out", copy / "report"))
        assert_user_error(run("export", split_dir(copy), "--out", copy / "x.h5"),
                          "Read-only file system")
        assert_user_error(run(*extract_args(wds_path, copy, "--model-arg", "depth=2",
                                            "--overwrite")), "Read-only file system")
    assert snapshot(copy) == before


def test_full_disk_during_extraction_and_report(wds_path, tmp_path, clean):
    disk = tmp_path / "disk"
    with tiny_disk(disk, "96k"):
        result = run(*extract_args(wds_path, disk))
        assert_user_error(result)
        assert "disk is full" in result.stderr or "No space left" in result.stderr
        assert not [p for p in disk.rglob("*") if ".tmp-" in p.name or p.suffix == ".partial"]
    # a report over an earlier one on a full disk: the earlier files stay as they were
    runs = tmp_path / "runs"
    assert run("probe", "--method", "linear", "--cache", clean, "--runs", runs,
               *QUICK).exit_code == 0
    out = tmp_path / "out"
    with tiny_disk(out, "64k"):
        first = run("report", "--runs", runs, "--out", out, "--format", "csv", "--no-cka")
        assert first.exit_code == 0, first.output
        before = snapshot(out)
        stat = os.statvfs(out)  # leave too little room for the next report's files
        (out / "filler").write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - 2048))
        result = run("report", "--runs", runs, "--out", out, "--no-cka")
        assert_user_error(result)
        after = snapshot(out)
        after.pop("filler")
        assert {k: after.get(k) for k in before} == before
        assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


# ------------------------------------------------------------------ concurrent probes


def test_two_probes_of_the_same_run_train_it_once(clean, tmp_path):
    from featcache.probing.run import ProbeOptions, probe

    opts = ProbeOptions(method="linear", cache=clean, runs=tmp_path, grid="quick", epochs=1,
                        min_steps=5)
    results: list = [None, None]

    def go(i: int) -> None:
        results[i] = probe(opts)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(r[0].status for r in results)
    assert statuses == ["skipped", "trained"]  # one trained, the other waited and took it
    assert results[0][0].metrics == results[1][0].metrics
    assert len(list(tmp_path.rglob("record.json"))) == 1


def test_ls_names_a_cache_it_cannot_open(copy):
    """A cache with damaged metadata is not silently missing from `ls`: a warning names it."""
    damaged = split_dir(copy)
    (damaged / "zarr.json").write_text("{ not json")
    result = run("ls", "--cache", copy)
    assert result.exit_code == 0, result.output
    assert "not listed" in result.stderr and str(damaged) in result.stderr.replace("\n", "")
    assert "featcache verify" in result.stderr
    assert "test" in result.stdout  # the test split is listed


@pytest.mark.parametrize("method", ["linear", "alf"])
def test_nan_written_into_a_cache_is_no_score(copy, tmp_path, method):
    """A value changed after extraction through zarr itself keeps every checksum valid:
    the per-shard identity (format 4) refuses it before any training."""
    train = split_dir(copy)
    cls = zarr.open_array(str(train / "cls"), mode="r+")
    row = cls[0]
    row[...] = np.nan
    cls[0] = row
    result = run("probe", "--method", method, "--cache", copy, "--runs", tmp_path / "runs",
                 *QUICK)
    assert_user_error(result, "shard 0 of 'cls'", "edited in place", "featcache verify")
    assert not list((tmp_path / "runs").rglob("record.json"))


def test_full_disk_for_run_records_and_an_export(clean, tmp_path):
    """A probe whose record cannot be written, and an export that would not fit: one line
    each (safetensors' and HDF5's own errors were tracebacks, HDF5 even crashed)."""
    disk = tmp_path / "disk"
    with tiny_disk(disk, "64k"):
        stat = os.statvfs(disk)
        (disk / "filler").write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - 8192))
        result = run("probe", "--method", "alf", "--cache", clean, "--runs", disk / "runs",
                     *QUICK)
        assert_user_error(result, "No space left")
        assert not list((disk / "runs").rglob("record.json"))
        assert not [p for p in disk.rglob("*") if ".tmp-" in p.name]
        assert_user_error(run("export", split_dir(clean), "--out", disk / "x.h5"),
                          "MiB are free there")
        assert not (disk / "x.h5").exists()
