"""The grid trainer: recipe arithmetic, batched optimiser, isolation of configs, learning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight

from featcache.metrics import classification_metrics
from featcache.probing.heads import ReferenceAttentiveHead
from featcache.probing.optim import BatchedAdamW, clip_grad_norm_per_config, cosine_lr
from featcache.probing.train import (
    TrainConfig,
    _jitter,
    _per_config_loss,
    class_weights,
    fit_grid,
    grid_points,
    plan_steps,
)

F64 = torch.float64
FAST = dict(epochs=3, batch_size=32, min_total_steps=0)
# Parameters whose true gradient is exactly zero without dropout: a shift added before the
# BatchNorm, which batch statistics remove. Their gradients are pure rounding noise that
# Adam normalises into real steps (in the reference head too), so they are compared through
# the function they compute, not value by value.
BN_NULL_SPACE = {"norm_v.bias", "out_proj.bias", "bn.running_mean"}


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny shapes: one thread


def test_grid_points() -> None:
    cfg = TrainConfig()
    att, lin = grid_points(cfg, attentive=True), grid_points(cfg, attentive=False)
    assert len(att) == 63 and len(lin) == 21
    assert att[0] == {"lr": 0.1, "wd": 1e-6, "dropout": 0.0}
    assert att[-1] == {"lr": 1e-3, "wd": pytest.approx(1.0), "dropout": 0.3}
    assert lin[1] == {"lr": 0.1, "wd": pytest.approx(1e-5)}
    assert all(isinstance(v, float) for p in att for v in p.values())


def test_plan_steps() -> None:
    cfg = TrainConfig()
    small = plan_steps(100, cfg)  # batch shrunk to get 5 steps; epochs raised to 1000 steps
    assert (small.steps_per_epoch, small.batch_size, small.epochs) == (5, 20, 200)
    mid = plan_steps(10_000, cfg)  # ceil(10000/2048) = 5 steps of ≤ 2048
    assert (mid.steps_per_epoch, mid.batch_size, mid.epochs) == (5, 2000, 200)
    big = plan_steps(1_000_000, cfg)  # 489 steps × 40 epochs ≥ 1000: nothing raised
    assert (big.steps_per_epoch, big.epochs) == (489, 40)
    assert big.batch_size <= 2048 and big.total_steps == 489 * 40
    odd = plan_steps(8193, cfg)  # 5 near-equal batches, no size-1 tail
    assert odd.steps_per_epoch == 5 and odd.batch_size == 1639
    tiny = plan_steps(6, cfg)  # never batches below 2 samples (BatchNorm)
    assert tiny.steps_per_epoch == 3 and tiny.epochs == 334
    assert plan_steps(100, TrainConfig(epochs=7, min_total_steps=0)).epochs == 7
    with pytest.raises(ValueError):
        plan_steps(1, cfg)


def test_cosine_lr() -> None:
    base = torch.tensor([0.1, 1e-3], dtype=F64)
    torch.testing.assert_close(cosine_lr(base, 0, 100, 1e-6), base)
    torch.testing.assert_close(cosine_lr(base, 50, 100, 1e-6), (base + 1e-6) / 2)
    assert cosine_lr(base, 99, 100, 1e-6)[0].item() < 1e-4


def test_class_weights_and_weighted_loss() -> None:
    y = torch.tensor([0] * 50 + [1] * 30 + [3] * 20)  # class 2 absent
    w = class_weights(y, 4)
    sk = compute_class_weight("balanced", classes=np.array([0, 1, 3]), y=y.numpy())
    torch.testing.assert_close(w[[0, 1, 3]], torch.tensor(sk, dtype=torch.float32))
    assert w[2].item() == 0.0
    logits = torch.randn(3, 100, 4, dtype=F64)
    per_cfg = _per_config_loss(logits, y, w.double())
    ce = torch.nn.CrossEntropyLoss(weight=w.double())
    for g in range(3):
        torch.testing.assert_close(per_cfg[g], ce(logits[g], y))
    torch.testing.assert_close(
        _per_config_loss(logits, y, None)[1], torch.nn.functional.cross_entropy(logits[1], y)
    )


def test_batched_adamw_equals_torch_adamw() -> None:
    """Per-config lr/wd, a changing (scheduled) lr, several steps: same as torch's AdamW."""
    G = 3
    gen = torch.Generator().manual_seed(0)
    shapes = [(G, 4, 5), (G, 7)]
    stacked = [torch.randn(s, generator=gen, dtype=F64, requires_grad=True) for s in shapes]
    lr = torch.tensor([0.1, 1e-2, 1e-3], dtype=F64)
    wd = torch.tensor([0.0, 1e-2, 1.0], dtype=F64)
    opt = BatchedAdamW(stacked, lr, wd)
    singles = [[p[g].detach().clone().requires_grad_(True) for p in stacked] for g in range(G)]
    topts = [
        torch.optim.AdamW(singles[g], lr=lr[g].item(), weight_decay=wd[g].item()) for g in range(G)
    ]
    for step in range(6):
        grads = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]
        for p, gr in zip(stacked, grads, strict=True):
            p.grad = gr.clone()
        lr_now = cosine_lr(lr, step, 6, 1e-6)
        opt.step(lr_now)
        for g in range(G):
            for p, gr in zip(singles[g], grads, strict=True):
                p.grad = gr[g].clone()
            topts[g].param_groups[0]["lr"] = lr_now[g].item()
            topts[g].step()
    for g in range(G):
        for p, single in zip(stacked, singles[g], strict=True):
            torch.testing.assert_close(p[g], single, rtol=1e-12, atol=1e-12)


