"""Lists and collections of models and datasets: `clip-vit-b16,dinov2-vit-b14`, `paper`,
`natural`. Each element is checked (cheaply: nothing is built or downloaded)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from featcache.errors import FeatcacheError


def split_list(value: str | Sequence[str]) -> list[str]:
    """ "a,b" (the CLI's form) → ["a", "b"]; a list is taken as it is, so that a local
    path holding a comma can be one element of it. Blanks are dropped."""
    parts = str(value).split(",") if isinstance(value, str) else [str(p) for p in value]
    return [p.strip() for p in parts if p.strip()]


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


def expand_models(value: str | Sequence[str]) -> list[str]:
    """Model names with collections expanded, in order, each once; unknown names raise."""
    from featcache.backbones import resolve_model
    from featcache.catalogue import model_collections

    collections = model_collections()
    out: list[str] = []
    for name in split_list(value):
        if name.lower() in collections:
            out += collections[name.lower()]
            continue
        resolve_model(name, {})
        out.append(name)
    if not out:
        raise FeatcacheError(f"no model named in {value!r}; see `featcache models`")
    return _unique(out)


def expand_datasets(value: str | Sequence[str]) -> list[str]:
    """Dataset names with collections expanded (other spellings as the registry's name,
    local paths made absolute), in order, each once; unknown names raise."""
    from featcache.catalogue import dataset_collections

    collections = dataset_collections()
    out: list[str] = []
    for name in split_list(value):
        out += collections.get(name.lower()) or [canonical_dataset(name)]
    if not out:
        raise FeatcacheError(f"no dataset named in {value!r}; see `featcache datasets`")
    return _unique(out)


def canonical_dataset(name: str) -> str:
    """The name `open_dataset` gives the dataset: `FER2013` → `fer2013`,
    `imagefolder:data` → `imagefolder:/abs/data` (unknown names raise its error)."""
    from featcache.registry import DATASETS
    from featcache.sources import open_dataset, parse_dataset_name

    spec, rest = parse_dataset_name(name)
    if spec is not None:
        if spec.local_path and rest:
            return f"{spec.name}:{Path(rest).expanduser().resolve()}"
        return f"{spec.name}:{rest}" if rest else name
    lowered = rest.lower()
    for key, entry in DATASETS.items():
        spellings = {key.lower(), *(a.lower() for a in getattr(entry, "aliases", ()))}
        if lowered in spellings or lowered.replace("-", "_") in spellings:
            return key
    open_dataset(name, "train", download=False)  # raises the registry's own message
    return name  # not reached for an unknown name


def collection_rows(kind: str) -> list[dict[str, object]]:
    """`featcache models` / `featcache datasets`: the collections, as rows."""
    from featcache.catalogue import dataset_collections, model_collections

    table = model_collections() if kind == "models" else dataset_collections()
    return [{"collection": name, "n": len(names), "members": names}
            for name, names in table.items()]


class PairsFailed(FeatcacheError):
    """Some (model, dataset) pairs of a list failed; the others are done (``results``)."""

    def __init__(self, results: list, failures: list[tuple[str, str, str]], total: int) -> None:
        self.results, self.failures = results, failures
        pairs = "; ".join(f"{m} × {d}" for m, d, _ in failures[:5])
        more = f" and {len(failures) - 5} more" if len(failures) > 5 else ""
        super().__init__(f"{len(failures)} of {total} pairs failed ({pairs}{more}); the others "
                         "are done: fix the causes above and run the same command again "
                         "(finished caches are kept)")
