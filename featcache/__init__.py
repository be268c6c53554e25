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
    "extract": ("featcache.extracting.run", "extract"),
    "ls": ("featcache.cache.commands", "ls"),
    "info": ("featcache.cache.commands", "info"),
    "export": ("featcache.cache.commands", "export"),
    "verify": ("featcache.cache.verification", "verify"),
    "models": ("featcache.backbones", "models"),
    "datasets": ("featcache.sources", "datasets"),
    "probe": ("featcache.probing.run", "probe"),
    "runs": ("featcache.records.listing", "runs"),
    "report": ("featcache.reporting.build", "report"),
    "predict": ("featcache.serving.inference", "predict"),
    "export_model": ("featcache.serving.deployment", "export_model"),
    "evaluate": ("featcache.serving.shift", "evaluate"),
    "demo": ("featcache.offline_demo", "demo"),
    "run": ("featcache.suites.runner", "run"),
    "ExtractOptions": ("featcache.extracting.run", "ExtractOptions"),
    "ProbeOptions": ("featcache.probing.run", "ProbeOptions"),
    "open_cache": ("featcache.cache.store", "open_cache"),
    "find_caches": ("featcache.cache.store", "find_caches"),
    "create_backbone": ("featcache.backbones", "create_backbone"),
    "open_dataset": ("featcache.sources", "open_dataset"),
    "FeatcacheError": ("featcache.errors", "FeatcacheError"),
    "register_model": ("featcache.backbones.spec", "register_model"),
    "register_backend": ("featcache.backbones.spec", "register_backend"),
    "register_dataset_source": ("featcache.sources", "register_dataset_source"),
    "register_method": ("featcache.probing.methods", "register_method"),
    "Method": ("featcache.probing.methods", "Method"),
    "register_figure": ("featcache.reporting.figures", "register_figure"),
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
