"""The paper's published numbers, mapped onto featcache's names.

The reference tables (`data/paper_results/perf_table_*.csv`) use the authors' model ids,
experiment labels and dataset display names; the report needs them keyed by our short
names so that a user's run can stand beside the published number for the same setting.
All values are balanced top-1 accuracy in percent, as in the run records.
"""

from __future__ import annotations

import csv
import functools
import io
import json
from importlib import resources
from pathlib import Path

# Our model short names -> the `base_model` id in the paper's tables.
PAPER_MODELS: dict[str, str] = {
    "clip-vit-b32": "OpenCLIP_ViT-B-32_openai",
    "clip-vit-b16": "OpenCLIP_ViT-B-16_openai",
    "clip-vit-l14": "OpenCLIP_ViT-L-14_openai",
    "dinov2-vit-s14": "dinov2-vit-small-p14",
    "dinov2-vit-b14": "dinov2-vit-base-p14",
    "dinov2-vit-l14": "dinov2-vit-large-p14",
    "vit-s16": "vit_small_patch16_224",
    "vit-b16": "vit_base_patch16_224",
    "vit-l16": "vit_large_patch16_224",
}

# The 20 datasets of the paper, by our short name (the order of the paper's domains).
PAPER_DATASETS: tuple[str, ...] = (
    "stl10", "cifar10", "caltech101", "voc2007", "imagenet1k", "cifar100", "country211",
    "pets", "flowers", "cars", "fgvc_aircraft", "gtsrb", "svhn",
    "pcam", "eurosat", "resisc45", "diabetic_retinopathy",
    "dtd", "fer2013", "dmlab",
)

# Other spellings users (or other registries) give the same datasets.
_DATASET_ALIASES: dict[str, str] = {
    "imagenet": "imagenet1k", "imagenet_1k": "imagenet1k", "in1k": "imagenet1k",
    "oxford_pets": "pets", "oxford_iiit_pet": "pets", "pet": "pets",
    "flowers102": "flowers", "oxford_flowers102": "flowers",
    "stanford_cars": "cars", "fgvc": "fgvc_aircraft", "aircraft": "fgvc_aircraft",
    "caltech": "caltech101", "voc": "voc2007", "pascal_voc2007": "voc2007",
    "stl_10": "stl10", "cifar_10": "cifar10", "cifar_100": "cifar100",
    "country_211": "country211", "resisc": "resisc45", "retinopathy": "diabetic_retinopathy",
    "patch_camelyon": "pcam", "fer": "fer2013",
}

_LAYER_SET_ALIASES: dict[str, str] = {
    "last": "last", "final": "last",
    "middle+last": "middle+last", "middle_last": "middle+last", "middle-last": "middle+last",
    "mid+last": "middle+last",
    "quarterly": "quarterly", "quarters": "quarterly",
    "all": "all",
}

_LAYER_SET_PHRASE: dict[str, str] = {
    "last": "CLS+AP last layer",
    "middle+last": "CLS+AP layers from middle & last blocks",
    "quarterly": "CLS+AP layers from quarterly blocks",
    "all": "CLS+AP layers from all blocks",
}

LINEAR_EXPERIMENT = "CLS last layer"
ATTENTIVE_EXPERIMENT = "All tokens last layer (attentive)"


def _data_text(*parts: str) -> str:
    """Read shipped package data; falls back to the source tree (namespace/editable)."""
    try:
        node = resources.files("featcache").joinpath("data", *parts)
        return node.read_text(encoding="utf-8")
    except (OSError, TypeError, ModuleNotFoundError, NotADirectoryError):
        return Path(__file__).with_name("data").joinpath(*parts).read_text(encoding="utf-8")


def _data_listing(folder: str) -> list[str]:
    """File names in a package-data folder (same fallback as `_data_text`)."""
    try:
        node = resources.files("featcache").joinpath("data", folder)
        return sorted(p.name for p in node.iterdir())
    except (OSError, TypeError, ModuleNotFoundError, NotADirectoryError):
        return sorted(p.name for p in Path(__file__).with_name("data").joinpath(folder).iterdir())


def normalize_dataset(name: str) -> str:
    """Our short dataset name for any common spelling ("wds/vtab/cifar10" -> "cifar10")."""
    key = name.strip().lower().replace("-", "_")
    for prefix in ("wds/vtab/", "wds/", "vtab/", "wds_vtab_", "wds_", "vtab_"):
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    return _DATASET_ALIASES.get(key, key)


