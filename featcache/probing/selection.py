"""Selection: split train into train and validation, train the grid on the first part,
pick the config by validation balanced top-1, refit it on all of train, score the test.

The per-layer form (`fit_and_select_layers`) does the same for every layer at once:
layers × grid points on one config axis.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from featcache import distributed as dist
from featcache.errors import FeatcacheError, warn
from featcache.metrics import TOP5_MIN_CLASSES
from featcache.probing.heads import HEADS

METRIC_KEYS = ("top1", "top5", "balanced_top1", "balanced_top5")


@dataclass
class Selection:
    """What selection gives: the grid (every point with its validation score), the
    selected point, its validation metrics, the refitted head and a note (a warning to
    say once the run is a result). For per-layer probes (`fit_and_select_layers`)
    ``grid``, ``selected`` and ``val_metrics`` hold one entry per layer and ``final``'s
    config l is layer l's probe. ``final`` is None on a rank whose share of a
    grid-parallel run is done (rank 0 refits)."""

    grid: list[Any]
    selected: Any
    val_metrics: Any
    final: Any = None
    note: str | None = None
    steps: dict[str, dict] | None = None  # the grid's and the refit's batch plans




def stratified_split(y: np.ndarray, val_fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Indices of train and validation parts (stratified when every class allows it).

    The validation size is sklearn's for a fractional `test_size`, ceil(N · fraction), as
    in the authors' code (at least one sample per class when stratified)."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(y))
    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 else None
    n_val = max(1, math.ceil(len(y) * val_fraction))
    if stratify is not None:
        n_val = max(n_val, int((counts > 0).sum()))
    if n_val >= len(y):
        raise FeatcacheError(f"too few training samples ({len(y)}) for a validation split")
    train_idx, val_idx = train_test_split(index, test_size=n_val, random_state=seed,
                                          stratify=stratify)
    return np.sort(train_idx), np.sort(val_idx)


def sample_shots(y: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """K examples per class (all of a class that has fewer, with a warning), seeded."""
    counts = np.bincount(y)
    short = [int(c) for c in np.unique(y) if counts[c] < shots]
    if short:
        warn(f"--shots {shots}: {len(short)} class(es) have fewer training samples (class "
             f"{short[0]} has {counts[short[0]]}); all of theirs are used")
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(y == c))[:shots] for c in np.unique(y)]
    return np.sort(np.concatenate(picks))


def fit_and_select(x_train: torch.Tensor | Any, y_train: torch.Tensor, n_classes: int,
                   head: str, cfg: Any, opts: Any, seed: int, num_heads: int | None,
                   progress: Callable[[dict], None] | None = None,
                   timings: dict[str, float] | None = None) -> Selection:
    """Grid on 80 %, select by validation balanced top-1, refit the winner on 100 %.

    ``x_train``: a tensor (used as it is) or a `FeatureSource`; ``opts`` needs
    ``val_fraction`` and ``protocol`` ("paper": validation scored on jittered features, as
    the authors; "clean" or absent: on clean ones). Returns a `Selection`. ``timings``
    gets grid_s, select_s and refit_s added.
    """
    from featcache.probing.tokens.features import as_source
    from featcache.probing.train import fit_grid, grid_points

    timings = {} if timings is None else timings
    src = as_source(x_train)
    tr, va = stratified_split(y_train.cpu().numpy(), opts.val_fraction, seed)
    cfg, steps = sized_plan(cfg, len(y_train), len(tr))
    y_dev = y_train.to(src.device)
    tr_t, va_t = (torch.as_tensor(i, device=y_dev.device) for i in (tr, va))
    points = grid_points(cfg, attentive=HEADS[head].has_dropout)
    clock = time.perf_counter()
    val = _grid_scores(lambda part, cfg: fit_grid(
        src.subset(tr), y_dev[tr_t], n_classes, head, points, cfg, num_heads=num_heads,
        progress=progress, part=part), src.subset(va), y_dev[va_t], opts, cfg, len(points),
        timings, clock)
    clock = time.perf_counter()
    scores = np.asarray(val["balanced_top1"], dtype=float)
    best = int(np.argmax(scores))  # ties: the first in grid order (largest lr, smallest wd)
    note = no_choice(scores, len(va))
    table = [{**p, "val_balanced_top1": float(v)} for p, v in zip(points, scores, strict=True)]
    timings["select_s"] = timings.get("select_s", 0.0) + time.perf_counter() - clock
    out = Selection(table, points[best], {k: float(val[k][best]) for k in METRIC_KEYS},
                    note=note, steps=steps)
    if dist.rank() != 0 and _grid_parallel(src):  # rank 0 refits
        return out
    clock = time.perf_counter()
    out.final = fit_grid(src, y_dev, n_classes, head, [points[best]], cfg,
                         num_heads=num_heads, progress=progress, refit=True)
    timings["refit_s"] = timings.get("refit_s", 0.0) + time.perf_counter() - clock
    return out


def _grid_scores(train: Callable[[tuple[int, int], Any], Any], x_val: Any,
                 y_val: torch.Tensor,
                 opts: Any, cfg: Any, n_points: int, timings: dict[str, float],
                 clock: float) -> dict[str, list[float]]:
    """Train the grid (under torchrun: this rank's share of its config groups) and score
    it on validation; every config's scores, gathered from every rank, in grid order."""
    # grid-parallel: this rank's share of the configs; data-parallel: every config, on
    # this rank's share of the samples (its scores are already summed over ranks)
    part = x_val.grid_part(dist.rank(), dist.world_size())
    if part[1] > 1 and cfg.memory_budget_bytes is None:
        cfg = _shared_budget(cfg, x_val.device)
    failure, payload = None, None
    try:
        grid = train(part, cfg)
        timings["grid_s"] = timings.get("grid_s", 0.0) + time.perf_counter() - clock
        if grid is not None:
            val = grid.evaluate(x_val, y_val, jitter=_val_jitter(opts, cfg))
            payload = (grid.configs or list(range(n_points)),
                       {k: list(val[k]) for k in METRIC_KEYS})
    except Exception as exc:  # every rank must hear of it (`gather_or_fail`)
        failure = exc
    scores: dict[str, list[float]] = {k: [float("nan")] * n_points for k in METRIC_KEYS}
    for share in dist.gather_or_fail(payload, failure):
        if share is not None:
            configs, values = share
            for k in METRIC_KEYS:
                for g, v in zip(configs, values[k], strict=True):
                    scores[k][g] = v
    missing = [g for g, v in enumerate(scores["balanced_top1"]) if v != v]
    if missing:  # never select a config nobody trained
        raise FeatcacheError(f"configs {missing} of the grid were trained on no rank; this "
                             "is a featcache bug: please report it with the command")
    return scores


def no_choice(scores: np.ndarray, n_val: int) -> str | None:
    """Every configuration scored alike (a validation split of a few images, as k-shot
    with small K leaves): the grid's first point is taken, which is no selection. The
    warning, said once the run's numbers are known to be numbers."""
    rows = np.atleast_2d(scores)
    if scores.size == rows.shape[0] or any(np.ptp(row) != 0 for row in rows) or \
            float(rows.min()) >= 100.0:  # every configuration perfect: any is the choice
        return None
    return (f"every configuration scored {float(rows[0][0]):.1f} on validation ({n_val} "
            "images): no configuration was chosen, the grid's first one is used; a larger "
            "validation split (more samples or shots, --val-fraction) would give it "
            "something to go on")


def _shared_budget(cfg: Any, device: torch.device) -> Any:
    """The grid's memory budget, the smallest over ranks: their free memory differs (ranks
    sharing a GPU see each other's tensors), and with it the grouping of configs, which
    every rank must form alike or some configs are trained twice and some never."""
    from featcache.probing.train import default_memory_budget

    budgets = dist.gather_or_fail(default_memory_budget(device), None)
    return dataclasses.replace(cfg, memory_budget_bytes=min(budgets))


def _grid_parallel(src: Any) -> bool:
    """Whether the processes of this run split the grid (not the samples)."""
    return src.grid_part(dist.rank(), dist.world_size())[1] > 1


def _val_jitter(opts: Any, cfg: Any) -> Any:
    """The paper protocol scores validation on jittered features (the authors cut it from
    their training dataset object, whose transform adds the jitter)."""
    from featcache.probing.train import validation_jitter

    if getattr(opts, "protocol", "clean") != "paper" or not cfg.jitter_p or not cfg.jitter_std:
        return None
    return validation_jitter(cfg)


def sized_plan(cfg: Any, n_train: int, n_tune: int) -> tuple[Any, dict[str, dict]]:
    """``cfg`` with the whole training set's size (the authors' batch plan sizes its batch
    there, for the grid too), and the steps the grid and the refit will take (the record's
    ``steps``)."""
    from featcache.probing.train import plan_steps

    cfg = dataclasses.replace(cfg, plan_samples=n_train)
    return cfg, {"grid": plan_steps(n_tune, cfg).as_dict(),
                 "refit": plan_steps(n_train, cfg).as_dict()}


def fit_and_select_layers(x_train: Any, y_train: torch.Tensor, n_classes: int, cfg: Any,
                          opts: Any, seed: int, progress: Callable[[dict], None] | None = None,
                          timings: dict[str, float] | None = None) -> Selection:
    """Per-layer linear probes, every layer in one grid: config (l, p) reads token l with
    hyperparameters p (layers × points on the config axis). Selection is per layer; the
    refit trains each layer's winner, again all layers at once. ``final``'s config l is
    layer l's probe."""
    from featcache.probing.tokens.features import as_source
    from featcache.probing.train import fit_grid, grid_points

    timings = {} if timings is None else timings
    src = as_source(x_train)
    L = src.sample_shape[0]
    tr, va = stratified_split(y_train.cpu().numpy(), opts.val_fraction, seed)
    cfg, steps = sized_plan(cfg, len(y_train), len(tr))
    y_dev = y_train.to(src.device)
    tr_t, va_t = (torch.as_tensor(i, device=y_dev.device) for i in (tr, va))
    points = grid_points(cfg, attentive=False)
    P = len(points)
    inputs = [layer for layer in range(L) for _ in points]
    clock = time.perf_counter()
    val = _grid_scores(lambda part, cfg: fit_grid(
        src.subset(tr), y_dev[tr_t], n_classes, "linear", points * L, cfg, progress=progress,
        inputs=inputs, part=part), src.subset(va), y_dev[va_t], opts, cfg, L * P, timings,
        clock)
    clock = time.perf_counter()
    scores = np.asarray(val["balanced_top1"], dtype=float).reshape(L, P)
    best = [int(np.argmax(row)) for row in scores]
    timings["select_s"] = timings.get("select_s", 0.0) + time.perf_counter() - clock
    out = Selection(
        grid=[[{**p, "val_balanced_top1": float(v)} for p, v in zip(points, row, strict=True)]
              for row in scores],
        selected=[points[b] for b in best],
        val_metrics=[{k: float(val[k][layer * P + b]) for k in METRIC_KEYS}
                     for layer, b in enumerate(best)],
        note=no_choice(scores, len(va)), steps=steps)
    if dist.rank() != 0 and _grid_parallel(src):  # rank 0 refits
        return out
    clock = time.perf_counter()
    out.final = fit_grid(src, y_dev, n_classes, "linear", [points[b] for b in best], cfg,
                            progress=progress, inputs=list(range(L)), refit=True)
    timings["refit_s"] = timings.get("refit_s", 0.0) + time.perf_counter() - clock
    return out


def all_test_metrics(final: Any, x_test: Any, y_test: torch.Tensor) -> list[dict[str, Any]]:
    """Every config's test metrics (percent) and per-class accuracy. Top-5 scores are None
    with fewer than six classes, where they say nothing (the authors report NaN)."""
    return _metric_rows(final.evaluate(x_test, y_test), final.heads.n_classes)


def logit_metrics(logits: torch.Tensor, y: torch.Tensor, n_classes: int) -> dict[str, Any]:
    """One config's test metrics from its (N, C) logits (the run's predictions)."""
    from featcache.metrics import classification_metrics

    metrics = classification_metrics(logits.unsqueeze(0), y.to(logits.device), n_classes)
    return _metric_rows(metrics, n_classes)[0]


def _metric_rows(metrics: dict[str, Any], n_classes: int) -> list[dict[str, Any]]:
    top5 = n_classes >= TOP5_MIN_CLASSES
    out = []
    for g in range(len(metrics["top1"])):
        row: dict[str, Any] = {k: float(metrics[k][g]) if top5 or "top5" not in k else None
                               for k in METRIC_KEYS}
        row["per_class"] = [None if v is None else float(v) for v in metrics["per_class"][g]]
        out.append(row)
    return out



