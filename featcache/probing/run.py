"""The probing recipe: pick tokens from the cache, split, train the grid at once, select, refit.

Never loads a backbone: everything comes from the cache. The tokens a method needs are
read once per split into a `featcache.probing.tokens.features.FeatureSource` (float16, on
the device or streamed from host memory; normalised per batch). `layers` trains every layer's linear
grid in one pass (layers × hyperparameters on the config axis). One record per
(cache pair, method, layer set, seed); see featcache.records.store.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featcache import __version__
from featcache import distributed as dist
from featcache.cache.store import Cache
from featcache.cache.stores import keep_local_copies, local_path, resolve_root
from featcache.distributed import resolve_device
from featcache.errors import FeatcacheError, warn
from featcache.options import check_int, make_options, parse_floats, parse_ints
from featcache.probing.methods import get_method
from featcache.probing.pairs import canonical_layer_set, find_pairs, layer_set_names, run_tokens
from featcache.probing.selection import (
    METRIC_KEYS,
    all_test_metrics,
    fit_and_select,
    fit_and_select_layers,
    logit_metrics,
    sample_shots,
)
from featcache.records.predictions import PREDICTIONS_FILE, from_logits
from featcache.records.store import default_runs_root, is_finished, run_dir, write_run
from featcache.registry import METHODS

GRIDS = ("paper", "quick")
# paper: what the authors' code does (validation scored on jittered features; all-tokens
# features normalised per channel across the tokens); clean: validation on clean
# features, every token vector normalised. docs/method.md lists every known difference.
PROTOCOLS = ("paper", "clean")
PRECISIONS = ("auto", "fp32", "bf16")
# Under torchrun: "grid" (ranks share each grid's config groups; every rank holds all the
# tokens), "data" (ranks share the samples: each holds its range of shards, gradients and
# BatchNorm statistics are summed over ranks; `featcache.probing.tokens.dataparallel`), "auto": data
# when the tokens do not fit one device, else grid.
PARALLEL = ("auto", "grid", "data")


@dataclass
class ProbeOptions:
    """Everything `featcache probe` takes, under the CLI's names; defaults follow the
    paper's reference recipe. List options take a sequence or the CLI's "a,b,c" text."""

    method: str = "alf"
    layers: str | None = None  # layer set; None → the method's default
    model: str | None = None  # only pairs of this model (registry/CLI name)
    dataset: str | None = None  # only pairs of this dataset
    cache: str | Path | None = None
    runs: str | Path | None = None  # runs root (default: <cache>/runs)
    local_cache: str | Path | None = None  # read-through copy of a store's shards
    seeds: str | Sequence[int] = (0,)
    grid: str = "paper"
    epochs: int | None = None
    batch_size: int | None = None
    lrs: str | Sequence[float] | None = None
    wds: str | Sequence[float] | None = None
    dropouts: str | Sequence[float] | None = None
    min_steps: int | None = None
    shots: int | None = None
    token: str | None = None  # linear/layers: "cls" or "ap" (default: the model's probe token)
    device: str = "auto"
    memory_gb: float | None = None  # the grid's heads (None: see TrainConfig)
    group_size: int | None = None  # stacked kernels over groups of this many configs
    feature_memory_gb: float | None = None  # tokens kept on the device (None: half its free)
    max_host_memory_gb: float | None = None  # beyond it, tokens stream from the cache
    parallel: str = "auto"  # under torchrun: grid | data | auto (data when one device is short)
    threads: int | None = None  # torch intra-op threads during the run (None: as set)
    force: bool = False
    protocol: str = "paper"
    precision: str = "auto"  # heads on CUDA: fp32, bf16 autocast, auto (fp32 under paper)
    val_fraction: float = 0.2
    train_split: str = "train"
    test_split: str = "test"

    def __post_init__(self) -> None:
        """The CLI's texts ("0,1,2", "1e-3,1e-2") as tuples, checked once."""
        self.seeds = parse_ints(self.seeds, "--seeds", 0)
        self.lrs = parse_floats(self.lrs, "--lrs")
        self.wds = parse_floats(self.wds, "--wds")
        self.dropouts = parse_floats(self.dropouts, "--dropouts")


