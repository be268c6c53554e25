"""Train a whole hyperparameter grid of probes in one pass over cached features.

The reference runs each of its 63 grid points as its own job. Here every config of a
group is a slice of one stacked head (``featcache.probing.heads``): all configs see the same
shuffled, jittered batch, each config's loss is its own, and optimisation (AdamW, cosine
schedule, clipping) is done per config on its own slices.

So a config's numbers are a function of the run's settings and its own hyperparameters
alone. On CPU, bitwise: they are the same whatever else shares its group, however many
configs the memory budget puts in a group, wherever the tokens sit (device or host),
and however many torchrun ranks split the grid (`tests/test_grid_invariance.py`):

- its init is one draw from the run seed, copied to every config; its batches, jitter
  and dropout masks come from generators seeded by the run seed alone (the masks from
  one uniform draw that every config thresholds at its own rate);
- no operation mixes configs: every matmul is one per config (`featcache.probing.heads.matmul`)
  or has the configs as its rows, every softmax runs along a contiguous row, and each
  config's loss, gradient-norm and optimiser step are computed from its slices alone.

What still changes the bits, and so is part of a run's identity
(`featcache.probing.run.run_settings`): the CPU thread count (MKL splits one matmul over
threads by the thread count), streaming from the cache (another batch order),
data-parallel training (sums over ranks; within a stated bound of one process,
docs/scaling.md), and the group size where the kernels are stacked
(`stacked_group_size`: on CUDA, and on a CPU with ``group_size``): one batched kernel
per group rounds a config by the group's shape, so the groups are then fixed runs of
``group_size`` configs in grid order, whatever the memory budget or the ranks.

Where the tokens come from is a `featcache.probing.tokens.features.TokenSource`: the trainer
calls its
hooks and never asks which placement it has.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from featcache.distributed import split_evenly
from featcache.errors import FeatcacheError
from featcache.metrics import MetricAccumulator
from featcache.probing.heads import HEADS, AttentiveHeads, StackedHeads, attention_summary
from featcache.probing.heads.matmul import stacked_kernels
from featcache.probing.optim import BatchedAdamW, clip_grad_norm_per_config, cosine_lr
from featcache.probing.tokens.features import (
    Jitter,
    TokenSource,
    as_source,
    generator,
    jitter_batch,
    scoring_batches,
)

__all__ = [
    "TrainConfig",
    "Jitter",
    "validation_jitter",
    "StepPlan",
    "FittedGrid",
    "grid_points",
    "plan_steps",
    "class_weights",
    "estimate_memory",
    "default_memory_budget",
    "stacked_group_size",
    "fit_grid",
]

_CPU_MEMORY_BASE = 8 * 1024**3
_MEMORY_FRACTION = 0.5
# Configs per group on CUDA (stacked kernels; `stacked_group_size`): the paper's 63-point
# ALF grid in 4 groups; a group of 16 ALF configs at FER2013's batch (1,914) took 3.8 GiB
# of the CPU's 4 GiB budget (docs/benchmarks.md, "paper grid"), so it fits most GPUs.
CUDA_GROUP_SIZE = 16


@dataclass
class TrainConfig:
    """The paper's reference recipe as defaults; every knob can be changed."""

    epochs: int = 40
    batch_size: int = 2048
    min_steps_per_epoch: int = 5
    min_total_steps: int = 1000
    lrs: tuple[float, ...] = (1e-1, 1e-2, 1e-3)
    wds: tuple[float, ...] = field(
        default_factory=lambda: tuple(float(v) for v in np.logspace(-6, 0, 7))
    )
    dropouts: tuple[float, ...] = (0.0, 0.1, 0.3)  # attentive heads only; linear ignores
    min_lr: float = 1e-6
    grad_clip: float | None = 5.0  # None or ≤ 0: no clipping
    jitter_std: float = 0.05
    jitter_p: float = 0.5
    class_weighted: bool = True
    seed: int = 0
    memory_budget_bytes: int | None = None  # None: half of free device memory (8 GiB CPU)
    # configs per group with stacked kernels (faster; the size is then in the identity);
    # None: per-config kernels on a CPU (any grouping, same bits), CUDA_GROUP_SIZE on CUDA
    group_size: int | None = None
    amp: bool = True  # bf16 autocast for the matmuls on CUDA; parameters stay fp32
    # "featcache": each fit's set cut into near-equal batches; "authors": their plan
    # (`authors_batch_size`), the batch sized once on ``plan_samples`` (the whole
    # training set) and reused on the tuning split
    batch_plan: str = "featcache"
    plan_samples: int | None = None


