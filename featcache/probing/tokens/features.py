"""Features for probing: the tokens a method needs, read once from the cache, served in batches.

A `FeatureSource` holds the raw tokens (N, T, D) exactly as the cache stores them
(float16) and hands out batches as float32 on the compute device, L2-normalised inside
`gather`: each token vector (per layer and token kind, as the paper), or, for the
authors' all-tokens baseline, each channel across the T tokens (their `normalize(dim=1)`
on (N, T, D) features; `NORMALISE`). Normalising per
batch, on the compute device, from the same float16 values means both placements below
give bit-identical batches, so a probe's result never depends on where its features sat.

Placement:

- **device**: the raw tokens live on the compute device (CUDA when present), one tensor;
  a batch is an `index_select` there. Chosen when they fit the feature budget.
- **host**: they stay in host memory (pinned on CUDA) and each batch is gathered on the
  host and copied to the device through two pinned staging buffers, so copying the next
  batch overlaps the current step. Chosen when the tokens do not fit the device budget.

Reading (`load_source`) is per layer and token kind: only the layers a method needs are
read from Zarr (the cache's inner chunks hold one layer each), shard by shard, straight
into the tensor at its final placement, so the float16 tokens are the only full copy.

Beyond host memory, `featcache.probing.run` streams the tokens from the cache
(`featcache.probing.tokens.streaming.StreamedSource`, through ``load_source(stream=...)``), and
under
torchrun a data-parallel rank holds its range of shards
(`featcache.probing.tokens.dataparallel.RankSource`).

One interface, `TokenSource`, is what the trainer and the evaluation see: these three
sources implement it, and the trainer calls its hooks (batches, jitter, dropout masks,
the loss's denominator, after backward, end of epoch, ...) without ever asking which
placement it has.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from featcache.errors import FeatcacheError
from featcache.text import human_bytes

__all__ = [
    "TokenSource",
    "LocalSource",
    "FeatureSource",
    "Jitter",
    "jitter_batch",
    "scoring_batches",
    "as_source",
    "load_source",
    "available_host_memory",
    "default_feature_budget",
]

NORM_EPS = 1e-12
# How a sample's (T, D) tokens are L2-normalised: "token": each token vector (over D);
# "channel": each channel over the T tokens (the authors' all-tokens features); None: not.
NORMALISE = ("token", "channel", None)
HOST_FRACTION = 0.8  # of MemAvailable the raw tokens may take
DEVICE_FRACTION = 0.5  # of free device memory (the rest is for the grid's heads)


@runtime_checkable
class TokenSource(Protocol):
    """What the trainer (`featcache.probing.train`) and the evaluation read tokens through.

    Implemented by `FeatureSource` (tokens on the device or in host memory),
    `featcache.probing.tokens.streaming.StreamedSource` (read from the cache as training goes) and
    `featcache.probing.tokens.dataparallel.RankSource` (a torchrun rank's share of the samples). The
    trainer calls these and nothing else; ``placement`` is what the run record says
    (device, host, stream, data-parallel), never a thing to branch on.

    Batches: ``epoch_batches(steps, generator)`` yields (the batch's sample positions on
    the compute device, for the labels; the float32 batch, the caller's to modify);
    ``batches(batch_size)`` yields (a key that indexes this batch's rows of a per-sample
    tensor: a slice, or positions on the device; the batch, read only).

    Hooks around a training step, in the order the trainer calls them:
    ``prepare(heads)`` once per group; ``jitter(xb, std, p, gen)`` on each batch (in
    place); ``dropout_mask(heads, xb, gen)`` (None: the heads draw their own);
    ``loss_total(yb, weight, y)``, what a config's summed loss over this batch is divided
    by (None: this batch's own weight); ``after_backward(params)``; ``end_epoch(losses)``.
    Between the processes that train one grid together: ``agree(budget)`` (the memory
    budget they all use), ``grid_part(rank, ranks)`` (the share of the grid's config
    groups this process trains: (rank, ranks) when ranks split the grid, (0, 1) when they
    split the samples), ``combine(t)`` (a per-process sum made global, in place).
    """

    placement: str
    device: torch.device

    def __len__(self) -> int: ...

    @property
    def sample_shape(self) -> tuple[int, ...]: ...

    def subset(self, index: Any) -> TokenSource: ...

    def epoch_batches(self, steps: int, generator: torch.Generator
                      ) -> Iterator[tuple[Tensor, Tensor]]: ...

    def batches(self, batch_size: int) -> Iterator[tuple[Any, Tensor]]: ...

    def prepare(self, heads: Any) -> None: ...

    def jitter(self, xb: Tensor, std: float, p: float, gen: torch.Generator) -> Tensor: ...

    def dropout_mask(self, heads: Any, xb: Tensor, gen: torch.Generator
                     ) -> Tensor | None: ...

    def loss_total(self, yb: Tensor, weight: Tensor | None, y: Tensor) -> Tensor | None: ...

    def after_backward(self, params: Sequence[Tensor]) -> None: ...

    def end_epoch(self, losses: Tensor) -> None: ...

    def agree(self, budget: int) -> int: ...

    def grid_part(self, rank: int, ranks: int) -> tuple[int, int]: ...

    def combine(self, t: Tensor) -> Tensor: ...


class LocalSource:
    """The `TokenSource` hooks of a source that holds every sample in this process: each
    step is the batch's own, and ranks under torchrun split the grid."""

    def prepare(self, heads: Any) -> None:
        return None

    def jitter(self, xb: Tensor, std: float, p: float, gen: torch.Generator) -> Tensor:
        return jitter_batch(xb, std, p, gen)

    def dropout_mask(self, heads: Any, xb: Tensor, gen: torch.Generator) -> Tensor | None:
        return None

    def loss_total(self, yb: Tensor, weight: Tensor | None, y: Tensor) -> Tensor | None:
        return None

    def after_backward(self, params: Sequence[Tensor]) -> None:
        return None

    def end_epoch(self, losses: Tensor) -> None:
        return None

    def agree(self, budget: int) -> int:
        return budget

    def grid_part(self, rank: int, ranks: int) -> tuple[int, int]:
        return rank, ranks

    def combine(self, t: Tensor) -> Tensor:
        return t


@dataclass(frozen=True)
class Jitter:
    """Gaussian feature jitter for scoring: N(0, std²) per sample with probability p."""

    std: float
    p: float
    seed: int


def generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def jitter_batch(xb: Tensor, std: float, p: float, gen: torch.Generator,
                 draw_all: bool | None = None) -> Tensor:
    """Gaussian feature jitter: each sample gets N(0, std²) noise with probability p.

    In place (``xb`` must be a fresh batch). On CPU only the hit samples' noise is drawn
    (sampling normals is a large part of a small probe's step); on a GPU (``draw_all``)
    noise is drawn for every sample and masked, so the number of hits never has to reach
    the host.
    """
    B = xb.shape[0]
    hit = torch.rand(B, generator=gen, device=xb.device) < p
    if not (xb.device.type != "cpu" if draw_all is None else draw_all):
        idx = hit.nonzero().squeeze(1)
        noise = torch.randn((idx.numel(), *xb.shape[1:]), generator=gen, dtype=xb.dtype)
        return xb.index_add_(0, idx, noise, alpha=std)
    noise = torch.randn(xb.shape, generator=gen, device=xb.device, dtype=xb.dtype)
    return xb.addcmul_(noise, (hit.to(xb.dtype) * std).view((B,) + (1,) * (xb.dim() - 1)))


def scoring_batches(src: TokenSource, batch_size: int, jitter: Jitter | None
                    ) -> Iterator[tuple[Any, Tensor]]:
    """``src.batches`` for evaluation, jittered when asked (one seeded draw that every
    config sees; a batch may be a view of the tokens, so it is copied first)."""
    gen = None if jitter is None else generator(src.device, jitter.seed)
    for key, xb in src.batches(batch_size):
        if gen is not None and jitter is not None:
            xb = src.jitter(xb.clone(), jitter.std, jitter.p, gen)
        yield key, xb


class FeatureSource(LocalSource):
    """Tokens (N, T, D) (or any (N, ...)) on the device or in host memory; see module doc.

    ``rows`` (optional) maps this source's sample i to row ``rows[i]`` of ``raw``:
    subsets (train/validation split, k-shot, valid rows) share one raw tensor.
    ``normalise``: one of `NORMALISE` (True is "token", False is None), applied in
    ``gather``.
    """

    def __init__(self, raw: Tensor, device: torch.device | str | None = None,
                 normalise: bool | str | None = "token", rows: Tensor | None = None,
                 placement: str | None = None, widths: Sequence[int] | None = None) -> None:
        if raw.dim() < 2:
            raise ValueError(f"need (N, ...) features, got shape {tuple(raw.shape)}")
        if not raw.is_floating_point():
            raise ValueError("features must be floating point")
        normalise = {True: "token", False: None}.get(normalise, normalise)  # type: ignore
        if normalise not in NORMALISE or (normalise == "channel" and raw.dim() < 3):
            raise ValueError(f"normalise must be one of {NORMALISE} (channel: (N, T, D) "
                             f"features), got {normalise!r}")
        self.raw = raw
        self.device = torch.device(device) if device is not None else raw.device
        self.normalise = normalise
        self.rows = None if rows is None else rows.to(raw.device, torch.long)
        on_device = _same_device(raw.device, self.device)
        if placement is None:
            placement = "device" if on_device else "host"
        if placement not in ("device", "host") or (placement == "device" and not on_device) \
                or (placement == "host" and raw.device.type != "cpu"):
            raise ValueError(f"placement {placement!r} does not fit raw tokens on "
                             f"{raw.device} and compute device {self.device}")
        # "host" on a CPU compute device: the same memory, but the streamed code path
        self.placement = placement
        self.widths = token_widths(widths, raw.shape[-1])
        self._stager: _Stager | None = None

    def __len__(self) -> int:
        return int(self.raw.shape[0] if self.rows is None else self.rows.numel())

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.raw.shape[1:])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.sample_shape)

    @property
    def nbytes(self) -> int:
        return self.raw.numel() * self.raw.element_size()

    @property
    def index_device(self) -> torch.device:
        """Where `gather`'s indices should live (no copy, no sync): the raw tokens' device."""
        return self.raw.device

    def __repr__(self) -> str:
        return (f"FeatureSource(shape={self.shape}, dtype={self.raw.dtype}, "
                f"placement={self.placement}, device={self.device})")

    # -- views --------------------------------------------------------------------------
    def subset(self, index: Tensor | np.ndarray | Sequence[int]) -> FeatureSource:
        """Samples ``index`` of this source (no copy of the tokens)."""
        idx = torch.as_tensor(np.asarray(index) if not isinstance(index, Tensor) else index,
                              dtype=torch.long).to(self.raw.device)
        rows = idx if self.rows is None else self.rows.index_select(0, idx)
        return FeatureSource(self.raw, self.device, self.normalise, rows, self.placement,
                             self.widths)

    def to_tensor(self) -> Tensor:
        """All samples as one float32 tensor on the compute device (small sources only)."""
        return torch.cat([xb for _, xb in self.batches(max(1, len(self)))]) if len(self) \
            else torch.empty((0, *self.sample_shape), device=self.device)

    # -- batches ------------------------------------------------------------------------
    def gather(self, idx: Tensor) -> Tensor:
        """Samples ``idx`` as a fresh float32 (B, ...) tensor on the compute device, each
        token L2-normalised (when ``normalise``); the caller may modify it in place.

        Pass ``idx`` on ``index_device``: a device-resident source indexes on the device,
        a host-resident one on the host (then copies the batch over)."""
        idx = idx.to(self.raw.device)
        rows = idx if self.rows is None else self.rows.index_select(0, idx)
        return self._finish(self._take(rows), fresh=True)

    def epoch_batches(self, steps: int, generator: torch.Generator
                      ) -> Iterator[tuple[Tensor, Tensor]]:
        """One training epoch: a permutation of the samples (drawn from ``generator``, a
        CPU generator) cut into ``steps`` near-equal batches; yields (sample indices on
        the compute device, for the labels; the batch, as `gather` gives it)."""
        perm = torch.randperm(len(self), generator=generator)
        perm_x = perm.to(self.index_device, non_blocking=True)
        perm_y = perm.to(self.device, non_blocking=True)  # labels live on the device
        for idx, idx_y in zip(perm_x.tensor_split(steps), perm_y.tensor_split(steps),
                              strict=True):
            yield idx_y, self.gather(idx)

    def batches(self, batch_size: int) -> Iterator[tuple[slice, Tensor]]:
        """Consecutive slices (for evaluation): (slice of samples, float32 batch). A batch
        may be a view of the raw tokens: read it, do not modify it."""
        n = len(self)
        for start in range(0, n, batch_size):
            s = slice(start, min(n, start + batch_size))
            if self.rows is not None:
                yield s, self._finish(self._take(self.rows[s]), fresh=True)
            else:  # a slice of (pinned) host tokens is copied as it is
                yield s, self._finish(self.raw[s], fresh=False)

    @property
    def _streamed(self) -> bool:
        return self.placement == "host" and self.device.type == "cuda"

    def _take(self, rows: Tensor) -> Tensor:
        if self._streamed:
            return self._stage(rows)
        return self.raw.index_select(0, rows)

    def _stage(self, rows: Tensor) -> Tensor:
        if self._stager is None:
            self._stager = _Stager(self.raw, self.device)
        return self._stager.copy(rows)

    def _finish(self, xb: Tensor, fresh: bool) -> Tensor:
        """float32 on the device; normalised. ``fresh``: ``xb`` is ours to modify, and so
        is the result (a float32 view of the raw tokens is copied before it is returned)."""
        out = xb.to(self.device, torch.float32, non_blocking=True)
        owned = fresh or out.data_ptr() != xb.data_ptr() or out.device != xb.device
        if self.normalise is not None:
            axis = -1 if self.normalise == "token" else -2
            norm = torch.linalg.vector_norm(out, dim=axis, keepdim=True).clamp_min_(NORM_EPS)
            return out.div_(norm) if owned else out / norm
        return out


class _Stager:
    """Two pinned host buffers: gather a batch into one, copy it to the device without
    blocking, and reuse a buffer only once its previous copy has finished (an event wait
    for the copy issued two batches ago, so the host runs at most two batches ahead)."""

    def __init__(self, raw: Tensor, device: torch.device, n: int = 2) -> None:
        self.raw, self.device = raw, device
        self.buffers: list[Tensor | None] = [None] * n
        self.events: list[Any] = [None] * n
        self.i = 0

    def copy(self, rows: Tensor) -> Tensor:
        """Rows ``rows`` (a host index) of the raw tokens, on the device."""
        i = self.i
        self.i = (i + 1) % len(self.buffers)
        if self.events[i] is not None:
            self.events[i].synchronize()  # this buffer's previous copy has landed
        n = int(rows.numel())
        cuda = self.device.type == "cuda"
        buf = self.buffers[i]
        if buf is None or buf.shape[0] < n:
            buf = torch.empty((n, *self.raw.shape[1:]), dtype=self.raw.dtype, pin_memory=cuda)
            self.buffers[i] = buf
        out = buf[:n]
        torch.index_select(self.raw, 0, rows, out=out)
        if not cuda:  # (tests) nothing in flight: hand out a copy, keep the buffer
            return out.clone()
        on_device = out.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.events[i] = event
        return on_device


def token_widths(widths: Sequence[int] | None, dim: int) -> tuple[int, ...] | None:
    """Each token's true width (its first ``widths[t]`` channels; the rest is zero
    padding), or None when every token fills all ``dim`` channels. Heads that read tokens
    side by side or one at a time read them at these widths (`LinearHeads`): CLIP's
    projected final layer is 512 wide in a 768-wide cache."""
    if widths is None or all(int(w) == dim for w in widths):
        return None
    if any(not 0 < int(w) <= dim for w in widths):
        raise ValueError(f"token widths must lie in [1, {dim}], got {list(widths)}")
    return tuple(int(w) for w in widths)


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (a.index if a.index is not None else current) == \
        (b.index if b.index is not None else current)


def as_source(x: Any) -> TokenSource:
    """A plain tensor is used as it is (already normalised by the caller), on its device;
    a `TokenSource` as it is."""
    if isinstance(x, Tensor):
        return FeatureSource(x, x.device, normalise=False)
    if not isinstance(x, TokenSource):
        raise TypeError(f"features must be a tensor or a TokenSource, got {type(x).__name__}")
    return x


# -- memory -----------------------------------------------------------------------------

def available_host_memory() -> int:
    """Bytes of host memory available now (MemAvailable; sysconf where there is no /proc)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def default_feature_budget(device: torch.device) -> int:
    """Bytes of raw tokens kept on the device: half its free memory on CUDA; on CPU the
    device is the host, so the budget is the host's."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(DEVICE_FRACTION * free)
    return int(HOST_FRACTION * available_host_memory())


# -- reading from the cache ---------------------------------------------------------------

@dataclass(frozen=True)
class TokenPlan:
    """Where each token a method reads comes from, and the (T, D) shape it fills."""

    tokens: tuple[tuple[str, str], ...]
    n_tok: int
    dim: int
    all_tokens: bool
    by_kind: dict[str, dict[int, list[int]]]  # kind → layer index → token slots
    widths: tuple[int, ...] | None = None  # each token's true width (`token_widths`)

    @property
    def row_bytes(self) -> int:
        return self.n_tok * self.dim * 2


def token_plan(cache: Any, tokens: list[tuple[str, str]]) -> TokenPlan:
    """Check the tokens against the cache (one line for a kind it lacks) and plan them."""
    if tokens == [("final", "all")]:
        return TokenPlan(tuple(tokens), cache.layout.n_tokens, cache.layout.token_dim, True,
                         {})
    by_kind: dict[str, dict[int, list[int]]] = {}
    for t, (name, kind) in enumerate(tokens):
        cache.check_token(name, kind)
        layer = 0 if kind == "pool" else cache.layer_index([name])[0]
        by_kind.setdefault(kind, {}).setdefault(layer, []).append(t)
    widths = [cache.token_width(n_, k) for n_, k in tokens]
    dim = max([cache.dim, *widths])
    return TokenPlan(tuple(tokens), len(tokens), dim, False, by_kind,
                     token_widths(widths, dim))


def fill_tokens(cache: Any, plan: TokenPlan, rows: slice, block: np.ndarray) -> None:
    """Cache rows ``rows`` of the planned tokens into ``block`` (rows, T, D) float16,
    each token's first slot straight from the shard files; narrower tokens leave their
    padding as it was (callers zero it)."""
    if plan.all_tokens:
        block[:] = cache.read("last_tokens", rows=rows)
        return
    for kind, slots in plan.by_kind.items():
        layers = sorted(slots)
        cache.read_into(kind, None if kind == "pool" else layers, rows, block,
                        [slots[layer][0] for layer in layers])
    for slots in plan.by_kind.values():  # a token asked for twice: its other slots
        for first, *others in slots.values():
            for t in others:
                block[:, t] = block[:, first]


def load_source(cache: Any, tokens: list[tuple[str, str]], device: torch.device,
                budget_bytes: int | None = None, host_budget_bytes: int | None = None,
                normalise: bool | str | None = "token",
                stream: Callable[..., TokenSource] | None = None,
                rows: slice | None = None, too_big: str | None = None) -> TokenSource:
    """The cache's tokens, in order, as a FeatureSource over all N samples (or over the
    cache rows ``rows``: a data-parallel rank's range of shards).

    ``tokens``: (layer name, "cls" | "ap" | "pool") pairs, or ``[("final", "all")]`` for
    every token of the last layer (``--all-tokens`` caches). Only these layers are read,
    shard by shard, into a float16 tensor on ``device`` if its size fits ``budget_bytes``
    (default: `default_feature_budget`), else into (pinned) host memory if it fits
    ``host_budget_bytes`` (default: 80 % of the memory available), else, with
    ``stream`` (`featcache.probing.tokens.streaming.StreamedSource`, called as ``stream(cache, plan,
    device, normalise, host_budget)``), a source that reads them from the cache as it
    goes (buffers within the host budget); without it that is one clear error, whose way
    out is ``too_big`` where the caller knows better than the default (k-NN).
    Tokens narrower than the widest (a pooled embedding of another width) are zero-padded,
    which changes neither their norm nor any dot product.
    """
    rows = rows if rows is not None else slice(0, cache.n)
    base, n = rows.start, rows.stop - rows.start
    plan = token_plan(cache, tokens)
    n_tok, dim = plan.n_tok, plan.dim
    nbytes = n * plan.row_bytes
    budget = default_feature_budget(device) if budget_bytes is None else int(budget_bytes)
    placement = "device" if nbytes <= budget else "host"
    if placement == "host" or device.type == "cpu":  # host memory holds them
        host_budget = (int(HOST_FRACTION * available_host_memory())
                       if host_budget_bytes is None else int(host_budget_bytes))
        if nbytes > host_budget:
            if stream is not None and n == cache.n:
                return stream(cache, plan, device, normalise, host_budget)
            fix = too_big or (
                "probe fewer layers (--layers) or fewer samples (--shots), or " +
                ("launch more ranks (each holds its share of the shards)" if n < cache.n
                 else "let featcache stream them from the cache (featcache probe does, "
                 "within --max-host-memory-gb)"))
            raise FeatcacheError(
                f"the {n_tok} tokens × {dim} of {n} samples in {cache.path} need "
                f"{human_bytes(nbytes)} (float16), more than the {human_bytes(host_budget)} "
                f"of host memory available for them; {fix}")
    target = device if placement == "device" else torch.device("cpu")
    pin = placement == "host" and device.type == "cuda"
    raw = torch.empty((n, n_tok, dim), dtype=torch.float16, device=target, pin_memory=pin)
    padded = not plan.all_tokens and any(k == "pool" for _, k in tokens)
    if padded:
        raw.zero_()  # the padding of tokens narrower than `dim`
    if raw.device.type == "cpu":  # straight into place: one pass per kind, read ahead
        fill_tokens(cache, plan, rows, raw.numpy())
    else:  # a GPU: through host blocks of whole shards
        block = max(1, cache.layout.shard_size)
        block *= max(1, READ_BLOCK_BYTES // max(1, block * plan.row_bytes))
        for start in range(0, n, block):
            span = slice(start, min(n, start + block))
            host = np.zeros((span.stop - span.start, n_tok, dim), dtype=np.float16)
            fill_tokens(cache, plan, slice(base + span.start, base + span.stop), host)
            raw[span].copy_(torch.from_numpy(host))
    return FeatureSource(raw, device, normalise=normalise, placement=placement,
                         widths=plan.widths)


READ_BLOCK_BYTES = 64 << 20


def budget_from_gb(gb: float | None) -> int | None:
    return None if gb is None else int(math.floor(gb * 2**30))
