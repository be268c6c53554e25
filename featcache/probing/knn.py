"""k-nearest-neighbour classification from the cache: DINOv2's k-NN protocol, at any depth.

The protocol (Oquab et al. 2023, `dinov2/eval/knn.py`, after Wu et al. 2018): every
feature L2-normalised, similarity the cosine (a dot product), the k most similar training
samples vote for their class with weight exp(s / T), T = 0.07, k one of {10, 20, 100,
200}. featcache picks k on the validation split (the same stratified split and
balanced-top-1 rule as the trained probes; ties: the smaller k); test samples then take
their neighbours from the whole training split, as a refit would.

Two methods: `knn` reads the model's own embedding (the linear probe's token); `knn-layers`
reads every layer's CLS and AP, one k-NN per token, and its number is the token chosen on
validation (as `layers`). Its per-token test scores are the report's k-NN-by-depth curve.

Ties, defined and kept on every device:
- neighbours are ordered by similarity, highest first, and equal similarities by the
  lower training row (the row of the cache among the training samples used), so the k
  nearest are one set whatever the block sizes;
- votes are summed neighbour by neighbour in that order (a fixed summation order: classes
  with equal neighbour similarities get bit-equal votes), and the predicted class is the
  highest vote, equal votes going to the lower class index.
The vote scores a run keeps as its logits are the weights' shares, Σ_class w / Σ w (the
softmax over the k neighbours of DINOv2, summed per class): same ranking, in [0, 1].

Fast: the similarity is computed in blocks of the training split (read once) against
blocks of the queries, with a running top-k per query; never the N × N matrix. Inside a
block `torch.topk` picks k + 1 candidates; only rows where ties straddle the k-th place are
re-sorted (stably), so the tie rule costs nothing in the common case.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from featcache.errors import FeatcacheError

TEMPERATURE = 0.07
KS = (10, 20, 100, 200)
# similarities per block (queries × training samples): 16 M floats (64 MB) on the CPU,
# 256 M (1 GiB) on a GPU. Few queries per block, many training samples: the running lists
# are merged once per (query block, training block), so their cost falls with the
# training block's width (1,024 × 16,384 took 0.6 of 4,096 × 4,096's time on this CPU)
BLOCK_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 28}
QUERY_ROWS = {"cpu": 1024, "cuda": 8192}


# -- neighbours -------------------------------------------------------------------------

def _block_topk(sims: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest of each row, (value desc, column asc): `topk` of k + 1, and a stable
    sort of the rows whose k-th and (k+1)-th values are equal (ties straddling the k-th
    place, where topk's pick is arbitrary). One more candidate instead of a pass comparing
    the whole block with the k-th value: that pass cost as much as the topk itself."""
    k = min(k, sims.shape[1])
    vals, idx = sims.topk(min(k + 1, sims.shape[1]), dim=1)
    if vals.shape[1] == k:  # the block is no wider than k: all of it, sorted below
        return vals, idx
    tied = vals[:, k - 1] == vals[:, k]
    vals, idx = vals[:, :k].contiguous(), idx[:, :k].contiguous()
    rows = tied.nonzero().flatten()
    if rows.numel():
        order = torch.sort(sims.index_select(0, rows), dim=1, descending=True, stable=True)
        vals[rows], idx[rows] = order.values[:, :k], order.indices[:, :k]
    return vals, idx


def _merge(run_v: Tensor, run_i: Tensor, new_v: Tensor, new_i: Tensor, k: int
           ) -> tuple[Tensor, Tensor]:
    """Two candidate lists → the k best by (value desc, index asc)."""
    v, i = torch.cat([run_v, new_v], 1), torch.cat([run_i, new_i], 1)
    by_index = i.argsort(dim=1)
    v, i = v.gather(1, by_index), i.gather(1, by_index)
    order = torch.sort(v, dim=1, descending=True, stable=True).indices[:, :k]
    return v.gather(1, order), i.gather(1, order)


