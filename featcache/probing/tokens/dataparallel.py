"""Data-parallel probing under torchrun: for tokens that do not fit one device.

Each rank holds the tokens of a contiguous range of whole cache shards (`RankSource`)
and trains every config of the grid on its part of each batch. Everything that decides
a result is defined over the global batch, so that the run is the one-process run up to
float rounding (sums over ranks round in another order, so it is not bitwise: its
identity names it, `data_parallel_ranks`, and docs/scaling.md states the bound):

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
  per-class hit counts, test logits and attention sums summed over ranks (``combine``).

These are the hooks of `RankSource` (a `featcache.probing.tokens.features.TokenSource`): the trainer
calls them as it calls those of a one-process source, and never asks which it has.
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
from featcache.probing.tokens.features import FeatureSource, load_source


class RankSource:
    """This rank's share of a source: the samples (global positions 0 … N-1, cache rows
    ``rows``) whose rows fall in this rank's range of shards, held in ``local`` (a
    FeatureSource over cache rows ``lo`` … ``hi`` - 1). A
    `featcache.probing.tokens.features.TokenSource`
    whose hooks make each step the global batch's (module doc)."""

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
        """Global batches in order; yields (this rank's positions in the batch, on the
        device; its part)."""
        for start in range(0, len(self), batch_size):
            positions = torch.arange(start, min(len(self), start + batch_size))
            mask, xb = self._part(positions)
            yield positions[mask].to(self.device), xb

    # -- the trainer's hooks (`featcache.probing.tokens.features.TokenSource`) ----------
    def prepare(self, heads: Any) -> None:
        heads.batch_norm = sync_batch_norm  # statistics of the global batch

    def jitter(self, xb: Tensor, std: float, p: float, gen: torch.Generator) -> Tensor:
        return global_jitter(xb, self, std, p, gen)

    def dropout_mask(self, heads: Any, xb: Tensor, gen: torch.Generator) -> Tensor | None:
        return global_dropout_mask(heads, self, xb.shape[1], gen) if xb.dim() == 3 else None

    def loss_total(self, yb: Tensor, weight: Tensor | None, y: Tensor) -> Tensor | float:
        """The global batch's weight: each rank's summed share, divided by it, adds up to
        the one-process loss (every rank holds every label)."""
        positions, _ = self.last
        if weight is None:
            return float(len(positions))
        return weight[y.index_select(0, positions.to(y.device))].sum()

    def after_backward(self, params: Sequence[Tensor]) -> None:
        all_reduce_grads(params)

    def end_epoch(self, losses: Tensor) -> None:
        all_reduce_(losses)  # each rank summed its share of every step's loss

    def agree(self, budget: int) -> int:
        return smallest(budget)  # one grouping on every rank

    def grid_part(self, rank: int, ranks: int) -> tuple[int, int]:
        return 0, 1  # every rank trains every config, on its samples

    def combine(self, t: Tensor) -> Tensor:
        return all_reduce_(t)


# -- what the trainer does differently ------------------------------------------------------

def global_jitter(xb: Tensor, src: RankSource, std: float, p: float, gen: torch.Generator,
                  draw_all: bool | None = None) -> Tensor:
    """`featcache.probing.tokens.features.jitter_batch` drawn for the global batch (the same
    draws as one
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
    if not heads.any_dropout or not heads.training:
        return None
    positions, mask = src.last
    full = heads.sample_dropout_mask(len(positions), n_tokens, gen)  # (G, B, H, T)
    return full[:, mask.to(full.device)]  # (G, B_mine, H, T)


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
    lo, hi = rank_range(cache.layout.n_shards, cache.layout.shard_size, cache.n)
    local = load_source(cache, tokens, device, budget, host_budget, normalise=normalise,
                        rows=slice(lo, hi))
    return RankSource(local, lo, hi, np.arange(cache.n))
