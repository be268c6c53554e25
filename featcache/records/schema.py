"""A run record's schema: the files of a run folder and the fields of its `record.json`.

One place for the names: `store` writes and reads these files, `predictions` reads the
test predictions, `featcache.atomic` refuses any output that would land on one of them.
`RecordFields` lists what `featcache probe` writes (`featcache.probing.run`) and what the
report and `featcache runs` read; records are stored and passed around as plain dicts
(JSON), so the schema is a TypedDict, checked by type checkers, not at run time.
"""

from __future__ import annotations

from typing import Any, TypedDict

RECORD_FILE = "record.json"
HEAD_FILE = "head.safetensors"  # the trained head's tensors
PREDICTIONS_FILE = "predictions.safetensors"  # per-sample test predictions
RUN_FILES = (RECORD_FILE, HEAD_FILE, PREDICTIONS_FILE)

# 2: the run's identity (`settings`, `settings_id`); 3: its test predictions; 4: the sha256
# of its head and predictions files (`files`)
RECORD_FORMAT = 4
SETTINGS_ID_LENGTH = 10


class RecordFields(TypedDict, total=False):
    """The keys of a `record.json` (format 4). Older formats lack some; readers take
    `model`, `dataset`, `method`, `layer_set` and `seed` from the folder's name when the
    record does not say them (`featcache.records.store.list_runs`)."""

    format: int  # RECORD_FORMAT when written
    featcache_version: str
    created: str  # "%Y-%m-%dT%H:%M:%S%z"
    # identity: where the run came from
    model: str
    model_dir: str
    dataset: str
    dataset_dir: str
    tap: str
    weights: str
    method: str
    layer_set: str | None
    tokens: list[str]  # "<layer>.<kind>" per input token
    seed: int
    settings: dict[str, Any]  # every setting that changes the numbers
    settings_id: str  # sha256 of `settings`, SETTINGS_ID_LENGTH hex digits
    options: dict[str, Any]  # the options the user set away from the paper's recipe
    # the data and the recipe
    n_train: int
    n_test: int
    n_classes: int
    protocol: str  # "paper" | "clean"
    normalisation: str  # "token" | "channel"
    config: dict[str, Any]
    caches: dict[str, str]  # split → cache path
    fingerprints: dict[str, dict[str, Any]]  # split → the cache's fingerprint
    steps: dict[str, Any]  # the batch plans the grid and the refit took: {grid, refit}
    # the results
    metrics: dict[str, float | None]  # test metrics in percent: balanced_top1, top1, ...
    val_metrics: dict[str, Any]
    selected: dict[str, Any] | None  # the grid point picked on validation
    grid: list[dict[str, Any]]
    per_layer: list[dict[str, Any]]  # `layers` runs: one entry per input token
    per_class: dict[str, Any]
    curves: dict[str, Any]
    attention: dict[str, Any]  # attentive heads: mean attention per input token
    timings: dict[str, float]
    predictions: dict[str, Any]  # {file: PREDICTIONS_FILE, split, n, top_k}
    files: dict[str, Any]  # file name → sha256 (head) or per-array digests (predictions)
    path: str  # added when read: the run's folder (never stored)


def run_variant(rec: dict) -> str:
    """What sets a run's numbers apart from the paper's recipe, as a short label ("" for
    none): the options its user set (`grid=quick, shots=5`), and its precision when not
    float32. Runs of different variants never share a cell; gains are taken over the
    linear baseline of the same variant. Records from before run identities existed name
    only their protocol (those from before protocols scored validation on clean features:
    "protocol=clean")."""
    options = rec.get("options")
    if isinstance(options, dict):
        parts = [f"{k}={_short(v)}" for k, v in sorted(options.items())]
        settings = rec.get("settings") if isinstance(rec.get("settings"), dict) else {}
        if settings.get("precision") not in (None, "fp32"):
            parts.append(f"precision={settings['precision']}")
        if settings.get("stream_buffer_shards"):
            parts.append(f"streamed={settings['stream_buffer_shards']} shards")
        if settings.get("data_parallel_ranks"):  # each rank held its shards: no stream
            parts.append(f"data-parallel={settings['data_parallel_ranks']} ranks")
        return ", ".join(parts)
    protocol = rec.get("protocol") or "clean"
    return "" if protocol == "paper" else f"protocol={protocol}"


def _short(value: object) -> str:
    if isinstance(value, list):
        return "/".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)
