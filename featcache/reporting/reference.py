"""The paper's published numbers, mapped onto featcache's names.

The reference tables (`data/paper_results/perf_table_*.csv`) use the authors' model ids,
experiment labels and dataset display names; the report needs them keyed by our short
names so that a user's run can stand beside the published number for the same setting.
All values are balanced top-1 accuracy in percent, as in the run records. Which model is
which paper id, and every dataset's names, come from the catalogue (`data/catalogue.json`);
which experiment a method and layer set are, from the method's spec.
"""

from __future__ import annotations

import csv
import functools
import io

from featcache.catalogue import data_listing, data_text, model_entries, paper_datasets
from featcache.probing.methods import method_of

LINEAR_EXPERIMENT = "CLS last layer"


@functools.lru_cache(maxsize=1)
def paper_models() -> dict[str, str]:
    """Our model names → their ids in the paper's tables."""
    return {m["name"]: m["paper_id"] for m in model_entries() if m.get("paper_id")}


@functools.lru_cache(maxsize=1)
def paper_dataset_names() -> tuple[str, ...]:
    """The paper's 20 datasets by our short name, in the paper's order."""
    return tuple(paper_datasets())


@functools.lru_cache(maxsize=1)
def _aliases() -> dict[str, str]:
    out: dict[str, str] = {}
    for name, d in paper_datasets().items():
        for alias in (name, *d.aliases):
            out.setdefault(alias.lower().replace("-", "_"), name)
    return out


def normalize_dataset(name: str) -> str:
    """Our short dataset name for any common spelling ("wds/vtab/cifar10" -> "cifar10")."""
    key = name.strip().lower().replace("-", "_")
    aliases = _aliases()
    if key in aliases:
        return aliases[key]
    for prefix in ("wds/vtab/", "wds/", "vtab/", "wds_vtab_", "wds_", "vtab_"):
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    return aliases.get(key, key)


def display_name(dataset: str) -> str:
    """The paper's display name for a dataset, or the name itself when it is not known."""
    d = paper_datasets().get(normalize_dataset(dataset))
    return d.display if d else dataset


def dataset_domain(dataset: str) -> str | None:
    """The paper's domain group ("Structured", ...) or None."""
    d = paper_datasets().get(normalize_dataset(dataset))
    return d.domain if d else None


def paper_model(model: str) -> str | None:
    """The paper's model id for our short name, or None when the model is not in the paper."""
    return paper_models().get(model.strip().lower())


def paper_experiment(method: str, layer_set: str | None = None) -> str | None:
    """The paper's experiment label for (method, layer_set), or None when it has no twin."""
    spec = method_of(method)
    return spec.paper_experiment(layer_set) if spec is not None else None


@functools.lru_cache(maxsize=1)
def paper_tables() -> dict[str, dict[str, dict[str, float]]]:
    """{paper model id: {experiment: {our dataset name: balanced top-1 %}}}.

    Summary rows of the CSVs ("min perf. gain", ...) are dropped; a display name that does
    not map back to one of our datasets keeps its display name as key, so nothing is lost.
    """
    by_display = {d.display: short for short, d in paper_datasets().items()}
    tables: dict[str, dict[str, dict[str, float]]] = {}
    for fname in data_listing("paper_results"):
        if not fname.endswith(".csv"):
            continue
        rows = list(csv.reader(io.StringIO(data_text("paper_results", fname))))
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


@functools.lru_cache(maxsize=1)
def paper_experiments() -> tuple[str, ...]:
    """The paper's ten experiment columns, in its tables' order (CLS linear, all tokens
    attentive, then CLS+AP linear and attentive for last / middle+last / quarterly / all)."""
    for fname in data_listing("paper_results"):
        if fname.endswith(".csv"):
            for row in csv.reader(io.StringIO(data_text("paper_results", fname))):
                if row and row[0] == "Experiment":
                    return tuple(row[1:])
    return ()


def paper_value(model: str, dataset: str, experiment: str) -> float | None:
    """Published balanced top-1 (%) for our model and dataset in one of the paper's
    experiment columns, or None."""
    pm = paper_model(model)
    if pm is None:
        return None
    return paper_tables().get(pm, {}).get(experiment, {}).get(normalize_dataset(dataset))


def paper_number(model: str, dataset: str, method: str, layer_set: str | None = None
                 ) -> float | None:
    """Published balanced top-1 (%) for our (model, dataset, method, layer set), or None."""
    exp = paper_experiment(method, layer_set)
    return None if exp is None else paper_value(model, dataset, exp)


def paper_datasets_of(model: str) -> list[str]:
    """Our names of the datasets the paper reports for a model (ImageNet-1k is not there)."""
    pm = paper_model(model)
    if pm is None:
        return []
    return sorted(paper_tables().get(pm, {}).get(LINEAR_EXPERIMENT, {}))
