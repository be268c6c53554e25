"""The on-disk cache: one Zarr v3 group per (model, tap, weights, dataset, split).

The shard (a block of `shard_size` consecutive samples) is the unit of writing: every
array's zarr shard covers exactly those rows, one writer owns a shard, and its done flag
is set only after its write returned. Inner chunks hold one layer each, so a probe that
needs a few layers reads only those bytes. See docs/cache-format.md.

Nothing damaged reads as data (format 2): every inner chunk carries a crc32c checksum, a
missing chunk reads as NaN (features) or -1 (labels), which the readers refuse, a flagged
shard whose files are gone is an error, and any failure to decode stored bytes becomes
one line naming the cache, the array and the shard, with the fix (`featcache verify`).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from featcache import __version__
from featcache.cache.identity import (
    IDENTITY,
    WRONG_PLACE,
    cache_tag,
    chunks_per_shard,
    file_crcs,
    fingerprint_digest,
)
from featcache.cache.kinds import FEATURE_KINDS, POOL_KIND, TOKEN_KIND
from featcache.cache.stores import (
    default_cache_root,  # noqa: F401 (re-exported: the path the CLI, suites and tests use)
    is_remote,
    read_all,
    store_failure,
    through_copy,
    user_cache_root,  # noqa: F401 (re-exported)
    zarr_store,
)
from featcache.errors import FeatcacheError
from featcache.text import slug

# 2: crc32c on every chunk, fills that cannot pass for data; 3: the token kinds a model
# has (no `cls` array without a class token; `pool` for a pooled embedding of its own);
# 4: a per-shard identity (`featcache.cache.identity`): a valid file in the wrong place is refused
FORMAT_VERSION = 4
READABLE_FORMATS = (1, 2, 3, 4)
# Written shard by shard (with the done flag after them); `done` itself is the flag.
SHARD_ARRAYS = ("cls", "ap", "pool", "last_tokens", "labels", "valid")
LABEL_FILL = -1
SHARD_TARGET_BYTES = 64 << 20  # the largest array's shard stays near this size
MAX_SHARD_SIZE = 1024
CHUNK_ROWS = 64  # rows of one inner chunk of cls/ap (one layer wide)
TOKEN_CHUNK_ROWS = 16  # rows of one inner chunk of last_tokens (all tokens wide)


def model_dir_name(model: str, tap: str, weights_id: str) -> str:
    """`clip-vit-b16` for the defaults; suffixes name a non-default tap or weights."""
    name = slug(model.replace(":", "-"))
    if tap != "reference":
        name += f"@{tap}"
    if weights_id.startswith("random:"):
        name += f"@random-{weights_id.split(':', 1)[1]}"
    elif weights_id.startswith("file:"):
        name += f"@file-{weights_id.rsplit(':', 1)[1][:10]}"
    return name


def cache_path(root: Any, model_dir: str, dataset_dir: str, split: str) -> Any:
    return (root if is_remote(root) else Path(root)) / model_dir / dataset_dir / slug(split)


def choose_shard_size(bytes_per_sample: int) -> int:
    """The largest power of two ≤ 1024 whose shard of the widest array stays ~64 MiB."""
    fit = max(1, SHARD_TARGET_BYTES // max(1, bytes_per_sample))
    return int(min(MAX_SHARD_SIZE, 2 ** int(math.log2(fit))))


@dataclass(frozen=True)
class Layout:
    """Sizes fixed when a cache is created."""

    n: int
    n_layers: int
    dim: int
    shard_size: int
    n_tokens: int | None = None  # all tokens of the last layer stored when set
    token_dim: int | None = None
    has_cls: bool = True  # a `cls` array (the model has a class token)
    pool_dim: int | None = None  # a `pool` array (N, 1, pool_dim) when set

    @property
    def token_kinds(self) -> list[str]:
        return ["cls"] * self.has_cls + ["ap"] + [POOL_KIND] * (self.pool_dim is not None)

    @property
    def n_shards(self) -> int:
        return max(1, math.ceil(self.n / self.shard_size))

    def rows(self, shard: int) -> slice:
        return slice(shard * self.shard_size, min(self.n, (shard + 1) * self.shard_size))


class Cache:
    """An opened cache: metadata in memory, arrays read on demand, damage refused."""

    def __init__(self, path: Path, mode: str = "r") -> None:
        """`mode` "r" (readers: probe, report) or "r+" (the extractor, which writes)."""
        self.path = path if is_remote(path) else Path(path)
        self.mode = mode
        self.local_copy: Path | None = None  # `probe --local-cache`: shards copied there
        try:
            self.group = zarr.open_group(zarr_store(self.path, mode), mode=mode)
        except FileNotFoundError:
            raise FeatcacheError(f"{self.path} is not a featcache cache (no Zarr group there);"
                                 " see `featcache ls`") from None
        except PermissionError as exc:
            raise FeatcacheError(f"cannot open {self.path}: {exc.strerror or exc}; check its "
                                 "permissions") from None
        except Exception as exc:  # malformed zarr.json: bad JSON, wrong fields
            raise store_failure(self.path, exc) or self.metadata_error("zarr.json", exc) \
                from None
        try:
            attrs = dict(self.group.attrs)
        except Exception as exc:
            raise store_failure(self.path, exc) or self.metadata_error("zarr.json", exc) \
                from None
        if "featcache" not in attrs:
            raise FeatcacheError(f"{self.path} is a Zarr group but not a featcache cache")
        fmt = attrs["featcache"].get("format") if isinstance(attrs["featcache"], dict) else None
        if fmt not in READABLE_FORMATS:
            raise FeatcacheError(f"{self.path}: cache format {fmt}, this featcache reads "
                                 f"{', '.join(map(str, READABLE_FORMATS))}; re-extract with "
                                 "--overwrite")
        self.format: int = fmt
        self.attrs = attrs
        try:
            self.fingerprint: dict[str, Any] = _typed(attrs["fingerprint"], dict)
            self.layer_names: list[str] = _typed(attrs["layer_names"], list)
            self.layer_dims: list[int] = _typed(attrs["layer_dims"], list)
            self.class_names: list[str] = _typed(attrs["class_names"], list)
            kinds = _typed(attrs.get("token_kinds", list(FEATURE_KINDS)), list)
            self.layout = Layout(int(attrs["n"]), len(self.layer_names), int(attrs["dim"]),
                                 int(attrs["shard_size"]), _int_or_none(attrs.get("n_tokens")),
                                 _int_or_none(attrs.get("token_dim")), "cls" in kinds,
                                 _int_or_none(attrs.get("pool_dim")))
            self.fingerprint["model"]["model"], self.fingerprint["dataset"]["name"]
        except (KeyError, TypeError, ValueError) as exc:
            raise self.metadata_error("zarr.json", f"attribute {exc} missing or of the "
                                      "wrong type") from None
        if self.layout.n < 1 or self.layout.shard_size < 1:
            raise self.metadata_error("zarr.json", "n and shard_size must be positive")
        self._check_arrays()

    def metadata_error(self, where: str, why: Any) -> FeatcacheError:
        text = str(why).splitlines()[0][:160] if str(why) else type(why).__name__
        return FeatcacheError(f"the metadata of {self.path} is damaged ({where}: {text}); "
                              "it cannot be repaired shard by shard: re-extract it with "
                              "--overwrite")

    def _check_arrays(self) -> None:
        """Every array exists with the shape and dtype the attributes imply: an edited or
        truncated array zarr.json is named here, not found later as odd numbers."""
        lay = self.layout
        expected: dict[str, tuple[tuple[int, ...], str]] = {
            "ap": ((lay.n, lay.n_layers, lay.dim), "float16"),
            "labels": ((lay.n,), "int64"),
            "valid": ((lay.n,), "bool"),
            "done": ((lay.n_shards,), "bool"),
        }
        if lay.has_cls:
            expected["cls"] = ((lay.n, lay.n_layers, lay.dim), "float16")
        if lay.pool_dim is not None:
            expected[POOL_KIND] = ((lay.n, 1, lay.pool_dim), "float16")
        if lay.n_tokens is not None:
            expected[TOKEN_KIND] = ((lay.n, lay.n_tokens, lay.token_dim or 0), "float16")
        if self.has_identity:
            try:
                width = 1 + sum(self.identity_widths().values())
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise self.metadata_error("zarr.json of an array", exc) from None
            expected[IDENTITY] = ((lay.n_shards, width), "uint32")
        for name, (shape, dtype) in expected.items():
            try:
                array = self.group[name]
                got_shape, got_dtype = tuple(array.shape), str(array.dtype)
            except KeyError:
                raise self.metadata_error(name, "the array is missing") from None
            except Exception as exc:
                raise store_failure(self.path, exc) or \
                    self.metadata_error(f"{name}/zarr.json", exc) from None
            if got_shape != shape or got_dtype != dtype:
                raise self.metadata_error(
                    f"{name}/zarr.json", f"shape {got_shape} {got_dtype}, the cache's "
                    f"attributes imply {shape} {dtype}")

    # -- metadata ---------------------------------------------------------------------
    @property
    def n(self) -> int:
        return self.layout.n

    @property
    def dim(self) -> int:
        return self.layout.dim

    @property
    def complete(self) -> bool:
        """Finalised and every shard's done flag set (a lost flag makes it incomplete
        again, so that `extract` recomputes that shard)."""
        return bool(self.group.attrs.get("complete", False)) and bool(self.done().all())

    @property
    def has_all_tokens(self) -> bool:
        return self.layout.n_tokens is not None

    @property
    def model(self) -> str:
        return self.fingerprint["model"]["model"]

    @property
    def dataset(self) -> str:
        return self.fingerprint["dataset"]["name"]

    @property
    def split(self) -> str:
        return self.fingerprint["dataset"]["split"]

    @property
    def token_kinds(self) -> list[str]:
        """"cls" (where the model has a class token), "ap", and "pool" (its own pooled
        embedding of the final layer, where it has one)."""
        return self.layout.token_kinds

    @property
    def arrays(self) -> list[str]:
        """The arrays written shard by shard that this cache has."""
        present = {*self.token_kinds, "labels", "valid", *([TOKEN_KIND] * self.has_all_tokens)}
        return [a for a in SHARD_ARRAYS if a in present]

    def token_width(self, name: str, kind: str) -> int:
        """How wide token `kind` of layer `name` is (the pool has its own width)."""
        if kind == POOL_KIND:
            return int(self.layout.pool_dim or 0)
        return int(self.layer_dims[self.layer_index([name])[0]])

    def check_token(self, name: str, kind: str) -> None:
        """Refuse a token this cache does not hold, naming what it holds."""
        if kind not in self.token_kinds:
            raise FeatcacheError(f"{self.path} has no {kind!r} tokens (this model's are "
                                 f"{', '.join(self.token_kinds)})")
        if kind == POOL_KIND and name != "final":
            raise FeatcacheError(f"{self.path}: the pooled embedding exists for the final "
                                 f"layer only, not {name!r}")
        self.layer_index([name])

    @property
    def file_checked_arrays(self) -> list[str]:
        """Arrays whose every written shard has a file of its own. Format 1 promised no
        such thing (chunks equal to the fill were not stored; other tools may chunk as
        they like), so its files are not checked."""
        return self.arrays if self.format >= 2 else []

    # -- where each shard belongs (format 4, `featcache.cache.identity`) -----------------------
    @property
    def has_identity(self) -> bool:
        """Whether shards record their identity (format 4); older caches read as before."""
        return self.format >= 4

    @property
    def fingerprint_digest(self) -> str:
        if "_digest" not in self.__dict__:
            self._digest = fingerprint_digest(self.fingerprint)
        return self._digest

    def identity_widths(self) -> dict[str, int]:
        """Chunks per shard of every array, in the order of an identity row."""
        if "_widths" not in self.__dict__:
            self._widths = {name: chunks_per_shard(self.path / name) for name in self.arrays}
        return self._widths

    def shard_crcs(self, name: str, shard: int) -> np.ndarray | None:
        """The crc32c stored with every chunk of the array's shard file (None: no file).
        Raises ValueError when its index does not parse. On a store, by ranged reads of
        the index and the crcs (the object is not downloaded)."""
        layout = self._shard_layout(name)
        chunk = None if layout is None else math.prod(layout.chunk) * layout.dtype.itemsize
        if is_remote(self.path):
            from featcache.cache.shardfiles import remote_crcs

            return remote_crcs(self.shard_file(name, shard), self.identity_widths()[name],
                               chunk)
        data = read_all(self.shard_file(name, shard))
        if data is None:
            return None
        return file_crcs(data, self.identity_widths()[name], chunk)

    def identity_row(self, shard: int) -> np.ndarray:
        """The row a written shard records: its tag, then its files' chunk crcs."""
        parts = [np.array([cache_tag(self.fingerprint_digest, shard)], dtype=np.uint32)]
        for name in self.identity_widths():
            crcs = self.shard_crcs(name, shard)
            if crcs is None:
                raise self.damage(name, shard, "its file is missing right after its write")
            parts.append(crcs)
        return np.concatenate(parts)

    def recorded_crcs(self, name: str, shard: int) -> np.ndarray | None:
        """The chunk crcs shard `shard` of `name` recorded when it was written; None for a
        cache before format 4, or a shard not written yet. Raises the damage line when a
        written shard has no record, or another shard's or cache's."""
        if not self.has_identity:
            return None
        row = self._identity_row(shard, fresh=False)
        tag = cache_tag(self.fingerprint_digest, shard)
        if row is None or row[0] != tag:
            row = self._identity_row(shard, fresh=True)  # written since we last looked?
        if row is None or row[0] == 0:
            if not self.done()[shard]:
                return None
            raise self.damage(name, shard, "its identity record is missing or unreadable")
        if row[0] != tag:
            raise self.damage(name, shard, "its identity record is another shard's or "
                              "another cache's (copied into the wrong place)")
        start = 1
        for other, width in self.identity_widths().items():
            if other == name:
                return row[start: start + width]
            start += width
        raise ValueError(f"{name} is not an array of {self.path}")

    def _identity_row(self, shard: int, fresh: bool) -> np.ndarray | None:
        """One row of the identity array (all rows are read at once, then kept)."""
        rows = self.__dict__.get("_identity_rows")
        if rows is None:
            try:
                rows = self._identity_rows = np.asarray(self.group[IDENTITY][:])
            except Exception as exc:
                if store_failure(self.path, exc):
                    raise store_failure(self.path, exc) from None
                rows = self._identity_rows = np.zeros(
                    (self.layout.n_shards, 1 + sum(self.identity_widths().values())),
                    np.uint32)
                fresh = True
        if fresh:
            try:
                rows[shard] = self.group[IDENTITY][shard]
            except Exception as exc:
                if store_failure(self.path, exc):
                    raise store_failure(self.path, exc) from None
                return None
        return rows[shard]

    def whole_shard_ok(self, name: str, shard: int, data: np.ndarray) -> bool:
        """Whether a shard file's bytes pass every check a read makes (its index and
        chunk checksums, its recorded identity): what a local copy must pass to be kept."""
        from featcache.cache.shardfiles import ShardDamage, read_shard

        layout = self._shard_layout(name)
        out = np.empty(layout.shard, dtype=layout.dtype)
        try:
            read_shard(layout, (shard,) + (0,) * (len(layout.shape) - 1),
                       (None,) * len(layout.shape), out, 0, None, data,
                       self.recorded_crcs(name, shard))
        except ShardDamage:
            return False
        return True

    def check_identity(self, name: str, shard: int) -> None:
        """Refuse shard `shard` of `name` when its file's chunks are not the recorded ones
        (the zarr read path's check; the shard reader checks chunk by chunk)."""
        expected = self.recorded_crcs(name, shard)
        if expected is None:
            return
        try:
            found = self.shard_crcs(name, shard)
        except ValueError as exc:
            raise self.damage(name, shard, f"its checksum cannot match: {exc}") from None
        if found is None:
            raise self.damage(name, shard, "its file is missing")
        if found.shape != expected.shape or (found != expected).any():
            raise self.damage(name, shard, WRONG_PLACE)

    def done(self) -> np.ndarray:
        """Which shards are written. A flag that cannot be read counts as not written, so
        the extractor recomputes that shard rather than trusting it."""
        array = self.group["done"]
        try:
            return np.asarray(array[:], dtype=bool)
        except Exception as exc:
            if store_failure(self.path, exc):
                raise store_failure(self.path, exc) from None
            out = np.zeros(self.layout.n_shards, dtype=bool)
            for k in range(self.layout.n_shards):
                with contextlib.suppress(Exception):
                    out[k] = bool(array[k])
            return out

    def summary(self) -> dict[str, Any]:
        """The row `featcache ls` prints for this cache."""
        fp = self.fingerprint
        done = self.done()
        return {
            "path": str(self.path),
            "model": fp["model"]["model"],
            "weights": fp["model"].get("weights"),
            "tap": fp["model"].get("tap"),
            "dataset": fp["dataset"]["name"],
            "split": fp["dataset"].get("split"),
            "n": self.n,
            "layers": len(self.layer_names),
            "dim": self.dim,
            "all_tokens": self.has_all_tokens,
            "token_kinds": self.token_kinds,
            "complete": bool(self.group.attrs.get("complete", False)) and bool(done.all()),
            "shards_done": int(done.sum()),
            "shards": int(done.size),
            "format": self.format,
            "bytes": disk_bytes(self.path),
        }

    # -- where the bytes are ----------------------------------------------------------
    def shard_file(self, name: str, shard: int) -> Path:
        """The file holding shard `shard` of array `name` (zarr's chunk key of the
        array's outer grid: one file per shard for sharded arrays, per chunk otherwise)."""
        array = self.group[name]
        index = (shard,) + (0,) * (len(array.shape) - 1)
        key = array.metadata.chunk_key_encoding.encode_chunk_key(index)
        return self.path / name / key

    def missing_files(self, shards: list[int] | None = None) -> list[tuple[str, int]]:
        """(array, shard) pairs whose file is absent although the shard is flagged done."""
        done = self.done()
        wanted = np.flatnonzero(done) if shards is None else [s for s in shards if done[s]]
        if is_remote(self.path):  # one listing, not a request per file
            held = {f"{self.path}/{key}" for key in self.path.listing()}
            return [(name, int(k)) for k in wanted for name in self.file_checked_arrays
                    if str(self.shard_file(name, int(k))) not in held]
        return [(name, int(k)) for k in wanted for name in self.file_checked_arrays
                if not self.shard_file(name, int(k)).is_file()]

    def check_files(self) -> None:
        """Refuse a cache whose flagged shards lost files (they would read as fill)."""
        missing = self.missing_files()
        if missing:
            name, shard = missing[0]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise self.damage(name, shard, f"its file {self.shard_file(name, shard)} is "
                              f"missing{more}")

    def damage(self, name: str, shard: int, why: str) -> FeatcacheError:
        """The one line for a damaged shard: what, where, and how to fix it."""
        rows = self.layout.rows(shard)
        return FeatcacheError(
            f"{self.path}: shard {shard} of '{name}' (samples {rows.start}–{rows.stop - 1}) "
            f"is damaged: {why}. Run `featcache verify {self.path} --repair`, then the same "
            "`featcache extract` command, to recompute it")

    def shards_of(self, rows: slice) -> range:
        s = self.layout.shard_size
        return range(rows.start // s, (max(rows.start, rows.stop - 1)) // s + 1)

    # -- data -------------------------------------------------------------------------
    def _read(self, name: str, rows: slice, selection: Any = None) -> np.ndarray:
        """Rows of an array; bytes that fail to decode (a checksum, a truncated file)
        become the damage line for the first bad shard. Featcache's own layout is read
        straight from its shard files (`featcache.cache.shardfiles`, 10-100x zarr's per-chunk
        path); anything else through zarr."""
        fast = self._shard_layout(name)
        layers = None if selection is None else selection[0]
        if fast is not None and rows.stop > rows.start and (
                layers is None or (fast.chunk[1] == 1 and selection[1:] == (slice(None),))):
            return self._read_shards(name, fast, rows, layers)
        array = self.group[name]
        try:
            if selection is None:
                values = np.asarray(array[rows])
            else:
                values = np.asarray(array.get_orthogonal_selection((rows, *selection)))
            for k in self.shards_of(rows) if self.has_identity else ():
                self.check_identity(name, k)
            return values
        except FeatcacheError:
            raise
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:
            if store_failure(self.path, exc):
                raise store_failure(self.path, exc) from None
            for k in self.shards_of(rows):
                try:
                    array[self.layout.rows(k)]
                except Exception as inner:
                    raise store_failure(self.path, inner) or \
                        self.damage(name, k, _reason(inner)) from None
            raise self.damage(name, self.shards_of(rows)[0], _reason(exc)) from None

    def _shard_layout(self, name: str) -> Any:
        cache = self.__dict__.setdefault("_shard_layouts", {})
        if name not in cache:
            from featcache.cache.shardfiles import shard_layout

            cache[name] = shard_layout(self.path / name) if self.format >= 2 else None
        return cache[name]

    def _read_shards(self, name: str, layout: Any, rows: slice, layers: list[int] | None,
                     out: np.ndarray | None = None, columns: list[int] | None = None
                     ) -> np.ndarray:
        """`_read` from the shard files: only the inner chunks of the rows (and layers)
        asked for are checked, each copied once, into ``out`` when given (picked layer j
        into its column ``columns[j]``)."""
        from concurrent.futures import ThreadPoolExecutor

        from featcache.cache.shardfiles import (
            ShardDamage,
            read_shard,
            remote_shard_bytes,
            shard_bytes,
            will_need,
        )

        S, r = layout.shard[0], layout.chunk[0]
        if out is None:
            rest = list(layout.shape[1:])
            if layers is not None:
                rest[0] = len(layers)
            out = np.empty((rows.stop - rows.start, *rest), dtype=layout.dtype)
        tail = (None,) * (len(layout.shape) - 2)
        zeros = (0,) * (len(layout.shape) - 1)
        shards = list(range(rows.start // S, (rows.stop - 1) // S + 1))

        def select(k: int) -> tuple[Any, ...]:
            lo, hi = max(rows.start, k * S), min(rows.stop, (k + 1) * S)
            c0, c1 = (lo - k * S) // r, (hi - 1 - k * S) // r
            return (np.arange(c0, c1 + 1), *(() if len(layout.shape) == 1 else (layers,)),
                    *tail)

        remote = is_remote(self.path)
        # the next shards' bytes are read while this one is checked and placed: on a cold
        # disk, decoding then costs (almost) nothing beyond the read itself; on an object
        # store several shards are in flight, each as concurrent ranged reads of just the
        # inner chunks asked for (benchmarks/read.py --store s3)
        depth = REMOTE_AHEAD if remote else 1
        buffers = [bytearray() for _ in range(depth + 1)]  # being read, and being decoded

        def fetch(i: int) -> Any:
            index = (shards[i], *zeros)
            if remote and self.local_copy is not None:
                return through_copy(self.local_copy, layout.file(index),
                                    lambda data: self.whole_shard_ok(name, shards[i], data))
            if remote:
                return remote_shard_bytes(layout, index, select(shards[i]), buffers,
                                          i % len(buffers))
            return shard_bytes(layout, index, buffers, i % len(buffers))

        with ThreadPoolExecutor(depth) as pool:
            ahead = [pool.submit(fetch, i) for i in range(min(depth, len(shards)))]
            for i, k in enumerate(shards):
                data = ahead.pop(0).result()
                if i + depth < len(shards):
                    ahead.append(pool.submit(fetch, i + depth))
                if not remote and i + READ_AHEAD < len(shards):  # the kernel reads ahead
                    will_need(layout, (shards[i + READ_AHEAD], *zeros))
                lo, hi = max(rows.start, k * S), min(rows.stop, (k + 1) * S)
                c0 = (lo - k * S) // r
                try:
                    if data is None:
                        raise ShardDamage("its file is missing")
                    read_shard(layout, (k, *zeros), select(k),
                               out[lo - rows.start: hi - rows.start], lo - k * S - c0 * r,
                               columns, data, self.recorded_crcs(name, k))
                except ShardDamage as exc:
                    raise self.damage(name, k, str(exc)) from None
        return out

    def read_into(self, kind: str, layers: list[int] | None, rows: slice, out: np.ndarray,
                  columns: list[int]) -> None:
        """`read`, placed: layer ``layers[j]`` of the rows into ``out[:, columns[j]]``
        (its first `token_width` entries; the rest of ``out`` is left alone). The probes'
        read path: featcache's own shard files go straight into place, one copy."""
        fast = self._shard_layout(kind)
        if fast is not None and (layers is None or fast.chunk[1] == 1) \
                and rows.stop > rows.start:
            self._read_shards(kind, fast, rows, layers, out, columns)
            return
        part = self.read(kind, layers, rows)
        for j, column in enumerate(columns):
            out[:, column, : part.shape[2]] = part[:, j]

    def labels(self) -> np.ndarray:
        """Class indices, checked: a label outside the classes (-1: a lost chunk) is
        refused with its shard named."""
        labels = self._read("labels", slice(0, self.n)).astype(np.int64)
        bad = np.flatnonzero((labels < 0) | (labels >= len(self.class_names)))
        if bad.size:
            i = int(bad[0])
            shard = i // self.layout.shard_size
            why = ("its chunk is missing (labels read as -1)" if labels[i] == LABEL_FILL
                   else f"label {labels[i]} of sample {i} is not one of the "
                        f"{len(self.class_names)} classes")
            raise self.damage("labels", shard, why)
        return labels

    def valid(self) -> np.ndarray:
        """False where an unreadable image was skipped (features are zeros there)."""
        return self._read("valid", slice(0, self.n)).astype(bool)

    def layer_index(self, names: list[str]) -> list[int]:
        missing = [n for n in names if n not in self.layer_names]
        if missing:
            raise FeatcacheError(f"{self.path}: no layer {missing[0]!r}; this cache has "
                                 f"{', '.join(self.layer_names)}")
        return [self.layer_names.index(n) for n in names]

    def read(self, kind: str, layers: list[int] | None = None,
             rows: slice | None = None, check: bool = True) -> np.ndarray:
        """(rows, layers, dim) float16 for kind "cls"/"ap"; (rows, 1, pool_dim) for "pool";
        (rows, T, D) for "last_tokens".

        ``check``: refuse values that are not finite (NaN is what a missing chunk reads
        as; the extractor never stores a non-finite value)."""
        if kind not in (*FEATURE_KINDS, POOL_KIND, TOKEN_KIND):
            raise ValueError(f"unknown kind {kind!r}")
        if kind == TOKEN_KIND and not self.has_all_tokens:
            raise FeatcacheError(f"{self.path} holds no last-layer tokens; re-extract with "
                                 "--all-tokens")
        if kind in (*FEATURE_KINDS, POOL_KIND) and kind not in self.token_kinds:
            raise FeatcacheError(f"{self.path} has no {kind!r} tokens (this model's are "
                                 f"{', '.join(self.token_kinds)})")
        rows = rows if rows is not None else slice(0, self.n)
        if kind in (TOKEN_KIND, POOL_KIND) or layers is None:
            out = self._read(kind, rows)
        else:
            out = self._read(kind, rows, (list(layers), slice(None)))
        if check and self._shard_layout(kind) is None:  # the shard reader refuses gaps
            self.check_finite(kind, out, rows.start)
        return out

    def check_finite(self, kind: str, values: np.ndarray, start: int) -> None:
        finite = np.isfinite(values)
        if finite.all():
            return
        row = int(np.argwhere(~finite)[0][0]) + start
        shard = row // self.layout.shard_size
        what = ("a missing inner chunk (it reads as NaN)" if np.isnan(values).any()
                else "an infinite value")
        raise self.damage(kind, shard, f"sample {row} holds {what}")

    # -- writing ----------------------------------------------------------------------
    def write_shard(self, shard: int, arrays: dict[str, np.ndarray]) -> None:
        """Write every array's rows of one shard, then (only then) its done flag."""
        rows = self.layout.rows(shard)
        for name, data in arrays.items():
            if data.shape[0] != rows.stop - rows.start:
                raise ValueError(f"shard {shard}: {name} has {data.shape[0]} rows, "
                                 f"expected {rows.stop - rows.start}")
            self._writable(name)[rows] = data
        if self.has_identity:  # after the files (it records their chunks), before the flag
            self._writable(IDENTITY)[shard] = self.identity_row(shard)
        self._writable("done")[shard] = True

    def _writable(self, name: str) -> Any:
        """An array that stores every chunk it is given, even one equal to the fill value
        (zarr skips those by default, and the setting is not stored with the array): so a
        flagged shard's files always exist, and a missing one is damage. Opened once per
        cache (on an object store each opening is a request)."""
        arrays = self.__dict__.setdefault("_writables", {})
        if name not in arrays:
            arrays[name] = self.group[name].with_config({"write_empty_chunks": True})
        return arrays[name]

    def clear_shards(self, shards: list[int]) -> None:
        """Forget shards (`verify --repair`): their done flags go first, then their files,
        so an interrupted repair never leaves a flagged shard without its data."""
        if not shards:
            return
        self.update_attrs({"complete": False})
        for k in shards:
            self._writable("done")[k] = False
        for k in shards:
            for name in self.arrays + [IDENTITY] * self.has_identity:
                with contextlib.suppress(FileNotFoundError):
                    self.shard_file(name, k).unlink()
        self.__dict__.pop("_identity_rows", None)

    def add_identity(self) -> None:
        """Upgrade an unfinished format-2/3 cache to format 4 before new shards are added
        (the extractor, under the write lock): the shards already written are recorded as
        they are (they were trusted so far), later ones as they are written."""
        if self.has_identity:
            return
        self.format = 4  # the identity array is expected, and written, from here on
        widths = self.identity_widths()
        if IDENTITY not in self.group:
            self.group.create_array(IDENTITY, **_identity_spec(self.layout.n_shards, widths))
        for k in np.flatnonzero(self.done()):
            self._writable(IDENTITY)[int(k)] = self.identity_row(int(k))
        self.update_attrs({"featcache": {"format": 4, "version": __version__}})

    def update_attrs(self, attrs: dict[str, Any]) -> None:
        """Change attributes (zarr ≥ 3.1.3 rewrites zarr.json atomically: a temporary file
        renamed into place)."""
        self.group.attrs.update(attrs)
        self.attrs.update(attrs)

    def finalize(self, extra_attrs: dict[str, Any] | None = None) -> bool:
        """Mark complete when every shard is done; returns whether it is."""
        done = self.done()
        attrs = dict(extra_attrs or {})
        attrs["complete"] = bool(done.all())
        attrs["n_skipped"] = int((~self.valid()).sum()) if done.all() else None
        self.update_attrs(attrs)
        return attrs["complete"]


def _typed(value: Any, kind: type) -> Any:
    if not isinstance(value, kind):
        raise TypeError(f"{type(value).__name__} where {kind.__name__} was expected")
    return value


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    if "checksum" in text.lower():
        return "its checksum does not match (flipped or truncated bytes)"
    return f"its bytes cannot be decoded ({type(exc).__name__}: {text[:120]})"


def disk_bytes(path: Any) -> int:
    if is_remote(path):
        return int(path._call(path.fs.du, path.key))
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def open_cache(path: str | Path, mode: str = "r") -> Cache:
    """Open a cache for reading ("r", the default) or for writing shards ("r+")."""
    from featcache.cache.stores import location

    path = location(path)
    if not (path / "zarr.json").is_file():
        raise FeatcacheError(f"no featcache cache at {path} (expected {path / 'zarr.json'});"
                             " see `featcache ls` for what is cached")
    return Cache(path, mode)


def create_cache(path: Path, fingerprint: dict[str, Any], layout: Layout, labels: np.ndarray,
                 class_names: list[str], layer_names: list[str], layer_dims: list[int],
                 extra_attrs: dict[str, Any] | None = None, checksums: bool = True) -> Cache:
    """Build the group in a temporary directory, then rename it into place (atomic).

    ``checksums=False`` leaves out the crc32c codec; only `benchmarks/checksum.py` uses it,
    to measure what the checksums cost."""
    remote = is_remote(path)
    path = path if remote else Path(path)
    # on an object store the group is built in a local temporary folder and uploaded,
    # its zarr.json last (`featcache.cache.stores.upload_group`): no rename there
    tmp = (Path(tempfile.mkdtemp(prefix="featcache-")) / path.name if remote
           else path.with_name(f".{path.name}.tmp-{os.getpid()}"))
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    n, s, lay = layout.n, layout.shard_size, layout
    # Zarr writes an edge chunk at its full size: inner chunks of a few rows keep the
    # padding of the last, partial shard small (at most CHUNK_ROWS - 1 rows).
    rows = _inner_rows(s, min(CHUNK_ROWS, n))
    # crc32c on every inner chunk: a flipped or truncated byte fails the read. Fills that
    # cannot pass for data: NaN features and label -1 are refused by the readers.
    # Every written chunk is stored, even one equal to the fill (see Cache._writable).
    checked = {"compressors": [Crc32cCodec()] if checksums else None,
               "config": {"write_empty_chunks": True}}
    for kind in FEATURE_KINDS:
        if kind in lay.token_kinds:
            group.create_array(kind, shape=(n, lay.n_layers, lay.dim), dtype="float16",
                               chunks=(rows, 1, lay.dim), shards=(s, lay.n_layers, lay.dim),
                               fill_value=np.nan, **checked)
    if lay.pool_dim is not None:
        group.create_array(POOL_KIND, shape=(n, 1, lay.pool_dim), dtype="float16",
                           chunks=(rows, 1, lay.pool_dim), shards=(s, 1, lay.pool_dim),
                           fill_value=np.nan, **checked)
    if lay.n_tokens is not None:
        token_rows = _inner_rows(s, min(TOKEN_CHUNK_ROWS, n))
        group.create_array(TOKEN_KIND, shape=(n, lay.n_tokens, lay.token_dim),
                           dtype="float16", chunks=(token_rows, lay.n_tokens, lay.token_dim),
                           shards=(s, lay.n_tokens, lay.token_dim), fill_value=np.nan,
                           **checked)
    labels_array = group.create_array("labels", shape=(n,), dtype="int64", chunks=(s,),
                                      fill_value=LABEL_FILL, **checked)
    labels_array[:] = np.asarray(labels, dtype=np.int64)
    group.create_array("valid", shape=(n,), dtype="bool", chunks=(s,), fill_value=True,
                       **checked)
    group.create_array("done", shape=(lay.n_shards,), dtype="bool", chunks=(1,),
                       fill_value=False, **checked)
    if checksums:  # the identity records chunk crcs: without them there is none to record
        names = [a for a in SHARD_ARRAYS if a in group]
        widths = {a: chunks_per_shard(tmp / a) for a in names}
        group.create_array(IDENTITY, **_identity_spec(lay.n_shards, widths))
    group.attrs.update({
        "featcache": {"format": FORMAT_VERSION if checksums else 3, "version": __version__},
        "fingerprint": fingerprint,
        "layer_names": layer_names,
        "layer_dims": layer_dims,
        "class_names": class_names,
        "n": n,
        "dim": lay.dim,
        "shard_size": s,
        "n_shards": lay.n_shards,
        "n_tokens": lay.n_tokens,
        "token_dim": lay.token_dim,
        "token_kinds": lay.token_kinds,
        "pool_dim": lay.pool_dim,
        "complete": False,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra_attrs or {}),
    })
    if remote:
        from featcache.cache.stores import upload_group

        upload_group(tmp, path)
        shutil.rmtree(tmp.parent, ignore_errors=True)
        return Cache(path, "r+")
    if path.exists():  # a half-made replacement (`.NAME.next`) of ours: start it again
        shutil.rmtree(path)
    os.replace(tmp, path)
    return Cache(path, "r+")


def _identity_spec(n_shards: int, widths: dict[str, int]) -> dict[str, Any]:
    """The identity array: one row (one object) per shard, crc-checked like the rest."""
    return {"shape": (n_shards, 1 + sum(widths.values())),
            "dtype": "uint32", "chunks": (1, 1 + sum(widths.values())), "fill_value": 0,
            "compressors": [Crc32cCodec()], "config": {"write_empty_chunks": True}}


REMOTE_AHEAD = 4  # shards in flight from an object store (benchmarks/read.py --store s3)
READ_AHEAD = 3  # shards the kernel is asked to read ahead of the one being decoded


def _inner_rows(shard_size: int, limit: int) -> int:
    """The largest divisor of the shard size up to `limit` (zarr needs inner chunks to tile
    the shard exactly)."""
    return max(d for d in range(1, max(1, min(shard_size, limit)) + 1) if shard_size % d == 0)


LOST_GROUP = ("damaged: its zarr.json (the cache's metadata) is missing, its arrays are "
              "there; it cannot be repaired shard by shard: re-extract it with --overwrite")


def _find_remote(root: Any, notes: list[tuple[Any, str]]) -> list[Cache]:
    """`find_caches` on an object store: one listing; a cache is a prefix holding
    `ap/zarr.json` and `done/zarr.json` (its group's zarr.json gone: damage, noted)."""
    keys = set(root.listing())
    found = []
    for key in sorted(keys):
        if not key.endswith("/done/zarr.json") or key == "done/zarr.json":
            continue
        folder = key[: -len("/done/zarr.json")]
        if any(part.startswith(".") for part in folder.split("/")) or \
                f"{folder}/ap/zarr.json" not in keys:
            continue
        if f"{folder}/zarr.json" not in keys:
            notes.append((root / folder, LOST_GROUP))
            continue
        try:
            found.append(Cache(root / folder))
        except FeatcacheError as exc:
            notes.append((root / folder, str(exc)))
    return found


def headless(folder: Any) -> bool:
    """A cache whose group zarr.json is gone: featcache's arrays without their group."""
    folder = folder if is_remote(folder) else Path(folder)
    return all((folder / name / "zarr.json").is_file() for name in ("ap", "done"))


def find_caches(root: str | Path, problems: list[tuple[Path, str]] | None = None
                ) -> list[Cache]:
    """Every cache under a root (a cache is a directory holding a featcache zarr.json).

    A cache that cannot be opened (damaged metadata, an unreadable folder) is left out and
    described in ``problems`` as (path, why), so that callers can say why it is not there."""
    from featcache.cache.stores import resolve_root

    root = resolve_root(root)
    notes = problems if problems is not None else []
    if is_remote(root):
        return _find_remote(root, notes)
    if root.exists() and not root.is_dir():
        raise FeatcacheError(f"the cache root {root} is a file, not a folder; point --cache "
                             "at a folder")
    if not root.is_dir():
        return []
    found = []

    def unreadable(exc: OSError) -> None:
        notes.append((Path(exc.filename or root), f"cannot read {exc.filename}: "
                      f"{exc.strerror}"))

    for folder, dirnames, filenames in os.walk(root, onerror=unreadable):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if "zarr.json" not in filenames:
            if headless(Path(folder)):
                dirnames[:] = []
                notes.append((Path(folder), LOST_GROUP))
            continue
        meta = Path(folder) / "zarr.json"
        try:
            text = meta.read_text(errors="replace")
        except OSError as exc:
            notes.append((meta.parent, f"cannot read {meta}: {exc.strerror}"))
            continue
        # a featcache group says so; one whose zarr.json is too damaged to say so still
        # has the arrays (and is reported, rather than silently missing)
        arrays = all(d in dirnames for d in ("cls", "ap", "done"))
        if '"featcache"' not in text and not arrays:
            continue
        dirnames[:] = []  # a cache's arrays are not caches
        try:
            found.append(Cache(Path(folder)))
        except FeatcacheError as exc:
            notes.append((Path(folder), str(exc)))
    return found
