"""The fast stacked attentive head must compute exactly the reference head's function."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from featcache.probing.heads import (
    AttentiveHeads,
    LinearHeads,
    ReferenceAttentiveHead,
    attention_summary,
    head_dim_for,
)

F64 = torch.float64
TIGHT = dict(rtol=1e-9, atol=1e-10)

# (G, B, T, D, num_heads, C): ALF-like (one head per token) and all-tokens-like shapes
SHAPES = [(3, 12, 24, 48, 24, 5), (2, 10, 50, 32, 8, 7)]


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny shapes: one thread


def _random_refs(G: int, T: int, D: int, H: int, C: int, seed: int) -> list[ReferenceAttentiveHead]:
    """G reference heads with every parameter (and BN buffer) perturbed differently."""
    torch.manual_seed(seed)
    refs = []
    for _ in range(G):
        ref = ReferenceAttentiveHead(D, T, C, H).to(F64)
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.3 * torch.randn_like(p))
            ref.bn.running_mean.normal_()
            ref.bn.running_var.uniform_(0.5, 2.0)
        refs.append(ref)
    return refs


def _stacked_from(refs: list[ReferenceAttentiveHead], dropout: list[float]) -> AttentiveHeads:
    r = refs[0]
    heads = AttentiveHeads(len(refs), r.dim, r.n_tokens, r.n_classes, r.num_heads, dropout).to(F64)
    for g, ref in enumerate(refs):
        heads.load_config(g, ref.state_dict())
    return heads


def _loss_weights(G: int, B: int, C: int) -> torch.Tensor:
    return torch.randn(G, B, C, generator=torch.Generator().manual_seed(1), dtype=F64)


def _compare(heads: AttentiveHeads, refs: list, x: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Outputs, attention, gradients (every parameter, the input) and BN buffers agree."""
    G = len(refs)
    x_fast = x.clone().requires_grad_(True)
    out, attn = heads(x_fast, return_attention=True, dropout_mask=mask)
    w = _loss_weights(G, x.shape[0], refs[0].n_classes)
    (out * w).sum().backward()
    x_ref = x.clone().requires_grad_(True)
    for g, ref in enumerate(refs):
        o, a = ref(x_ref, return_attention=True, dropout_mask=None if mask is None else mask[g])
        torch.testing.assert_close(out[g], o, **TIGHT)
        torch.testing.assert_close(attn[g], a, **TIGHT)
        (o * w[g]).sum().backward()
    torch.testing.assert_close(x_fast.grad, x_ref.grad, **TIGHT)
    for g, ref in enumerate(refs):
        grads = {n: p.grad for n, p in ref.named_parameters()}
        exported = heads.export(g)
        for key, attr in heads._KEYS.items():
            stacked = getattr(heads, attr)
            if not isinstance(stacked, nn.Parameter):
                continue
            if stacked.grad is None:
                # only β_k: a per-head constant on the scores, which softmax ignores, so the
                # fast form never reads it; the reference's gradient is zero up to rounding
                assert key == "norm_k.bias"
                torch.testing.assert_close(grads[key], torch.zeros_like(grads[key]), **TIGHT)
                continue
            torch.testing.assert_close(
                stacked.grad[g].reshape(grads[key].shape), grads[key], **TIGHT, msg=key
            )
        for key, ref_val in ref.state_dict().items():
            torch.testing.assert_close(exported[key], ref_val, **TIGHT, msg=key)


@pytest.fixture(params=["chunked", "plain"])
def pool_path(request, monkeypatch) -> str:
    """Both forms of the pooling: chunked (CPU) and one bmm + einsum (GPUs, autocast)."""
    import featcache.probing.heads.pooling as heads_mod

    if request.param == "plain":
        monkeypatch.setattr(heads_mod, "_use_chunks", lambda *_: False)
    return request.param


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fast_equals_reference(shape: tuple, mode: str, pool_path: str) -> None:
    G, B, T, D, H, C = shape
    refs = _random_refs(G, T, D, H, C, seed=T)
    heads = _stacked_from(refs, [0.0] * G)
    for m in [heads, *refs]:
        m.train(mode == "train")
    x = torch.randn(B, T, D, dtype=F64)
    _compare(heads, refs, x, mask=None)


