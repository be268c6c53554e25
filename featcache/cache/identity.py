"""Per-shard identity (format 4): a valid file in the wrong place is refused.

Every chunk carries its own crc32c, which says its bytes are intact but not where they
belong: a shard file copied over another shard, another array's file, or a *test* split's
file copied into *train* passed every checksum and was read as data. So each written
shard also records, in the cache's `identity` array (one row, one object, per shard,
written after the shard's files and before its done flag):

- a tag: crc32c of the cache's fingerprint digest (model, settings, dataset *and split*)
  and the shard index;
- the crc32c of every inner chunk of every array of the shard, in the order of
  `Cache.arrays`, each array's chunks in the order of its shard index (C order).

A reader compares the crc of each chunk it reads (the 4 bytes stored after the chunk,
already checked against the chunk's bytes) with the recorded one for that cache, split,
array, shard and position; `verify` compares them all. The chunk crcs differ whenever
the numbers do, so only a file holding exactly the right numbers passes: a misplaced copy
of identical bytes (two all-valid `valid` chunks) is no harm. See docs/cache-format.md.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

IDENTITY = "identity"  # the array: (n_shards, 1 + chunks of every array per shard) uint32
FIRST_FORMAT = 4  # caches before this format have no identity (read as before)
WRONG_PLACE = ("its bytes are not the ones written for it: a file copied from another "
               "shard, array, split or cache, or edited in place")


def crc32c(data: Any) -> int:
    import google_crc32c

    return int(google_crc32c.value(bytes(data) if isinstance(data, str) else data))


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    """sha256 of the fingerprint as sorted JSON: the cache and split a tag ties to."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def cache_tag(digest: str, shard: int) -> int:
    """The tag of shard `shard` of the cache whose fingerprint has this digest."""
    return crc32c(f"{digest}/{shard}".encode())


def chunks_per_shard(array_path: Path) -> int:
    """Inner chunks in one shard of an array (1 for an unsharded array: its chunk is the
    shard), from its zarr.json."""
    from featcache.cache.stores import location

    meta = json.loads((location(array_path) / "zarr.json").read_text())
    codecs = meta.get("codecs") or []
    if codecs and codecs[0].get("name") == "sharding_indexed":
        shard = meta["chunk_grid"]["configuration"]["chunk_shape"]
        inner = codecs[0]["configuration"]["chunk_shape"]
        return math.prod(s // c for s, c in zip(shard, inner, strict=True))
    return 1


def file_crcs(data: np.ndarray, n_chunks: int, chunk_bytes: int | None) -> np.ndarray:
    """The stored crc32c of every chunk of one shard file's bytes (uint8), in index
    order (0 for a chunk the shard does not hold: in the last, partial shard, the chunks
    wholly past the end of the array); for an unsharded file (``chunk_bytes`` None), its
    one trailing crc. Raises ValueError when the bytes are too short or the index does
    not parse."""
    if chunk_bytes is None:
        if len(data) < 4:
            raise ValueError("the file is truncated")
        return data[-4:].view("<u4").astype(np.uint32)
    size = 16 * n_chunks + 4
    if len(data) < size:
        raise ValueError("the file is truncated")
    entries = data[len(data) - size: len(data) - 4].view("<u8").reshape(n_chunks, 2)
    held = entries[:, 0] != np.uint64(2**64 - 1)
    ends = entries[held, 0].astype(np.int64) + chunk_bytes
    if (entries[held, 1] != chunk_bytes + 4).any() or (ends + 4 > len(data) - size).any() \
            or (ends < 0).any():
        raise ValueError("its shard index gives a chunk a bad offset or size")
    out = np.zeros(n_chunks, dtype=np.uint32)
    picks = np.ascontiguousarray(data[ends[:, None] + np.arange(4)])
    out[held] = picks.view("<u4").reshape(-1)
    return out


def row_slices(widths: dict[str, int]) -> dict[str, slice]:
    """Where each array's chunk crcs sit in a row (after the tag)."""
    out, start = {}, 1
    for name, width in widths.items():
        out[name] = slice(start, start + width)
        start += width
    return out