@dataclass
class RunResult:
    path: Path
    model: str
    dataset: str
    method: str
    layer_set: str
    seed: int
    status: str  # "trained" | "skipped" (finished before; --force to redo) | "partial"
    # (under torchrun, a rank > 0: its share of the grid trained, rank 0 wrote the record)
    metrics: dict[str, Any] = field(default_factory=dict)
    selected: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


# -- the recipe --------------------------------------------------------------------------

def train_config(opts: ProbeOptions, seed: int) -> Any:
    """The reference recipe, with the user's overrides and the quick grid if asked."""
    from featcache.probing.train import TrainConfig

    # the paper protocol follows the authors' batch plan
    # (`featcache.probing.train.authors_batch_size`)
    cfg = TrainConfig(seed=seed, batch_plan="authors" if opts.protocol == "paper" else
                      "featcache", amp=head_amp(opts))
    if opts.grid == "quick":  # (check_options has refused any other grid name)
        cfg = replace(cfg, epochs=10, min_total_steps=200, lrs=(1e-2, 1e-3), wds=(1e-4, 1e-2),
                      dropouts=(0.0, 0.1))
    overrides = {"epochs": opts.epochs, "batch_size": opts.batch_size, "lrs": opts.lrs,
                 "wds": opts.wds, "dropouts": opts.dropouts, "min_total_steps": opts.min_steps}
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if opts.memory_gb:
        cfg = replace(cfg, memory_budget_bytes=int(opts.memory_gb * 2**30))
    if opts.group_size:
        cfg = replace(cfg, group_size=opts.group_size)
    return cfg


def head_amp(opts: ProbeOptions) -> bool:
    """bf16 autocast for the heads' matmuls on CUDA: asked for, or `auto` outside the
    paper protocol (the authors train in fp32; TF32 stays off, torch's default)."""
    return opts.precision == "bf16" or (opts.precision == "auto" and opts.protocol != "paper")


def check_options(opts: ProbeOptions) -> None:
    """Every option a user can get wrong, as one clear line, before anything is read."""
    if opts.method not in METHODS:
        raise FeatcacheError(f"unknown method {opts.method!r}: choose "
                             f"{', '.join(METHODS.names())}")
    if opts.grid not in GRIDS:
        raise FeatcacheError(f"unknown grid {opts.grid!r}: choose {', '.join(GRIDS)}")
    if opts.parallel not in PARALLEL:
        raise FeatcacheError(f"unknown --parallel {opts.parallel!r}: choose "
                             f"{', '.join(PARALLEL)}")
    if opts.protocol not in PROTOCOLS:
        raise FeatcacheError(f"unknown protocol {opts.protocol!r}: choose "
                             f"{', '.join(PROTOCOLS)}")
    if opts.precision not in PRECISIONS:
        raise FeatcacheError(f"unknown --precision {opts.precision!r}: choose "
                             f"{', '.join(PRECISIONS)}")
    spec = get_method(opts.method)
    if not spec.takes_layers and opts.layers not in (None, spec.default_layers):
        raise FeatcacheError(f"--method {spec.name} reads {spec.description}; --layers does "
                             "not apply (use --method alf for layer sets)")
    if opts.token not in (None, "cls", "ap", "pool"):
        raise FeatcacheError(f"bad --token {opts.token!r}: use cls, ap or pool (the kinds a "
                             "cache has: `featcache info PATH`)")
    if not opts.seeds:
        raise FeatcacheError("no seeds given: use e.g. --seeds 0,1,2")
    if len(set(opts.seeds)) != len(opts.seeds):
        raise FeatcacheError(f"repeated seeds in {list(opts.seeds)}")

    check_int(opts.epochs, "--epochs")
    check_int(opts.batch_size, "--batch-size", 2)
    check_int(opts.shots, "--shots")
    check_int(opts.min_steps, "--min-steps", 0)
    check_int(opts.threads, "--threads")
    check_int(opts.group_size, "--group-size")
    for option, gb, zero_ok in (("--memory-gb", opts.memory_gb, False),
                                ("--feature-memory-gb", opts.feature_memory_gb, True),
                                ("--max-host-memory-gb", opts.max_host_memory_gb, False)):
        if gb is not None and not (math.isfinite(gb) and (gb > 0 or zero_ok and gb == 0)):
            raise FeatcacheError(f"{option} must be a finite number of GB, "
                                 f"{'≥ 0' if zero_ok else 'positive'}; got {gb} (leave it out "
                                 "for the default)")
    if not 0 < opts.val_fraction < 1:
        raise FeatcacheError(f"the validation fraction must lie in (0, 1), got "
                             f"{opts.val_fraction}")
    for name, values, ok, rule in (
        ("--lrs", opts.lrs, lambda v: v > 0 and math.isfinite(v), "positive"),
        ("--wds", opts.wds, lambda v: v >= 0 and math.isfinite(v), "≥ 0"),
        ("--dropouts", opts.dropouts, lambda v: 0 <= v < 1, "in [0, 1)"),
    ):
        if values is None:
            continue
        if not values:
            raise FeatcacheError(f"{name} is empty: give at least one value")
        bad = [v for v in values if not ok(v)]
        if bad:
            raise FeatcacheError(f"{name} values must be {rule}, got {bad[0]:g}")