@pytest.mark.parametrize("shape", SHAPES)
def test_fast_equals_reference_with_dropout_mask(shape: tuple, pool_path: str) -> None:
    """Dropout > 0: the same (injected) inverted-dropout mask in both heads; Σ_t a ≠ 1."""
    G, B, T, D, H, C = shape
    p = torch.tensor([0.1, 0.3, 0.5][:G], dtype=F64)
    refs = _random_refs(G, T, D, H, C, seed=T + 1)
    heads = _stacked_from(refs, p.tolist())
    keep = torch.rand(G, B, H, T, dtype=F64) >= p.view(G, 1, 1, 1)
    mask = keep / (1 - p.view(G, 1, 1, 1))
    x = torch.randn(B, T, D, dtype=F64)
    _compare(heads, refs, x, mask)


def test_sampled_dropout_mask_and_isolation() -> None:
    """Sampled masks have keep-rate 1-p_g and scale 1/(1-p_g); a p=0 config in a group
    with dropout neighbours computes exactly its dropout-free function."""
    T, D, H, C, B = 24, 48, 24, 5, 64
    refs = _random_refs(3, T, D, H, C, seed=5)
    p = [0.0, 0.3, 0.6]
    heads = _stacked_from(refs, p)
    gen = torch.Generator().manual_seed(0)
    mask = heads.sample_dropout_mask(400, T, gen)  # (G, B, H, T)
    for g, pg in enumerate(p):
        m = mask[g]
        assert abs((m == 0).double().mean().item() - pg) < 0.01
        assert torch.allclose(m[m > 0], torch.tensor(1 / (1 - pg), dtype=F64))
    x = torch.randn(B, T, D, dtype=F64)
    heads.train()
    refs[0].train()
    out = heads(x, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out[0], refs[0](x), **TIGHT)
    # reproducible from the generator; the dropout configs really are perturbed
    torch.testing.assert_close(heads(x, generator=torch.Generator().manual_seed(1)), out)
    heads.set_dropout(0.0)
    clean = heads(x)
    torch.testing.assert_close(clean[0], out[0], **TIGHT)
    assert not torch.allclose(clean[1], out[1]) and not torch.allclose(clean[2], out[2])


def test_linear_heads_equal_nn_linear() -> None:
    G, B, D, C = 3, 9, 20, 6
    heads = LinearHeads(G, D, C).to(F64)
    lins = [nn.Linear(D, C).to(F64) for _ in range(G)]
    for g, lin in enumerate(lins):
        heads.load_config(g, lin.state_dict())
    x = torch.randn(B, D, dtype=F64)
    out = heads(x)
    assert out.shape == (G, B, C)
    w = _loss_weights(G, B, C)
    (out * w).sum().backward()
    for g, lin in enumerate(lins):
        o = lin(x)
        torch.testing.assert_close(out[g], o, **TIGHT)
        (o * w[g]).sum().backward()
        torch.testing.assert_close(heads.weight.grad[g], lin.weight.grad, **TIGHT)
        torch.testing.assert_close(heads.bias.grad[g], lin.bias.grad, **TIGHT)
    plain = nn.Linear(D, C).to(F64)
    plain.load_state_dict(heads.export(1))  # strict: exactly the keys of nn.Linear
    torch.testing.assert_close(plain(x), out[1], **TIGHT)


def test_init_same_for_every_config_and_grid_size() -> None:
    a = AttentiveHeads(4, 32, 6, 3, 4, generator=torch.Generator().manual_seed(7))
    b = AttentiveHeads(1, 32, 6, 3, 4, generator=torch.Generator().manual_seed(7))
    for g in range(4):
        for key, val in a.export(g).items():
            torch.testing.assert_close(val, b.export(0)[key], rtol=0, atol=0)
    assert a.query.std().item() == pytest.approx(0.02, rel=0.5)
    assert a.head_dim == head_dim_for(32, 4) == 16
    assert head_dim_for(16, 24) == 1


