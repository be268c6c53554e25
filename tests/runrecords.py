"""Synthetic run records for report tests, shaped like the probe's `record.json`.

Values are drawn from a seeded generator so tests can recompute every expected number
from the files themselves, independently of the report's code.
"""

from __future__ import annotations

import copy
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np

N_BLOCKS = 12
LAYER_SETS = {
    "last": ["final"],
    "middle+last": ["block6", "final"],
    "quarterly": ["block3", "block6", "block9", "final"],
    "all": [f"block{i}" for i in range(1, N_BLOCKS)] + ["final"],
}


def tokens_for(method: str, layer_set: str) -> list[str]:
    """The head's input tokens in order, as the probe names them."""
    if method == "linear":
        return ["final.cls"]
    if method == "attentive":
        return [f"final.tok{i}" for i in range(197)]
    layers = LAYER_SETS.get(layer_set) or [f"block{i}" for i in layer_set.split(",")]
    return [f"{layer}.{kind}" for layer in layers for kind in ("cls", "ap")]


def base_record() -> dict[str, Any]:
    """A complete record with the contract's keys (linear, clip-vit-b16, fer2013, seed 0)."""
    return {
        "format": 1, "featcache_version": "0.1.0", "created": "2026-11-21T12:00:00Z",
        "model": "clip-vit-b16", "model_dir": "clip-vit-b16", "dataset": "fer2013",
        "tap": "reference", "weights": "hub:openai",
        "method": "linear", "layer_set": "last", "tokens": ["final.cls"], "seed": 0,
        "protocol": "paper",
        "config": {"epochs": 40, "batch_size": 2048, "lrs": [0.1, 0.01, 0.001],
                   "wds": [1e-6, 1e-4], "dropouts": [0.0]},
        "caches": {"train": "/nonexistent/train", "test": "/nonexistent/test"},
        "fingerprints": {"train": {"model": "clip-vit-b16"}, "test": {"model": "clip-vit-b16"}},
        "grid": [{"lr": 0.1, "wd": 1e-6, "dropout": 0.0, "val_balanced_top1": 60.0}],
        "selected": {"lr": 0.01, "wd": 1e-4, "dropout": 0.0},
        "val_metrics": {"top1": 66.0, "top5": 97.0, "balanced_top1": 64.0,
                        "balanced_top5": 96.0},
        "metrics": {"top1": 66.5, "top5": 97.5, "balanced_top1": 64.1, "balanced_top5": 96.5},
        "per_class": {"class_names": ["a", "b"], "accuracy": [60.0, 68.2]},
        "curves": {"train_loss": [2.0, 1.0, 0.5]},
        "attention": None,
        "per_layer": None,
        "timings": {"total_s": 12.3},
    }


def write_record(runs_root: str | Path, **overrides: Any) -> Path:
    """Write one record.json (base record updated with `overrides`) at the contract path."""
    rec = base_record()
    rec.update(copy.deepcopy(overrides))
    if "model_dir" not in overrides:
        rec["model_dir"] = rec["model"]
    if "tokens" not in overrides:
        rec["tokens"] = tokens_for(rec["method"], rec["layer_set"])
    run = Path(runs_root) / rec["model_dir"] / rec["dataset"] / (
        f"{rec['method']}-{rec['layer_set']}-seed{rec['seed']}")
    run.mkdir(parents=True, exist_ok=True)
    (run / "record.json").write_text(json.dumps(rec, indent=1), encoding="utf-8")
    return run


# The realistic set: one model in the paper, one not; fer2013/svhn are paper datasets.
MODELS = ("clip-vit-b16", "tiny-vit")
DATASETS = ("fer2013", "svhn", "digits")
METHODS = (("linear", "last"), ("concat", "all"), ("alf", "all"), ("layers", "all"))
SEEDS = (0, 1)
MISSING = ("tiny-vit", "digits", "alf")  # this pair has no ALF runs
_OFFSET = {"linear": 0.0, "concat": 2.5, "alf": 5.0, "layers": 1.0}


def write_realistic_set(runs_root: str | Path, seed: int = 0) -> list[Path]:
    """2 models × 3 datasets × {linear, concat, alf, layers} × 2 seeds, minus ALF for
    (tiny-vit, digits); ALF runs carry attention, `layers` runs per-layer results."""
    rng = np.random.default_rng(seed)
    paths = []
    for model in MODELS:
        for dataset in DATASETS:
            base = 50.0 + 20.0 * rng.random()
            for method, layer_set in METHODS:
                if (model, dataset, method) == MISSING:
                    continue
                for s in SEEDS:
                    bal = round(base + _OFFSET[method] + rng.normal(0, 0.7), 4)
                    tokens = tokens_for(method, layer_set)
                    extra: dict[str, Any] = {}
                    if method == "alf":
                        w = rng.random(len(tokens)) + 0.05
                        extra["attention"] = {"tokens": tokens,
                                              "mean": (w / w.sum()).round(6).tolist()}
                    if method == "layers":
                        per_layer = []
                        names = [f"block{i}" for i in range(N_BLOCKS)] + ["final"]
                        for depth, name in enumerate(names):
                            for kind in ("cls", "ap"):
                                v = base - 25 + 25 * depth / N_BLOCKS + rng.normal(0, 1)
                                per_layer.append({"layer": name, "token": kind,
                                                  "balanced_top1": round(v, 4),
                                                  "top1": round(v + 1, 4),
                                                  "val_balanced_top1": round(
                                                      v + rng.normal(0, 1), 4)})
                        extra["per_layer"] = per_layer
                        # as the probe does: the layer with the best validation score
                        best = max(per_layer, key=lambda e: e["val_balanced_top1"])
                        bal = best["balanced_top1"]
                        extra["selected"] = {"lr": 0.01, "wd": 1e-4, "layer": best["layer"]}
                    key = zlib.crc32(f"{model}/{dataset}".encode())
                    paths.append(write_record(
                        runs_root, model=model, dataset=dataset, method=method,
                        layer_set=layer_set, seed=s, tokens=tokens,
                        tap="reference", weights="hub:openai" if model.startswith("clip")
                        else "random:0",
                        caches={"train": f"/caches/{model}/{dataset}/train",
                                "test": f"/caches/{model}/{dataset}/test"},
                        fingerprints={"test": {"id": key}, "train": {"id": key}},
                        metrics={"top1": bal + 1.0, "top5": 99.0, "balanced_top1": bal,
                                 "balanced_top5": 98.0},
                        **{"selected": {"lr": 0.01, "wd": 1e-4, "dropout": 0.1 * s}, **extra}))
    return paths
