"""The on-disk cache: one Zarr v3 group per (model, tap, weights, dataset, split).

The shard (a block of `shard_size` consecutive samples) is the unit of writing: every
array's zarr shard covers exactly those rows, one writer owns a shard, and its done flag
is set only after its write returned. Inner chunks hold one layer each, so a probe that
needs a few layers reads only those bytes. See docs/cache-format.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from featcache import __version__
from featcache.errors import FeatcacheError, FingerprintMismatch

FORMAT_VERSION = 1
FEATURE_KINDS = ("cls", "ap")
SHARD_TARGET_BYTES = 64 << 20  # the largest array's shard stays near this size
MAX_SHARD_SIZE = 1024
CHUNK_ROWS = 64  # rows of one inner chunk of cls/ap (one layer wide)
TOKEN_CHUNK_ROWS = 16  # rows of one inner chunk of last_tokens (all tokens wide)


def default_cache_root() -> Path:
    """$FEATCACHE_CACHE, else <user cache dir>/featcache."""
    env = os.environ.get("FEATCACHE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "featcache"


def slug(text: str) -> str:
    """A readable, filesystem-safe directory name."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "x"


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


def cache_path(root: Path, model_dir: str, dataset_dir: str, split: str) -> Path:
    return Path(root) / model_dir / dataset_dir / slug(split)


