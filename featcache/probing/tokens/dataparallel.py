"""Data-parallel probing under torchrun: for tokens that do not fit one device.

Each rank holds the tokens of a contiguous range of whole cache shards (`RankSource`)
and trains every config of the grid on its part of each batch. Everything that decides
a result is defined over the global batch, so that the run does not depend on the
number of ranks beyond float rounding:

- the shuffle: one permutation of all samples per epoch, drawn identically on every
  rank, cut into the same batches as in one process; a rank takes the samples of each
  batch that it holds (their number varies from batch to batch; it may be 0);
- the jitter and the attention-dropout masks: drawn for the whole global batch on every
  rank, from the same seeded generators as in one process; a rank applies its rows;
- the loss: the global batch's weighted mean, so each rank divides its part's sum by the
  global weight (known to every rank: all ranks hold all labels); the gradients are then
  summed over ranks (all-reduce) before clipping and the optimiser step, which thus stay
  identical on every rank;
- BatchNorm (the attentive head's): mean and variance over the global batch (SyncBatchNorm
  semantics), through a differentiable all-reduce of the per-channel sums;
- evaluation: global batches in order (the validation jitter drawn as in one process),
  per-class hit counts summed over ranks; test logits gathered to rank 0, which writes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import Tensor

from featcache import distributed as dist
from featcache.probing.tokens.features import FeatureSource


class RankSource:
    """This rank's share of a source: the samples (global positions 0 … N-1, cache rows
    ``rows``) whose rows fall in this rank's range of shards, held in ``local`` (a
    FeatureSource over cache rows ``lo`` … ``hi`` - 1)."""

    placement = "data-parallel"

    def __init__(self, local: FeatureSource, lo: int, hi: int, rows: np.ndarray) -> None:
        self.local, self.lo, self.hi = local, lo, hi
        self.rows = np.asarray(rows, dtype=np.int64)
        mine = (self.rows >= lo) & (self.rows < hi)
        self.owned = torch.from_numpy(mine)
        self.local_index = torch.from_numpy(np.where(mine, self.rows - lo, -1))
        self.device = local.device
        self.normalise = local.normalise
        self.last: tuple[Tensor, Tensor] | None = None  # the batch's positions, and mine

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.local.sample_shape

    @property
    def widths(self) -> tuple[int, ...] | None:
        return self.local.widths

    @property
    def index_device(self) -> torch.device:
        return torch.device("cpu")

    def subset(self, index: Any) -> RankSource:
        index = np.asarray(index.cpu() if isinstance(index, Tensor) else index, dtype=np.int64)
        return RankSource(self.local, self.lo, self.hi, self.rows[index])

    def _part(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Which of the batch's positions are mine (a mask over the batch), and my batch."""
        mask = self.owned[positions]
        self.last = (positions, mask)
        return mask, self.local.gather(self.local_index[positions[mask]])

    def epoch_batches(self, steps: int, generator: torch.Generator
                      ) -> Iterator[tuple[Tensor, Tensor]]:
        """The one-process epoch (same permutation, same batches); yields this rank's
        part of each: (its global positions on the device, its samples)."""
        perm = torch.randperm(len(self), generator=generator)
        for positions in perm.tensor_split(steps):
            mask, xb = self._part(positions)
            yield positions[mask].to(self.device), xb

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Global batches in order; yields (this rank's positions in the batch, its part)."""
        for start in range(0, len(self), batch_size):
            positions = torch.arange(start, min(len(self), start + batch_size))
            mask, xb = self._part(positions)
            yield positions[mask], xb


# -- what the trainer does differently ------------------------------------------------------

def global_jitter(xb: Tensor, src: RankSource, std: float, p: float, gen: torch.Generator,
                  draw_all: bool | None = None) -> Tensor:
    """`featcache.probing.train._jitter` drawn for the global batch (the same draws as one
    process), applied to this rank's rows of it, in place."""
    positions, mask = src.last
    B = len(positions)
    shape = xb.shape[1:]
    hit = torch.rand(B, generator=gen, device=xb.device) < p
    if not (xb.device.type != "cpu" if draw_all is None else draw_all):
        order = torch.cumsum(hit.long(), 0) - 1  # a hit row's place among the hits
        noise = torch.randn((int(hit.sum()), *shape), generator=gen, dtype=xb.dtype)
        mine = torch.nonzero(mask).squeeze(1)
        sel = hit[mine]
        local = torch.nonzero(sel).squeeze(1)
        return xb.index_add_(0, local, noise[order[mine[sel]]], alpha=std)
    noise = torch.randn((B, *shape), generator=gen, device=xb.device, dtype=xb.dtype)
    scale = (hit.to(xb.dtype) * std)[mask.to(xb.device)]
    return xb.addcmul_(noise[mask.to(xb.device)], scale.view(-1, *[1] * len(shape)))


def global_dropout_mask(heads: Any, src: RankSource, n_tokens: int,
                        gen: torch.Generator) -> Tensor | None:
    """The attentive heads' dropout masks for the global batch (as one process draws
    them), this rank's rows, in the layout `forward(dropout_mask=…)` takes."""
    if not getattr(heads, "_any_dropout", False) or not heads.training:
        return None
    positions, mask = src.last
    full = heads.sample_dropout_mask(len(positions), n_tokens, gen)  # (B, T, G, H)
    return full[mask.to(full.device)].permute(2, 0, 3, 1)  # (G, B_mine, H, T)


def global_loss(logits: Tensor, yb: Tensor, weight: Tensor | None, src: RankSource,
                y: Tensor) -> Tensor:
    """Per config: this rank's share of the global batch's (weighted) mean cross entropy;
    summed over ranks it is the one-process loss."""
    from featcache.probing.train import per_sample_nll

    positions, _ = src.last
    nll = per_sample_nll(logits, yb)
    if weight is None:
        return nll.sum(1) / len(positions)
    everyone = y.index_select(0, positions.to(y.device))
    return (nll * weight[yb]).sum(1) / weight[everyone].sum()


def all_reduce_grads(params: Sequence[Tensor]) -> None:
    """Sum the gradients over ranks, in one flat buffer."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    tdist.all_reduce(flat)
    start = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        if p.grad is None:
            p.grad = flat[start: start + n].view_as(p).clone()
        else:
            p.grad.copy_(flat[start: start + n].view_as(p))
        start += n


def sync_batch_norm(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor,
                    bias: Tensor, training: bool, momentum: float, eps: float) -> Tensor:
    """`F.batch_norm` on (1, C, B) with the statistics of the global batch (every rank's
    B together): per-channel sums all-reduced, differentiably."""
    if not training:
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps)
    from torch.distributed.nn.functional import all_reduce

    count = torch.tensor([float(x.shape[-1])], device=x.device, dtype=x.dtype)
    stats = all_reduce(torch.cat([x.sum(-1).view(-1), (x * x).sum(-1).view(-1), count]))
    C = x.shape[1]
    n = stats[-1]
    mean = stats[:C] / n
    var = (stats[C: 2 * C] / n - mean * mean).clamp_min(0)
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
        running_var.mul_(1 - momentum).add_(var.detach() * n / max(float(n) - 1, 1.0),
                                            alpha=momentum)
    scale = weight * torch.rsqrt(var + eps)
    return (x - mean.view(1, C, 1)) * scale.view(1, C, 1) + bias.view(1, C, 1)


def smallest(value: int) -> int:
    """The smallest of the ranks' values (each rank's free memory differs; the grid's
    grouping, and so every collective call, must not)."""
    if dist.world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64,
                     device="cuda" if tdist.get_backend() == "nccl" else "cpu")
    tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
    return int(t.item())


def all_reduce_(t: Tensor) -> Tensor:
    tdist.all_reduce(t)
    return t


# -- evaluation ----------------------------------------------------------------------------

def evaluate(grid: Any, src: RankSource, y: Tensor, batch_size: int, configs: Any,
             jitter: Any) -> dict:
    """`FittedGrid.evaluate` over global batches: hits per class summed over ranks."""
    from featcache.metrics import MetricAccumulator

    y = torch.as_tensor(y).to(src.device).long()
    accs: dict[int, MetricAccumulator] = {}

    def score(idx: list[int], out: Tensor, positions: Tensor) -> None:
        acc = accs.setdefault(idx[0], MetricAccumulator(grid.heads.n_classes))
        acc.update(out.float(), y[positions.to(y.device)])

    _forward(grid, src, batch_size, configs, score, jitter=jitter)
    keys = sorted(accs)
    for acc in (accs[k] for k in keys):  # every rank scored every chunk (maybe 0 rows)
        for t in (acc._hits1, acc._hitsk, acc._counts):
            all_reduce_(t)
    parts = [accs[k].compute() for k in keys]
    merged = {key: [v for p in parts for v in p[key]] for key in parts[0]
              if key not in ("k", "n")}
    merged["k"], merged["n"] = parts[0]["k"], parts[0]["n"]
    return merged


def predict_logits(grid: Any, src: RankSource, batch_size: int, configs: Any,
                   out_device: Any) -> Tensor:
    """(G, N, C) logits on every rank: each rank's rows, gathered."""
    wanted = list(range(grid.heads.n_configs)) if configs is None else list(configs)
    # on the compute device: NCCL reduces device tensors only
    out = torch.zeros(len(wanted), len(src), grid.heads.n_classes, device=src.device)
    pos = {g: i for i, g in enumerate(wanted)}

    def keep(idx: list[int], o: Tensor, positions: Tensor) -> None:
        out[pos[idx[0]]: pos[idx[-1]] + 1, positions.to(src.device)] = o.float()

    _forward(grid, src, batch_size, wanted, keep)
    all_reduce_(out)  # each sample's row is nonzero on exactly one rank
    return out.to(out_device or src.device)