BATCH_PLANS = ("featcache", "authors")


@dataclass(frozen=True)
class StepPlan:
    """How one pass is cut: ``steps_per_epoch`` near-equal batches of ≤ ``batch_size``
    (``fixed``: batches of exactly ``batch_size`` and a smaller last one, as a DataLoader
    without ``drop_last``)."""

    n_samples: int
    batch_size: int
    steps_per_epoch: int
    epochs: int
    fixed: bool = False

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def cuts(self) -> int | list[int]:
        """What a source's ``epoch_batches`` cuts a permutation with (``tensor_split``'s
        argument): a number of near-equal batches, or the indices where batches start."""
        if not self.fixed:
            return self.steps_per_epoch
        return list(range(self.batch_size, self.n_samples, self.batch_size))

    def as_dict(self) -> dict[str, int]:
        last = self.n_samples - self.batch_size * (self.steps_per_epoch - 1)
        return {"batch_size": self.batch_size, "steps_per_epoch": self.steps_per_epoch,
                "epochs": self.epochs, "last_batch": last if self.fixed else
                self.n_samples // self.steps_per_epoch}


def grid_points(cfg: TrainConfig, attentive: bool) -> list[dict]:
    """The lr × wd (× dropout for attentive heads) grid, lr outermost.

    Linear points carry no "dropout" key: linear heads have no dropout to tune.
    """
    if attentive:
        return [
            {"lr": float(lr), "wd": float(wd), "dropout": float(p)}
            for lr, wd, p in itertools.product(cfg.lrs, cfg.wds, cfg.dropouts)
        ]
    return [{"lr": float(lr), "wd": float(wd)} for lr, wd in itertools.product(cfg.lrs, cfg.wds)]


def plan_steps(n_samples: int, cfg: TrainConfig) -> StepPlan:
    """Epoch/step arithmetic of the recipe.

    - at least ``min_steps_per_epoch`` steps per epoch (the batch shrinks for small sets),
      but never batches of fewer than 2 samples (BatchNorm needs 2);
    - epochs raised until total steps ≥ ``min_total_steps``;
    - an epoch is the shuffled data cut into ``steps_per_epoch`` near-equal batches, so
      there is no tiny last batch (a size-1 tail would break BatchNorm and add noise).
    """
    if n_samples < 2:
        raise ValueError(f"need at least 2 training samples, got {n_samples}")
    if cfg.batch_size < 2 or cfg.epochs < 1:
        raise ValueError("batch_size must be ≥ 2 and epochs ≥ 1")
    if cfg.batch_plan == "authors":
        return _authors_plan(n_samples, cfg)
    spe = max(math.ceil(n_samples / cfg.batch_size), cfg.min_steps_per_epoch, 1)
    spe = min(spe, n_samples // 2)
    epochs = max(cfg.epochs, math.ceil(cfg.min_total_steps / spe))
    return StepPlan(n_samples, math.ceil(n_samples / spe), spe, epochs)


def authors_batch_size(batch_size: int, n_samples: int, min_batches: int = 5) -> int:
    """The authors' batch for a training set of ``n_samples`` (their
    `adjust_batch_size`): ``batch_size`` if it gives at least ``min_batches`` batches and a
    last batch that is empty or at least half full; else the largest batch down to 17
    that gives at least that many batches (or the batches ``batch_size`` gives, if more)
    with such a last batch; else 1. Their rule, re-derived, not their code."""
    def ok(rest: int, size: int) -> bool:
        return rest == 0 or rest >= 0.5 * size

    if n_samples // batch_size >= min_batches and ok(n_samples % batch_size, batch_size):
        return batch_size
    need = max(min_batches, n_samples // batch_size)
    for size in range(n_samples // need + 1, 16, -1):
        if n_samples // size >= need and ok(n_samples % size, size):
            return size
    return 1


def _authors_plan(n_samples: int, cfg: TrainConfig) -> StepPlan:
    """The authors' batches for a fit on ``n_samples``: the batch sized on the whole
    training set (``cfg.plan_samples``), one more when it would leave a lone last sample
    on the tuning split (their `check_batch_size`), never below 2 (a batch of 1 through
    train-mode BatchNorm fails; their rule gives 1 below 85 samples); a DataLoader's
    batches of that size with a smaller last one; epochs from ``cfg.epochs`` raised until
    ≥ ``min_total_steps``. Where their rule would still leave a last batch of one (below
    85 samples, once their batch of 1 is raised to 2; or a tuning split one more does not
    cure), the batch grows until it does not: they would fail there."""
    whole = cfg.plan_samples or n_samples
    size = max(2, authors_batch_size(cfg.batch_size, whole, cfg.min_steps_per_epoch))
    size += n_samples != whole and n_samples % size == 1
    while n_samples % size == 1 and size < n_samples:
        size += 1
    size = min(size, n_samples)
    spe = math.ceil(n_samples / size)
    epochs = max(cfg.epochs, math.ceil(cfg.min_total_steps / spe))
    return StepPlan(n_samples, size, spe, epochs, fixed=True)


def class_weights(y: Tensor, n_classes: int) -> Tensor:
    """sklearn's "balanced" weights n / (C_present · count_c); 0 for absent classes.

    Only ratios matter: the weighted cross entropy divides by the summed weights.
    """
    counts = torch.bincount(y.long(), minlength=n_classes)[:n_classes].double()
    present = counts > 0
    w = torch.zeros_like(counts)
    w[present] = y.numel() / (present.sum() * counts[present])
    return w.float()


def per_sample_nll(logits: Tensor, y: Tensor) -> Tensor:
    """Cross entropy of each config's logits (G, B, C) for each sample: (G, B), fp32."""
    G, B, C = logits.shape
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    # softmax over C along the (G, C, B) layout the heads produce: a long contiguous inner
    # axis (over a short contiguous C, CPU kernels are ~10x slower)
    logp = F.log_softmax(logits.transpose(1, 2), dim=1)
    return -logp.gather(1, y.view(1, 1, B).expand(G, 1, B)).squeeze(1)


def _per_config_loss(logits: Tensor, y: Tensor, weight: Tensor | None,
                     total: Tensor | float | None = None) -> Tensor:
    """Cross entropy per config, (G,): ``CrossEntropyLoss(weight=w)``'s weighted mean (or,
    with ``total``, the weighted sum over these samples divided by ``total``: a rank's
    share of a global batch's mean).

    Config by config: one reduction over the (G, B) losses splits its sums over threads
    by G, and a config's loss (and so its gradient) must not depend on its neighbours."""
    nll = per_sample_nll(logits, y)
    wb = None if weight is None else weight[y]
    if total is None:
        total = float(y.numel()) if wb is None else wb.sum()
    rows = nll.unbind(0) if wb is None else [row * wb for row in nll.unbind(0)]
    return torch.stack([row.sum() for row in rows]) / total


_jitter = jitter_batch  # the trainer's jitter is the sources' (`featcache.probing.tokens.features`)
_generator = generator


def _stream_seeds(seed: int) -> tuple[int, int, int]:
    """Distinct, reproducible seeds for the shuffle, jitter and dropout streams."""
    ss = np.random.SeedSequence(seed).spawn(3)
    return tuple(int(s.generate_state(1, np.uint64)[0] >> 1) for s in ss)


def validation_jitter(cfg: TrainConfig) -> Jitter:
    """The jitter the authors' validation features get (a fourth stream of the seed)."""
    state = np.random.SeedSequence(cfg.seed).spawn(4)[3].generate_state(1, np.uint64)[0]
    return Jitter(cfg.jitter_std, cfg.jitter_p, int(state >> 1))


def estimate_memory(
    head: str,
    sample_shape: Sequence[int],
    n_classes: int,
    batch_size: int,
    num_heads: int | None = None,
    *,
    device: torch.device | str | None = None,
    inputs: Sequence[int] | None = None,
) -> tuple[int, int]:
    """Training bytes of a step on ``device`` (default CPU): (per config, shared by the
    group), counted in fp32 with a margin; the head kind's own estimate
    (`StackedHeads.memory`)."""
    return _head_kind(head).memory(sample_shape, n_classes, batch_size, num_heads, device,
                                   inputs)


def _head_kind(head: str) -> type[StackedHeads]:
    if head not in HEADS:
        raise ValueError(f"head must be one of {tuple(HEADS)}, got {head!r}")
    return HEADS[head]


def default_memory_budget(device: torch.device) -> int:
    """Half of the free device memory on CUDA; half of 8 GiB on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(_MEMORY_FRACTION * free)
    return int(_MEMORY_FRACTION * _CPU_MEMORY_BASE)


def stacked_group_size(cfg: TrainConfig, device: torch.device,
                       refit: bool = False) -> int | None:
    """Configs per group where the kernels are stacked (one batched product per group,
    whose rounding depends on the group's shape: the run's identity names the size);
    None where each config has its own products (on a CPU by default, and for the
    ``refit`` on a CPU: any grouping, same bits)."""
    if device.type == "cuda":
        return cfg.group_size or CUDA_GROUP_SIZE
    return None if refit else cfg.group_size


def config_groups(n_points: int, per_config: int, shared: int, budget: int,
                  fixed: int | None = None) -> list[list[int]]:
    """Contiguous groups of configs in grid order: near-equal ones that fit the budget (at
    least 1 each); or, with ``fixed`` (`stacked_group_size`), runs of that many (the last
    one shorter), refused as one line where one exceeds the budget (a smaller group is
    another run)."""
    if fixed:
        size = min(fixed, n_points)
        need = shared + size * per_config
        if need > budget:
            raise FeatcacheError(
                f"a group of {size} configs needs {need / 2**30:.3g} GiB to train, more than "
                f"the memory budget of {budget / 2**30:.3g} GiB: pass a smaller --group-size "
                "(another run: the group size changes the numbers) or a larger --memory-gb")
    else:
        fit = max(1, (budget - shared) // max(per_config, 1))
        size = math.ceil(n_points / math.ceil(n_points / fit))
    return [list(range(i, min(i + size, n_points))) for i in range(0, n_points, size)]


@dataclass
class FittedGrid:
    """A trained grid: the stacked head (configs in ``points`` order) and its curves.

    Evaluation takes what ``fit_grid`` took: a tensor or a ``TokenSource`` (batches are
    formed the same way as in training: linear heads without ``inputs`` read a
    (B, T, D) source batch flattened to (B, T·D)).
    """

    heads: StackedHeads
    points: list[dict]
    curves: Tensor  # (G, epochs): per config, per epoch mean train loss (CPU, float32)
    plan: StepPlan
    group_size: int
    amp: bool = False
    stacked: bool = False  # stacked kernels (`stacked_group_size`): evaluation runs them too
    flatten: bool = False  # source batches are flattened to (B, T·D) for the head
    configs: list[int] | None = None  # a rank's share of a grid: the global config indices

    def _autocast(self, device: torch.device) -> torch.autocast:
        return torch.autocast(device.type, torch.bfloat16, enabled=self.amp and
                              device.type == "cuda")

    @torch.no_grad()
    def forward_batches(self, batches: Iterable[tuple[Any, Tensor]],
                        configs: Sequence[int] | None, fn: Callable[..., None],
                        return_attention: bool = False) -> None:
        """Eval-mode forward of (key, batch) pairs, ready but for flattening, through
        chunks of ``group_size`` of ``configs`` (default: all); ``fn`` gets (global
        config indices of the chunk, head output, key)."""
        n = self.heads.n_configs
        wanted = list(range(n)) if configs is None else list(configs)
        chunks = [wanted[i : i + self.group_size] for i in range(0, len(wanted), self.group_size)]
        was_training = self.heads.training
        self.heads.eval()
        try:
            heads = [self.heads if idx == list(range(n)) else self.heads.select(idx).eval()
                     for idx in chunks]
            for key, xb in batches:
                if self.flatten:
                    xb = xb.flatten(1)
                for idx, head in zip(chunks, heads, strict=True):
                    with self._autocast(xb.device), stacked_kernels(self.stacked):
                        out = head(xb, return_attention=return_attention)
                    fn(idx, out, key)
        finally:
            self.heads.train(was_training)

    def predict_logits(
        self,
        x: Tensor | TokenSource,
        batch_size: int = 4096,
        configs: Sequence[int] | None = None,
        out_device: torch.device | str | None = None,
    ) -> Tensor:
        """Eval-mode logits (G, N, C) in fp32 on ``out_device`` (default: the compute
        device). For large grids × large N × many classes, use ``evaluate`` (streams)."""
        src = as_source(x)
        wanted = list(range(self.heads.n_configs)) if configs is None else list(configs)
        # on the compute device: a source whose samples are spread over ranks sums them
        # there (NCCL reduces device tensors only)
        out = torch.zeros(len(wanted), len(src), self.heads.n_classes, device=src.device)
        pos = {g: i for i, g in enumerate(wanted)}

        def logits(idx: list[int], o: Tensor, key: Any) -> None:
            out[pos[idx[0]] : pos[idx[-1]] + 1, key] = o.float()

        self.forward_batches(scoring_batches(src, batch_size, None), wanted, logits)
        src.combine(out)  # each sample's row is written by exactly one process
        return out.to(src.device if out_device is None else torch.device(out_device))

    def evaluate(
        self,
        x: Tensor | TokenSource,
        y: Tensor,
        batch_size: int = 4096,
        configs: Sequence[int] | None = None,
        jitter: Jitter | None = None,
    ) -> dict:
        """``classification_metrics`` for every config, streamed (no (G, N, C) tensor).
        ``jitter``: score on jittered features (the authors' validation; one seeded draw
        that every config sees)."""
        src = as_source(x)
        wanted = list(range(self.heads.n_configs)) if configs is None else list(configs)
        y = torch.as_tensor(y).to(src.device).long()
        accs: dict[int, MetricAccumulator] = {}

        def score(idx: list[int], o: Tensor, key: Any) -> None:
            acc = accs.setdefault(idx[0], MetricAccumulator(self.heads.n_classes))
            acc.update(o.float(), y[key])

        self.forward_batches(scoring_batches(src, batch_size, jitter), wanted, score)
        for acc in accs.values():  # every process scored every chunk (maybe of 0 rows)
            for t in (acc._hits1, acc._hitsk, acc._counts):
                src.combine(t)
        parts = [accs[k].compute() for k in sorted(accs)]
        merged = {
            key: [v for p in parts for v in p[key]] for key in parts[0] if key not in ("k", "n")
        }
        merged["k"], merged["n"] = parts[0]["k"], parts[0]["n"]
        return merged

    def attention(self, x: Tensor | TokenSource, batch_size: int = 4096,
                  per_head: bool = False) -> Tensor:
        """Mean attention weight per input token, (G, T) (or (G, H, T) with ``per_head``):
        averaged over samples (and heads); eval mode, so no dropout. CPU float32."""
        if not isinstance(self.heads, AttentiveHeads):
            raise TypeError("attention weights exist only for attentive heads")
        src = as_source(x)
        H, T = self.heads.num_heads, src.sample_shape[0]
        total = torch.zeros(self.heads.n_configs, H, T, device=src.device, dtype=torch.float64)

        def attn(idx: list[int], o: tuple[Tensor, Tensor], key: Any) -> None:
            n = key.numel() if isinstance(key, Tensor) else key.stop - key.start
            if n:
                batch_mean = attention_summary(o[1], per_head=True).double()
                total[idx[0] : idx[-1] + 1] += batch_mean * n

        self.forward_batches(scoring_batches(src, batch_size, None), None, attn,
                             return_attention=True)
        src.combine(total)
        mean = (total / len(src)).float().cpu()
        return mean if per_head else mean.mean(1)

    def export(self, g: int) -> dict[str, Tensor]:
        """Config g's weights as a plain state dict (safetensors-ready)."""
        return self.heads.export(g)


def fit_grid(
    x: Tensor | TokenSource,
    y: Tensor,
    n_classes: int,
    head: str,
    points: list[dict],
    cfg: TrainConfig | None = None,
    num_heads: int | None = None,
    progress: Callable[[dict], None] | None = None,
    inputs: Sequence[int] | None = None,
    part: tuple[int, int] = (0, 1),
    refit: bool = False,
) -> FittedGrid | None:
    """Train one head per grid point on (x, y), all at once, on x's (compute) device.

    x: a tensor, used as it is (batches cast to fp32): (N, d) for ``linear``, (N, T, D)
    for ``attentive``; or a ``TokenSource`` (batches normalised on the way; a linear
    head reads its (T, D) samples flattened). ``inputs`` (linear only): one token index
    per point, config g then reads token ``inputs[g]`` of (N, T, D) features (per-layer
    probes of every layer in one grid). ``num_heads`` defaults to T (the ALF rule: one
    head per token); pass 8 for the all-tokens baseline. ``progress`` gets a dict once
    per epoch per group (one host sync per epoch). Returns the stacked head with configs
    in ``points`` order.

    ``part`` (rank, ranks): train only this rank's share of the config groups, whole
    groups as one process forms them (so each config ends bit for bit where it ends in
    one process); a grid of fewer groups than ranks is first cut into as many groups as
    ranks, which changes no config's bits either (a config's arithmetic does not depend
    on its group, module doc), except where the kernels are stacked
    (`stacked_group_size`): those groups are kept, and a rank may get none. The result
    holds the share, with its global indices in ``configs``; None for a rank with no
    share.

    ``refit``: the selected configs retrained on all the data (one, or one per layer):
    on a CPU each has its own products even under ``group_size``, as `featcache predict`
    runs it, so that predict gives the stored logits bit for bit.
    """
    cfg = cfg or TrainConfig()
    kind = _head_kind(head)
    if not points:
        raise ValueError("empty grid")
    src = as_source(x)
    shape = src.sample_shape
    if inputs is not None and len(inputs) != len(points):
        raise ValueError(f"{len(inputs)} inputs for {len(points)} points")
    flatten = kind.check_input(shape, inputs, plain=isinstance(x, Tensor))
    device = src.device
    y = torch.as_tensor(y).to(device).long().flatten()
    N = len(src)
    if y.numel() != N:
        raise ValueError(f"{y.numel()} labels for {N} samples")
    if int(y.min()) < 0 or int(y.max()) >= n_classes:
        raise ValueError(f"labels must lie in [0, {n_classes})")
    plan = plan_steps(N, cfg)
    weight = class_weights(y, n_classes) if cfg.class_weighted else None
    G = len(points)
    lrs = [float(p["lr"]) for p in points]
    wds = [float(p["wd"]) for p in points]
    per_cfg, shared = kind.memory(shape, n_classes, plan.batch_size, num_heads, device, inputs)
    # every process that trains this grid forms the same groups (grid-parallel ranks
    # agree on the budget before: `selection._grid_scores`)
    budget = src.agree(cfg.memory_budget_bytes or default_memory_budget(device))
    rank, world = part
    fixed = stacked_group_size(cfg, device, refit)  # then ranks take the groups as they are
    groups = config_groups(G, per_cfg, shared, budget, fixed)
    if not fixed and world > 1 and len(groups) < world:  # every rank gets work
        groups = [c.tolist() for c in np.array_split(np.arange(G), min(G, world))]
    group_size = len(groups[0])  # evaluation chunks line up with the groups
    groups = [groups[i] for i in split_evenly(list(range(len(groups))), rank, world)]
    if not groups:
        return None

    def make(idx: list[int]) -> StackedHeads:
        gen = torch.Generator().manual_seed(cfg.seed)  # every group: the same init draw
        return kind.build_group(idx, points, shape, n_classes, num_heads, inputs, gen, device,
                                widths=src.widths)

    parts, curves = [], []
    for gi, idx in enumerate(groups):
        heads = make(idx)
        report = None
        if progress is not None:

            def report(info: dict, gi: int = gi, idx: list[int] = idx) -> None:
                progress({"group": gi, "n_groups": len(groups), "configs": idx, **info})

        with stacked_kernels(fixed is not None):
            curve = _train_group(heads, src, y, weight, [lrs[i] for i in idx],
                                 [wds[i] for i in idx], plan, cfg, report, flatten)
        parts.append(heads)
        curves.append(curve)
    stacked = type(parts[0]).concat(parts)
    mine = [i for idx in groups for i in idx]
    return FittedGrid(
        heads=stacked,
        points=[dict(points[i]) for i in mine],
        curves=torch.cat(curves).float().cpu(),
        plan=plan,
        group_size=group_size,
        amp=cfg.amp,
        stacked=fixed is not None,
        flatten=flatten,
        configs=mine if world > 1 else None,
    )


def _train_group(
    heads: StackedHeads,
    src: TokenSource,
    y: Tensor,
    weight: Tensor | None,
    lr0: list[float],
    wd: list[float],
    plan: StepPlan,
    cfg: TrainConfig,
    progress: Callable[[dict], None] | None,
    flatten: bool = False,
) -> Tensor:
    """The training loop for one group; returns (G, epochs) mean train loss on device.

    No host syncs per step: losses accumulate on the device; the lr schedule is computed
    on the host from Python floats. The shuffle is drawn on the host (a CPU generator) by
    the source (`epoch_batches`), so it is the same whether the features sit on the
    device or in host memory; a source streamed from the cache shuffles by blocks of
    shards instead (`featcache.probing.tokens.streaming`). What the source does around each step
    (jitter, masks, the loss's denominator, after backward, end of epoch) are its hooks
    (`featcache.probing.tokens.features.TokenSource`).
    """
    device = src.device
    src.prepare(heads)
    heads.train()
    params = list(heads.parameters())
    opt = BatchedAdamW(params, lr0, wd)
    lr0_t = opt.lr  # (G,) float64 on the device
    s_shuffle, s_jitter, s_drop = _stream_seeds(cfg.seed)
    g_shuffle = _generator(torch.device("cpu"), s_shuffle)
    g_jitter = _generator(device, s_jitter)
    g_drop = _generator(device, s_drop)
    use_amp = cfg.amp and device.type == "cuda"
    jitter = cfg.jitter_p > 0 and cfg.jitter_std > 0
    clip = cfg.grad_clip is not None and cfg.grad_clip > 0
    # (epochs, G): an epoch's row is contiguous, as all_reduce needs (a strided column
    # is refused by NCCL and silently mixed up by gloo)
    curves = torch.zeros(plan.epochs, heads.n_configs, device=device, dtype=torch.float64)
    total, step = plan.total_steps, 0
    for epoch in range(plan.epochs):
        epoch_loss = curves[epoch]
        for idx_y, xb in src.epoch_batches(plan.cuts, g_shuffle):
            if flatten:
                xb = xb.flatten(1)
            yb = y.index_select(0, idx_y)
            if jitter:
                xb = src.jitter(xb, cfg.jitter_std, cfg.jitter_p, g_jitter)
            if opt.fused:  # cosine_lr on the host: the fused kernel takes floats
                c = 0.5 * (1 + math.cos(math.pi * step / total))
                lr = [cfg.min_lr + (base - cfg.min_lr) * c for base in lr0]
            else:
                lr = cosine_lr(lr0_t, step, total, cfg.min_lr)
            mask = src.dropout_mask(heads, xb, g_drop)
            with torch.autocast(device.type, torch.bfloat16, enabled=use_amp):
                logits = heads(xb, generator=g_drop, dropout_mask=mask)
            loss = _per_config_loss(logits, yb, weight, src.loss_total(yb, weight, y))
            opt.zero_grad()
            loss.sum().backward()  # d(sum)/d(loss_g) = 1: config g's own gradient
            src.after_backward(params)
            if clip:
                clip_grad_norm_per_config(params, cfg.grad_clip)
            opt.step(lr)
            epoch_loss += loss.detach()
            step += 1
        src.end_epoch(epoch_loss)
        if progress is not None:
            mean = (curves[epoch] / plan.steps_per_epoch).tolist()
            progress({"epoch": epoch + 1, "epochs": plan.epochs, "loss": mean})
    return (curves / plan.steps_per_epoch).T.contiguous()  # (G, epochs)
