"""Per-config matmuls whose bits do not depend on how many configs share the call.

A config's arithmetic must be the same whatever else shares its group (so a grid's
numbers do not move with the memory budget, the group size or the number of ranks).
One GEMM over a stack of configs breaks that on CPU: MKL picks its kernel and splits the
work over threads by the whole shape, so a config's rows round differently beside 0, 1
or 62 others (measured: a (5·G, 32) @ (32, 240) product, and torch's ``bmm`` over G,
differ from the same config alone in the last bits as soon as 2 threads run). Here each
config is its own ``mm`` of a fixed shape, so the split over threads is the same for it
whatever G is. And each operand is handed over contiguous and 64-byte aligned, as it is
when the config is alone: MKL's small-matrix kernels round by the alignment of their
operands (measured: a (3, 24) @ (24, 19) product differed in its last bits between the
first and the second config of a stack, whose slab starts 1,824 bytes in). On CUDA, and
on a CPU inside `stacked_kernels` (`--group-size`), one batched kernel runs over the
group instead: faster, but a config's bits then depend on its group, so the group size
is part of the run's identity (`featcache.probing.train.stacked_group_size`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

_STACKED: ContextVar[bool] = ContextVar("stacked_kernels", default=False)


@contextmanager
def stacked_kernels(on: bool = True) -> Iterator[None]:
    """Inside: CPU products too run as one batched kernel per group (`config_mm`)."""
    token = _STACKED.set(on)
    try:
        yield
    finally:
        _STACKED.reset(token)


def config_mm(w: Tensor, x: Tensor, bias: Tensor | None = None,
              index: Sequence[int] | None = None) -> Tensor:
    """out[g] = w[g] @ x[i_g] (+ bias[g] on every column): (G, M, K), (X, K, N) → (G, M, N).

    ``index`` (one entry per config) says which x each config reads (default: x[g] when
    X = G, else x[0], shared). Gradients flow to w, bias and x (a shared x's gradient sums
    over configs, in config order)."""
    G, X = w.shape[0], x.shape[0]
    idx = tuple(index) if index is not None else tuple(range(G)) if X == G else (0,) * G
    if len(idx) != G:
        raise ValueError(f"{len(idx)} indices for {G} configs")
    if _STACKED.get() or w.device.type != "cpu" or torch.is_autocast_enabled(w.device.type):
        return _batched(w, x, bias, idx)
    return _ConfigMM.apply(w, x, bias, idx)


def _batched(w: Tensor, x: Tensor, bias: Tensor | None, idx: tuple[int, ...]) -> Tensor:
    """One batched kernel (GPUs): the same product, config order free."""
    xs = x if idx == tuple(range(x.shape[0])) else x[list(idx)] if x.shape[0] > 1 else \
        x.expand(len(idx), *x.shape[1:])
    if bias is None:
        return torch.bmm(w, xs)
    return torch.baddbmm(bias.unsqueeze(2), w, xs)


ALIGN = 64  # bytes: the CPU allocator's alignment, so a config alone is aligned so


def aligned(t: Tensor) -> Tensor:
    """``t`` contiguous at an ``ALIGN``-byte address: itself, or a fresh copy."""
    if t.is_contiguous() and t.data_ptr() % ALIGN == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _into(out: Tensor, product: Tensor) -> None:
    if out.data_ptr() != product.data_ptr():
        out.copy_(product)


def _mm(a: Tensor, b: Tensor, out: Tensor, bias: Tensor | None = None) -> None:
    """out = a @ b (+ bias), computed on aligned operands into an aligned result."""
    a, b = aligned(a), aligned(b)
    target = out if out.data_ptr() % ALIGN == 0 else torch.empty_like(out)
    if bias is None:
        torch.mm(a, b, out=target)
    else:
        torch.addmm(aligned(bias), a, b, out=target)
    _into(out, target)


class _ConfigMM(torch.autograd.Function):
    """One ``mm`` per config, forward and backward; every product has a config's shape."""

    @staticmethod
    def forward(ctx, w: Tensor, x: Tensor, bias: Tensor | None,  # type: ignore[override]
                idx: tuple[int, ...]) -> Tensor:
        G, M, _ = w.shape
        out = w.new_empty(G, M, x.shape[2])
        xs = {i: aligned(x[i]) for i in sorted(set(idx))}  # a shared x: one copy at most
        biases = [None] * G if bias is None else bias.unsqueeze(2).unbind(0)
        for w_g, i, out_g, b_g in zip(w.unbind(0), idx, out.unbind(0), biases, strict=True):
            _mm(w_g, xs[i], out_g, b_g)
        ctx.save_for_backward(w, x)
        ctx.idx, ctx.has_bias = idx, bias is not None
        return out

    @staticmethod
    def backward(ctx, d_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        w, x = ctx.saved_tensors
        need_w, need_x, need_b, _ = ctx.needs_input_grad
        d_w = torch.empty_like(w) if need_w else None
        d_x = torch.zeros_like(x) if need_x else None
        d_b = w.new_empty(w.shape[0], w.shape[1]) if need_b and ctx.has_bias else None
        x_t = {i: aligned(x[i].t()) for i in sorted(set(ctx.idx))} if d_w is not None else {}
        for g, (i, d_g) in enumerate(zip(ctx.idx, d_out.unbind(0), strict=True)):
            d_g = aligned(d_g)
            if d_w is not None:
                _mm(d_g, x_t[i], d_w[g])
            if d_x is not None:
                part = torch.empty_like(x[i], memory_format=torch.contiguous_format)
                _mm(w[g].t(), d_g, part)
                d_x[i].add_(part)
            if d_b is not None:
                d_b[g] = d_g.sum(dim=1)
        return d_w, d_x, d_b, None