def test_clipping_is_per_config() -> None:
    """A config with a huge gradient is clipped alone; its neighbour's grads (and so its
    update) stay exactly what they would be alone; clipped norms match torch's."""
    gen = torch.Generator().manual_seed(1)
    params = [torch.zeros(2, 3, 4, dtype=F64, requires_grad=True),
              torch.zeros(2, 5, dtype=F64, requires_grad=True)]
    grads = [torch.randn(p.shape, generator=gen, dtype=F64) * 0.1 for p in params]
    for gr in grads:
        gr[1] *= 1e6
    for p, gr in zip(params, grads, strict=True):
        p.grad = gr.clone()
    norms = clip_grad_norm_per_config(params, 5.0)
    assert norms[1] > 1e4 and norms[0] < 5
    for p, gr in zip(params, grads, strict=True):
        torch.testing.assert_close(p.grad[0], gr[0], rtol=0, atol=0)  # untouched
    for g in range(2):
        copies = [gr[g].clone().requires_grad_(True) for gr in grads]
        for c, gr in zip(copies, grads, strict=True):
            c.grad = gr[g].clone()
        torch.nn.utils.clip_grad_norm_(copies, 5.0)
        for p, c in zip(params, copies, strict=True):
            torch.testing.assert_close(p.grad[g], c.grad)
    total = sum(p.grad[1].pow(2).sum() for p in params).sqrt()
    assert total.item() == pytest.approx(5.0, rel=1e-6)


@pytest.mark.parametrize("draw_all", [False, True])  # CPU: hits only; GPU: all, masked
def test_jitter_statistics(draw_all: bool) -> None:
    x = torch.zeros(4000, 3, 8)
    out = _jitter(x, 0.05, 0.5, torch.Generator().manual_seed(0), draw_all)
    hit = out.flatten(1).abs().sum(1) > 0
    assert abs(hit.float().mean().item() - 0.5) < 0.03
    assert out[hit].std().item() == pytest.approx(0.05, rel=0.02)