def feature_normalisation(method: str, protocol: str) -> str:
    """How a method's tokens are L2-normalised under a protocol (`Method.normalisation`)."""
    return get_method(method).normalisation(protocol)


def probe(options: ProbeOptions | None = None, /, *, progress: Any = None,
          **kwargs: Any) -> list[RunResult]:
    """Train a method on every matching cache pair, for every seed; skip finished runs.

    ``probe(method="alf", cache="cache")`` or ``probe(ProbeOptions(...))``: the keywords
    are `featcache probe`'s options. ``progress``: a `featcache.progress.Bars`.
    """
    opts = make_options(ProbeOptions, options, kwargs)
    check_options(opts)
    with dist.session():  # under torchrun: ranks share each grid (`run_one`)
        return _probe(opts, progress)


def _probe(opts: ProbeOptions, progress: Any) -> list[RunResult]:
    spec = get_method(opts.method)
    cache_root = resolve_root(opts.cache)
    runs_root = local_path(opts.runs, "--runs") if opts.runs else default_runs_root(cache_root)
    pairs = find_pairs(cache_root, opts.model, opts.dataset, opts.train_split, opts.test_split)
    if opts.local_cache is not None:
        keep_local_copies([c for pair in pairs for c in pair], opts.local_cache)
    if opts.layers is not None and not opts.layers.strip():
        warn(f"--layers is empty: using {opts.method}'s default layer set "
             f"'{spec.default_layers}'")
    if opts.token is not None and spec.tokens != "probe":
        names = [n for n, m in METHODS.items() if m.tokens == "probe"]
        probes = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
        warn(f"--token applies to {probes} only; {opts.method} reads "
             f"{'every token of the last layer' if spec.needs_all_tokens else 'CLS and AP'}")
    layer_set = (opts.layers or "").strip() or spec.default_layers
    if spec.needs_all_tokens:
        lacking = [c.path for t, s in pairs for c in (t, s) if not c.has_all_tokens]
        if lacking:
            raise FeatcacheError(f"--method attentive needs every token of the last layer, and "
                                 f"{lacking[0]} has none; re-extract with --all-tokens")
    for train, _ in pairs:  # validate the layer set before any training starts
        layer_set_names(layer_set, train.layer_names)
    device = resolve_device(opts.device)
    if opts.precision == "bf16" and device.type != "cuda":
        warn("--precision bf16 applies on CUDA only: on the CPU heads train in fp32 (bf16 "
             "matmuls can be far slower there), and the records say fp32")
    ensure_writable(runs_root)  # before any training, not after it
    threads = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    try:
        results: list[RunResult] = []
        jobs = [(train, test, seed) for train, test in pairs for seed in opts.seeds]
        for train, test, seed in jobs:
            results.append(run_one(train, test, opts, layer_set, seed, runs_root, device,
                                   progress))
        # Runs another process was training: wait for it, then take its record (or train
        # the run here if that process died without finishing it). No work is done twice.
        for i, (train, test, seed) in enumerate(jobs):
            if results[i].status == "busy":
                from featcache.records.store import wait_for_run

                if dist.rank() == 0:
                    wait_for_run(results[i].path)
                results[i] = run_one(train, test, opts, layer_set, seed, runs_root, device,
                                     progress)
        return results
    finally:
        torch.set_num_threads(threads)


