"""A valid file in the wrong place (issue 18): a shard file copied over another shard,
another array's file, or a *test* split's file copied into *train* passes every chunk
checksum. The per-shard identity (format 4) refuses it on every read and `verify` names
it; a split's lost zarr.json is damage for `verify --cache` and `ls`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from cliutil import assert_user_error, run
from probecache import SynthSpec, make_pair

from featcache.cache.store import open_cache
from featcache.cache.verification import verify
from featcache.errors import FeatcacheError

QUICK = ["--grid", "quick", "--epochs", 1, "--min-steps", 5]


@pytest.fixture
def pair(tmp_path) -> tuple[Path, Path, Path]:
    """(root, train, test) of a synthetic pair: 240 train rows (shards of 64: 4 shards,
    the last partial), 120 test rows (2 shards)."""
    train, test = make_pair(tmp_path / "cache", SynthSpec(signal={("final", "cls"): 3.0}))
    return tmp_path / "cache", train.path, test.path


def copy_over(src: Path, dst: Path) -> None:
    assert src.read_bytes() != dst.read_bytes()  # different bytes, both valid
    shutil.copyfile(src, dst)


MISPLACED = {
    "another shard": lambda train, test: copy_over(train / "ap/c/0/0/0", train / "ap/c/1/0/0"),
    "another array": lambda train, test: copy_over(train / "cls/c/1/0/0", train / "ap/c/1/0/0"),
    "the test split": lambda train, test: copy_over(test / "ap/c/0/0/0", train / "ap/c/0/0/0"),
    "test labels": lambda train, test: copy_over(test / "labels/c/0", train / "labels/c/0"),
    "test shard and its identity": lambda train, test: (
        copy_over(test / "cls/c/1/0/0", train / "cls/c/1/0/0"),
        copy_over(test / "identity/c/1/0", train / "identity/c/1/0")),
}


@pytest.mark.parametrize("case", list(MISPLACED))
def test_a_misplaced_file_is_refused_by_reads_and_named_by_verify(pair, case):
    _, train, test = pair
    MISPLACED[case](train, test)
    cache = open_cache(train)
    kind = "labels" if "labels" in case else ("cls" if "identity" in case else "ap")
    with pytest.raises(FeatcacheError, match=r"shard \d of '(ap|cls|labels)'.*(not the "
                       r"ones written|another shard's or another cache's)"):
        if kind == "labels":
            cache.labels()
        else:
            cache.read(kind, [0, 4])
    (result,) = verify(train)
    assert not result.ok
    reasons = [why for whys in result.damaged.values() for why in whys]
    assert any(kind in why and ("not the ones written" in why or "another" in why)
               for why in reasons), reasons


def test_the_probe_refuses_test_features_in_train_and_records_nothing(pair, tmp_path):
    root, train, test = pair
    copy_over(test / "cls/c/0/0/0", train / "cls/c/0/0/0")
    result = run("probe", "--method", "linear", "--cache", root, "--runs", tmp_path / "runs",
                 *QUICK)
    assert_user_error(result, "shard 0 of 'cls'", "not the ones written", "verify")
    assert not list((tmp_path / "runs").rglob("record.json"))
    verified = run("verify", "--cache", root, "--json")
    assert verified.exit_code == 2
    bad = [r for r in json.loads(verified.stdout) if not r["ok"]]
    assert [r["path"] for r in bad] == [str(train)] and list(bad[0]["damaged"]) == ["0"]


def test_repair_clears_the_misplaced_shard_and_its_record(pair):
    _, train, test = pair
    copy_over(train / "ap/c/0/0/0", train / "ap/c/2/0/0")
    (result,) = verify(train, repair=True)
    assert result.repaired == [2]
    assert not (train / "ap/c/2/0/0").exists() and not (train / "identity/c/2/0").exists()
    assert not open_cache(train).done()[2]


def test_the_identity_is_what_was_written_and_a_clean_cache_verifies(pair):
    _, train, _ = pair
    cache = open_cache(train)
    rows = zarr.open_group(str(train), mode="r")["identity"][:]
    for k in range(cache.layout.n_shards):
        assert (rows[k] == cache.identity_row(k)).all()
    assert len(set(rows[:, 0].tolist())) == cache.layout.n_shards  # a tag per shard
    assert all(r.ok for r in verify(train))
    assert np.isfinite(cache.read("ap", [0, 1, 2, 3, 4])).all()


def test_a_format_3_cache_without_identity_still_reads(pair):
    _, train, _ = pair
    meta = json.loads((train / "zarr.json").read_text())
    meta["attributes"]["featcache"]["format"] = 3
    (train / "zarr.json").write_text(json.dumps(meta))
    shutil.rmtree(train / "identity")
    cache = open_cache(train)
    assert not cache.has_identity and cache.complete
    assert cache.read("cls", [4]).shape == (240, 1, 32)
    assert all(r.ok for r in verify(train))


def test_a_split_without_its_zarr_json_is_damage_for_verify_and_ls(pair):
    root, train, _ = pair
    (train / "zarr.json").unlink()
    verified = run("verify", "--cache", root, "--json")
    assert verified.exit_code == 2
    bad = [r for r in json.loads(verified.stdout) if not r["ok"]]
    assert [r["path"] for r in bad] == [str(train)]
    assert "zarr.json" in bad[0]["metadata"] and "--overwrite" in bad[0]["metadata"]
    one = run("verify", train)
    assert one.exit_code == 2 and "damaged" in one.stdout and "zarr.json" in one.stdout
    listed = run("ls", "--cache", root, "--json")
    assert listed.exit_code == 0 and [r["split"] for r in json.loads(listed.stdout)] == ["test"]
    assert f"not listed: {train}: damaged" in listed.stderr


def test_a_last_shard_with_chunks_past_the_end_records_and_checks(tmp_path):
    """300 rows in shards of 256: the last shard holds 44 rows, one inner chunk of 64;
    its three chunks past the end are not stored (their crcs are recorded as 0)."""
    from probecache import make_split

    cache = make_split(tmp_path, SynthSpec(shard_size=256), "train", 300)
    row = zarr.open_group(str(cache.path), mode="r")["identity"][1]
    assert (row == cache.identity_row(1)).all()
    assert (cache.recorded_crcs("ap", 1).reshape(4, 5)[1:] == 0).all()
    assert cache.read("ap", [0, 4], slice(250, 300)).shape == (50, 2, 32)
    assert all(r.ok for r in verify(cache.path))
    copy_over(cache.path / "cls/c/1/0/0", cache.path / "ap/c/1/0/0")
    with pytest.raises(FeatcacheError, match="shard 1 of 'ap'.*not the ones written"):
        cache.read("ap", [4], slice(256, 300))


def test_an_unfinished_format_3_cache_is_upgraded_when_resumed(tmp_path):
    """No identity array at all (a format-3 cache): `add_identity` (what `extract` calls
    on resume) records the shards already written, and the rest as they are written."""
    from probecache import make_split

    spec = SynthSpec()
    whole = make_split(tmp_path / "whole", spec, "train", 240)
    part = make_split(tmp_path / "part", spec, "train", 240, complete=False)
    meta = json.loads((part.path / "zarr.json").read_text())
    meta["attributes"]["featcache"]["format"] = 3
    (part.path / "zarr.json").write_text(json.dumps(meta))
    shutil.rmtree(part.path / "identity")
    cache = open_cache(part.path, "r+")
    assert not cache.has_identity and cache.done().tolist() == [True] * 3 + [False]
    cache.add_identity()
    rows = slice(192, 240)
    cache.write_shard(3, {name: np.asarray(whole.group[name][rows])
                          for name in whole.arrays})
    assert cache.finalize()
    again = open_cache(part.path)
    assert again.format == 4 and all(r.ok for r in verify(part.path))
    ours = zarr.open_group(str(part.path), mode="r")["identity"][:]
    theirs = zarr.open_group(str(whole.path), mode="r")["identity"][:]
    assert (ours == theirs).all()  # the same record as a cache written whole
