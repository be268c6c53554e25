"""How fast a probe reads its tokens from a cache, against reading the same bytes raw.

One run, one machine: a ViT-B-shaped cache (13 layers × 768, CLS and AP, float16, the
crc32c-checked format featcache writes) through featcache's own writer. Two readings of
the same shard files, alternated, median of the repeats:

- raw: every `cls` and `ap` shard file read sequentially into memory (bytes only);
- featcache: `load_source` of the ALF tokens (CLS+AP of blocks 1..11 and final, 24 of
  the 26 layer-kinds): files read, index and chunk checksums verified, chunks placed.

Cold: each file's pages are dropped from the page cache first (posix_fadvise
DONTNEED), so both read the disk; warm: both from the page cache (memory bandwidth, the
decoding cost laid bare). The goal (issue "Probing at scale") is featcache ≥ 0.7 of raw.
With `--stream`, also one training epoch of a linear probe, reading included, with the
tokens loaded into memory against streamed from the cold cache within a quarter of their
size (`featcache.probing.tokens.streaming`).

With `--store s3`, the same bytes are also put in an S3 bucket served on 127.0.0.1 by
moto (`moto[server]`, the dev extras) and read from there (`s3://…`): featcache from
the store against featcache from the local disk (warm and cold), and what the read-ahead
(shards in flight, `featcache.cache.store.REMOTE_AHEAD`) and the ranged requests in flight per
shard (`featcache.cache.shardfiles.RANGES_IN_FLIGHT`) buy. Goal: ≥ 0.5 of the local disk.

    python benchmarks/read.py [--n 16384] [--repeats 3] [--stream] [--store s3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from checksum import build, timed_read  # noqa: E402
from machine import cpu_info  # noqa: E402

from featcache.cache.store import open_cache  # noqa: E402
from featcache.probing.pairs import token_list  # noqa: E402
from featcache.probing.tokens.features import load_source  # noqa: E402
from featcache.probing.tokens.streaming import StreamedSource  # noqa: E402


def shard_files(path: Path) -> list[Path]:
    return sorted(f for kind in ("cls", "ap") for f in (path / kind / "c").rglob("*")
                  if f.is_file())


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (clean pages: no root needed)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(files: list[Path]) -> float:
    started = time.perf_counter()
    total = 0
    for f in files:
        total += len(f.read_bytes())
    assert total > 0
    return time.perf_counter() - started


def compare(path: Path, files: list[Path], repeats: int, cold: bool) -> dict[str, float]:
    times: dict[str, list[float]] = {"raw": [], "featcache": []}
    for _ in range(repeats):
        for name, fn in (("raw", lambda: raw_read(files)),
                         ("featcache", lambda: timed_read(path))):
            if cold:
                evict(files)
            else:
                raw_read(files)  # in the page cache
            times[name].append(fn())
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--store", choices=["disk", "s3"], default="disk")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("FEATCACHE_BENCH_DIR")) as tmp:
        path = build(Path(tmp), args.n, True)
        files = shard_files(path)
        size = sum(f.stat().st_size for f in files) / 2**30
        print(f"machine: {cpu_info()}, torch {torch.__version__}, threads "
              f"{torch.get_num_threads()}")
        print(f"cache: {args.n} samples × 13 layers × 768, CLS and AP: {size:.2f} GiB of "
              f"shard files; ALF reads 24 of 26 layer-kinds")
        for cold in (True, False):
            med = compare(path, files, args.repeats, cold)
            print(f"{'cold' if cold else 'warm'}: raw {med['raw']:.3f} s "
                  f"({size / med['raw']:.2f} GiB/s), featcache {med['featcache']:.3f} s "
                  f"({size / med['featcache']:.2f} GiB/s): featcache / raw throughput "
                  f"{med['raw'] / med['featcache']:.2f}" + (" (goal ≥ 0.7)" if cold else ""))
        if args.stream:
            stream_epochs(path, files, args.repeats)
        if args.store == "s3":
            from_store(path, files, size, args.repeats)


def from_store(path: Path, files: list[Path], size: float, repeats: int) -> None:
    """The same cache read from moto's S3 on the loopback, against the local disk."""
    import socket
    import subprocess

    import boto3

    from featcache.cache import shardfiles
    from featcache.cache import store as cache_module
    from featcache.cache.stores import location

    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        host, port = s.getsockname()
    # a process of its own: in this one, the server's threads would share the reader's GIL
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", host, "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                break
        time.sleep(0.1)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://{host}:{port}")
    boto3.client("s3").create_bucket(Bucket="bench")
    url = "s3://bench/" + "/".join(path.parts[-3:])
    remote = location(url)
    for f in sorted(f for f in path.rglob("*") if f.is_file()):
        (remote / f.relative_to(path).as_posix()).write_bytes(f.read_bytes())
    try:
        evict(files)
        local = {"cold": statistics.median(_cold(path, files) for _ in range(repeats)),
                 "warm": statistics.median(timed_read(path) for _ in range(repeats))}
        timed_read(remote)  # the server's first reads are slower (moto loads its objects)
        s3 = statistics.median(timed_read(remote) for _ in range(repeats))
        print(f"s3 (moto on 127.0.0.1): featcache {s3:.3f} s ({size / s3:.2f} GiB/s); local "
              f"disk cold {local['cold']:.3f} s, warm {local['warm']:.3f} s: s3 / local "
              f"throughput {local['cold'] / s3:.2f} cold, {local['warm'] / s3:.2f} warm "
              "(goal ≥ 0.5)")
        ceiling = statistics.median(_whole_objects(remote, path, files)
                                    for _ in range(repeats))
        print(f"  the server's ceiling: every shard file fetched whole, all GETs in flight "
              f"at once (s3fs cat): {ceiling:.3f} s, {_bytes(files) / 2**30 / ceiling:.2f}"
              f" GiB/s of shard files; featcache's ALF read takes {s3 / ceiling:.2f}x that time "
              "(for 92 % of the bytes)")
        default = (cache_module.REMOTE_AHEAD, shardfiles.RANGES_IN_FLIGHT)
        for ahead, ranges in ((1, 1), (1, default[1]), (default[0], 1), default, (8, 64)):
            cache_module.REMOTE_AHEAD, shardfiles.RANGES_IN_FLIGHT = ahead, ranges
            t = statistics.median(timed_read(remote) for _ in range(repeats))
            print(f"  shards in flight {ahead}, ranged requests in flight per shard "
                  f"{ranges}: {t:.3f} s ({size / t:.2f} GiB/s)")
        cache_module.REMOTE_AHEAD, shardfiles.RANGES_IN_FLIGHT = default
    finally:
        server.terminate()
        server.wait()