def ensure_writable(root: Path) -> None:
    """Fail before training, not after it, when the run records could not be written."""
    # one name per thread too: two probes in one process raced on a shared name
    probe_file = Path(root) / f".featcache-write-test-{os.getpid()}-{threading.get_ident()}"
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
        probe_file.write_bytes(b"")
        probe_file.unlink()
    except OSError as exc:
        raise FeatcacheError(f"cannot write run records under {root}: "
                             f"{exc.strerror or exc}; pass --runs DIR (a writable folder) or "
                             "fix its permissions") from None


def run_settings(opts: ProbeOptions, cfg: Any, layer_set: str, token_names: list[str],
                 train: Cache, test: Cache, device: torch.device,
                 mode: str = "single", widths: tuple[int, ...] | None = None
                 ) -> dict[str, Any]:
    """Every setting that changes a run's numbers, but its seed: its identity (see
    `featcache.records.store.settings_id`). Left out, because they provably do not change them
    (bitwise, on CPU: tests/test_grid_invariance.py): the memory budgets and grouping (a
    config's arithmetic does not depend on its group), the feature placement (device or
    host batches are bit-identical), ranks that split the grid (``mode`` "grid"), and
    dropout values for linear heads (which have no dropout). In, because they do: the
    CPU thread count (MKL splits one matmul over threads by it), streaming from the cache
    (another batch order), data-parallel training with its number of ranks (sums
    over ranks round otherwise; ``mode`` "data", which never streams), and the group
    size where the kernels are stacked (on CUDA, or ``--group-size``: one batched product
    per group rounds by its shape; `featcache.probing.train.stacked_group_size`)."""
    spec = get_method(opts.method)
    streamed = None if mode == "data" else stream_buffer(train, token_names, opts, device)
    recipe = {k: getattr(cfg, k) for k in (
        "epochs", "batch_size", "min_steps_per_epoch", "min_total_steps", "lrs", "wds",
        "min_lr", "grad_clip", "jitter_std", "jitter_p", "class_weighted")}
    if spec.attentive:
        recipe["dropouts"] = cfg.dropouts
    if cfg.batch_plan != "featcache":  # (runs of featcache's own plan keep their ids)
        recipe["batch_plan"] = cfg.batch_plan
    from featcache.probing.train import stacked_group_size
    from featcache.records.store import settings_id

    group = stacked_group_size(cfg, device)
    return {
        "method": opts.method,
        "layer_set": layer_set,
        "tokens": token_names,
        "heads": spec.num_heads(len(token_names)),
        "protocol": opts.protocol,
        "normalisation": spec.normalisation(opts.protocol),
        "shots": opts.shots,
        "val_fraction": opts.val_fraction,
        "recipe": {k: list(v) if isinstance(v, tuple) else v for k, v in recipe.items()},
        "precision": "bf16-autocast" if cfg.amp and device.type == "cuda" else "fp32",
        "caches": {"train": settings_id(train.fingerprint), "test": settings_id(test.fingerprint)},
        # streamed from the cache, an epoch's order is shuffled by buffers of shards: other
        # numbers than in memory, and other ones per buffer size
        # (`featcache.probing.tokens.streaming`)
        **({"stream_buffer_shards": streamed} if streamed else {}),
        # linear heads read narrower tokens (CLIP's projected final layer) at their true
        # width (`featcache.probing.heads.LinearHeads`); before, they read its zero padding too
        **({"token_widths": list(widths)} if widths and spec.head == "linear" else {}),
        **({"cpu_threads": torch.get_num_threads()} if device.type == "cpu" else {}),
        **({"data_parallel_ranks": dist.world_size()} if mode == "data" else {}),
        **({"group_size": group} if group else {}),
    }