def choose_shard_size(bytes_per_sample: int) -> int:
    """The largest power of two ≤ 1024 whose shard of the widest array stays ~64 MiB."""
    fit = max(1, SHARD_TARGET_BYTES // max(1, bytes_per_sample))
    return int(min(MAX_SHARD_SIZE, 2 ** int(math.log2(fit))))


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict → {"a.b.c": value}, for naming the setting that differs."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: obj}


# Recorded for people, not compared: where the data sat when the cache was made (a moved
# copy of the same files has the same content hash, `dataset.identity.sha256`).
INFORMATIONAL_KEYS = frozenset({"dataset.identity.location"})


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human lines `key: old → new` for every setting that differs."""
    a, b = flatten(old), flatten(new)
    for key in INFORMATIONAL_KEYS:
        a.pop(key, None)
        b.pop(key, None)
    lines = []
    # Settings first; what follows from them (layer lists, token counts) last.
    derived = ("layer_names", "layer_dims", "n_tokens", "n_prefix_tokens")
    for key in sorted(set(a) | set(b), key=lambda k: (k.rsplit(".", 1)[-1] in derived, k)):
        before, after = a.get(key, "<absent>"), b.get(key, "<absent>")
        if before != after:
            lines.append(f"{key}: {_short(before)} → {_short(after)}")
    return lines


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class Layout:
    """Sizes fixed when a cache is created."""

    n: int
    n_layers: int
    dim: int
    shard_size: int
    n_tokens: int | None = None  # all tokens of the last layer stored when set
    token_dim: int | None = None

    @property
    def n_shards(self) -> int:
        return max(1, math.ceil(self.n / self.shard_size))

    def rows(self, shard: int) -> slice:
        return slice(shard * self.shard_size, min(self.n, (shard + 1) * self.shard_size))


class Cache:
    """An opened cache: metadata in memory, arrays read on demand."""

    def __init__(self, path: Path, mode: str = "r") -> None:
        """`mode` "r" (readers: probe, report) or "r+" (the extractor, which writes)."""
        self.path = Path(path)
        self.mode = mode
        try:
            self.group = zarr.open_group(str(self.path), mode=mode)
        except Exception:
            raise FeatcacheError(f"{self.path} is not a featcache cache (no Zarr group there);"
                                 " see `featcache ls`") from None
        attrs = dict(self.group.attrs)
        if "featcache" not in attrs:
            raise FeatcacheError(f"{self.path} is a Zarr group but not a featcache cache")
        fmt = attrs["featcache"].get("format")
        if fmt != FORMAT_VERSION:
            raise FeatcacheError(f"{self.path}: cache format {fmt}, this featcache reads "
                                 f"{FORMAT_VERSION}; re-extract with --overwrite")
        self.attrs = attrs
        self.fingerprint: dict[str, Any] = attrs["fingerprint"]
        self.layer_names: list[str] = attrs["layer_names"]
        self.layer_dims: list[int] = attrs["layer_dims"]
        self.class_names: list[str] = attrs["class_names"]
        self.layout = Layout(attrs["n"], len(self.layer_names), attrs["dim"], attrs["shard_size"],
                             attrs.get("n_tokens"), attrs.get("token_dim"))

    # -- metadata ---------------------------------------------------------------------
    @property
    def n(self) -> int:
        return self.layout.n

    @property
    def dim(self) -> int:
        return self.layout.dim

    @property
    def complete(self) -> bool:
        return bool(self.group.attrs.get("complete", False))

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

    def done(self) -> np.ndarray:
        return np.asarray(self.group["done"][:], dtype=bool)

    def summary(self) -> dict[str, Any]:
        """The row `featcache ls` prints for this cache."""
        fp = self.fingerprint
        done = self.done()
        return {
            "path": str(self.path),
            "model": fp["model"]["model"],
            "weights": fp["model"]["weights"],
            "tap": fp["model"]["tap"],
            "dataset": fp["dataset"]["name"],
            "split": fp["dataset"]["split"],
            "n": self.n,
            "layers": len(self.layer_names),
            "dim": self.dim,
            "all_tokens": self.has_all_tokens,
            "complete": self.complete,
            "shards_done": int(done.sum()),
            "shards": int(done.size),
            "bytes": disk_bytes(self.path),
        }

    # -- data -------------------------------------------------------------------------
    def labels(self) -> np.ndarray:
        return np.asarray(self.group["labels"][:], dtype=np.int64)

    def valid(self) -> np.ndarray:
        """False where an unreadable image was skipped (features are zeros there)."""
        return np.asarray(self.group["valid"][:], dtype=bool)

    def layer_index(self, names: list[str]) -> list[int]:
        missing = [n for n in names if n not in self.layer_names]
        if missing:
            raise FeatcacheError(f"{self.path}: no layer {missing[0]!r}; this cache has "
                                 f"{', '.join(self.layer_names)}")
        return [self.layer_names.index(n) for n in names]

    def read(self, kind: str, layers: list[int] | None = None,
             rows: slice | None = None) -> np.ndarray:
        """(rows, layers, dim) float16 for kind "cls"/"ap"; (rows, T, D) for "last_tokens"."""
        if kind not in (*FEATURE_KINDS, "last_tokens"):
            raise ValueError(f"unknown kind {kind!r}")
        if kind == "last_tokens" and not self.has_all_tokens:
            raise FeatcacheError(f"{self.path} holds no last-layer tokens; re-extract with "
                                 "--all-tokens")
        array = self.group[kind]
        rows = rows if rows is not None else slice(0, self.n)
        if kind == "last_tokens" or layers is None:
            return np.asarray(array[rows])
        return np.asarray(array.get_orthogonal_selection((rows, list(layers), slice(None))))

    # -- writing ----------------------------------------------------------------------
    def write_shard(self, shard: int, arrays: dict[str, np.ndarray]) -> None:
        """Write every array's rows of one shard, then (only then) its done flag."""
        rows = self.layout.rows(shard)
        for name, data in arrays.items():
            if data.shape[0] != rows.stop - rows.start:
                raise ValueError(f"shard {shard}: {name} has {data.shape[0]} rows, "
                                 f"expected {rows.stop - rows.start}")
            self.group[name][rows] = data
        self.group["done"][shard] = True

    def finalize(self, extra_attrs: dict[str, Any] | None = None) -> bool:
        """Mark complete when every shard is done; returns whether it is."""
        done = self.done()
        attrs = dict(extra_attrs or {})
        attrs["complete"] = bool(done.all())
        attrs["n_skipped"] = int((~self.valid()).sum()) if done.all() else None
        self.group.attrs.update(attrs)
        self.attrs.update(attrs)
        return attrs["complete"]


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def open_cache(path: str | Path, mode: str = "r") -> Cache:
    """Open a cache for reading ("r", the default) or for writing shards ("r+")."""
    path = Path(path).expanduser()
    if not (path / "zarr.json").is_file():
        raise FeatcacheError(f"no featcache cache at {path} (expected {path / 'zarr.json'});"
                             " see `featcache ls` for what is cached")
    return Cache(path, mode)


def create_cache(path: Path, fingerprint: dict[str, Any], layout: Layout, labels: np.ndarray,
                 class_names: list[str], layer_names: list[str], layer_dims: list[int],
                 extra_attrs: dict[str, Any] | None = None) -> Cache:
    """Build the group in a temporary directory, then rename it into place (atomic)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    n, s, lay = layout.n, layout.shard_size, layout
    # Zarr writes an edge chunk at its full size: inner chunks of a few rows keep the
    # padding of the last, partial shard small (at most CHUNK_ROWS - 1 rows).
    rows = _inner_rows(s, min(CHUNK_ROWS, n))
    for kind in FEATURE_KINDS:
        group.create_array(kind, shape=(n, lay.n_layers, lay.dim), dtype="float16",
                           chunks=(rows, 1, lay.dim), shards=(s, lay.n_layers, lay.dim),
                           compressors=None, fill_value=0.0)
    if lay.n_tokens is not None:
        token_rows = _inner_rows(s, min(TOKEN_CHUNK_ROWS, n))
        group.create_array("last_tokens", shape=(n, lay.n_tokens, lay.token_dim),
                           dtype="float16", chunks=(token_rows, lay.n_tokens, lay.token_dim),
                           shards=(s, lay.n_tokens, lay.token_dim), compressors=None,
                           fill_value=0.0)
    group.create_array("labels", data=np.asarray(labels, dtype=np.int64), chunks=(s,),
                       compressors=None)
    group.create_array("valid", shape=(n,), dtype="bool", chunks=(s,), compressors=None,
                       fill_value=True)
    group.create_array("done", shape=(lay.n_shards,), dtype="bool", chunks=(1,),
                       compressors=None, fill_value=False)
    group.attrs.update({
        "featcache": {"format": FORMAT_VERSION, "version": __version__},
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
        "complete": False,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra_attrs or {}),
    })
    if path.exists():
        _swap_in(tmp, path)
    else:
        os.replace(tmp, path)
    return Cache(path, "r+")


def _inner_rows(shard_size: int, limit: int) -> int:
    """The largest divisor of the shard size up to `limit` (zarr needs inner chunks to tile
    the shard exactly)."""
    return max(d for d in range(1, max(1, min(shard_size, limit)) + 1) if shard_size % d == 0)


def _swap_in(tmp: Path, path: Path) -> None:
    """Replace an existing cache (--overwrite): rename old aside, new in, delete old."""
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def check_fingerprint(cache: Cache, fingerprint: dict[str, Any]) -> None:
    """Refuse a cache built with other settings, naming the first settings that differ."""
    diff = fingerprint_diff(cache.fingerprint, fingerprint)
    if diff:
        shown = "; ".join(diff[:3])
        more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
        raise FingerprintMismatch(
            f"{cache.path} holds a cache built with other settings: {shown}{more}. "
            "Pass --overwrite to replace it, or --cache DIR to keep both; it was left untouched")


def remove_leftovers(path: Path) -> list[Path]:
    """Delete half-built (`.NAME.tmp-PID`) and half-replaced (`.NAME.old-PID`) siblings of a
    cache that a killed run left behind. Call only while holding `write_lock(path)`."""
    path = Path(path)
    gone = []
    if path.parent.is_dir():
        for kind in ("tmp", "old"):
            for stale in path.parent.glob(f".{path.name}.{kind}-*"):
                shutil.rmtree(stale, ignore_errors=True)
                gone.append(stale)
    return gone


@contextlib.contextmanager
def write_lock(path: Path) -> Iterator[None]:
    """One writer per cache at a time, across processes (advisory flock beside the cache)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(f".{path.name}.lock")
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FeatcacheError(f"another featcache process is writing {path} right now; "
                                 "wait for it to finish (nothing was changed)") from None
        yield


def find_caches(root: str | Path) -> list[Cache]:
    """Every cache under a root (a cache is a directory holding a featcache zarr.json)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        return []
    found = []
    for meta in sorted(root.rglob("zarr.json")):
        folder = meta.parent
        if folder.name.startswith(".") or any(p.name.startswith(".") for p in folder.parents
                                               if root in p.parents):
            continue
        try:
            text = meta.read_text()
        except OSError:
            continue
        if '"featcache"' in text and '"node_type": "group"' in text:
            with contextlib.suppress(FeatcacheError):
                found.append(Cache(folder))
    return found


def ls(cache: str | Path | None = None) -> list[dict[str, Any]]:
    """`featcache ls`: a summary row per cache under the root (default: the default root)."""
    root = Path(cache).expanduser() if cache else default_cache_root()
    return [c.summary() for c in find_caches(root)]


def info(path: str | Path) -> dict[str, Any]:
    """`featcache info`: one cache's summary, layers, classes, fingerprint and attributes."""
    from featcache.backbones import describe_preprocess

    c = open_cache(path)
    shown = ("fingerprint", "class_names", "layer_names", "layer_dims")
    pp = c.fingerprint.get("model", {}).get("preprocess") or {}
    return {**c.summary(), "transform": describe_preprocess(pp) if pp else None,
            "layer_names": c.layer_names, "layer_dims": c.layer_dims,
            "shard_size": c.layout.shard_size, "class_names": c.class_names,
            "fingerprint": c.fingerprint,
            "attrs": {k: v for k, v in c.attrs.items() if k not in shown}}


EXPORT_FORMATS = ("hdf5",)


def export(path: str | Path, format: str = "hdf5", out: str | Path | None = None,
           overwrite: bool = False) -> Path:
    """`featcache export`: write a complete cache to HDF5 (default: PATH.h5); returns the file."""
    if format.lower() not in ("hdf5", "h5"):
        raise FeatcacheError(f"unknown export format {format!r}: hdf5 is supported")
    c = open_cache(path)
    target = Path(out).expanduser() if out else Path(str(c.path).rstrip("/") + ".h5")
    return export_hdf5(c, target, overwrite=overwrite)


def export_hdf5(cache: Cache, out: Path, overwrite: bool = False) -> Path:
    """The same arrays and attributes as HDF5 (thingsvision and friends read .hdf5)."""
    import json

    import h5py

    out = Path(out)
    if out.exists() and not overwrite:
        raise FeatcacheError(f"{out} exists; pass --overwrite to replace it")
    if not cache.complete:
        raise FeatcacheError(f"{cache.path} is not complete; finish it with `featcache extract` "
                             "first (re-run the same command)")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with h5py.File(tmp, "w") as h5:
        for name in (*FEATURE_KINDS, "last_tokens", "labels", "valid"):
            if name not in cache.group:
                continue
            src = cache.group[name]
            dst = h5.create_dataset(name, shape=src.shape, dtype=src.dtype,
                                    chunks=_h5_chunks(src.shape, src.dtype.itemsize))
            step = cache.layout.shard_size
            for start in range(0, src.shape[0], step):
                dst[start:start + step] = src[start:start + step]
        for key, value in cache.group.attrs.items():
            h5.attrs[key] = json.dumps(value) if not isinstance(value, (int, float, str)) else value
    os.replace(tmp, out)
    return out


def _h5_chunks(shape: tuple[int, ...], itemsize: int = 2) -> tuple[int, ...] | None:
    """Whole rows per chunk, about 4 MiB each (HDF5 reads whole chunks)."""
    if shape[0] == 0:
        return None
    if len(shape) == 1:
        return (min(shape[0], 1 << 16),)
    row = max(1, int(np.prod(shape[1:])) * itemsize)
    return (max(1, min(shape[0], (4 << 20) // row)), *shape[1:])