def _toy_tokens(n: int, T: int, D: int, C: int, k: int, seed: int) -> tuple:
    """Only token k carries the class (a class prototype); every token is L2-normalised."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (n,), generator=gen)
    x = 0.5 * torch.randn(n, T, D, generator=gen)
    protos = torch.randn(C, D, generator=torch.Generator().manual_seed(99))
    x[:, k] += protos[y]
    return x / x.norm(dim=-1, keepdim=True), y


def test_config_in_grid_equals_config_alone() -> None:
    """Same seed: a config trained inside a 6-point grid (neighbours with other lr/wd and
    dropout), or inside that grid split into groups of one, ends where it ends alone.
    Holds for dropout > 0 too: masks come from one draw shared by all configs."""
    x, y = _toy_tokens(96, 5, 16, 3, k=2, seed=0)
    cfg = TrainConfig(**FAST)
    points = [
        {"lr": 1e-1, "wd": 1e-6, "dropout": 0.3},
        {"lr": 1e-3, "wd": 1.0, "dropout": 0.0},
        {"lr": 1e-2, "wd": 1e-3, "dropout": 0.0},
        {"lr": 1e-2, "wd": 1e-3, "dropout": 0.1},
        {"lr": 1e-1, "wd": 1e-2, "dropout": 0.0},
        {"lr": 1e-3, "wd": 1e-4, "dropout": 0.3},
    ]
    grid = fit_grid(x, y, 3, "attentive", points, cfg, num_heads=5)
    split = fit_grid(x, y, 3, "attentive", points, TrainConfig(**FAST, memory_budget_bytes=1))
    assert grid.group_size == 6 and split.group_size == 1
    for g in (2, 3):
        alone = fit_grid(x, y, 3, "attentive", [points[g]], cfg, num_heads=5)
        a = alone.export(0)
        null_space = BN_NULL_SPACE - ({"norm_v.bias"} if points[g]["dropout"] > 0 else set())
        for fitted in (grid, split):
            for key, val in fitted.export(g).items():
                if key not in null_space:
                    torch.testing.assert_close(val, a[key], rtol=1e-4, atol=1e-6, msg=key)
            torch.testing.assert_close(fitted.curves[g], alone.curves[0], rtol=1e-4, atol=1e-6)
            # eval mode reads the running mean, which carries the null space's rounding walk
            # (Adam turns rounding noise into real steps; visible at the 1e-2 level in the
            # logits): with the null-space values taken from `alone`, everything else must
            # give the same eval logits, tightly
            patched = fitted.heads.select([g])
            patched.load_config(0, {**fitted.export(g), **{k: a[k] for k in null_space}})
            with torch.no_grad():
                got = patched.eval()(x)[0]
                want = alone.heads.select([0]).eval()(x)[0]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            if points[g]["dropout"] == 0:
                with torch.no_grad():  # batch statistics are blind to the null space: tight
                    got = fitted.heads.select([g]).train()(x)[0]
                    want = alone.heads.select([0]).train()(x)[0]
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # grouping never changes any config, whatever its lr or dropout (float32 matmuls of
    # other shapes round differently, and Adam at lr 0.1 amplifies that to ~1e-6)
    torch.testing.assert_close(split.curves, grid.curves, rtol=1e-4, atol=1e-6)
    for key, val in grid.heads.state_dict().items():
        attr = {v: k for k, v in grid.heads._KEYS.items()}.get(key)
        if attr not in BN_NULL_SPACE:
            torch.testing.assert_close(split.heads.state_dict()[key], val, rtol=1e-4, atol=1e-5,
                                       msg=key)
    # linear heads too
    xl = x.flatten(1)
    lin_alone = fit_grid(xl, y, 3, "linear", [{"lr": 1e-2, "wd": 1e-3}], cfg)
    lin_grid = fit_grid(xl, y, 3, "linear", grid_points(TrainConfig(lrs=(1e-1, 1e-2)), False),
                        cfg)
    g = lin_grid.points.index({"lr": 1e-2, "wd": pytest.approx(1e-3)})
    for key, val in lin_grid.export(g).items():
        torch.testing.assert_close(val, lin_alone.export(0)[key], rtol=1e-4, atol=1e-5)


def test_planted_signal_attention_and_noise_baseline() -> None:
    T, D, C, k = 6, 16, 4, 3
    x, y = _toy_tokens(640, T, D, C, k=k, seed=1)
    xtr, ytr, xte, yte = x[:512], y[:512], x[512:], y[512:]
    cfg = TrainConfig(epochs=12, batch_size=64, min_total_steps=0)
    calls = []
    fitted = fit_grid(xtr, ytr, C, "attentive", [{"lr": 1e-2, "wd": 1e-4, "dropout": 0.1}],
                      cfg, progress=calls.append)
    assert len(calls) == 12 and calls[-1]["epoch"] == 12 and len(calls[-1]["loss"]) == 1
    assert fitted.curves.shape == (1, 12) and fitted.curves[0, -1] < fitted.curves[0, 0] / 3
    m = fitted.evaluate(xte, yte)
    assert m["balanced_top1"][0] > 90
    att = fitted.attention(xte)
    assert att.shape == (1, T) and int(att[0].argmax()) == k and att[0, k] > 0.3
    assert fitted.attention(xte, per_head=True).shape == (1, T, T)
    # streamed metrics equal metrics on the full logits
    full = classification_metrics(fitted.predict_logits(xte), yte, C)
    assert m["balanced_top1"] == pytest.approx(full["balanced_top1"])
    # the export is a plain reference-head state dict
    ref = ReferenceAttentiveHead(D, T, C, T)
    ref.load_state_dict(fitted.export(0))
    torch.testing.assert_close(ref.eval()(xte), fitted.predict_logits(xte)[0], rtol=1e-4,
                               atol=1e-4)
    # linear probe on pure noise: near chance on held-out data
    noise = torch.randn(640, 32, generator=torch.Generator().manual_seed(2))
    lin = fit_grid(noise[:512], ytr, C, "linear", [{"lr": 1e-2, "wd": 1e-4}], cfg)
    chance = lin.evaluate(noise[512:], yte)["balanced_top1"][0]
    assert chance < 45


def test_input_validation() -> None:
    x, y = _toy_tokens(20, 3, 8, 2, k=0, seed=0)
    cfg = TrainConfig(**FAST)
    with pytest.raises(ValueError):
        fit_grid(x, y, 2, "linear", [{"lr": 1e-2, "wd": 0.0}], cfg)
    with pytest.raises(ValueError):
        fit_grid(x, y, 2, "mlp", [{"lr": 1e-2, "wd": 0.0}], cfg)
    with pytest.raises(ValueError):
        fit_grid(x, y + 5, 2, "attentive", [{"lr": 1e-2, "wd": 0.0}], cfg)
    with pytest.raises(ValueError):
        fit_grid(x, y, 2, "attentive", [], cfg)
    assert math.isfinite(fit_grid(x.half(), y, 2, "attentive", [{"lr": 1e-2, "wd": 0.0}],
                                  cfg).curves.sum().item())


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_fused_adamw_path_equals_torch_adamw(dtype: torch.dtype) -> None:
    """Large heads take the fused kernel per config (host lrs): same update as torch's
    AdamW with each config's lr and wd, and the same as the broadcast path."""
    G, shapes = 3, [(3, 40, 500), (3, 7)]
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    lr = [0.1, 1e-2, 1e-3]
    wd = [0.0, 1e-2, 1.0]
    fused = [p.clone().requires_grad_(True) for p in init]
    plain = [p.clone().requires_grad_(True) for p in init]
    opt_f, opt_b = BatchedAdamW(fused, lr, wd), BatchedAdamW(plain, lr, wd)
    assert opt_f.fused and opt_b.fused  # 20k parameters per config
    opt_b.fused = False
    singles = [[p[g].detach().clone().requires_grad_(True) for p in init] for g in range(G)]
    topts = [torch.optim.AdamW(singles[g], lr=lr[g], weight_decay=wd[g]) for g in range(G)]
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == F64 else dict(rtol=1e-5, atol=1e-6)
    for step in range(4):
        grads = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
        now = cosine_lr(torch.tensor(lr, dtype=F64), step, 4, 1e-6)
        for params, opt in ((fused, opt_f), (plain, opt_b)):
            for p, gr in zip(params, grads, strict=True):
                p.grad = gr.clone()
            opt.step(now.tolist() if opt is opt_f else now)
        for g in range(G):
            for p, gr in zip(singles[g], grads, strict=True):
                p.grad = gr[g].clone()
            topts[g].param_groups[0]["lr"] = now[g].item()
            topts[g].step()
    for g in range(G):
        for pf, pb, single in zip(fused, plain, singles[g], strict=True):
            torch.testing.assert_close(pf[g], single, **tol)
            torch.testing.assert_close(pb[g], single, **tol)