def stream_buffer(train: Cache, token_names: list[str], opts: ProbeOptions,
                  device: torch.device | None = None) -> int | None:
    """Shards per buffer when the train tokens will be streamed from the cache (they fit
    neither a GPU's feature budget nor host memory or --max-host-memory-gb), else None:
    `featcache.probing.tokens.features.load_source` decides alike."""
    from featcache.probing.tokens.features import (
        HOST_FRACTION,
        available_host_memory,
        budget_from_gb,
        default_feature_budget,
    )
    from featcache.probing.tokens.streaming import BUFFERS

    if get_method(opts.method).needs_all_tokens:
        row = (train.layout.n_tokens or 0) * (train.layout.token_dim or 0) * 2
    else:
        widths = [train.token_width(*t.split(".", 1)) for t in token_names]
        row = len(token_names) * max([train.dim, *widths]) * 2
    if device is not None and device.type != "cpu":  # tokens on the GPU need no host room
        on_device = budget_from_gb(opts.feature_memory_gb)
        if train.n * row <= (default_feature_budget(device) if on_device is None
                             else on_device):
            return None
    host = budget_from_gb(opts.max_host_memory_gb)
    if host is None:
        host = int(HOST_FRACTION * available_host_memory())
    if train.n * row <= host:
        return None
    return int(host // BUFFERS // max(1, train.layout.shard_size * row))


def variant_options(opts: ProbeOptions) -> dict[str, Any]:
    """The options a user set away from the paper's recipe: what the report and `runs`
    name a run's variant by (`grid=quick, shots=5`)."""
    out: dict[str, Any] = {}
    if opts.grid != "paper":
        out["grid"] = opts.grid
    for key in ("epochs", "batch_size", "lrs", "wds", "dropouts", "min_steps", "shots",
                "token", "group_size"):
        value = getattr(opts, key)
        if value is not None and not (key == "dropouts"
                                      and not get_method(opts.method).attentive):
            out[key] = list(value) if isinstance(value, tuple) else value
    if opts.protocol != "paper":
        out["protocol"] = opts.protocol
    if opts.val_fraction != ProbeOptions.val_fraction:
        out["val_fraction"] = opts.val_fraction
    return out


def run_one(train: Cache, test: Cache, opts: ProbeOptions, layer_set: str, seed: int,
            runs_root: Path, device: torch.device, progress: Any = None) -> RunResult:
    """One record: (pair, method, layer set, settings, seed). Returns status "busy" when
    another process is training the same run right now."""
    from featcache.records.store import read_run, run_lock, settings_id

    layer_set = canonical_layer_set(layer_set, train.layer_names)
    model_dir, dataset_dir = train.path.parent.parent.name, train.path.parent.name
    cfg = train_config(opts, seed)
    tokens, token_names = run_tokens(opts.method, layer_set, train, opts.token)
    knn = get_method(opts.method).head == "knn"  # no training: featcache.probing.knn
    if knn:
        from featcache.probing.knn import run_knn
        from featcache.probing.knn import run_settings as knn_settings

        settings = knn_settings(opts, layer_set, token_names, train, test)
    else:
        from featcache.probing.tokens.features import token_plan

        settings = run_settings(opts, cfg, layer_set, token_names, train, test, device,
                                parallel_mode(opts, train, tokens, device),
                                token_plan(train, tokens).widths)
    ident = settings_id(settings)
    path = run_dir(runs_root, model_dir, dataset_dir, opts.method, layer_set, seed, ident)
    base = RunResult(path, train.model, train.dataset, opts.method, layer_set, seed, "skipped")
    # Under torchrun rank 0 alone locks, decides and writes; every rank trains its share
    # of the grid (`selection`), and an error on any rank stops them all.
    rank = dist.rank()
    with run_lock(path) if rank == 0 else contextlib.nullcontext(True) as mine:
        status = "busy" if not mine else "skipped" if (
            rank == 0 and is_finished(path) and not opts.force) else "train"
        status = dist.broadcast_object(status)
        if status == "busy":
            return replace(base, status="busy")
        if status == "skipped":
            old = read_run(path) if rank == 0 else {}
            return replace(base, metrics=old.get("metrics", {}),
                           selected=old.get("selected", {}))
        extra = {"settings": settings, "settings_id": ident, "options": variant_options(opts)}
        failure, result = None, base
        try:
            result = (run_knn(train, test, opts, layer_set, seed, path, device, progress,
                              tokens, token_names, extra, base) if knn else
                      _train_run(_Run(train, test, opts, layer_set, seed, path, device, cfg,
                                      tokens, token_names, extra, base), progress))
        except BaseException as exc:
            failure = exc
        dist.gather_or_fail(None, failure)  # rank 0's refit and record: all wait for them
        return result


@dataclass
class _Run:
    """One run to train: what `run_one` decided (its identity) and where it goes."""

    train: Cache
    test: Cache
    opts: ProbeOptions
    layer_set: str
    seed: int
    path: Path
    device: torch.device
    cfg: Any
    tokens: list[tuple[str, str]]
    token_names: list[str]
    identity: dict
    base: RunResult


@dataclass
class _Data:
    """A run's samples: the token sources and labels of the kept rows."""

    src_train: Any
    src_test: Any
    y_train: torch.Tensor
    y_test: torch.Tensor
    keep_test: np.ndarray
    mode: str
    norm: str | None


@dataclass
class _Fit:
    """What a method's fit gives the record: its fields, the head's tensors, the test
    logits of the config the predictions come from, and the selection."""

    fields: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    logits: torch.Tensor
    selection: Any


def _train_run(run: _Run, progress: Any) -> RunResult:
    """Read the samples, fit and select, test, check, write: one record."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    data = _load_data(run, timings)
    task = None if progress is None else progress.start(
        f"{run.train.dataset} {run.opts.method} seed {run.seed}", 0)
    torch.manual_seed(run.seed)
    fit = _fit(run, data, _ticker(progress, task), timings)
    if fit is None:  # another rank's share of the grid, done: rank 0 writes
        return _partial(run.base, progress, task)
    _check_finite(run, fit)
    if task is not None:
        progress.stop(task)
    seconds = time.perf_counter() - started
    record = _record(run, data, fit, {"total_s": seconds,
                                      **{k: round(v, 4) for k, v in timings.items()}})
    if dist.rank() != 0:  # data-parallel: every rank scored its share; rank 0 writes
        return _partial(run.base, progress, task)
    _write(run, data, fit, record)
    return replace(run.base, status="trained", metrics=record["metrics"],
                   selected=record["selected"], seconds=seconds)


def _kept_rows(run: _Run) -> tuple[np.ndarray, np.ndarray]:
    """The train and test rows a run reads: valid ones (train: K per class with --shots);
    refused when the training rows hold fewer than 2 classes."""
    train, opts = run.train, run.opts
    y_train = train.labels()
    keep_train = np.flatnonzero(train.valid())
    if opts.shots:
        keep_train = keep_train[sample_shots(y_train[keep_train], opts.shots, run.seed)]
    present = np.unique(y_train[keep_train])
    if len(present) < 2:
        raise FeatcacheError(f"{train.path}: the training data hold {len(present)} class "
                             f"({', '.join(train.class_names[c] for c in present) or 'none'}); "
                             "a probe needs at least 2 to mean anything")
    return keep_train, np.flatnonzero(run.test.valid())


def _load_data(run: _Run, timings: dict[str, float]) -> _Data:
    """Both splits' tokens as sources (every rank's, under torchrun) and their labels."""
    keep_train, keep_test = _kept_rows(run)
    clock = time.perf_counter()
    norm = feature_normalisation(run.opts.method, run.opts.protocol)
    mode = parallel_mode(run.opts, run.train, run.tokens, run.device)
    src_train, src_test = _sources(run, mode, norm)
    timings["load_s"] = time.perf_counter() - clock
    y_tr = torch.as_tensor(run.train.labels()[keep_train], device=run.device)
    y_te = torch.as_tensor(run.test.labels()[keep_test], device=run.device)
    if len(y_tr) < 2 or len(y_te) < 1:
        raise FeatcacheError(f"{run.train.path}: too few samples to probe ({len(y_tr)} "
                             f"train, {len(y_te)} test)")
    return _Data(src_train.subset(keep_train), src_test.subset(keep_test), y_tr, y_te,
                 keep_test, mode, norm)


def _sources(run: _Run, mode: str, norm: str | None) -> tuple[Any, Any]:
    """The train and test sources: this rank's shards (data-parallel), else every sample,
    in memory or streamed from the cache. A rank that cannot read its shards stops every
    rank (not one waiting forever)."""
    from featcache.probing.tokens.features import budget_from_gb, load_source
    from featcache.probing.tokens.streaming import StreamedSource

    budget = budget_from_gb(run.opts.feature_memory_gb)
    host = budget_from_gb(run.opts.max_host_memory_gb)
    failure, sources = None, (None, None)
    try:
        if mode == "data":
            from featcache.probing.tokens.dataparallel import load_rank_source

            sources = tuple(load_rank_source(c, run.tokens, run.device, budget, host, norm)
                            for c in (run.train, run.test))
        else:
            sources = tuple(load_source(c, run.tokens, run.device, budget, host,
                                        normalise=norm, stream=StreamedSource)
                            for c in (run.train, run.test))
    except Exception as exc:
        failure = exc
    dist.gather_or_fail(None, failure)
    return sources


def _ticker(progress: Any, task: Any) -> Any:
    """The fit's progress callback: once per epoch per config group; a fit's size is known
    at its first epoch."""

    def tick(info: dict) -> None:
        if task is None:
            return
        if info["epoch"] == 1 and info["group"] == 0:
            progress.grow(task, info["epochs"] * info["n_groups"])
        progress.advance(task, 1)

    return tick


def _fit(run: _Run, data: _Data, tick: Any, timings: dict[str, float]) -> _Fit | None:
    """The method's fit, selection and test; None on a rank whose share is done."""
    if get_method(run.opts.method).per_layer:
        return _fit_layers(run, data, tick, timings)
    return _fit_head(run, data, tick, timings)


