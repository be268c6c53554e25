"""Reading featcache's own shard files directly: the probes' read path, at disk speed.

Zarr decodes a sharded array inner chunk by inner chunk through its codec pipeline, about
175 µs of Python per chunk here: the ALF tokens of 8,192 ViT-B samples (3,300 chunks,
0.3 GB) took 0.58 s read shard by shard and 6 s layer by layer, against 0.04 s for the
same bytes read raw (`benchmarks/read.py`). This module reads the layout featcache writes
(format ≥ 2: a `sharding_indexed` codec, inner chunks of `bytes` little-endian +
`crc32c`, the index at the end, itself `bytes` + `crc32c`) with one file read per shard,
one vectorised index parse and one crc32c per needed chunk, then copies the chunks into
place. Every check zarr makes is made here too: the index checksum, each chunk's
checksum, sizes; and since featcache stores every chunk of a written shard, a missing
chunk or file is damage said as such (where zarr would hand out the fill value for the
readers to catch). An array laid out any other way (another tool's cache, format 1) has
no `shard_layout`, and `Cache` reads it through zarr.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_MISSING = np.uint64(2**64 - 1)
RANGES_IN_FLIGHT = 32  # ranged requests of one shard object at once (benchmarks/read.py)
# Ranges of a shard object closer than RANGE_GAP are read as one request, up to
# RANGE_BLOCK bytes (AWS's guidance for ranged GETs: 8-16 MB). ALF's read of a 20 MB
# shard was 8 requests (the 2 unread layer-kinds of 26 leave small gaps) and took 1.03 s
# for 8 shards from moto; merged, 2 requests a shard took 0.69 s (benchmarks/read.py
# --store s3: every request costs a whole pass over the object there).
RANGE_GAP = 1 << 20
RANGE_BLOCK = 16 << 20
_CHECKED = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]


class ShardDamage(Exception):
    """A shard file that does not decode: its reason, for `Cache.damage`."""


@dataclass(frozen=True)
class ShardLayout:
    """One sharded array as its metadata says: shapes, dtype, where its files are."""

    path: Path
    shape: tuple[int, ...]
    shard: tuple[int, ...]
    chunk: tuple[int, ...]
    dtype: np.dtype
    fill: float

    @property
    def grid(self) -> tuple[int, ...]:
        """Inner chunks per shard, per axis."""
        return tuple(s // c for s, c in zip(self.shard, self.chunk, strict=True))

    def file(self, index: tuple[int, ...]) -> Path:
        return self.path / "c" / "/".join(str(i) for i in index)


def shard_layout(array_path: Path) -> ShardLayout | None:
    """The array's layout if it is the one featcache writes (else None: read with zarr)."""
    try:
        from featcache.cache.stores import location

        array_path = location(array_path)
        meta = json.loads((array_path / "zarr.json").read_text())
        (codec,) = meta["codecs"]
        config = codec["configuration"]
        ok = (codec["name"] == "sharding_indexed" and config.get("codecs") == _CHECKED
              and config.get("index_codecs") == _CHECKED
              and config.get("index_location", "end") == "end"
              and meta["chunk_key_encoding"] == {"name": "default",
                                                 "configuration": {"separator": "/"}}
              and meta["data_type"] in ("float16", "float32", "int64", "bool"))
        if not ok:
            return None
        shard = tuple(int(v) for v in meta["chunk_grid"]["configuration"]["chunk_shape"])
        chunk = tuple(int(v) for v in config["chunk_shape"])
        if any(s % c for s, c in zip(shard, chunk, strict=True)):
            return None
        fill = meta.get("fill_value")
        return ShardLayout(array_path, tuple(int(v) for v in meta["shape"]), shard,
                           chunk, np.dtype(meta["data_type"]).newbyteorder("<"),
                           float("nan") if fill == "NaN" else float(fill or 0))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def will_need(layout: ShardLayout, index: tuple[int, ...]) -> None:
    """Ask the kernel to start reading a shard file now (readahead; a hint, never an
    error), so the disk works while the current shard is decoded."""
    try:
        fd = os.open(layout.file(index), os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except (OSError, AttributeError):
        pass
    finally:
        os.close(fd)


def shard_bytes(layout: ShardLayout, index: tuple[int, ...],
                buffers: list[bytearray] | None = None, slot: int = 0) -> np.ndarray | None:
    """A shard file's bytes as a uint8 array (None when there is no file): the I/O half
    of `read_shard`, which a reader runs ahead in a thread (file reads release the GIL).
    With ``buffers``, read into ``buffers[slot]`` (grown as needed) instead of a fresh
    allocation: no new pages to fault in for every shard."""
    try:
        with open(layout.file(index), "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if buffers is None:
                return np.frombuffer(f.read(), dtype=np.uint8)
            if len(buffers[slot]) < size:
                buffers[slot] = bytearray(size)
            got = f.readinto(memoryview(buffers[slot])[:size])
            return np.frombuffer(buffers[slot], dtype=np.uint8, count=got)
    except FileNotFoundError:
        return None


def read_shard(layout: ShardLayout, index: tuple[int, ...], select: tuple[Any, ...],
               out: np.ndarray, skip: int = 0, columns: Sequence[int] | None = None,
               data: np.ndarray | None = None, expected: np.ndarray | None = None) -> None:
    """Copy inner chunks of one written shard into ``out``, each once, straight from the
    file's bytes (``data``: already read by `shard_bytes`; else read here). ``select``
    gives, per axis, the chunk coordinates wanted (None: all).
    Along axis 0 the picked chunks are laid end to end from out row ``-skip`` (rows that
    fall outside ``out`` are dropped: a range that starts or ends inside a chunk); along
    axis 1 (chunks of width 1), picked chunk j goes to column ``columns[j]`` (default j);
    further axes keep their place (``out`` may be narrower: a zero-padded tail is left
    alone). ``expected``: the crc32c recorded for every chunk of this shard (index
    order, `featcache.cache.identity`); a chunk whose stored crc is not its recorded one belongs
    elsewhere. Raises ShardDamage with the reason when the file is gone, a wanted chunk is
    missing, the bytes fail their checksums, or the chunks are not this shard's."""
    import google_crc32c

    grid = layout.grid
    picks = [np.arange(g) if sel is None else np.asarray(sel, dtype=np.int64).reshape(-1)
             for g, sel in zip(grid, select, strict=True)]
    if data is None:
        data = shard_bytes(layout, index)
    if data is None:
        raise ShardDamage("its file is missing")
    n = math.prod(grid)
    size = 16 * n + 4
    total = len(data)
    if total < size:
        raise ShardDamage(f"its checksum cannot match: the file is truncated ({total} "
                          "bytes, shorter than its index)")
    view = data  # uint8; its slices are zero-copy, and google_crc32c takes them
    if _crc(google_crc32c, view[total - size: total - 4]) != view[total - 4:].tobytes():
        raise ShardDamage("its checksum does not match (flipped or truncated bytes in the "
                          "shard index)")
    entries = view[total - size: total - 4].view("<u8").reshape(*grid, 2)
    chosen = entries[np.ix_(*picks)].reshape(-1, 2)
    chunk_bytes = math.prod(layout.chunk) * layout.dtype.itemsize
    if (chosen == _MISSING).any():
        raise ShardDamage("an inner chunk is missing (it would read as the fill value)")
    offsets, sizes = chosen[:, 0].astype(np.int64), chosen[:, 1]
    if (sizes != chunk_bytes + 4).any() or (offsets + chunk_bytes + 4 > total - size).any():
        raise ShardDamage("its checksum cannot match: the shard index gives an inner chunk "
                          "a bad offset or size")
    if expected is not None:
        _check_place(view, offsets + chunk_bytes, expected,
                     np.ravel_multi_index(np.ix_(*picks), grid).reshape(-1))
    r = layout.chunk[0]
    for pos, start in zip(np.ndindex(*(len(p) for p in picks)), offsets.tolist(),
                          strict=True):
        payload = view[start: start + chunk_bytes]
        end = start + chunk_bytes
        if _crc(google_crc32c, payload) != view[end: end + 4].tobytes():
            raise ShardDamage("its checksum does not match (flipped or truncated bytes in "
                              "an inner chunk)")
        chunk = payload.view(layout.dtype).reshape(layout.chunk)
        a, b = pos[0] * r - skip, (pos[0] + 1) * r - skip
        lo, hi = max(a, 0), min(b, out.shape[0])
        if lo >= hi:
            continue
        where: list[Any] = [slice(lo, hi)]
        if len(pos) > 1:
            where.append(columns[pos[1]] if columns is not None else
                         slice(pos[1] * layout.chunk[1], (pos[1] + 1) * layout.chunk[1]))
        part = chunk[lo - a: hi - a] if columns is None or len(pos) < 2 else \
            chunk[lo - a: hi - a, 0]
        for axis in range(2, len(pos)):
            c = layout.chunk[axis]
            width = min(c, out.shape[axis] - pos[axis] * c)
            where.append(slice(pos[axis] * c, pos[axis] * c + width))
            part = part[(slice(None),) * (part.ndim - len(pos) + axis) + (slice(0, width),)]
        out[tuple(where)] = part


def _check_place(view: np.ndarray, ends: np.ndarray, expected: np.ndarray,
                 flat: np.ndarray) -> None:
    """The crcs stored after the picked chunks are the ones recorded for them here."""
    from featcache.cache.identity import WRONG_PLACE

    stored = np.ascontiguousarray(view[ends[:, None] + np.arange(4)]).view("<u4").reshape(-1)
    if len(expected) <= int(flat.max(initial=0)) or (stored != expected[flat]).any():
        raise ShardDamage(WRONG_PLACE)


def _crc(module: Any, data: Any) -> bytes:
    return np.uint32(module.value(data)).tobytes()


def remote_shard_bytes(layout: ShardLayout, index: tuple[int, ...], select: tuple[Any, ...],
                       buffers: list[bytearray], slot: int) -> np.ndarray | None:
    """The bytes of one shard object that a read needs, by ranged requests: its index (a
    suffix range: no size lookup), then the picked inner chunks with their crcs (adjacent
    ones merged), all in flight at once. They are laid at their own offsets in a buffer
    the size of the object, so that `read_shard` checks and places them unchanged (it
    reads nothing else). None when there is no such object."""
    import google_crc32c

    path: Any = layout.file(index)
    grid = layout.grid
    n = math.prod(grid)
    size = 16 * n + 4
    try:
        tail = path._call(path.fs.cat_file, path.key, start=-size)
    except FileNotFoundError:
        return None
    index_bytes = np.frombuffer(tail, dtype=np.uint8)
    if len(tail) < size or _crc(google_crc32c, index_bytes[:-4]) != bytes(tail[-4:]):
        return index_bytes  # too short or a bad index: `read_shard` names the damage
    entries = index_bytes[:-4].view("<u8").reshape(*grid, 2)
    present = entries[..., 0] != _MISSING
    total = int((entries[..., 0][present] + entries[..., 1][present]).max(initial=0)) + size
    picks = [np.arange(g) if sel is None else np.asarray(sel, dtype=np.int64).reshape(-1)
             for g, sel in zip(grid, select, strict=True)]
    chosen = entries[np.ix_(*picks)].reshape(-1, 2)
    chosen = chosen[chosen[:, 0] != _MISSING]
    if len(buffers[slot]) < total:
        buffers[slot] = bytearray(total)
    view = memoryview(buffers[slot])
    view[total - size: total] = tail
    for start, stop, blob in _ranges(path, chosen, total - size):
        view[start:stop] = blob
    return np.frombuffer(buffers[slot], dtype=np.uint8, count=total)


def _ranges(path: Any, chosen: np.ndarray, limit: int) -> list[tuple[int, int, bytes]]:
    """Fetch the (offset, size) ranges concurrently, merged where they touch, overlap or
    lie at most ``RANGE_GAP`` apart (up to ``RANGE_BLOCK`` a request); a range the object
    does not hold comes back short (and fails its checksum). The bytes of a gap are the
    object's own, laid where they belong, and never read."""
    spans = _merged(sorted((offset, min(offset + nbytes, limit))
                           for offset, nbytes in chosen.tolist()))
    if not spans:
        return []
    blobs = path._call(path.fs.cat_ranges, [path.key] * len(spans), [s for s, _ in spans],
                       [e for _, e in spans], batch_size=RANGES_IN_FLIGHT)
    out = []
    for (start, _), blob in zip(spans, blobs, strict=True):
        if isinstance(blob, BaseException):
            raise blob
        out.append((start, start + len(blob), blob))
    return out


def _merged(spans: list[tuple[int, int]]) -> list[list[int]]:
    """Sorted (start, end) spans joined across gaps of at most ``RANGE_GAP`` while the
    request stays within ``RANGE_BLOCK`` (a longer span stays whole); empty ones dropped.
    (fsspec's `merge_offset_ranges` does this too, but across the versions featcache
    accepts it shrank a span nested in another and dropped duplicated ones.)"""
    out: list[list[int]] = []
    for start, end in spans:
        if start >= end:
            continue
        if out and start - out[-1][1] <= RANGE_GAP and \
                max(end, out[-1][1]) - out[-1][0] <= RANGE_BLOCK:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out


def remote_crcs(path: Any, n_chunks: int, chunk_bytes: int | None) -> np.ndarray | None:
    """`featcache.cache.identity.file_crcs` of an object without downloading it: its index by a
    suffix range, then the 4-byte crc after each chunk it holds, ranges in flight at once
    (the writer records a shard's identity this way). None when there is no object."""
    from featcache.cache.identity import file_crcs

    size = 4 if chunk_bytes is None else 16 * n_chunks + 4
    try:
        tail = np.frombuffer(path._call(path.fs.cat_file, path.key, start=-size), np.uint8)
    except FileNotFoundError:
        return None
    if chunk_bytes is None or len(tail) < size:
        return file_crcs(tail, n_chunks, chunk_bytes)
    entries = tail[:-4].view("<u8").reshape(n_chunks, 2)
    held = entries[:, 0] != _MISSING
    if (entries[held, 1] != chunk_bytes + 4).any():
        raise ValueError("its shard index gives a chunk a bad offset or size")
    ends = (entries[held, 0] + np.uint64(chunk_bytes)).astype(np.int64).tolist()
    out = np.zeros(n_chunks, dtype=np.uint32)
    if ends:
        blobs = path._call(path.fs.cat_ranges, [path.key] * len(ends), ends,
                           [e + 4 for e in ends], batch_size=RANGES_IN_FLIGHT)
        if any(isinstance(b, BaseException) or len(b) != 4 for b in blobs):
            raise ValueError("its shard index points past the end of the object")
        out[held] = np.frombuffer(b"".join(blobs), "<u4")
    return out