def test_multi_input_linear_grid_equals_per_token_fits() -> None:
    """`layers` trains every token's grid at once (tokens × points on the config axis):
    each config ends where a plain fit on that token alone ends (no jitter: its noise is
    drawn per batch shape)."""
    from featcache.probing.tokens.features import FeatureSource

    x, y = _toy_tokens(120, 3, 8, 3, k=1, seed=4)
    cfg = TrainConfig(**FAST, jitter_p=0.0)
    points = [{"lr": 1e-1, "wd": 1e-4}, {"lr": 1e-2, "wd": 1e-2}]
    inputs = [t for t in range(3) for _ in points]
    src = FeatureSource(x.half(), normalise=True)
    grid = fit_grid(src, y, 3, "linear", points * 3, cfg, inputs=inputs)
    xt = src.to_tensor()
    for i, t in enumerate(inputs):
        alone = fit_grid(xt[:, t].contiguous(), y, 3, "linear", [points[i % 2]], cfg)
        for key, val in grid.export(i).items():
            torch.testing.assert_close(val, alone.export(0)[key], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grid.curves[i], alone.curves[0], rtol=1e-4, atol=1e-6)
    m = grid.evaluate(src, y)
    assert len(m["balanced_top1"]) == 6
    scores = m["balanced_top1"]  # token 1 carries the class; lr 0.1 learns it in 3 epochs
    assert scores[2] > 90 and scores[2] > max(scores[:2] + scores[4:])
    with pytest.raises(ValueError):
        fit_grid(src, y, 3, "linear", points, cfg, inputs=[0, 5])