def _fit_layers(run: _Run, data: _Data, tick: Any, timings: dict[str, float]
                ) -> _Fit | None:
    """Every layer's linear probe in one grid; the predictions are the layer picked on
    validation."""
    tokens, n_classes = run.tokens, len(run.train.class_names)
    sel = fit_and_select_layers(data.src_train, data.y_train, n_classes, run.cfg, run.opts,
                                run.seed, tick, timings)
    if sel.final is None:
        return None
    clock = time.perf_counter()
    tests = all_test_metrics(sel.final, data.src_test, data.y_test)
    best = max(range(len(tokens)), key=lambda i: sel.val_metrics[i]["balanced_top1"])
    logits = sel.final.predict_logits(data.src_test, configs=[best], out_device="cpu")[0]
    tests[best] = logit_metrics(logits, data.y_test, n_classes)
    timings["test_s"] = time.perf_counter() - clock
    per_layer = [{"layer": name, "token": kind, "selected": sel.selected[i],
                  "val_balanced_top1": sel.val_metrics[i]["balanced_top1"],
                  "val_metrics": sel.val_metrics[i],
                  **{k: v for k, v in tests[i].items() if k != "per_class"},
                  "per_class": tests[i]["per_class"]}
                 for i, (name, kind) in enumerate(tokens)]
    grid = [{**p, "layer": tokens[i][0], "token": tokens[i][1]}
            for i, row in enumerate(sel.grid) for p in row]
    fields = dict(per_layer=per_layer, selected={**sel.selected[best], "layer": tokens[best][0]},
                  metrics={k: per_layer[best][k] for k in METRIC_KEYS},
                  per_class={"class_names": run.train.class_names,
                             "accuracy": per_layer[best]["per_class"]},
                  grid=grid, val_metrics=sel.val_metrics[best], attention=None,
                  curves={"train_loss": sel.final.curves[best].tolist(),
                          "per_layer_train_loss": sel.final.curves.tolist()})
    tensors = {f"{name}.{kind}.{key}": value for i, (name, kind) in enumerate(tokens)
               for key, value in sel.final.export(i).items()}
    return _Fit(fields, tensors, logits, sel)


