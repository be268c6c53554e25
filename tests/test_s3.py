"""Caches in an object store, against a real S3 API on 127.0.0.1: moto's server mode
(`moto[server]`, in the dev extras), started here. Nothing leaves this machine.

extract / probe / ls / info / verify / export / report on `s3://` give the same bytes and
records as on a local disk; a flipped byte is refused; two writers lose no flag; the lock
is a conditional create; kill -9 resumes bitwise; store errors are one line."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
from cliutil import assert_user_error, kill_9_when, run, slow_extract
from conftest import TIMM_TINY, TIMM_TINY_KW, model_args

pytestmark = pytest.mark.usefixtures("torch_one_thread")

QUICK = ["--grid", "quick", "--epochs", 1, "--min-steps", 5, "--json"]


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 on 127.0.0.1 (a free port), credentials and endpoint in the standard
    environment variables, as a user would set them."""
    server_mod = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    try:
        server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
    except Exception as exc:  # only when it cannot start
        pytest.skip(f"moto's S3 server cannot start here: {exc}")
    host, port = server.get_host_and_port()
    mp = pytest.MonkeyPatch()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_ENDPOINT_URL": f"http://{host}:{port}",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        mp.setenv(key, value)
    _fresh_clients()
    yield f"http://{host}:{port}"
    mp.undo()
    _fresh_clients()
    server.stop()


def _fresh_clients() -> None:
    """fsspec keeps one client per set of options: a changed environment needs a new one."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def bucket(s3_server) -> str:
    import boto3

    name = f"fc-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


def objects(url: str) -> dict[str, bytes]:
    """Every object under a prefix (relative key → bytes)."""
    from featcache.cache.stores import location

    root = location(url)
    return {k: (root / k).read_bytes() for k in root.listing()}


def local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file()}


def data_only(files: dict[str, bytes]) -> dict[str, bytes]:
    """The chunk and shard files (metadata holds timestamps and paths)."""
    return {k: v for k, v in files.items() if not k.endswith("zarr.json")
            and "/runs/" not in f"/{k}"}


EXTRACT = ["extract", "--model", TIMM_TINY, "--weights", "random", *model_args(TIMM_TINY_KW),
           "--batch-size", 8, "--shard-size", 16, "--workers", 0]


def extract(wds_path: Path, cache: object, *extra: object):
    return run(*EXTRACT, "--dataset", f"wds:{wds_path}", "--cache", cache, *extra)


@pytest.fixture
def local_root(wds_path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("local")
    result = extract(wds_path, root)
    assert result.exit_code == 0, result.output
    return root


def test_ranges_merge_across_small_gaps_within_a_block():
    """Every requested byte is covered once merged, gaps up to RANGE_GAP are bridged, a
    request grows only to RANGE_BLOCK, and nested, duplicated or empty spans neither
    shrink a request nor vanish (against a brute force over random spans)."""
    from featcache.cache.shardfiles import RANGE_BLOCK, RANGE_GAP, _merged

    M = 1 << 20
    assert _merged([(0, 100), (10, 20)]) == [[0, 100]]
    assert _merged([(0, 100), (0, 100), (200, 300)]) == [[0, 300]]
    assert _merged([(5, 5)]) == []
    assert _merged([(0, 10), (10 + RANGE_GAP + 1, 2 * RANGE_GAP)]) == [
        [0, 10], [10 + RANGE_GAP + 1, 2 * RANGE_GAP]]
    assert _merged([(0, 20 * M), (20 * M + 5, 20 * M + 9)]) == [[0, 20 * M],
                                                               [20 * M + 5, 20 * M + 9]]
    rng = np.random.default_rng(0)
    for _ in range(200):
        starts = np.sort(rng.integers(0, 40 * M, 30))
        sizes = rng.integers(0, 3 * M, 30)
        spans = sorted((int(a), int(a + b)) for a, b in zip(starts, sizes, strict=True))
        merged = _merged(spans)
        for start, end in spans:  # every requested byte is in a request
            assert start == end or any(a <= start and end <= b for a, b in merged)
        for a, b in merged:  # within a block, or one span that is longer on its own
            assert b - a <= RANGE_BLOCK or [a, b] in [list(x) for x in spans]
        for (a0, b0), (a1, b1) in itertools.pairwise(merged):  # no two that could be one
            assert a1 - b0 > RANGE_GAP or max(b0, b1) - a0 > RANGE_BLOCK


@pytest.mark.parametrize("gap", [0, 1 << 20])
def test_sparse_reads_from_a_store_equal_the_local_ones(bucket, wds_path, local_root,
                                                        monkeypatch, gap):
    """A subset of layers and rows read from the store, its ranges merged across the gaps
    of unread chunks (RANGE_GAP) or not, equals the local read: the gap's bytes land
    where they belong and are never taken for a chunk's."""
    from featcache.cache import shardfiles
    from featcache.cache.store import open_cache

    url = f"{bucket}/cache"
    assert extract(wds_path, url).exit_code == 0
    monkeypatch.setattr(shardfiles, "RANGE_GAP", gap)
    for split in ("train", "test"):
        remote, local = (open_cache(next(r["path"] for r in json.loads(
            run("ls", "--cache", root, "--json").stdout) if r["split"] == split))
            for root in (url, local_root))
        last = len(local.layer_names) - 1
        for kind in local.token_kinds:
            for layers, rows in (([0, last], None), ([1], slice(3, 29)), (None, None)):
                np.testing.assert_array_equal(remote.read(kind, layers, rows),
                                              local.read(kind, layers, rows))