def test_plain_pooling_path_trains_like_the_chunked_one(monkeypatch) -> None:
    """GPUs take the plain pooling (one bmm + einsum), CPUs the chunked one: the same
    training, up to float32 rounding."""
    import featcache.probing.heads.pooling as heads_mod

    x, y = _toy_tokens(64, 4, 16, 3, k=1, seed=5)
    cfg = TrainConfig(**FAST)
    points = [{"lr": 1e-2, "wd": 1e-4, "dropout": 0.0}, {"lr": 1e-3, "wd": 1e-2, "dropout": 0.1}]
    chunked = fit_grid(x, y, 3, "attentive", points, cfg)
    monkeypatch.setattr(heads_mod, "_use_chunks", lambda *_: False)
    plain = fit_grid(x, y, 3, "attentive", points, cfg)
    torch.testing.assert_close(plain.curves, chunked.curves, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # batch statistics: blind to the BN null space's rounding walk
        got = plain.heads.select([0]).train()(x)[0]
        want = chunked.heads.select([0]).train()(x)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_memory_estimate_follows_the_pooling_path() -> None:
    """CPU attentive training pools in reused chunks (no (B, H, D) tensor per config), CUDA
    materialises the pooled tokens: the estimate counts what the path keeps, so the CPU
    fits ~3x more configs per group at ALF's FER2013 shape (4 GiB: 4 groups, not 13)."""
    from featcache.probing.heads import pool_scratch_bytes
    from featcache.probing.train import config_groups, estimate_memory

    args = ("attentive", (24, 768), 7, 1914, 24)
    cpu, gpu = estimate_memory(*args, device="cpu"), estimate_memory(*args, device="cuda")
    assert estimate_memory(*args) == cpu  # default: CPU
    assert gpu[0] > 3 * cpu[0]
    assert cpu[1] == gpu[1] + 2 * pool_scratch_bytes(1914, 24, 768)
    # measured peak RSS here: ~250 MiB + 124 MiB per config; the estimate keeps a margin
    assert cpu[0] > 1.25 * 124 * 2**20 and cpu[1] > 2 * 250 * 2**20
    assert [len(g) for g in config_groups(63, *cpu, 4 << 30)] == [16, 16, 16, 15]
    assert len(config_groups(63, *gpu, 4 << 30)) == 13
    lin = estimate_memory("linear", (768,), 7, 1914)
    assert lin == estimate_memory("linear", (768,), 7, 1914, device="cuda")