def _fit_head(run: _Run, data: _Data, tick: Any, timings: dict[str, float]) -> _Fit | None:
    """One head kind's grid, the selected config refitted and tested."""
    spec, n_classes = get_method(run.opts.method), len(run.train.class_names)
    num_heads = spec.num_heads(data.src_train.sample_shape[0])
    sel = fit_and_select(data.src_train, data.y_train, n_classes, spec.head, run.cfg,
                         run.opts, run.seed, num_heads, tick, timings)
    if sel.final is None:
        return None
    clock = time.perf_counter()
    logits = sel.final.predict_logits(data.src_test, out_device="cpu")[0]
    metrics = logit_metrics(logits, data.y_test, n_classes)
    attention = None
    if spec.attentive:
        weights = sel.final.attention(data.src_test)[0].numpy().astype(float)
        attention = {"tokens": run.token_names, "mean": weights.tolist()}
    timings["test_s"] = time.perf_counter() - clock
    fields = dict(grid=sel.grid, selected=sel.selected, val_metrics=sel.val_metrics,
                  metrics={k: v for k, v in metrics.items() if k != "per_class"},
                  per_class={"class_names": run.train.class_names,
                             "accuracy": metrics.get("per_class")},
                  curves={"train_loss": sel.final.curves[0].tolist()},
                  attention=attention, per_layer=None)
    return _Fit(fields, sel.final.export(0), logits, sel)


