"""Probing a cache larger than memory: the tokens streamed from the cache as training goes.

A `StreamedSource` stands in for a `featcache.probing.tokens.features.FeatureSource` when the
tokens a
method needs do not fit host memory (or `--max-host-memory-gb`). It never holds more
than two buffers of whole shards (the one being trained on, the next one being read in a
thread), each at most a third of the host budget.

Shuffling. In memory, each epoch is one uniform permutation of all samples. Streamed,
an epoch is: the shards (holding this source's samples) in a random order, taken
`buffer_shards` at a time, and the samples of each buffer in a random order; the
resulting sequence is cut into the same number of equal batches as in memory. So every
sample is seen exactly once per epoch, as before, but a batch draws from the few shards
in the buffer, not from the whole cache. Shards hold samples in dataset order, which for
most datasets is class-sorted or grouped by source: the fewer shards per buffer, the
less mixed a batch. With the buffer at a third of the budget this is a few percent of a
large cache; the probes' accuracy on a planted-signal cache is that of the in-memory
run within noise (`tests/test_streaming.py`). Both orders are drawn from the same seeded
generator, so a streamed run is reproducible, but it is not the in-memory run.

Evaluation reads in order (`batches`), shard by shard, with the next shard read ahead.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import Tensor

from featcache.errors import FeatcacheError
from featcache.probing.tokens.features import FeatureSource, LocalSource, TokenPlan, fill_tokens
from featcache.text import human_bytes

BUFFERS = 3  # the host budget is split in thirds: two buffers of shards, one for the rest


class StreamedSource(LocalSource):
    """The planned tokens of some cache rows (``rows``, in this source's order), read
    from the cache in buffers of whole shards; a `featcache.probing.tokens.features.TokenSource`."""

    placement = "stream"

    def __init__(self, cache: Any, plan: TokenPlan, device: torch.device | str,
                 normalise: bool | str | None, host_budget: int,
                 rows: np.ndarray | None = None) -> None:
        self.cache, self.plan = cache, plan
        self.device = torch.device(device)
        self.normalise = normalise
        self.host_budget = int(host_budget)
        self.rows = np.arange(cache.n, dtype=np.int64) if rows is None else \
            np.asarray(rows, dtype=np.int64)
        self.shard_size = cache.layout.shard_size
        shard_bytes = self.shard_size * plan.row_bytes
        self.buffer_shards = int(self.host_budget // BUFFERS // max(1, shard_bytes))
        if self.buffer_shards < 1:
            raise FeatcacheError(
                f"{cache.path}: one shard of these tokens is {human_bytes(shard_bytes)}, and "
                f"streaming needs {BUFFERS} times that in host memory; the budget is "
                f"{human_bytes(self.host_budget)}: raise --max-host-memory-gb")

    # -- the TokenSource interface ------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.plan.n_tok, self.plan.dim)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.sample_shape)

    @property
    def widths(self) -> tuple[int, ...] | None:
        return self.plan.widths

    @property
    def index_device(self) -> torch.device:
        return torch.device("cpu")

    def __repr__(self) -> str:
        return (f"StreamedSource(shape={self.shape}, buffer={self.buffer_shards} shards, "
                f"device={self.device})")

    def subset(self, index: Any) -> StreamedSource:
        index = np.asarray(index.cpu() if isinstance(index, Tensor) else index, dtype=np.int64)
        return StreamedSource(self.cache, self.plan, self.device, self.normalise,
                              self.host_budget, self.rows[index])

    def gather(self, idx: Tensor) -> Tensor:
        raise FeatcacheError("a streamed source has no random access; use epoch_batches")

    # -- reading ------------------------------------------------------------------------
    def _read(self, shards: list[int]) -> tuple[FeatureSource, dict[int, int]]:
        """The shards' rows, as one host FeatureSource, and each shard's first row in it."""
        S, n = self.shard_size, self.cache.n
        sizes = [min(n, (k + 1) * S) - k * S for k in shards]
        block = np.zeros((sum(sizes), self.plan.n_tok, self.plan.dim), dtype=np.float16)
        start, where = 0, {}
        for k, size in zip(shards, sizes, strict=True):
            fill_tokens(self.cache, self.plan, slice(k * S, k * S + size),
                        block[start: start + size])
            where[k] = start
            start += size
        return FeatureSource(torch.from_numpy(block), self.device, self.normalise,
                             placement="host"), where

    def _windows(self, groups: list[list[int]]
                 ) -> Iterator[tuple[FeatureSource, dict[int, int]]]:
        """Each group of shards read, the next one in a thread while this one is used."""
        with ThreadPoolExecutor(1) as pool:
            ahead = pool.submit(self._read, groups[0]) if groups else None
            for i in range(len(groups)):
                window = ahead.result()
                ahead = pool.submit(self._read, groups[i + 1]) if i + 1 < len(groups) \
                    else None
                yield window

    def _local(self, positions: np.ndarray, where: dict[int, int]) -> Tensor:
        rows = self.rows[positions]
        shard = rows // self.shard_size
        first = np.array([where[k] for k in shard.tolist()], dtype=np.int64)
        return torch.from_numpy(first + rows - shard * self.shard_size)

    def epoch_batches(self, steps: int, generator: torch.Generator
                      ) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch in buffer-shuffled order (module doc), cut into ``steps`` batches;
        yields (positions on the compute device, for the labels; the batch)."""
        shard_of = self.rows // self.shard_size
        present = np.unique(shard_of)
        order = present[torch.randperm(len(present), generator=generator).numpy()]
        groups = [order[i: i + self.buffer_shards].tolist()
                  for i in range(0, len(order), self.buffer_shards)]
        by_shard: dict[int, np.ndarray] = {}
        sorted_pos = np.argsort(shard_of, kind="stable")
        bounds = np.searchsorted(shard_of[sorted_pos], present, side="left")
        for k, lo, hi in zip(present.tolist(), bounds, [*bounds[1:], len(sorted_pos)],
                             strict=True):
            by_shard[k] = sorted_pos[lo:hi]
        sequence, group_of = [], []
        for g, group in enumerate(groups):
            pos = np.concatenate([by_shard[k] for k in group])
            pos = pos[torch.randperm(len(pos), generator=generator).numpy()]
            sequence.append(pos)
            group_of.append(np.full(len(pos), g))
        order_pos, order_group = np.concatenate(sequence), np.concatenate(group_of)
        windows = self._windows(groups)
        loaded: dict[int, tuple[FeatureSource, dict[int, int]]] = {}
        next_group = 0
        for cut in np.array_split(np.arange(len(order_pos)), steps):
            pos, grp = order_pos[cut], order_group[cut]
            while next_group <= grp.max():  # the batch reaches into the next buffer
                loaded[next_group] = next(windows)
                next_group += 1
            for g in [g for g in loaded if g < grp.min()]:
                del loaded[g]  # done with it: its memory goes
            parts = [loaded[g][0].gather(self._local(pos[grp == g], loaded[g][1]))
                     for g in np.unique(grp).tolist()]
            yield torch.from_numpy(pos).to(self.device), torch.cat(parts) \
                if len(parts) > 1 else parts[0]

    def batches(self, batch_size: int) -> Iterator[tuple[slice, Tensor]]:
        """Consecutive samples in this source's order (its rows ascending, as subsets of a
        cache are), read shard by shard, the next buffer ahead in a thread."""
        n = len(self)
        shard_of = self.rows // self.shard_size
        if n and (np.diff(shard_of) < 0).any():
            raise FeatcacheError("a streamed source reads its rows in cache order only")
        present = np.unique(shard_of).tolist()
        groups = [present[i: i + self.buffer_shards]
                  for i in range(0, len(present), self.buffer_shards)]
        window_of = {k: g for g, group in enumerate(groups) for k in group}
        windows = self._windows(groups)
        loaded: dict[int, tuple[FeatureSource, dict[int, int]]] = {}
        next_group = 0
        for start in range(0, n, batch_size):
            pos = np.arange(start, min(n, start + batch_size))
            grp = np.array([window_of[k] for k in shard_of[pos].tolist()])
            while next_group <= grp.max():
                loaded[next_group] = next(windows)
                next_group += 1
            for g in [g for g in loaded if g < grp.min()]:
                del loaded[g]
            parts = [loaded[g][0].gather(self._local(pos[grp == g], loaded[g][1]))
                     for g in np.unique(grp).tolist()]
            yield slice(start, start + len(pos)), torch.cat(parts) if len(parts) > 1 \
                else parts[0]

    def to_tensor(self) -> Tensor:
        return torch.cat([xb for _, xb in self.batches(4096)])