def test_export_roundtrip_select_concat_and_dtypes() -> None:
    refs = _random_refs(3, 6, 16, 2, 4, seed=3)
    heads = _stacked_from(refs, [0.0, 0.1, 0.3])
    ref = ReferenceAttentiveHead(16, 6, 4, 2).to(F64)
    ref.load_state_dict(heads.export(2))  # strict: keys and shapes match exactly
    sub = heads.select([2, 0])
    assert sub.n_configs == 2 and sub._dropout_list == [0.3, 0.0]
    both = AttentiveHeads.concat([heads.select([0]), heads.select([1, 2])])
    assert both._dropout_list == [0.0, 0.1, 0.3]
    x = torch.randn(5, 6, 16, dtype=F64)
    for m in (heads, sub, both):
        m.eval()
    torch.testing.assert_close(sub(x), heads(x)[[2, 0]], **TIGHT)
    torch.testing.assert_close(both(x), heads(x), **TIGHT)
    # any float input dtype; fp32 parameters decide the compute dtype
    h32 = heads.float()
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        out = h32(x.to(dt))
        assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_attention_summary_and_shapes() -> None:
    heads = AttentiveHeads(2, 32, 10, 3, 4).eval()
    x = torch.randn(7, 10, 32)
    logits, attn = heads(x, return_attention=True)
    assert logits.shape == (2, 7, 3) and attn.shape == (2, 7, 4, 10)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 7, 4))
    s = attention_summary(attn)
    assert s.shape == (2, 10)
    torch.testing.assert_close(s.sum(-1), torch.ones(2))
    assert attention_summary(attn, per_head=True).shape == (2, 4, 10)
    with pytest.raises(ValueError):
        heads(torch.randn(7, 10, 31))
    with pytest.raises(ValueError):  # T is part of the head (one head per token for ALF)
        heads(torch.randn(7, 9, 32))
    with pytest.raises(ValueError):
        AttentiveHeads(2, 32, 10, 3, 4, dropout=[0.1, 1.0])



def test_chunked_pool_project_equals_reference(monkeypatch) -> None:
    """The CPU path pools in chunks of samples × configs (scratch reused, recomputed in
    backward): force many ragged chunks and compare with the reference head exactly."""
    import featcache.probing.heads.pooling as heads_mod

    monkeypatch.setattr(heads_mod, "_POOL_CHUNK_ROWS", 10)  # 2 configs of 5 heads per chunk
    monkeypatch.setattr(heads_mod, "_POOL_CHUNK_BYTES", 3 * 10 * 16 * 8)  # 3 samples
    G, B, T, D, H, C = 5, 11, 6, 16, 5, 4
    assert heads_mod._pool_chunks(B, G, H, D, 8) == (2, 3)
    p = torch.tensor([0.0, 0.1, 0.0, 0.3, 0.5], dtype=F64)
    refs = _random_refs(G, T, D, H, C, seed=11)
    keep = torch.rand(G, B, H, T, dtype=F64) >= p.view(G, 1, 1, 1)
    mask = keep / (1 - p.view(G, 1, 1, 1))
    x = torch.randn(B, T, D, dtype=F64)
    _compare(_stacked_from(refs, p.tolist()), refs, x, mask)
    # the function itself, every input's gradient (numerically), and with the input's
    # gradient not needed (training: that branch is skipped)
    a = torch.rand(G, H, B, T, dtype=F64, requires_grad=True)
    xh = torch.randn(B, T, D, dtype=F64, requires_grad=True)
    w = torch.randn(G, H, 2, D, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(heads_mod.pool_project, (a, xh, w))
    out = heads_mod.pool_project(a, xh.detach(), w)
    want = torch.einsum("ghbt,btd,ghed->bghe", a, xh.detach(), w)
    torch.testing.assert_close(out, want, **TIGHT)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (a, w), g)
    ref = torch.autograd.grad(want, (a, w), g)
    for u, v in zip(got, ref, strict=True):
        torch.testing.assert_close(u, v, **TIGHT)


