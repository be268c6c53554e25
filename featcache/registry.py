"""Registries by name: models, backends, dataset sources, probe methods, report figures.

One registration per extension. featcache registers its own entries the same way a
plugin does; plugins are packages that declare an entry point in the group
`featcache.plugins` and are imported (lazily, once) the first time a registry is asked
for a name. Importing a plugin runs its `featcache.register_*` calls:

    [project.entry-points."featcache.plugins"]
    my_plugin = "my_plugin"

The registries hold only names and light specs; nothing heavy (torch, timm, zarr) is
imported here. See docs/extending.md.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from featcache.errors import FeatcacheError, warn

T = TypeVar("T")

PLUGIN_GROUP = "featcache.plugins"

# Modules that register featcache's own entries, imported before any lookup.
# (The built-in figures register when `featcache.reporting.figures` is imported, by the report:
# matplotlib stays out of everything else.)
_BUILTINS = ("featcache.catalogue", "featcache.backbones", "featcache.sources",
             "featcache.probing.methods")
_loaded = False
_loading = False


class Registry(Generic[T]):
    """Names → entries of one kind, in registration order."""

    def __init__(self, kind: str, hint: str = "") -> None:
        self.kind = kind
        self.hint = hint  # where to see the names, for error messages
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T, replace: bool = False) -> T:
        if not isinstance(name, str) or not name.strip():
            raise FeatcacheError(f"a {self.kind} needs a non-empty name, got {name!r}")
        if name in self._entries and not replace:
            raise FeatcacheError(f"{self.kind} {name!r} is registered already; pass "
                                 "replace=True to replace it")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        load_plugins()
        try:
            return self._entries[name]
        except KeyError:
            raise self.unknown(name) from None

    def find(self, name: str) -> T | None:
        load_plugins()
        return self._entries.get(name)

    def unknown(self, name: str, extra: tuple[str, ...] = ()) -> FeatcacheError:
        close = difflib.get_close_matches(name, [*self._entries, *extra], n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        where = f" See {self.hint}." if self.hint else ""
        return FeatcacheError(f"unknown {self.kind} {name!r}.{hint}{where}")

    def names(self) -> list[str]:
        load_plugins()
        return list(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        load_plugins()
        return iter(list(self._entries.items()))

    def __contains__(self, name: object) -> bool:
        load_plugins()
        return name in self._entries


MODELS: Registry[Any] = Registry("model", "`featcache models`")
BACKENDS: Registry[Any] = Registry("backend", "docs/extending.md")
SOURCES: Registry[Any] = Registry("dataset source", "`featcache datasets`")
DATASETS: Registry[Any] = Registry("dataset", "`featcache datasets`")
METHODS: Registry[Any] = Registry("method", "`featcache probe --help`")
FIGURES: Registry[Any] = Registry("report figure", "docs/extending.md")


def load_plugins() -> None:
    """featcache's own entries, then every installed plugin (once per process). A plugin
    that fails to import is a warning naming it, not a failure of featcache."""
    global _loaded, _loading
    if _loaded or _loading:
        return
    _loading = True
    try:
        for module in _BUILTINS:
            importlib.import_module(module)
        for entry in _entry_points():
            try:
                entry.load()
            except Exception as exc:  # a broken plugin must not break featcache
                warn(f"the featcache plugin {entry.name!r} ({entry.value}) failed to load: "
                     f"{type(exc).__name__}: {exc}")
        _loaded = True
    finally:
        _loading = False


def _entry_points() -> list[Any]:
    from importlib.metadata import entry_points

    return sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name)


def plugins() -> list[str]:
    """The plugins installed (entry points of the group `featcache.plugins`)."""
    return [f"{e.name} = {e.value}" for e in _entry_points()]


def resolve(entry: Any) -> Any:
    """An entry given as "module:attribute" (featcache's own, imported on first use so
    that listing names stays light) or as the object itself (plugins)."""
    if isinstance(entry, str) and ":" in entry:
        module, _, attr = entry.partition(":")
        return getattr(importlib.import_module(module), attr)
    return entry