def attention(grid: Any, src: RankSource, batch_size: int, per_head: bool) -> Tensor:
    """Mean attention per input token over every rank's samples."""
    from featcache.probing.heads import attention_summary

    H, T = grid.heads.num_heads, src.sample_shape[0]
    total = torch.zeros(grid.heads.n_configs, H, T, dtype=torch.float64, device=src.device)

    def add(idx: list[int], o: tuple[Tensor, Tensor], positions: Tensor) -> None:
        if len(positions):
            total[idx[0]: idx[-1] + 1] += attention_summary(o[1], per_head=True).double() \
                * len(positions)

    _forward(grid, src, batch_size, None, add, return_attention=True)
    all_reduce_(total)
    mean = (total / len(src)).float().cpu()
    return mean if per_head else mean.mean(1)


def _forward(grid: Any, src: RankSource, batch_size: int, configs: Any, fn: Any,
             return_attention: bool = False, jitter: Any = None) -> None:
    """`FittedGrid._forward_chunks` over global batches: ``fn`` gets this rank's
    positions instead of a slice (the validation jitter drawn for the global batch)."""
    from featcache.probing.train import _generator

    gen = None if jitter is None else _generator(src.device, jitter.seed)

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        for positions, xb in src.batches(batch_size):
            if gen is not None:
                xb = global_jitter(xb.clone(), src, jitter.std, jitter.p, gen)
            yield positions, xb

    grid.forward_batches(batches(), configs, fn, return_attention)


def rank_range(n_shards: int, shard_size: int, n: int) -> tuple[int, int]:
    """This rank's contiguous range of whole shards, as cache rows [lo, hi)."""
    mine = dist.split_evenly(list(range(n_shards)), dist.rank(), dist.world_size())
    if not mine:
        return 0, 0
    return mine[0] * shard_size, min(n, (mine[-1] + 1) * shard_size)


def load_rank_source(cache: Any, tokens: list[tuple[str, str]], device: torch.device,
                     budget: int | None, host_budget: int | None,
                     normalise: str | None) -> RankSource:
    """This rank's range of whole shards of the cache, loaded (on its device if they fit,
    else in host memory), as a RankSource over all the cache's samples."""
    from featcache.probing.tokens.features import load_source

    lo, hi = rank_range(cache.layout.n_shards, cache.layout.shard_size, cache.n)
    local = load_source(cache, tokens, device, budget, host_budget, normalise=normalise,
                        rows=slice(lo, hi))
    return RankSource(local, lo, hi, np.arange(cache.n))
