"""The fused pooling of the attentive head on CPUs: Σ_t a_{g,h,t} x̂_t for every config and
head, in chunks that stay in cache, with a hand-written backward (no per-config copy of
the pooled tokens is kept). GPUs (and autocast) take one bmm + einsum instead."""

from __future__ import annotations

import torch
from torch import Tensor

_POOL_CHUNK_BYTES = 16 << 20
_POOL_CHUNK_ROWS = 96  # configs·heads per chunk (whole configs)


def _spans(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(n, i + size)) for i in range(0, n, size)]


class _PoolProject(torch.autograd.Function):
    """o[b,g,h] = W[g,h] · Σ_t a[g,h,b,t] x̂[b,t] computed in cache-sized chunks.

    The same contraction as ``bmm`` (pool) then ``einsum`` (project), but the pooled
    tensor (B, G·H, D), G·H/T times the size of the input batch, exists only one chunk at a
    time (reused scratch; recomputed in backward rather than stored). On CPU this avoids
    allocating and page-faulting hundreds of MB per step and is ~2x faster at ALF shapes.

    A config's bits never depend on how many configs share the call: every matmul has
    the configs' heads as its batch or its row (M) dimension, never as a column (N) or
    contraction (K) dimension, and the samples are cut into chunks whose size does not
    depend on the number of configs (the weight gradient sums over them in that order).
    """

    @staticmethod
    def forward(ctx, a: Tensor, xh: Tensor, w: Tensor) -> Tensor:
        G, H, B, T = a.shape
        E, D = w.shape[2], w.shape[3]
        gc, bc = _pool_chunks(B, G, H, D, a.element_size())
        out = a.new_empty(B, G, H, E)
        scratch = a.new_empty(bc * gc * H * D)
        rows = a.view(G * H, B, T)
        for g0, g1 in _spans(G, gc):
            n = (g1 - g0) * H
            w_t = w[g0:g1].reshape(n, E, D).transpose(1, 2)
            for b0, b1 in _spans(B, bc):
                m = b1 - b0
                a_c = rows[g0 * H: g1 * H, b0:b1].transpose(0, 1)  # (m, n, T) view
                z_buf = scratch[: m * n * D].view(m, n, D)
                z = torch.bmm(a_c, xh[b0:b1], out=z_buf)
                o = torch.bmm(z.transpose(0, 1), w_t)  # (n, m, E)
                out[b0:b1, g0:g1].copy_(o.view(g1 - g0, H, m, E).permute(2, 0, 1, 3))
        ctx.save_for_backward(a, xh, w)
        return out

    @staticmethod
    def backward(ctx, d_out: Tensor) -> tuple[Tensor | None, ...]:
        a, xh, w = ctx.saved_tensors
        need_a, need_x, need_w = ctx.needs_input_grad
        G, H, B, T = a.shape
        E, D = w.shape[2], w.shape[3]
        gc, bc = _pool_chunks(B, G, H, D, a.element_size())
        rows = a.view(G * H, B, T)
        d_a = torch.empty_like(a) if need_a else None
        d_rows = None if d_a is None else d_a.view(G * H, B, T)
        d_x = torch.zeros_like(xh) if need_x else None
        d_w = torch.zeros_like(w) if need_w else None
        s_dz = a.new_empty(bc * gc * H * D)
        s_z = a.new_empty(bc * gc * H * D) if need_w else None
        for g0, g1 in _spans(G, gc):
            n = (g1 - g0) * H
            w_c = w[g0:g1].reshape(n, E, D)
            for b0, b1 in _spans(B, bc):
                m = b1 - b0
                a_c = rows[g0 * H: g1 * H, b0:b1].transpose(0, 1)  # (m, n, T)
                x_c = xh[b0:b1]
                do_t = d_out[b0:b1, g0:g1].permute(1, 2, 0, 3).reshape(n, m, E)
                if need_a or need_x:
                    dz = torch.bmm(do_t, w_c, out=s_dz[: m * n * D].view(n, m, D))
                    dz = dz.transpose(0, 1)  # (m, n, D)
                    if d_rows is not None:  # heads as rows (M): (m, n, D) @ (m, D, T)
                        d_rows[g0 * H: g1 * H, b0:b1] = torch.bmm(
                            dz, x_c.transpose(1, 2)).transpose(0, 1)
                    if d_x is not None:  # sums over configs: only for a test's gradcheck
                        d_x[b0:b1].baddbmm_(a_c.transpose(1, 2), dz)
                if need_w:
                    z = torch.bmm(a_c, x_c, out=s_z[: m * n * D].view(m, n, D))
                    d_w[g0:g1].view(n, E, D).baddbmm_(do_t.transpose(1, 2), z.transpose(0, 1))
        return d_a, d_x, d_w