@pytest.mark.slow
def test_extract_probe_verify_on_s3_equal_a_local_disk(bucket, wds_path, local_root,
                                                       tmp_path):
    url = f"{bucket}/cache"
    result = extract(wds_path, url)
    assert result.exit_code == 0, result.output
    assert not Path("s3:").exists()
    assert data_only(objects(url)) == data_only(local_files(local_root))
    again = extract(wds_path, url)
    assert again.exit_code == 0 and "already complete" in again.stdout
    listed = json.loads(run("ls", "--cache", url, "--json").stdout)
    assert sorted(r["split"] for r in listed) == ["test", "train"]
    assert all(r["complete"] and r["path"].startswith(url) for r in listed)
    info = run("info", listed[0]["path"], "--json")
    assert info.exit_code == 0 and json.loads(info.stdout)["missing_files"] == []
    assert run("verify", "--cache", url).exit_code == 0
    records = {}
    for name, root in (("s3", url), ("local", local_root)):
        probed = run("probe", "--method", "alf", "--cache", root, "--runs", tmp_path / name,
                     *QUICK)
        assert probed.exit_code == 0, probed.output
        records[name] = json.loads(probed.stdout)[0]
    assert records["s3"]["status"] == "trained"
    same = ("balanced_top1", "top1", "selected")
    assert [records["s3"][k] for k in same] == [records["local"][k] for k in same]
    saved = [json.loads(next((tmp_path / n).rglob("record.json")).read_text())
             for n in ("s3", "local")]
    assert saved[0]["metrics"] == saved[1]["metrics"]
    assert saved[0]["caches"]["train"].startswith(url)
    report = run("report", "--runs", tmp_path / "s3", "--out", tmp_path / "rep", "--json")
    assert report.exit_code == 0, report.output
    out = tmp_path / "train.h5"
    assert run("export", listed[1]["path"], "--out", out).exit_code == 0 and out.is_file()


@pytest.mark.slow
def test_a_flipped_byte_in_an_object_is_refused_then_repaired(bucket, wds_path, local_root,
                                                             tmp_path):
    from featcache.cache.stores import location

    url = f"{bucket}/cache"
    assert extract(wds_path, url, "--split", "train").exit_code == 0
    (split,) = [k[: -len("/ap/c/1/0/0")] for k in location(url).listing()
                if k.endswith("train/ap/c/1/0/0")]
    obj = location(f"{url}/{split}/ap/c/1/0/0")
    data = bytearray(obj.read_bytes())
    data[100] ^= 0xFF
    obj.write_bytes(bytes(data))
    exported = run("export", f"{url}/{split}", "--out", tmp_path / "t.h5")
    assert_user_error(exported, "shard 1 of 'ap'", "checksum")
    assert not list(tmp_path.iterdir())  # nothing half-written
    verified = run("verify", f"{url}/{split}", "--json")
    assert verified.exit_code == 2 and list(json.loads(verified.stdout)[0]["damaged"]) == ["1"]
    assert run("verify", f"{url}/{split}", "--repair").exit_code == 1  # found and repaired
    assert extract(wds_path, url, "--split", "train").exit_code == 0
    train = {k: v for k, v in data_only(local_files(local_root)).items() if "/train/" in k}
    assert data_only(objects(url)) == train


