"""featcache: cache every layer of a frozen ViT once, then train probes from the cache.

The library behind the `featcache` CLI. Every command is a function of the same name with
the command's options as keywords (`--workers` is `workers`):

    import featcache
    train, test = featcache.extract(model="dinov2-vit-b14", dataset="eurosat")
    results = featcache.probe(method="alf")
    featcache.report(out="report")

No module of the package is named like a command, so `featcache.extract` is this
function whatever was imported before. The pieces: `open_cache`, `create_backbone`,
`open_dataset`, and the options classes `ExtractOptions` and `ProbeOptions`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name → (module, attribute): the commands first, then the pieces.
_LAZY: dict[str, tuple[str, str]] = {
    "extract": ("featcache.extraction", "extract"),
    "ls": ("featcache.cache_commands", "ls"),
    "info": ("featcache.cache_commands", "info"),
    "export": ("featcache.cache_commands", "export"),
    "verify": ("featcache.verification", "verify"),
    "models": ("featcache.backbones", "models"),
    "datasets": ("featcache.sources", "datasets"),
    "probe": ("featcache.probing", "probe"),
    "runs": ("featcache.records", "runs"),
    "report": ("featcache.reporting", "report"),
    "predict": ("featcache.inference", "predict"),
    "export_model": ("featcache.deployment", "export_model"),
    "evaluate": ("featcache.shift", "evaluate"),
    "demo": ("featcache.offline_demo", "demo"),
    "run": ("featcache.suites.runner", "run"),
    "ExtractOptions": ("featcache.extraction", "ExtractOptions"),
    "ProbeOptions": ("featcache.probing", "ProbeOptions"),
    "open_cache": ("featcache.cache", "open_cache"),
    "find_caches": ("featcache.cache", "find_caches"),
    "create_backbone": ("featcache.backbones", "create_backbone"),
    "open_dataset": ("featcache.sources", "open_dataset"),
    "FeatcacheError": ("featcache.errors", "FeatcacheError"),
    "register_model": ("featcache.backbones.spec", "register_model"),
    "register_backend": ("featcache.backbones.spec", "register_backend"),
    "register_dataset_source": ("featcache.sources", "register_dataset_source"),
    "register_method": ("featcache.methods", "register_method"),
    "Method": ("featcache.methods", "Method"),
    "register_figure": ("featcache.figures", "register_figure"),
    "plugins": ("featcache.registry", "plugins"),
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    """Import heavy modules (torch, zarr) only when their names are used."""
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value  # looked up once
        return value
    raise AttributeError(f"module 'featcache' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
