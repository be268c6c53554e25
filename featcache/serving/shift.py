"""`featcache evaluate`: a trained probe scored on another dataset's cache of the same
backbone, without running the backbone again (distribution shift: ImageNet-V2, -Sketch,
-R, -A, ObjectNet for a probe trained on ImageNet; DINOv2 §7.2, CLIP_benchmark's
`imagenet_robustness`).

Classes are matched by name (case, spaces and underscores aside), or through a class map
(JSON: test class → training class, or a list of them). Each test class scores with the
best logit of its training classes: a test set with a subset of the classes (ImageNet-R
and -A keep 200 of the 1,000) is scored on the logits restricted to that subset, as is
standard; ObjectNet's classes that stand for several ImageNet classes take their best.
The metrics are the record's (`featcache.probing.selection.logit_metrics`) over the test set's
classes, so on the run's own test cache they are the record's test metrics exactly.

Results are kept beside the run, in `<run>/shift/<dataset>-<split>.json` (its
record.json stays as written); the report's table "Under shift" reads them
(`featcache.reporting.under_shift`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featcache.errors import FeatcacheError
from featcache.reporting.under_shift import SHIFT_DIR


def evaluate(run_dir: str | Path, dataset: str | None = None, split: str = "test",
             cache: str | Path | None = None, test_cache: str | Path | None = None,
             class_map: str | Path | None = None, device: str = "auto") -> dict[str, Any]:
    """`featcache evaluate`: the run's selected head (or k-NN) on a cache of another
    dataset: ``dataset`` (a name as `extract` takes it, or as `featcache ls` shows a cache
    under ``cache``, default the run's own cache root) or ``test_cache`` (a cache folder).
    Returns (and keeps beside the run) {"metrics": …, "n": …, …}."""
    from featcache.distributed import resolve_device
    from featcache.serving.inference import load_trained

    if (dataset is None) == (test_cache is None):
        raise FeatcacheError("name the test set: --dataset NAME or --test-cache PATH (one "
                             "of them)")
    dev = resolve_device(device)
    probe = load_trained(run_dir, dev)
    test = (_open_test_cache(Path(test_cache)) if test_cache is not None
            else find_test_cache(probe.record, dataset, split, cache))
    check_backbone(probe.record, test)
    mapping = read_class_map(class_map) if class_map is not None else {}
    columns = class_columns(probe.class_names, test.class_names, mapping, test.path)
    logits, y, n = _score(probe, test, dev)
    restricted = restrict(logits, columns)
    from featcache.probing.selection import logit_metrics

    metrics = logit_metrics(restricted, torch.as_tensor(y), len(columns))
    result = _result(probe, test, metrics, n, columns, class_map)
    result["file"] = str(save(Path(run_dir).expanduser(), result))
    return result


def _score(probe: Any, test: Any, device: torch.device) -> tuple[torch.Tensor, np.ndarray,
                                                                  int]:
    """The probe's logits on the test cache's valid rows, computed as its record's were."""
    from featcache.probing.tokens.features import load_source

    if probe.all_tokens and not test.has_all_tokens:
        raise FeatcacheError(f"the run reads every token of the last layer and {test.path} "
                             "has none; extract it with --all-tokens")
    keep = np.flatnonzero(test.valid())
    if not len(keep):
        raise FeatcacheError(f"{test.path} holds no valid sample to score")
    src = load_source(test, probe.tokens, device, normalise=probe.normalisation)
    return probe.score(src.subset(keep)), test.labels()[keep], len(keep)


# -- which cache ------------------------------------------------------------------------

def find_test_cache(record: dict[str, Any], dataset: str, split: str,
                    cache: str | Path | None) -> Any:
    """The ``split`` cache of ``dataset`` for the run's model folder under the root; the
    extract command that makes it when there is none."""
    from featcache.cache.store import default_cache_root, find_caches
    from featcache.sources import dataset_dir_name

    root = Path(cache).expanduser() if cache is not None else _run_cache_root(record) \
        or default_cache_root()
    model_dir = str(record.get("model_dir") or record.get("model"))
    try:
        folder = dataset_dir_name(dataset)
    except FeatcacheError:
        folder = dataset
    names = {dataset, folder}
    found = [c for c in find_caches(root) if c.path.parent.parent.name == model_dir
             and c.split == split and names & {c.dataset, c.path.parent.name}]
    if not found:
        raise FeatcacheError(f"no {split!r} cache of {dataset} for {model_dir} under {root}; "
                             f"make it with `{extract_command(record, dataset, split, root)}`")
    if not found[0].complete:
        raise FeatcacheError(f"{found[0].path} is incomplete (re-run its `featcache extract` "
                             "command to finish it)")
    return found[0]


def _run_cache_root(record: dict[str, Any]) -> Path | None:
    """The root the run's own caches sit under (<root>/<model>/<dataset>/<split>)."""
    where = (record.get("caches") or {}).get("train")
    if not where:
        return None
    root = Path(where).parent.parent.parent
    return root if root.is_dir() else None


def extract_command(record: dict[str, Any], dataset: str, split: str, root: Path) -> str:
    """The `featcache extract` line that makes the missing cache for the run's backbone."""
    model = (record.get("fingerprints") or {}).get("train", {}).get("model", {})
    parts = ["featcache extract", f"--model {record.get('model')}", f"--dataset {dataset}",
             f"--split {split}", f"--cache {root}"]
    if model.get("tap", "reference") != "reference":
        parts.append(f"--tap {model['tap']}")
    weights = str(model.get("weights") or "")
    if weights.startswith("random:"):
        parts.append(f"--weights {weights}")
    elif weights.startswith("file:"):
        parts.append("--weights PATH (the run's checkpoint)")
    if (record.get("tokens") or [""])[0].startswith("final.token"):
        parts.append("--all-tokens")
    return " ".join(parts)


def _open_test_cache(path: Path) -> Any:
    from featcache.cache.store import open_cache

    cache = open_cache(path.expanduser())
    if not cache.complete:
        raise FeatcacheError(f"{cache.path} is incomplete (re-run its `featcache extract` "
                             "command to finish it)")
    return cache


def check_backbone(record: dict[str, Any], test: Any) -> None:
    """The test cache must hold the run's backbone's tokens: the fingerprints' model
    parts are compared; the first difference is the one line."""
    from featcache.cache.fingerprint import fingerprint_diff

    mine = ((record.get("fingerprints") or {}).get("train") or {}).get("model")
    if not isinstance(mine, dict):
        raise FeatcacheError(f"{record.get('path')}: the record names no backbone fingerprint"
                             "; run the same `featcache probe` command again with --force")
    diff = fingerprint_diff(mine, test.fingerprint.get("model") or {})
    if diff:
        raise FeatcacheError(f"{test.path} was made with another backbone than the run "
                             f"({diff[0]}); extract the test set with the run's model")


# -- which classes ----------------------------------------------------------------------

def read_class_map(path: str | Path) -> dict[str, list[str]]:
    """--class-map FILE: JSON {test class: training class or [training classes]}."""
    file = Path(path).expanduser()
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise FeatcacheError(f"cannot read the class map {file} ({why}); give a JSON object "
                             "{\"test class\": \"training class\", …}") from None
    if not isinstance(raw, dict):
        raise FeatcacheError(f"the class map {file} holds a JSON {type(raw).__name__}; give "
                             "an object {\"test class\": \"training class\", …}")
    out = {}
    for key, value in raw.items():
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not names or \
                not all(isinstance(v, str) for v in names):
            raise FeatcacheError(f"the class map {file}: {key!r} maps to {value!r}; give a "
                                 "training class name or a list of them")
        out[str(key)] = names
    return out


def _key(name: str) -> str:
    return " ".join(str(name).lower().replace("_", " ").split())


def class_columns(train_names: list[str], test_names: list[str],
                  mapping: dict[str, list[str]], where: Any = "") -> list[list[int]]:
    """Per test class (in its label order), the training classes whose best logit scores
    it: the class map's, else the one of the same name. A class that maps to nothing, or
    a map naming a class the run was not trained on, is one line naming it."""
    index = {_key(n): i for i, n in enumerate(train_names)}
    by_key = {_key(k): v for k, v in mapping.items()}
    columns = []
    for name in test_names:
        wanted = by_key.get(_key(name), [name])
        unknown = [w for w in wanted if _key(w) not in index]
        if unknown:
            why = (f"the class map sends it to {unknown[0]!r}, not a class of the run"
                   if _key(name) in by_key else "the run has no class of that name")
            raise FeatcacheError(f"{where}: test class {name!r} maps to nothing ({why}); give "
                                 "--class-map FILE (JSON: test class → training class)")
        columns.append(sorted({index[_key(w)] for w in wanted}))
    return columns


def restrict(logits: torch.Tensor, columns: list[list[int]]) -> torch.Tensor:
    """(N, C_test) logits: each test class's best over its training classes' logits (the
    training classes' own logits, unchanged, when each maps to one)."""
    if all(len(c) == 1 for c in columns):
        return logits[:, [c[0] for c in columns]]
    return torch.stack([logits[:, c].amax(1) for c in columns], 1)


# -- kept beside the run ------------------------------------------------------------------

def _result(probe: Any, test: Any, metrics: dict[str, Any], n: int,
            columns: list[list[int]], class_map: Any) -> dict[str, Any]:
    record = probe.record
    kept = sorted({i for c in columns for i in c})
    return {
        "metrics": {k: v for k, v in metrics.items() if k != "per_class"},
        "n": n,
        "test_dataset": test.dataset,
        "test_dataset_dir": test.path.parent.name,
        "split": test.split,
        "test_cache": str(test.path),
        "classes": len(columns),
        "training_classes_scored": len(kept),
        "class_map": None if class_map is None else str(class_map),
        "per_class": {"class_names": test.class_names, "accuracy": metrics.get("per_class")},
        "run": str(probe.path),
        "model": record.get("model"), "dataset": record.get("dataset"),
        "method": record.get("method"), "layer_set": record.get("layer_set"),
        "seed": record.get("seed"), "settings_id": record.get("settings_id"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def save(run_dir: Path, result: dict[str, Any]) -> Path:
    """`<run>/shift/<dataset>-<split>.json`, written whole or not at all."""
    from featcache import atomic
    from featcache.records.store import strict_json
    from featcache.text import slug

    file = run_dir / SHIFT_DIR / f"{slug(result['test_dataset_dir'])}-{result['split']}.json"
    file.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(file, json.dumps(strict_json(result), indent=1, allow_nan=False))
    return file
