"""What the crc32c checksums of cache format 2 cost a probe's read.

One run, one machine: two caches of the same ViT-B-shaped features (13 layers × 768,
CLS and AP), one written with crc32c on every inner chunk (format 2, what featcache
writes) and one without (format 1's codecs). For each, the probe's read of the ALF
tokens (CLS+AP of blocks 1..11 and final: 24 tokens, `probing.tokens.features.load_source`)
is timed with the files in the page cache, so the figure is the decoding cost the
checksum adds, not the disk's speed. Runs alternate; the median of each is compared.

    python benchmarks/checksum.py [--n 16384] [--repeats 5]

Goal (issue "Nothing silent"): at most 5 % slower with checksums. docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from machine import cpu_info  # noqa: E402

from featcache.cache.store import Layout, create_cache, disk_bytes, open_cache  # noqa: E402
from featcache.probing.pairs import token_list  # noqa: E402
from featcache.probing.tokens.features import load_source  # noqa: E402


def build(root: Path, n: int, checksums: bool) -> Path:
    """Write a cache through featcache's own writer, with or without the crc32c codec."""
    from probecache import MODEL, SynthSpec, fingerprint

    spec = SynthSpec(n_blocks=12, dim=768, n_classes=10, shard_size=1024)
    layout = Layout(n, 13, 768, 1024)
    path = root / ("crc" if checksums else "plain") / MODEL / "synth" / "train"
    cache = create_cache(path, fingerprint(spec, "synth", "train", n), layout,
                         np.arange(n) % 10, [str(c) for c in range(10)], spec.layer_names,
                         [768] * 13, checksums=checksums)
    rng = np.random.default_rng(0)
    for shard in range(layout.n_shards):
        rows = layout.rows(shard)
        size = rows.stop - rows.start
        cache.write_shard(shard, {
            "cls": rng.standard_normal((size, 13, 768), dtype=np.float32).astype(np.float16),
            "ap": rng.standard_normal((size, 13, 768), dtype=np.float32).astype(np.float16),
            "labels": np.arange(rows.start, rows.stop) % 10,
            "valid": np.ones(size, dtype=bool)})
    cache.finalize()
    return path


def timed_read(path: Path) -> float:
    """Seconds for `load_source` of the ALF tokens: what a probe reads before training."""
    cache = open_cache(path)
    tokens = token_list("alf", "all", cache)
    started = time.perf_counter()
    src = load_source(cache, tokens, torch.device("cpu"))
    seconds = time.perf_counter() - started
    assert src.raw.shape == (cache.n, 24, 768)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        crc, plain = build(Path(tmp), args.n, True), build(Path(tmp), args.n, False)
        assert open_cache(crc).group["cls"].compressors and \
            not open_cache(plain).group["cls"].compressors
        timed_read(crc), timed_read(plain)  # both in the page cache
        times: dict[str, list[float]] = {"crc": [], "plain": []}
        for _ in range(args.repeats):
            times["crc"].append(timed_read(crc))
            times["plain"].append(timed_read(plain))
        gib = args.n * 24 * 768 * 2 / 2**30
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"machine: {cpu_info()}")
        print(f"ALF tokens of {args.n} samples: {gib:.2f} GiB read of "
              f"{disk_bytes(crc) / 2**30:.2f} GiB on disk (with checksums) / "
              f"{disk_bytes(plain) / 2**30:.2f} GiB (without)")
        for key in ("plain", "crc"):
            print(f"  {key:>5}: median {med[key]:.3f} s ({gib / med[key]:.2f} GiB/s), "
                  f"runs {', '.join(f'{t:.3f}' for t in times[key])}")
        print(f"checksummed / plain read time: {med['crc'] / med['plain']:.3f} "
              "(goal ≤ 1.05)")


if __name__ == "__main__":
    main()