def test_two_writers_on_one_cache_lose_no_flag(bucket):
    from featcache.cache.store import Layout, create_cache, open_cache
    from featcache.cache.stores import location

    n, shard = 48, 8
    path = location(f"{bucket}/c/m/d/train")
    fp = {"model": {"model": "m"}, "dataset": {"name": "d", "split": "train"}}
    create_cache(path, fp, Layout(n, 2, 4, shard), np.zeros(n, int), ["a"],
                 ["block0", "final"], [4, 4])
    rng = np.random.default_rng(0)
    values = rng.normal(size=(n, 2, 4)).astype(np.float16)

    def writer(rank: int) -> None:
        cache = open_cache(path, "r+")  # each "rank" opens it, as torchrun ranks do
        for k in range(rank, n // shard, 2):
            rows = slice(k * shard, (k + 1) * shard)
            cache.write_shard(k, {"cls": values[rows], "ap": -values[rows],
                                  "labels": np.zeros(shard, int),
                                  "valid": np.ones(shard, bool)})

    threads = [threading.Thread(target=writer, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cache = open_cache(path, "r+")
    assert cache.done().all()
    assert cache.finalize() and (cache.read("ap", [0, 1]) == -values).all()
    assert run("verify", path).exit_code == 0


def test_the_split_lock_is_a_conditional_create(bucket):
    from featcache.cache.files import write_lock
    from featcache.cache.stores import location
    from featcache.errors import FeatcacheError

    path = location(f"{bucket}/c/m/d/train")
    lock = path.with_name(".train.lock")
    with write_lock(path):
        assert json.loads(lock.read_bytes())["pid"] == os.getpid()
        with pytest.raises(FeatcacheError, match="another featcache process is writing"), \
                write_lock(path):
            pass
    assert not lock.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    import socket

    lock.write_bytes(json.dumps({"host": socket.gethostname(), "pid": int(dead)}).encode())
    with write_lock(path):  # a killed writer's lock on this host is taken over
        pass
    lock.write_bytes(json.dumps({"host": "elsewhere", "pid": 1}).encode())
    with pytest.raises(FeatcacheError, match=f"delete {lock}"), write_lock(path):
        pass


@pytest.mark.slow
def test_kill_9_mid_extraction_resumes_bitwise(bucket, wds_path, local_root):
    from featcache.cache.stores import location

    url = f"{bucket}/cache"
    cli = [str(a) for a in EXTRACT] + ["--dataset", f"wds:{wds_path}", "--split", "train",
                                       "--cache", url, "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the child's, and the rerun's
    child = slow_extract(cli, 3)  # a kill lands mid-run
    kill_9_when(child, lambda: any("/train/done/c/" in f"/{k}"  # a shard's done flag
                                   for k in location(url).listing()), poll=0.2)
    rerun = subprocess.run([sys.executable, "-m", "featcache", *cli], env=env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    (row,) = json.loads(rerun.stdout)
    assert row["status"] == "resumed" and 1 <= row["shards_written"] < 3
    train = {k: v for k, v in data_only(local_files(local_root)).items() if "/train/" in k}
    assert data_only(objects(url)) == train


def test_no_credentials_is_one_line(bucket, s3_server, tmp_path):
    """No AWS_ACCESS_KEY_ID and no ~/.aws: the line says where credentials come from."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=s3_server, AWS_DEFAULT_REGION="us-east-1",
               HOME=str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "featcache", "ls", "--cache", bucket],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.strip()]
    assert line.startswith(f"error: {bucket}: no valid credentials") and \
        "AWS_ACCESS_KEY_ID" in line


def test_store_errors_are_one_line(bucket, s3_server, monkeypatch):
    assert_user_error(run("ls", "--cache", "s3://no-such-bucket-here/c"),
                      "no-such-bucket-here", "does not exist")
    assert_user_error(run("verify", "s3://no-such-bucket-here/c/m/d/train"),
                      "no featcache cache")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr("featcache.cache.stores.STORE_OPTIONS", {"s3": {"config_kwargs": {
        "retries": {"max_attempts": 2, "mode": "standard"}, "connect_timeout": 1}}})
    _fresh_clients()
    try:
        assert_user_error(run("ls", "--cache", f"{bucket}/c"), "unreachable",
                          "AWS_ENDPOINT_URL")
    finally:
        _fresh_clients()


def test_a_server_stopped_mid_probe_is_one_line_and_leaves_no_record(s3_server, tmp_path,
                                                                     monkeypatch):
    import boto3
    from moto.server import ThreadedMotoServer
    from probecache import SynthSpec, make_pair

    from featcache.cache.store import Cache
    from featcache.cache.stores import location

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    monkeypatch.setattr("featcache.cache.stores.STORE_OPTIONS", {"s3": {"config_kwargs": {
        "retries": {"max_attempts": 2, "mode": "standard"}, "connect_timeout": 1}}})
    _fresh_clients()
    try:
        boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket="gone")
        make_pair(location("s3://gone/c"), SynthSpec(n_train=96, n_test=64, shard_size=32))
        real, calls = Cache.read_into, []

        def stopping(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2:  # the train tokens were read: the server goes away
                server.stop()
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Cache, "read_into", stopping)
        result = run("probe", "--method", "linear", "--cache", "s3://gone/c", "--runs",
                     tmp_path / "runs", *QUICK[:-1])
        assert len(calls) >= 2
        assert_user_error(result, "s3://gone/c", "unreachable", "run the same command again")
        assert not [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    finally:
        _fresh_clients()
        with __import__("contextlib").suppress(Exception):
            server.stop()


@pytest.mark.slow
def test_local_cache_keeps_a_verified_copy_and_replaces_a_bad_one(bucket, tmp_path,
                                                                 monkeypatch):
    from probecache import SynthSpec, make_pair

    from featcache.cache.stores import RemotePath, location

    real, fetched = RemotePath.read_bytes, []

    def counted(self):
        fetched.append(self.url)
        return real(self)

    monkeypatch.setattr(RemotePath, "read_bytes", counted)

    url = f"{bucket}/c"
    make_pair(location(url), SynthSpec(n_train=96, n_test=64, shard_size=32))
    copies = tmp_path / "copies"
    results = []
    for i in range(3):
        fetched.clear()
        probed = run("probe", "--method", "linear", "--cache", url, "--runs",
                     tmp_path / f"runs{i}", "--local-cache", copies, *QUICK)
        assert probed.exit_code == 0, probed.output
        results.append(json.loads(probed.stdout)[0])
        shards = [u for u in fetched if "/cls/c/" in u]
        assert len(shards) == [5, 1, 0][i]  # all; the damaged copy again; none
        kept = sorted(p for p in copies.rglob("*") if p.is_file())
        # the final layer's CLS of every shard of both splits: 3 + 2 objects
        assert [p.relative_to(copies).parts[-5] for p in kept] == ["cls"] * 5, kept
        for p in kept:  # each copy is the store's object, byte for byte
            key = p.relative_to(copies / "s3").as_posix()
            assert p.read_bytes() == location(f"s3://{key}").read_bytes()
        if i == 0:
            flipped = bytearray(kept[0].read_bytes())
            flipped[10] ^= 0xFF
            kept[0].write_bytes(bytes(flipped))  # a damaged copy is fetched again
    assert len({json.dumps([r["balanced_top1"], r["top1"]]) for r in results}) == 1


def test_a_missing_or_truncated_object_is_damage_named_as_such(bucket, tmp_path):
    from probecache import SynthSpec, make_pair

    from featcache.cache.stores import location
    from featcache.cache.verification import verify

    url = f"{bucket}/c"
    train, _ = make_pair(location(url), SynthSpec(n_train=96, n_test=64, shard_size=32))
    (train.path / "ap/c/1/0/0").unlink()
    cut = train.path / "cls/c/2/0/0"
    cut.write_bytes(cut.read_bytes()[:-100])
    (result,) = verify(train.path)
    assert sorted(result.damaged) == [1, 2]
    assert any("file missing" in why for why in result.damaged[1])
    assert any("cls" in why for why in result.damaged[2])
    probed = run("probe", "--method", "linear", "--cache", url, "--runs", tmp_path / "r",
                 *QUICK[:-1])
    assert_user_error(probed, "is damaged", "featcache verify")
    assert not list((tmp_path / "r").rglob("record.json"))


def test_a_suite_with_its_cache_in_a_bucket(bucket, tmp_path, monkeypatch):
    """`cache = "s3://..."` in a suite file is the bucket, never a folder named `s3:` beside
    the file (it was); the state and the report stay on this machine, under the user's
    cache folder, and running the suite again does nothing."""
    from fakedata import make_imagefolder
    from test_suites import suite_file

    import featcache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home"))
    make_imagefolder(tmp_path / "data", {"train": 12, "test": 6})
    path = suite_file(tmp_path, [f"imagefolder:{tmp_path / 'data'}"], methods=["linear"])
    url = f"{bucket}/suite-cache"
    path.write_text(path.read_text().replace('cache = "cache"', f'cache = "{url}"'))
    first = featcache.run(path, view=False)
    assert first["cache"] == url and first["totals"]["done"] == 2 and first["report"]["csv"]
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "cache").exists()
    assert any(k.endswith("zarr.json") for k in objects(url))
    state = Path(first["state_file"])
    assert state.is_file() and (tmp_path / "home") in state.parents
    assert featcache.run(path, view=False)["totals"]["to_do"] == 0
    listed = json.loads(run("ls", "--cache", url, "--json").stdout)
    assert sorted(r["split"] for r in listed) == ["test", "train"]
