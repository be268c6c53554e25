"""The suite file: what a benchmark is (models × datasets × methods × seeds) and how each
command runs, under the commands' own option names. Everything is checked before anything
runs; a mistake is one line naming the file, the key and what is accepted."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from featcache.errors import FeatcacheError

# Keys a suite fixes for every unit itself (models, datasets, methods, seeds, cache).
EXTRACT_FIXED = {"model", "dataset", "cache"}
PROBE_FIXED = {"method", "model", "dataset", "cache", "seeds"}
REPORT_KEYS = {"out": str, "format": list[str] | str, "cka": bool, "resamples": int}
TOP_KEYS = {"name": str, "models": list[str] | str, "datasets": list[str] | str,
            "methods": list[str] | str, "seeds": list[int], "cache": str}
SECTIONS = ("extract", "probe", "report", "launcher")
LAUNCHER_KEYS: dict[str, Any] = {
    "name": str, "partition": str, "gpus_per_job": int, "ranks_per_job": int,
    "cpus_per_task": int, "mem_gb": float, "time": str, "array_parallelism": int,
    "account": str, "qos": str, "constraint": str, "setup": list[str], "devices": list[int],
}
LAUNCHERS = ("local", "slurm")
SHIPPED = ("paper",)  # suites in the package: `featcache run paper`


@dataclass
class Suite:
    path: Path
    name: str
    models: list[str]
    datasets: list[str]
    methods: list[str]
    seeds: list[int]
    cache: Any  # a folder (Path), an object store's root (RemotePath), or None
    extract: dict[str, Any] = field(default_factory=dict)
    probe: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    launcher: dict[str, Any] = field(default_factory=lambda: {"name": "local"})


def suite_text(suite: str | Path) -> tuple[Path, str]:
    """(path, text) of a suite file, or of a shipped suite by name (`paper`)."""
    path = Path(suite).expanduser().absolute()
    if str(suite) in SHIPPED and not path.exists():
        from featcache.catalogue import data_text

        return Path(f"<featcache>/data/suites/{suite}.toml"), data_text("suites", f"{suite}.toml")
    if not path.is_file():
        shipped = ", ".join(SHIPPED)
        raise FeatcacheError(f"suite file {suite} does not exist; give a TOML file (see "
                             f"docs/suites.md) or a shipped suite: {shipped}")
    return path, path.read_text(encoding="utf-8")


def load_suite(suite: str | Path) -> Suite:
    """Read and check a suite: keys, types, every command option, every model and dataset."""
    path, text = suite_text(suite)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FeatcacheError(f"{path}: not valid TOML: {exc}") from None
    where = str(path)
    _check_keys(where, "", data, {**TOP_KEYS, **dict.fromkeys(SECTIONS, dict)})
    for key in ("models", "datasets"):
        if key not in data:
            raise FeatcacheError(f"{where}: the key {key!r} is missing; give a list of names "
                                 "or collections (`featcache models` / `featcache datasets`)")
    suite = Suite(path, data.get("name") or path.stem,
                  _names(where, "models", data["models"]),
                  _names(where, "datasets", data["datasets"]),
                  _methods(where, data.get("methods", ["linear", "concat", "alf"])),
                  list(data.get("seeds", [0])), _cache(path, data.get("cache")),
                  _section(where, "extract", data, _option_types("extract"), EXTRACT_FIXED),
                  _section(where, "probe", data, _option_types("probe"), PROBE_FIXED),
                  _section(where, "report", data, REPORT_KEYS, set()),
                  {"name": "local", **_section(where, "launcher", data, LAUNCHER_KEYS, set())})
    _check_commands(where, suite)
    return suite


def _check_keys(where: str, section: str, data: dict[str, Any], types_: dict[str, Any]) -> None:
    prefix = f"[{section}] " if section else ""
    for key, value in data.items():
        if key not in types_:
            raise FeatcacheError(f"{where}: {prefix}unknown key {key!r}; accepted: "
                                 f"{', '.join(sorted(types_))}")
        if not accepts(types_[key], value):
            raise FeatcacheError(f"{where}: {prefix}{key} = {value!r} is not "
                                 f"{describe(types_[key])}")


def _section(where: str, name: str, data: dict[str, Any], types_: dict[str, Any],
             fixed: set[str]) -> dict[str, Any]:
    values = data.get(name, {})
    for key in fixed & set(values):
        raise FeatcacheError(f"{where}: [{name}] {key} is set by the suite itself (its models, "
                             "datasets, methods, seeds and cache keys); remove it here")
    _check_keys(where, name, values, {k: v for k, v in types_.items() if k not in fixed})
    return dict(values)


def _option_types(command: str) -> dict[str, Any]:
    from featcache.extracting.run import ExtractOptions
    from featcache.probing.run import ProbeOptions

    cls = ExtractOptions if command == "extract" else ProbeOptions
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _names(where: str, key: str, value: Any) -> list[str]:
    from featcache.suites.names import expand_datasets, expand_models

    try:
        return (expand_models if key == "models" else expand_datasets)(value)
    except FeatcacheError as exc:
        raise FeatcacheError(f"{where}: {key}: {exc}") from None


def _methods(where: str, value: Any) -> list[str]:
    from featcache.probing.methods import METHODS
    from featcache.suites.names import split_list

    names = split_list(value)
    known = METHODS.names()
    for name in names:
        if name not in known:
            raise FeatcacheError(f"{where}: methods: unknown method {name!r}; accepted: "
                                 f"{', '.join(known)}")
    if not names:
        raise FeatcacheError(f"{where}: methods is empty; accepted: {', '.join(known)}")
    return list(dict.fromkeys(names))


def _cache(path: Path, value: str | None) -> Any:
    """A relative cache folder is relative to the suite file, not to where it is run; a
    URL (s3://bucket/prefix) is an object store's root, never a folder named `s3:`."""
    from featcache.cache.stores import location, url_scheme

    if value is None:
        return None
    if url_scheme(value):
        return location(value, f"{path}: cache")
    cache = Path(value).expanduser()
    return cache if cache.is_absolute() else path.parent / cache


def _check_commands(where: str, suite: Suite) -> None:
    """The commands' own checks of their options (ranges, choices), with the file named."""
    from featcache.extracting.run import ExtractOptions
    from featcache.probing.run import ProbeOptions, check_options

    if suite.launcher["name"] not in LAUNCHERS:
        raise FeatcacheError(f"{where}: [launcher] name = {suite.launcher['name']!r}; "
                             f"accepted: {', '.join(LAUNCHERS)}")
    if any(s < 0 for s in suite.seeds) or not suite.seeds:
        raise FeatcacheError(f"{where}: seeds = {suite.seeds} must be whole numbers >= 0")
    try:
        _check_extract(ExtractOptions(model=suite.models[0], **suite.extract))
    except FeatcacheError as exc:
        raise FeatcacheError(f"{where}: [extract] {exc}") from None
    try:
        for method in suite.methods:
            check_options(ProbeOptions(method=method, seeds=suite.seeds, **suite.probe))
    except FeatcacheError as exc:
        raise FeatcacheError(f"{where}: [probe] {exc}") from None


def _check_extract(opts: Any) -> None:
    """`featcache extract`'s own cheap checks (nothing built, nothing downloaded)."""
    from featcache.backbones import parse_weights
    from featcache.backbones.spec import check_tap
    from featcache.options import check_int, parse_model_args
    from featcache.sources import parse_splits

    check_int(opts.batch_size, "--batch-size")
    check_int(opts.workers, "--workers", 0)
    check_int(opts.shard_size, "--shard-size")
    parse_splits(opts.split if isinstance(opts.split, str) else ",".join(opts.split))
    parse_model_args(opts.model_arg)
    parse_weights(opts.weights)
    check_tap(opts.tap)


# -- types ------------------------------------------------------------------------------

def accepts(hint: Any, value: Any) -> bool:
    """Whether a TOML value fits an option's annotation (str | Sequence[int] | None, ...)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(accepts(arg, value) for arg in typing.get_args(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint in (str, Path):
        return isinstance(value, str)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if origin in (list, tuple, typing.Sequence, _abc_sequence()) or hint is list:
        args = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(accepts(args[0], v) for v in value)
    return False


def _abc_sequence() -> Any:
    import collections.abc

    return collections.abc.Sequence


def describe(hint: Any) -> str:
    """`int | None` → "a whole number"; for the one line a wrong type gets."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [describe(a) for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(dict.fromkeys(parts))
    if origin in (list, tuple, _abc_sequence()):
        args = typing.get_args(hint) or (Any,)
        return f"a list of {describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "text",
             Path: "a path (text)", dict: "a table"}
    return names.get(hint, names.get(origin, "a table" if origin is dict else str(hint)))
