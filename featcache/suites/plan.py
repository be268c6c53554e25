"""A suite's units of work: one extraction per (model, dataset), one probe per (model,
dataset, method) after it; which are done, and what each costs (`cost`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from featcache.suites.spec import Suite


@dataclass
class Unit:
    key: str  # extract/<model dir>/<dataset dir>, probe/<model dir>/<dataset dir>/<method>
    kind: str  # "extract" | "probe"
    model: str
    dataset: str
    method: str | None
    options: dict[str, Any]  # the command's keywords (featcache.extract / featcache.probe)
    after: str | None = None  # the extraction a probe needs
    caches: list[Any] = field(default_factory=list)  # local paths or RemotePaths
    stamp: str = ""  # a hash of the options: a probe done with other options is not done
    bytes: float | None = None
    flops: float | None = None
    done: bool = False

    @property
    def label(self) -> str:
        what = f"{self.model} × {self.dataset}"
        return f"probe {self.method} {what}" if self.method else f"extract {what}"

    def as_json(self) -> dict[str, Any]:
        return {"key": self.key, "kind": self.kind, "model": self.model,
                "dataset": self.dataset, "method": self.method, "after": self.after,
                "done": self.done, "bytes": self.bytes, "flops": self.flops,
                "caches": [str(c) for c in self.caches]}


def expected_model_dir(model: str, tap: str, weights: str | None) -> str:
    """The cache folder `extract` will write for a model (without building it)."""
    from featcache.backbones import parse_weights
    from featcache.cache.fingerprint import file_sha256
    from featcache.cache.store import model_dir_name

    kind, value = parse_weights(weights)
    weights_id = {"random": lambda: f"random:{value}",
                  "file": lambda: f"file:sha256:{file_sha256(value)}"}.get(kind, lambda: "hub")
    return model_dir_name(model, tap, weights_id())


def stamp(options: dict[str, Any]) -> str:
    blob = json.dumps(options, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def make_plan(suite: Suite, root: Any, done_probes: dict[str, str]) -> list[Unit]:
    """Every unit, models outermost (one backbone build per model when run in order);
    ``done_probes``: the state's finished probe units (key → stamp)."""
    from featcache.extracting.run import ExtractOptions
    from featcache.sources import dataset_dir_name, parse_splits
    from featcache.text import slug

    ext = ExtractOptions(model=suite.models[0], **suite.extract)
    splits = parse_splits(ext.split if isinstance(ext.split, str) else ",".join(ext.split))
    units: list[Unit] = []
    for model in suite.models:
        model_dir = expected_model_dir(model, ext.tap, ext.weights)
        for dataset in suite.datasets:
            data_dir = dataset_dir_name(dataset)
            caches = [root / model_dir / data_dir / slug(s) for s in splits]
            extract = Unit(f"extract/{model_dir}/{data_dir}", "extract", model, dataset, None,
                           {**suite.extract, "model": model, "dataset": [dataset],
                            "cache": str(root)}, caches=caches)
            extract.done = all(_complete(c) for c in caches)
            units.append(extract)
            for method in suite.methods:
                options = {**suite.probe, "method": method, "model": model_dir,
                           "dataset": data_dir, "cache": str(root), "seeds": suite.seeds}
                key = f"probe/{model_dir}/{data_dir}/{method}"
                unit = Unit(key, "probe", model, dataset, method, options, extract.key,
                            stamp=stamp(options))
                unit.done = extract.done and done_probes.get(key) == unit.stamp
                units.append(unit)
    add_costs(units, suite)
    return units


def _complete(path: Any) -> bool:
    from featcache.cache.store import open_cache
    from featcache.errors import FeatcacheError

    if not (path / "zarr.json").is_file():
        return False
    try:
        return open_cache(path).complete
    except (FeatcacheError, OSError):
        return False


def add_costs(units: list[Unit], suite: Suite) -> None:
    """Bytes and FLOPs of each unit where the architecture and dataset size are known."""
    from featcache.options import parse_model_args
    from featcache.suites.cost import (
        cache_bytes,
        dataset_size,
        extract_flops,
        guess_arch,
        probe_flops,
    )

    model_arg = parse_model_args(suite.extract.get("model_arg"))
    all_tokens = bool(suite.extract.get("all_tokens", False))
    for unit in units:
        arch, size = guess_arch(unit.model, model_arg), dataset_size(unit.dataset)
        if arch is None or size is None:
            continue
        n, classes = size
        if unit.kind == "extract":
            unit.bytes = cache_bytes(arch, n, all_tokens)
            unit.flops = extract_flops(arch, n)
        else:
            unit.flops = probe_flops(unit.method or "", arch, n, classes, len(suite.seeds))
