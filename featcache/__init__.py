"""featcache: cache every layer of a frozen ViT once, then train probes from the cache.

The library behind the `featcache` CLI; every command has a function of the same name:
`featcache.extract`, `featcache.probe`, `featcache.report`, plus `open_cache`,
`create_backbone` and `open_dataset` for working with the pieces.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "extract": ("featcache.extract", "extract"),
    "ExtractOptions": ("featcache.extract", "ExtractOptions"),
    "open_cache": ("featcache.cache", "open_cache"),
    "find_caches": ("featcache.cache", "find_caches"),
    "create_backbone": ("featcache.models", "create_backbone"),
    "open_dataset": ("featcache.datasets", "open_dataset"),
    "probe": ("featcache.probe", "probe"),
    "report": ("featcache.report", "build_report"),
}


def __getattr__(name: str) -> Any:
    """Import heavy modules (torch, zarr) only when their names are used."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'featcache' has no attribute {name!r}")