def _pool_chunks(B: int, G: int, H: int, D: int, itemsize: int) -> tuple[int, int]:
    """(configs, samples) per chunk of the pooled tokens. The samples per chunk are those
    of a full chunk of configs whatever G is: the weight gradient sums over the chunks,
    and its order must not depend on how many configs share the group."""
    g_max = max(1, _POOL_CHUNK_ROWS // max(H, 1))
    gc = min(G, g_max)
    bc = max(1, min(B, _POOL_CHUNK_BYTES // (g_max * H * D * itemsize)))
    return gc, bc


def pool_scratch_bytes(B: int, H: int, D: int, itemsize: int = 4) -> int:
    """Bytes of one chunk's scratch in the CPU pooling, the most any number of configs
    gives (the forward holds one chunk, the backward two)."""
    g_max = max(1, _POOL_CHUNK_ROWS // max(H, 1))
    gc, bc = _pool_chunks(B, g_max, H, D, itemsize)
    return gc * bc * H * D * itemsize


def pool_project(a: Tensor, xh: Tensor, w: Tensor) -> Tensor:
    """Σ_t a[g,h,b,t] (W[g,h] x̂[b,t]) as pool-then-project: (G,H,B,T), (B,T,D),
    (G,H,E,D) → (B,G,H,E). Chunked on CPU (see ``_PoolProject``); two bmm elsewhere
    (GPUs have the bandwidth, and fewer, larger kernels suit them better).

    The plain form: the pool is batched over samples, z (B, G·H, D); the projection over
    heads, reading z as (G·H, B, D) (a strided view: each head's rows are contiguous, one
    leading dimension apart). cuBLAS and CPU float32 GEMMs read that view in place, so z
    is written once and never copied, and autograd saves the view itself. CPU GEMMs in
    bf16/fp16 (oneDNN) want dense operands and would copy the view twice, the second time
    transposed for the weight gradient (~1/3 of a bf16 step); there z is laid out as
    (G·H, B, D) once, explicitly, and that copy is what autograd saves, whose transpose
    the weight gradient then reads in place.
    """
    if _use_chunks(a, xh, w):
        return _PoolProject.apply(a, xh, w)
    G, H, B, T = a.shape
    E, D = w.shape[2], w.shape[3]
    z = torch.bmm(a.reshape(G * H, B, T).transpose(0, 1), xh)  # (B, G*H, D)
    zt = z.transpose(0, 1)  # (G*H, B, D) view
    if _dense_gemm_only(z):
        zt = zt.contiguous()
    o = torch.bmm(zt, w.reshape(G * H, E, D).transpose(1, 2))  # (G*H, B, E)
    return o.view(G, H, B, E).permute(2, 0, 1, 3)


def _dense_gemm_only(t: Tensor) -> bool:
    """Whether batched GEMMs on ``t``'s device and dtype copy a strided operand (CPU in
    reduced precision) rather than read it in place (CUDA; CPU float32/64)."""
    return t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16)


def _use_chunks(a: Tensor, xh: Tensor, w: Tensor) -> bool:
    """The chunked form on CPU (same dtypes, no autocast); the plain form elsewhere."""
    return a.device.type == "cpu" and a.dtype == xh.dtype == w.dtype and not _cpu_autocast()


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


