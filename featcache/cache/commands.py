"""`featcache ls`, `info` and `export`: what is cached, one cache in detail, and a cache
written to HDF5 (thingsvision and friends read .hdf5)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from featcache import atomic
from featcache.cache.store import (
    Cache,
    find_caches,
    open_cache,
)
from featcache.cache.stores import is_remote, local_path, resolve_root
from featcache.errors import FeatcacheError, os_error


def ls(cache: str | Path | None = None) -> list[dict[str, Any]]:
    """`featcache ls`: a summary row per cache under the root (default: the default root).
    A cache that cannot be opened is not a row but a warning naming it and why."""
    from featcache.errors import warn

    root = resolve_root(cache)
    problems: list[tuple[Path, str]] = []
    rows = [c.summary() for c in find_caches(root, problems)]
    for path, why in problems:
        warn(f"not listed: {path}: {why}; `featcache verify {path}` says more")
    return rows


def info(path: str | Path) -> dict[str, Any]:
    """`featcache info`: one cache's summary, layers, classes, fingerprint and attributes."""
    from featcache.backbones.preprocess import describe_preprocess

    c = open_cache(path)
    shown = ("fingerprint", "class_names", "layer_names", "layer_dims")
    pp = c.fingerprint.get("model", {}).get("preprocess") or {}
    missing = c.missing_files()
    return {**c.summary(), "transform": describe_preprocess(pp) if pp else None,
            "missing_files": [f"{name} shard {k}" for name, k in missing],
            "layer_names": c.layer_names, "layer_dims": c.layer_dims,
            "shard_size": c.layout.shard_size, "class_names": c.class_names,
            "fingerprint": c.fingerprint,
            "attrs": {k: v for k, v in c.attrs.items() if k not in shown}}


def export(path: str | Path, format: str = "hdf5", out: str | Path | None = None,
           overwrite: bool = False) -> Path:
    """`featcache export`: write a complete cache to HDF5 (default: PATH.h5); returns the file."""
    if format.lower() not in ("hdf5", "h5"):
        raise FeatcacheError(f"unknown export format {format!r}: hdf5 is supported")
    c = open_cache(path)
    if out is None and is_remote(c.path):
        raise FeatcacheError(f"{c.path} is on an object store: give --out FILE.h5, a file on "
                             "this machine")
    target = local_path(out, "--out") if out else Path(str(c.path).rstrip("/") + ".h5")
    return export_hdf5(c, target, overwrite=overwrite)


def export_hdf5(cache: Cache, out: Path, overwrite: bool = False) -> Path:
    """The same arrays and attributes as HDF5 (thingsvision and friends read .hdf5)."""
    if Path(out).is_dir():
        raise FeatcacheError(f"--out {out} is a folder; give a file name, e.g. "
                             f"{Path(out) / (cache.path.name + '.h5')}")
    out = atomic.check_target(out, "--out", overwrite, inputs=[cache.path])
    if not cache.complete:
        raise FeatcacheError(f"{cache.path} is not complete; finish it with `featcache extract` "
                             "first (re-run the same command)")
    cache.check_files()
    need = sum(cache.group[name].nbytes for name in cache.arrays) + (1 << 20)
    free = shutil.disk_usage(out.parent).free
    if free < need:  # HDF5 can crash outright when the disk fills mid-write
        raise FeatcacheError(f"--out {out}: the export needs about {need / 2**20:.1f} MiB, "
                             f"{free / 2**20:.1f} MiB are free there; free space or choose "
                             "another folder")
    try:
        _write_hdf5(cache, out)
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise
        raise os_error(exc, out) from None
    return out


def _write_hdf5(cache: Cache, out: Path) -> None:
    import h5py

    with atomic.atomic_path(out) as tmp, h5py.File(tmp, "w") as h5:
        for name in cache.arrays:
            src = cache.group[name]
            dst = h5.create_dataset(name, shape=src.shape, dtype=src.dtype,
                                    chunks=_h5_chunks(src.shape, src.dtype.itemsize))
            step = cache.layout.shard_size
            for start in range(0, src.shape[0], step):
                rows = slice(start, min(src.shape[0], start + step))
                values = cache._read(name, rows)  # damage is an error, never exported
                if values.dtype.kind == "f":
                    cache.check_finite(name, values, start)
                dst[rows] = values
        cache.labels()  # labels in range
        for key, value in cache.group.attrs.items():
            h5.attrs[key] = json.dumps(value) if not isinstance(value, (int, float, str)) else value


def _h5_chunks(shape: tuple[int, ...], itemsize: int = 2) -> tuple[int, ...] | None:
    """Whole rows per chunk, about 4 MiB each (HDF5 reads whole chunks)."""
    if shape[0] == 0:
        return None
    if len(shape) == 1:
        return (min(shape[0], 1 << 16),)
    row = max(1, int(np.prod(shape[1:])) * itemsize)
    return (max(1, min(shape[0], (4 << 20) // row)), *shape[1:])
