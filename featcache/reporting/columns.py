"""Report columns: which runs share a table cell, and which linear baseline a gain is over.

A column is a method with its layer set ("alf:all", "concat:quarterly", "linear") plus,
when a run's settings differ from the paper's recipe, a variant label in brackets
("linear [protocol=clean]"). Runs of different columns are never averaged together.
"""

from __future__ import annotations

from featcache.probing.methods import LAYER_SETS, normalize_layer_set
from featcache.records.schema import run_variant  # noqa: F401 (a record's; named here too)


def column_key(method: str, layer_set: str | None) -> str:
    """The table column a run belongs to: "linear", "attentive", "concat:all", "alf:all"
    (the method's spec decides; a method not registered here shows its layer set)."""
    from featcache.probing.methods import method_of

    spec = method_of(method)
    if spec is not None:
        return spec.column(layer_set)
    m = str(method).strip().lower()
    ls = normalize_layer_set(layer_set) or (str(layer_set) if layer_set else None)
    return f"{m}:{ls}" if ls else m


def split_column(col: str) -> tuple[str, str]:
    """"alf:all [protocol=clean]" → ("alf:all", "protocol=clean")."""
    base, _, rest = col.partition(" [")
    return base, rest[:-1] if rest.endswith("]") else rest


def with_variant(base: str, variant: str) -> str:
    return f"{base} [{variant}]" if variant else base


def is_baseline(col: str) -> bool:
    """The linear probe's column (of any variant): the one gains are taken over."""
    return split_column(col)[0] == "linear"


def baseline_of(col: str) -> str:
    """The linear column a column's gains are measured against (same variant)."""
    return with_variant("linear", split_column(col)[1])


def column_sort(key: str) -> tuple[int, int, str]:
    """Methods in registration order (linear first), then layer sets in the paper's order."""
    from featcache.registry import METHODS

    order = METHODS.names()
    method, _, ls = split_column(key)[0].partition(":")
    mi = order.index(method) if method in order else len(order)
    li = LAYER_SETS.index(ls) if ls in LAYER_SETS else len(LAYER_SETS)
    return (mi, li, key)