def _bytes(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files)


def _whole_objects(remote: object, path: Path, files: list[Path]) -> float:
    """Seconds to GET every shard file whole, all requests in flight at once: what the
    server gives any client (featcache reads 24 of the 26 layer-kinds, in ranges)."""
    keys = [(remote / f.relative_to(path).as_posix()).key for f in files]
    fs = remote.fs
    start = time.perf_counter()
    fs.cat(keys)
    return time.perf_counter() - start


def _cold(path: Path, files: list[Path]) -> float:
    evict(files)
    return timed_read(path)


def stream_epochs(path: Path, files: list[Path], repeats: int) -> None:
    """One epoch of a linear probe's training steps over the ALF tokens, reading included:
    loaded into memory against streamed from the (cold) cache within a quarter of their
    size (`featcache.probing.tokens.streaming`)."""
    cache = open_cache(path)
    tokens = token_list("alf", "all", cache)
    y = torch.as_tensor(cache.labels())
    head = torch.nn.Linear(24 * 768, 10)
    opt = torch.optim.SGD(head.parameters(), lr=0.01)
    steps = -(-cache.n // 2048)
    nbytes = cache.n * 24 * 768 * 2

    def epoch(**kwargs: object) -> tuple[float, str]:
        evict(files)
        started = time.perf_counter()
        src = load_source(cache, tokens, torch.device("cpu"), **kwargs)
        for positions, xb in src.epoch_batches(steps, torch.Generator().manual_seed(0)):
            loss = torch.nn.functional.cross_entropy(head(xb.flatten(1)), y[positions])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return time.perf_counter() - started, repr(src)

    times: dict[str, list[float]] = {"memory": [], "stream": []}
    shown = ""
    for _ in range(repeats):
        times["memory"].append(epoch()[0])
        seconds, shown = epoch(host_budget_bytes=nbytes // 4, stream=StreamedSource)
        times["stream"].append(seconds)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"one epoch (batch 2048, {steps} steps), cold cache, reading included: in memory "
          f"{med['memory']:.2f} s, streamed {med['stream']:.2f} s ({shown}): streamed / in "
          f"memory {med['stream'] / med['memory']:.2f}")


if __name__ == "__main__":
    main()