def normalize_layer_set(layer_set: str | None) -> str | None:
    """Canonical named layer set, or None for an explicit list like "3,7,11"."""
    if layer_set is None:
        return None
    return _LAYER_SET_ALIASES.get(str(layer_set).strip().lower())


@functools.lru_cache(maxsize=1)
def dataset_info() -> dict[str, dict]:
    """dataset_info.json keyed by our short name (ImageNet's several keys collapse to one)."""
    raw = json.loads(_data_text("dataset_info.json"))
    out: dict[str, dict] = {}
    for key, info in raw.items():
        short = normalize_dataset(key)
        if short not in out or key.startswith("wds/"):
            out[short] = dict(info, key=key)
    return out


def display_name(dataset: str) -> str:
    """The paper's display name for a dataset, or the name itself when it is not known."""
    info = dataset_info().get(normalize_dataset(dataset))
    return info["name"] if info else dataset


def dataset_domain(dataset: str) -> str | None:
    """The paper's domain group ("Structured", ...) or None."""
    info = dataset_info().get(normalize_dataset(dataset))
    return info["domain"] if info else None


def paper_model(model: str) -> str | None:
    """The paper's model id for our short name, or None when the model is not in the paper."""
    return PAPER_MODELS.get(model.strip().lower())


def paper_experiment(method: str, layer_set: str | None = None) -> str | None:
    """The paper's experiment label for (method, layer_set), or None when it has no twin."""
    method = method.strip().lower()
    if method == "linear":
        return LINEAR_EXPERIMENT
    if method == "attentive":
        return ATTENTIVE_EXPERIMENT
    ls = normalize_layer_set(layer_set if layer_set is not None else "all")
    if ls is None:
        return None
    if method == "concat":
        return f"{_LAYER_SET_PHRASE[ls]} (linear)"
    if method == "alf":
        return f"{_LAYER_SET_PHRASE[ls]} (attentive)"
    return None


@functools.lru_cache(maxsize=1)
def paper_tables() -> dict[str, dict[str, dict[str, float]]]:
    """{paper model id: {experiment: {our dataset name: balanced top-1 %}}}.

    Summary rows of the CSVs ("min perf. gain", ...) are dropped; a display name that does
    not map back to one of our datasets keeps its display name as key, so nothing is lost.
    """
    by_display = {info["name"]: short for short, info in dataset_info().items()}
    tables: dict[str, dict[str, dict[str, float]]] = {}
    for fname in _data_listing("paper_results"):
        if not fname.endswith(".csv"):
            continue
        rows = list(csv.reader(io.StringIO(_data_text("paper_results", fname))))
        header = {r[0]: r[1:] for r in rows[:3] if r}
        models = {m for m in header.get("base_model", []) if m}
        experiments = header.get("Experiment", [])
        if len(models) != 1 or not experiments:
            continue
        table: dict[str, dict[str, float]] = {exp: {} for exp in experiments}
        for row in rows:
            if not row or row[0] in ("base_model", "Experiment", "dataset_fmt"):
                continue
            if "perf. gain" in row[0]:
                continue
            dataset = by_display.get(row[0], row[0])
            for exp, cell in zip(experiments, row[1:], strict=False):
                try:
                    table[exp][dataset] = float(cell)
                except ValueError:
                    continue
        tables[models.pop()] = table
    return tables


def paper_number(model: str, dataset: str, method: str, layer_set: str | None = None
                 ) -> float | None:
    """Published balanced top-1 (%) for our (model, dataset, method, layer set), or None."""
    pm = paper_model(model)
    exp = paper_experiment(method, layer_set)
    if pm is None or exp is None:
        return None
    return paper_tables().get(pm, {}).get(exp, {}).get(normalize_dataset(dataset))


def paper_datasets(model: str) -> list[str]:
    """Our names of the datasets the paper reports for a model (ImageNet-1k is not there)."""
    pm = paper_model(model)
    if pm is None:
        return []
    return sorted(paper_tables().get(pm, {}).get(LINEAR_EXPERIMENT, {}))


def paper_mean(model: str, method: str, layer_set: str | None = None,
               datasets: list[str] | None = None) -> float | None:
    """Mean published number over `datasets` (default: all the paper has for the model)."""
    names = datasets if datasets is not None else paper_datasets(model)
    vals = [paper_number(model, d, method, layer_set) for d in names]
    if not vals or any(v is None for v in vals):
        return None
    return sum(vals) / len(vals)  # type: ignore[arg-type]
