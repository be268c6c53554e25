"""Options as the CLI spells them: one dataclass per command, built from keywords or text.

Every command's Python function takes its options under the CLI's names (`--workers` is
`workers`, `--memory-gb` is `memory_gb`), either as an options object or as keywords,
and list-valued options either as Python sequences or as the CLI's comma-separated text.
The parsing lives here, not in the CLI, so both entry points reject the same bad values
with the same message.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from featcache.errors import FeatcacheError

Opts = TypeVar("Opts")

# Larger values than any real run needs; beyond them a number is a typo (and a 20-digit
# integer would overflow torch and numpy further down).
MAX_INT_OPTION = 10**9


def make_options(cls: type[Opts], options: Opts | None, kwargs: Mapping[str, Any]) -> Opts:
    """An options object from an object, keywords, or an object plus keyword overrides."""
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise FeatcacheError(f"unknown option {unknown[0]!r}; the options are: "
                             f"{', '.join(sorted(fields))}")
    if options is None:
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a required option left out
            raise FeatcacheError(f"{cls.__name__}: {exc}") from None
    if not isinstance(options, cls):
        raise FeatcacheError(f"expected {cls.__name__} or keywords, got "
                             f"{type(options).__name__}")
    return dataclasses.replace(options, **kwargs) if kwargs else options  # type: ignore[type-var]


def _items(value: str | Sequence[Any]) -> list[Any]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


def parse_floats(value: str | Sequence[float] | None, what: str) -> tuple[float, ...] | None:
    """"1e-3,1e-2" or a sequence → finite floats; None stays None."""
    if value is None:
        return None
    try:
        values = tuple(float(v) for v in _items(value))
    except (TypeError, ValueError):
        values = ()
    if not values or not all(math.isfinite(v) for v in values):
        raise FeatcacheError(f"bad {what} {value!r}: use comma-separated numbers, e.g. 1e-3,1e-2")
    return values


def parse_ints(value: str | int | Sequence[int], what: str, low: int = 0
               ) -> tuple[int, ...]:
    """"0,1,2" or a sequence → integers in [low, MAX_INT_OPTION]."""
    items = [value] if isinstance(value, int) else _items(value)
    try:
        values = tuple(_as_int(v) for v in items)
    except (TypeError, ValueError):
        values = ()
    if not values:
        raise FeatcacheError(f"bad {what} {value!r}: use comma-separated integers, e.g. 0,1,2")
    for v in values:
        check_int(v, what, low)
    return values


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("a boolean is not an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("not an integer")
        return int(value)
    return int(value)


def check_int(value: int | None, what: str, low: int = 1) -> None:
    """An integer option in [low, MAX_INT_OPTION] (None: not set)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise FeatcacheError(f"{what} must be an integer, got {value!r}")
    if value < low:
        raise FeatcacheError(f"{what} must be at least {low}, got {value}")
    if value > MAX_INT_OPTION:
        raise FeatcacheError(f"{what} is too large ({value}); at most {MAX_INT_OPTION:,}")


def parse_model_args(value: Mapping[str, Any] | Sequence[str] | None) -> dict[str, Any]:
    """`KEY=VALUE` texts (values parsed as JSON when they parse, else text), or a mapping."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    out: dict[str, Any] = {}
    for item in [value] if isinstance(value, str) else value:
        key, sep, text = str(item).partition("=")
        if not sep or not key:
            raise FeatcacheError(f"bad --model-arg {item!r}: use KEY=VALUE, e.g. img_size=224")
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out
