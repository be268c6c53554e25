"""The paper's models and datasets, as one table of data (`data/catalogue.json`).

Everything that needs to know them reads this: the model registry (names, backends, hub
tags, preprocessing), the dataset registry (hub repositories, display names, domains,
sizes, other spellings) and the paper's reference numbers (the models' ids in its
tables). Importing this module registers the models.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from featcache.registry import MODELS


@dataclass(frozen=True)
class PaperDataset:
    """One of the paper's 20 datasets (CLIP-benchmark webdatasets on the hub)."""

    name: str  # featcache's short name: "fer2013"
    hub: str  # the hub repository: "clip-benchmark/wds_fer2013"
    paper_key: str  # the authors' key: "wds/fer2013"
    display: str  # the paper's spelling: "FER2013"
    domain: str
    classes: int
    train_size: int
    aliases: tuple[str, ...] = ()


def data_text(*parts: str) -> str:
    """Shipped package data (the source tree's when the package is not installed)."""
    try:
        return resources.files("featcache").joinpath("data", *parts).read_text(encoding="utf-8")
    except (OSError, TypeError, ModuleNotFoundError, NotADirectoryError):
        return Path(__file__).with_name("data").joinpath(*parts).read_text(encoding="utf-8")


def data_listing(folder: str) -> list[str]:
    """File names in a package-data folder (same fallback as `data_text`)."""
    try:
        node = resources.files("featcache").joinpath("data", folder)
        return sorted(p.name for p in node.iterdir())
    except (OSError, TypeError, ModuleNotFoundError, NotADirectoryError):
        return sorted(p.name for p in Path(__file__).with_name("data").joinpath(folder).iterdir())


@functools.lru_cache(maxsize=1)
def _table() -> dict[str, Any]:
    return json.loads(data_text("catalogue.json"))


@functools.lru_cache(maxsize=1)
def paper_datasets() -> dict[str, PaperDataset]:
    """The paper's datasets by short name, in the paper's order."""
    return {d["name"]: PaperDataset(**{**d, "aliases": tuple(d.get("aliases", ()))})
            for d in _table()["datasets"]}


# `--dataset natural` etc.: the catalogue's domains ("Natural (single-domain)" is natural)
DOMAIN_COLLECTIONS = {"natural": "Natural", "specialized": "Specialized",
                      "structured": "Structured"}


def dataset_collections() -> dict[str, list[str]]:
    """Names that stand for several datasets: `paper` (its 20) and the three domains."""
    rows = list(paper_datasets().values())
    out = {"paper": [d.name for d in rows]}
    for key, prefix in DOMAIN_COLLECTIONS.items():
        out[key] = [d.name for d in rows if d.domain.startswith(prefix)]
    return out


def model_collections() -> dict[str, list[str]]:
    """Names that stand for several models: `paper` (the 9 of its tables)."""
    return {"paper": [m["name"] for m in model_entries() if m.get("paper_id")]}


@dataclass(frozen=True)
class ShiftDataset:
    """A test set under distribution shift of a training dataset (``of``): CLIP_benchmark's
    imagenet_robustness collection, for `featcache evaluate`. ``keeps``: the indices of
    ``of``'s classes it keeps, "all", or None when its class names are its own."""

    name: str
    hub: str
    display: str
    of: str
    classes: int
    test_size: int
    keeps: Any
    about: str
    aliases: tuple[str, ...] = ()


@functools.lru_cache(maxsize=1)
def shift_datasets() -> dict[str, ShiftDataset]:
    """The robustness test sets by short name (`featcache evaluate --dataset NAME`)."""
    return {d["name"]: ShiftDataset(**{**d, "aliases": tuple(d.get("aliases", ()))})
            for d in _table().get("shift_datasets", [])}


def model_entries() -> list[dict[str, Any]]:
    return [dict(m) for m in _table()["models"]]


def _register_models() -> None:
    from featcache.backbones.spec import ModelSpec

    for entry in model_entries():
        if entry.get("token_kinds") is not None:
            entry["token_kinds"] = tuple(entry["token_kinds"])
        MODELS.add(entry["name"], ModelSpec(**entry))


_register_models()