def _check_finite(run: _Run, fit: _Fit) -> None:
    """NaN in the tokens (a cache changed after extraction: checksums cover bytes, not
    meaning) or a diverged refit: either way the score would be chance, not a result."""
    if bool(torch.isfinite(fit.selection.final.curves).all()) and \
            bool(torch.isfinite(fit.logits).all()):
        return
    train, test = run.train, run.test
    raise FeatcacheError(f"{train.path}: training gave non-finite losses or test logits, "
                         "so there is no score to report; check its caches with "
                         f"`featcache verify {train.path}` and `featcache verify "
                         f"{test.path}` (a value changed after extraction?), or lower "
                         "--lrs")


def _record(run: _Run, data: _Data, fit: _Fit, timings: dict[str, float]) -> dict[str, Any]:
    """The run record (`featcache.records.store`), but for its predictions entry."""
    train, opts = run.train, run.opts
    return {
        "featcache_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": train.model,
        "model_dir": train.path.parent.parent.name,
        "dataset": train.dataset,
        "dataset_dir": train.path.parent.name,
        "tap": train.fingerprint["model"]["tap"],
        "weights": train.fingerprint["model"]["weights"],
        "method": opts.method,
        "layer_set": run.layer_set,
        "tokens": run.token_names,
        "seed": run.seed,
        "n_train": int(len(data.y_train)),
        "n_test": int(len(data.y_test)),
        "n_classes": len(train.class_names),
        "protocol": opts.protocol,
        "normalisation": data.norm,
        "config": {**_cfg_dict(run.cfg), "val_fraction": opts.val_fraction,
                   "shots": opts.shots, "grid_name": opts.grid, "device": str(run.device),
                   "feature_placement": data.src_train.placement,
                   "parallel": data.mode, "ranks": dist.world_size(),
                   "torch_threads": torch.get_num_threads()},
        "caches": {"train": str(train.path), "test": str(run.test.path)},
        "fingerprints": {"train": train.fingerprint, "test": run.test.fingerprint},
        "steps": fit.selection.steps,
        **run.identity,
        **fit.fields,
        "timings": timings,
    }


def _write(run: _Run, data: _Data, fit: _Fit, record: dict[str, Any]) -> None:
    """The record, the head and the predictions, written; the selection's note said once
    the run is a result."""
    predictions = from_logits(fit.logits, data.y_test, data.keep_test)
    record["predictions"] = {"file": PREDICTIONS_FILE, "split": run.opts.test_split,
                             "n": len(predictions.index), "top_k": predictions.top_k.shape[1]}
    write_run(run.path, record, fit.tensors, predictions.tensors())
    if fit.selection.note:
        warn(fit.selection.note)


def parallel_mode(opts: ProbeOptions, train: Cache, tokens: list[tuple[str, str]],
                  device: torch.device) -> str:
    """"single" without torchrun; else the --parallel mode, "auto" resolved: data when
    the train tokens do not fit one device's feature budget, else grid."""
    if dist.world_size() == 1:
        return "single"
    if opts.parallel != "auto":
        return opts.parallel
    from featcache.probing.tokens.features import budget_from_gb, default_feature_budget, token_plan

    need = train.n * token_plan(train, tokens).row_bytes
    budget = budget_from_gb(opts.feature_memory_gb)
    return "data" if need > (default_feature_budget(device) if budget is None
                             else budget) else "grid"


def _partial(base: RunResult, progress: Any, task: Any) -> RunResult:
    if task is not None:
        progress.stop(task)
    return replace(base, status="partial")


def _cfg_dict(cfg: Any) -> dict[str, Any]:
    """The training config as plain JSON (tuples as lists; an unset budget as null)."""
    out = asdict(cfg)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()
            if not (isinstance(v, float) and not math.isfinite(v))}