def nearest(queries: Any, bank: Any, k: int, block_elements: int | None = None,
            tick: Any = None) -> tuple[Tensor, Tensor]:
    """The k nearest bank samples of every query, per token: similarities (T, Nq, k)
    float32 and bank positions (T, Nq, k) int64, on the compute device.

    ``queries``, ``bank``: `featcache.probing.tokens.features.FeatureSource` (or (N, T, D) / (N, D)
    tensors, taken as they are), normalised per token vector. The bank is read once, in
    blocks; each bank block meets every query block. ``tick(n)``: bank samples done."""
    from featcache.probing.tokens.features import as_source

    queries, bank = as_source(_3d(queries)), as_source(_3d(bank))
    k = min(int(k), len(bank))
    if k < 1 or not len(queries):
        raise FeatcacheError("k-NN needs at least one training sample and one query")
    n_tok, nq, dev = queries.sample_shape[0], len(queries), queries.device
    kind = "cuda" if dev.type == "cuda" else "cpu"
    per = BLOCK_ELEMENTS[kind] if block_elements is None else int(block_elements)
    # block shapes depend on the device only, never on how many queries come: a query
    # scored alone (`predict`, `evaluate`) meets the training samples in the same blocks
    bq = max(1, min(QUERY_ROWS[kind], int(math.isqrt(per))))
    bb = max(k, per // bq)
    # running lists, (value desc, index asc); -inf placeholders sort last, then leave
    run_v = torch.full((n_tok, nq, k), -math.inf, device=dev)
    run_i = torch.full((n_tok, nq, k), -1, dtype=torch.long, device=dev)
    for b_slice, xb in bank.batches(bb):
        for q_slice, xq in queries.batches(bq):
            for t in range(n_tok):
                v, i = _block_topk(xq[:, t] @ xb[:, t].T, k)
                run_v[t, q_slice], run_i[t, q_slice] = _merge(
                    run_v[t, q_slice], run_i[t, q_slice], v, i + b_slice.start, k)
        if tick is not None:
            tick(b_slice.stop - b_slice.start)
    return run_v, run_i


def _3d(x: Any) -> Any:
    if isinstance(x, Tensor) and x.dim() == 2:
        return x.unsqueeze(1)
    return x


# -- votes ------------------------------------------------------------------------------

def vote(sims: Tensor, idx: Tensor, labels: Tensor, n_classes: int, k: int,
         temperature: float = TEMPERATURE) -> Tensor:
    """(Nq, C) vote shares of the first k neighbours (one token's (Nq, ≥k) lists):
    Σ_class exp(s/T) / Σ exp(s/T), summed neighbour by neighbour (see the module doc)."""
    s, nb = sims[:, :k], labels[idx[:, :k]]
    w = torch.exp((s - s[:, :1]) / temperature)  # relative to the nearest: no overflow
    votes = torch.zeros((len(s), n_classes), device=s.device)
    for j in range(s.shape[1]):
        votes.scatter_add_(1, nb[:, j:j + 1], w[:, j:j + 1])
    total = torch.zeros((len(s), 1), device=s.device)
    for j in range(s.shape[1]):
        total += w[:, j:j + 1]
    return votes / total


def candidate_ks(n_bank: int, ks: tuple[int, ...] = KS) -> list[int]:
    """The protocol's k that the bank can serve (all of it when it holds fewer than 10)."""
    fit = [k for k in ks if k <= n_bank]
    return fit or [n_bank]


def select_k(sims: Tensor, idx: Tensor, labels: Tensor, y: Tensor, n_classes: int,
             ks: list[int]) -> tuple[int, list[dict[str, Any]]]:
    """One token's k, chosen by validation balanced top-1 (ties: the smaller k); the grid
    rows {k, val_balanced_top1, val_metrics}."""
    from featcache.probing.selection import logit_metrics

    rows = []
    for k in ks:
        m = logit_metrics(vote(sims, idx, labels, n_classes, k), y, n_classes)
        rows.append({"k": k, "val_balanced_top1": m["balanced_top1"],
                     "val_metrics": {key: v for key, v in m.items() if key != "per_class"}})
    best = max(range(len(ks)), key=lambda j: (rows[j]["val_balanced_top1"], -j))
    return ks[best], rows


@dataclass
class KnnFit:
    """What `fit_knn` found: per token the chosen k, the grid and validation metrics,
    the test vote shares (logits) and metrics; ``best``: the token chosen on validation."""

    ks: list[int]
    grid: list[list[dict[str, Any]]]
    test_logits: list[Tensor]
    test_metrics: list[dict[str, Any]]
    best: int
    timings: dict[str, float]


def fit_knn(train: Any, y_train: Tensor, test: Any, y_test: Tensor, n_classes: int,
            val_fraction: float, seed: int, tick: Any = None) -> KnnFit:
    """The protocol on sources of T tokens each: k per token on validation (the train
    split's stratified part, neighbours from the rest), then the test with neighbours
    from the whole train split."""
    from featcache.probing.selection import logit_metrics, stratified_split

    timings: dict[str, float] = {}
    clock = time.perf_counter()
    tr, va = stratified_split(y_train.cpu().numpy(), val_fraction, seed)
    y_dev = y_train.to(train.device)
    tr_t, va_t = (torch.as_tensor(i, device=y_dev.device) for i in (tr, va))
    ks = candidate_ks(len(tr))
    sims, idx = nearest(train.subset(va), train.subset(tr), max(ks), tick=tick)
    chosen, grid = [], []
    for t in range(len(sims)):
        k, rows = select_k(sims[t], idx[t], y_dev[tr_t], y_dev[va_t], n_classes, ks)
        chosen.append(k)
        grid.append(rows)
    timings["select_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    y_te = y_test.to(train.device)
    sims, idx = nearest(test, train, max(chosen), tick=tick)
    logits = [vote(sims[t], idx[t], y_dev, n_classes, chosen[t]).cpu()
              for t in range(len(sims))]
    metrics = [logit_metrics(lg, y_te.cpu(), n_classes) for lg in logits]
    timings["test_s"] = time.perf_counter() - clock
    val = [next(r for r in rows if r["k"] == k)["val_balanced_top1"]
           for rows, k in zip(grid, chosen, strict=True)]
    best = max(range(len(val)), key=lambda t: (val[t], -t))  # ties: the first token
    return KnnFit(chosen, grid, logits, metrics, best, timings)


# -- a run ------------------------------------------------------------------------------

def run_settings(opts: Any, layer_set: str, token_names: list[str], train: Any,
                 test: Any) -> dict[str, Any]:
    """A k-NN run's identity (`featcache.records.store.settings_id`): no training recipe, no
    protocol (paper and clean differ in training only), the k candidates and T instead."""
    from featcache.records.store import settings_id

    return {"method": opts.method, "layer_set": layer_set, "tokens": token_names,
            "normalisation": "token", "shots": opts.shots, "val_fraction": opts.val_fraction,
            "knn": {"ks": list(KS), "temperature": TEMPERATURE}, "precision": "fp32",
            "caches": {"train": settings_id(train.fingerprint),
                       "test": settings_id(test.fingerprint)}}


def run_knn(train: Any, test: Any, opts: Any, layer_set: str, seed: int, path: Path,
            device: torch.device, progress: Any, tokens: list[tuple[str, str]],
            token_names: list[str], identity: dict[str, Any], base: Any) -> Any:
    """`featcache probe --method knn|knn-layers`: one record, as `probing._train_run`
    writes for a trained probe (its `head.safetensors`: the training rows and labels the
    neighbours come from; `predict` reads their tokens from the train cache)."""
    from dataclasses import replace

    from featcache import distributed as dist

    if dist.rank() != 0:  # nothing to share out: rank 0 does it all
        return replace(base, status="partial")
    started = time.perf_counter()
    keep_train, keep_test, y_tr, y_te = _samples(train, test, opts, seed)
    clock = time.perf_counter()
    src_train, src_test = _sources(train, test, tokens, device, opts)
    src_train, src_test = src_train.subset(keep_train), src_test.subset(keep_test)
    load_s = time.perf_counter() - clock
    task = progress.start(f"{train.dataset} {opts.method} seed {seed}",
                          int(0.8 * len(keep_train)) + len(keep_train)) if progress else None
    n_classes = len(train.class_names)
    fit = fit_knn(src_train, torch.as_tensor(y_tr), src_test, torch.as_tensor(y_te),
                  n_classes, opts.val_fraction, seed,
                  (lambda n: progress.advance(task, n)) if task is not None else None)
    if task is not None:
        progress.stop(task)
    record = _record(train, test, opts, layer_set, seed, tokens, token_names, fit, y_tr,
                     y_te, device, src_train)
    # training options (grid, epochs, lrs …) do not apply: not part of a k-NN variant
    options = {k: v for k, v in (identity.get("options") or {}).items()
               if k in ("shots", "token", "val_fraction")}
    record.update({**identity, "options": options})
    record["timings"] = {"total_s": time.perf_counter() - started, "load_s": round(load_s, 4),
                         **{k: round(v, 4) for k, v in fit.timings.items()}}
    _write(path, record, fit, keep_train, keep_test, y_tr, y_te, opts)
    return replace(base, status="trained", metrics=record["metrics"],
                   selected=record["selected"], seconds=record["timings"]["total_s"])


def _samples(train: Any, test: Any, opts: Any, seed: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Valid rows of both caches (k shots of train when asked) and their labels."""
    from featcache.probing.selection import sample_shots

    y_train, y_test = train.labels(), test.labels()
    keep_train, keep_test = np.flatnonzero(train.valid()), np.flatnonzero(test.valid())
    if opts.shots:
        keep_train = keep_train[sample_shots(y_train[keep_train], opts.shots, seed)]
    present = np.unique(y_train[keep_train])
    if len(present) < 2 or len(keep_test) < 1:
        raise FeatcacheError(f"{train.path}: k-NN needs training samples of at least 2 "
                             f"classes and a test sample ({len(present)} classes, "
                             f"{len(keep_test)} test samples)")
    return keep_train, keep_test, y_train[keep_train], y_test[keep_test]


def _sources(train: Any, test: Any, tokens: list[tuple[str, str]], device: torch.device,
             opts: Any) -> tuple[Any, Any]:
    """Both caches' tokens, normalised per token vector (the protocol's cosine)."""
    from featcache.probing.tokens.features import budget_from_gb, load_source

    budget = budget_from_gb(opts.feature_memory_gb)
    host = budget_from_gb(opts.max_host_memory_gb)
    # every sample is held (--shots picks after loading), and k-NN does not stream
    too_big = ("k-NN holds every sample's tokens in memory: probe fewer layers (--layers; "
               "--method knn reads the final layer's alone), raise --max-host-memory-gb "
               "if more memory is free, or use a machine with more")
    return tuple(load_source(c, tokens, device, budget, host, normalise="token",
                             too_big=too_big)
                 for c in (train, test))  # type: ignore[return-value]


def _record(train: Any, test: Any, opts: Any, layer_set: str, seed: int,
            tokens: list[tuple[str, str]], token_names: list[str], fit: KnnFit,
            y_tr: np.ndarray, y_te: np.ndarray, device: torch.device,
            src_train: Any) -> dict[str, Any]:
    """record.json's fields, as a trained probe's (`featcache.probing.run._train_run`)."""
    from featcache import __version__
    from featcache.probing.methods import get_method
    from featcache.probing.selection import METRIC_KEYS

    b = fit.best
    tests = fit.test_metrics
    val_best = _val_row(fit, b)
    record: dict[str, Any] = {
        "featcache_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": train.model, "model_dir": train.path.parent.parent.name,
        "dataset": train.dataset, "dataset_dir": train.path.parent.name,
        "tap": train.fingerprint["model"]["tap"],
        "weights": train.fingerprint["model"]["weights"],
        "method": opts.method, "layer_set": layer_set, "tokens": token_names, "seed": seed,
        "n_train": int(len(y_tr)), "n_test": int(len(y_te)),
        "n_classes": len(train.class_names), "protocol": "knn", "normalisation": "token",
        "config": {"ks": list(KS), "temperature": TEMPERATURE,
                   "val_fraction": opts.val_fraction, "shots": opts.shots,
                   "device": str(device), "feature_placement": src_train.placement},
        "caches": {"train": str(train.path), "test": str(test.path)},
        "fingerprints": {"train": train.fingerprint, "test": test.fingerprint},
        "metrics": {k: tests[b][k] for k in METRIC_KEYS},
        "val_metrics": val_best,
        "per_class": {"class_names": train.class_names, "accuracy": tests[b]["per_class"]},
        "attention": None, "curves": {},
    }
    if get_method(opts.method).per_layer:
        record["selected"] = {"k": fit.ks[b], "layer": tokens[b][0], "token": tokens[b][1]}
        record["grid"] = [{**{k: v for k, v in row.items() if k != "val_metrics"},
                           "layer": name, "token": kind}
                          for (name, kind), rows in zip(tokens, fit.grid, strict=True)
                          for row in rows]
        record["per_layer"] = [
            {"layer": name, "token": kind, "selected": {"k": fit.ks[t]},
             "val_balanced_top1": _val_row(fit, t)["balanced_top1"],
             "val_metrics": _val_row(fit, t),
             **{k: v for k, v in tests[t].items() if k != "per_class"},
             "per_class": tests[t]["per_class"]}
            for t, (name, kind) in enumerate(tokens)]
    else:
        record["selected"] = {"k": fit.ks[b]}
        record["grid"] = [{k: v for k, v in row.items() if k != "val_metrics"}
                          for row in fit.grid[b]]
        record["per_layer"] = None
    return record


def _val_row(fit: KnnFit, t: int) -> dict[str, Any]:
    return next(r for r in fit.grid[t] if r["k"] == fit.ks[t])["val_metrics"]


def _write(path: Path, record: dict[str, Any], fit: KnnFit, keep_train: np.ndarray,
           keep_test: np.ndarray, y_tr: np.ndarray, y_te: np.ndarray, opts: Any) -> None:
    """The record, its "head" (the neighbours' rows and labels) and its predictions."""
    from featcache.records.predictions import PREDICTIONS_FILE, from_logits
    from featcache.records.store import write_run

    logits = fit.test_logits[fit.best]
    if not bool(torch.isfinite(logits).all()):
        raise FeatcacheError(f"{record['caches']['train']}: k-NN gave non-finite votes; "
                             f"check its caches with `featcache verify`")
    predictions = from_logits(logits, torch.as_tensor(y_te), keep_test)
    record["predictions"] = {"file": PREDICTIONS_FILE, "split": opts.test_split,
                             "n": len(predictions.index), "top_k": predictions.top_k.shape[1]}
    head = {"train_index": torch.as_tensor(keep_train, dtype=torch.long),
            "train_labels": torch.as_tensor(y_tr, dtype=torch.long)}
    write_run(path, record, head, predictions.tensors())