@pytest.mark.parametrize("inputs", [[0, 0, 1, 1, 2, 2], [2, 0, 1, 1, 0, 2]])
def test_linear_heads_with_inputs_read_their_token(inputs: list[int]) -> None:
    """Config g is nn.Linear on token inputs[g]: equal runs (one batched matmul) and any
    other order (a gather per config) give the same outputs and gradients."""
    G, B, T, D, C = len(inputs), 7, 4, 12, 5
    heads = LinearHeads(G, D, C, inputs).to(F64)
    assert (heads._runs is not None) == (inputs == sorted(inputs))
    lins = [nn.Linear(D, C).to(F64) for _ in range(G)]
    for g, lin in enumerate(lins):
        heads.load_config(g, lin.state_dict())
    x = torch.randn(B, T, D, dtype=F64)
    out = heads(x)
    assert out.shape == (G, B, C)
    w = _loss_weights(G, B, C)
    (out * w).sum().backward()
    for g, lin in enumerate(lins):
        o = lin(x[:, inputs[g]])
        torch.testing.assert_close(out[g], o, **TIGHT)
        (o * w[g]).sum().backward()
        torch.testing.assert_close(heads.weight.grad[g], lin.weight.grad, **TIGHT)
        torch.testing.assert_close(heads.bias.grad[g], lin.bias.grad, **TIGHT)
    sub = heads.select([5, 1, 2])
    assert sub.inputs == [inputs[5], inputs[1], inputs[2]]
    torch.testing.assert_close(sub(x), heads(x)[[5, 1, 2]], **TIGHT)
    both = LinearHeads.concat([heads.select([0, 1]), heads.select([2, 3, 4, 5])])
    assert both.inputs == inputs
    torch.testing.assert_close(both(x), out, **TIGHT)
    with pytest.raises(ValueError):
        heads(x[:, :2])  # token 2 missing
    with pytest.raises(ValueError):
        LinearHeads(3, D, C, [0, 1])


def test_bf16_autocast_runs_and_tracks_fp32() -> None:
    """Under autocast (bf16 here on CPU; bf16 on CUDA in training) the plain form runs,
    forward and backward, and stays close to the fp32 result."""
    torch.manual_seed(0)
    heads = AttentiveHeads(3, 32, 8, 5, 8, [0.0, 0.1, 0.0])
    x = torch.randn(16, 8, 32)
    heads.train()
    with torch.autocast("cpu", torch.bfloat16):
        out = heads(x, generator=torch.Generator().manual_seed(0))
    out.float().sum().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in heads.parameters())
    heads.eval()
    with torch.no_grad():
        ref = heads(x)
        with torch.autocast("cpu", torch.bfloat16):
            low = heads(x)
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.1)


def test_plain_pool_project_dense_layout_equals_reference(monkeypatch) -> None:
    """The plain pooling lays the pooled tokens out densely where CPU GEMMs would copy a
    strided view (bf16/fp16): that branch, forced in float64, is exact too."""
    import featcache.probing.heads.pooling as heads_mod

    monkeypatch.setattr(heads_mod, "_use_chunks", lambda *_: False)
    monkeypatch.setattr(heads_mod, "_dense_gemm_only", lambda *_: True)
    G, B, T, D, H, C = 3, 9, 6, 16, 5, 4
    p = torch.tensor([0.0, 0.1, 0.3], dtype=F64)
    refs = _random_refs(G, T, D, H, C, seed=12)
    keep = torch.rand(G, B, H, T, dtype=F64) >= p.view(G, 1, 1, 1)
    _compare(_stacked_from(refs, p.tolist()), refs, torch.randn(B, T, D, dtype=F64),
             keep / (1 - p.view(G, 1, 1, 1)))
    a = torch.rand(G, H, B, T, dtype=F64, requires_grad=True)
    xh = torch.randn(B, T, D, dtype=F64, requires_grad=True)
    w = torch.randn(G, H, 2, D, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(heads_mod.pool_project, (a, xh, w))


def test_pool_chunks_hold_enough_samples() -> None:
    """CPU pooling chunks keep ≥ 40 samples at ALF shapes (ViT-S/B/L) however many configs
    are stacked (the matmuls over a chunk's samples slow down 2-3x at a few samples), and
    the scratch bound covers every group size."""
    import featcache.probing.heads.pooling as heads_mod

    for T, D in [(24, 768), (24, 384), (48, 1024)]:
        for G in (1, 5, 8, 63):
            gc, bc = heads_mod._pool_chunks(2048, G, T, D, 4)
            assert bc >= 40 and gc * T <= max(T, heads_mod._POOL_CHUNK_ROWS)
            assert gc * bc * T * D * 4 <= heads_mod.pool_scratch_bytes(2048, T, D, 4)
    assert heads_mod._pool_chunks(2048, 8, 24, 768, 4)[1] >= 48
