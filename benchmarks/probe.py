"""Probe benchmark: fast attentive head, grid at once, FLOP/s, the paper grid for ALF.

Everything is measured in one run on synthetic tokens (random, L2-normalised), on the
device chosen by ``--device`` (CUDA when present with ``auto``):

  (0) this machine's matmul FLOP/s (large fp32 and bf16 matmuls) and, on a CPU, one
      thread against all threads;
  (1) the fast attentive head (``AttentiveHeads``) against the straightforward one
      (``ReferenceAttentiveHead``), same configs, forward+backward per step: ALF
      (D=768, T=24 tokens, H=24 heads) and the all-tokens head (T=197, H=8); the G configs
      trained one after another cost G times one reference step;
  (2) ``fit_grid`` with every point at once against ``fit_grid`` once per point (same
      TrainConfig, few steps): ALF and linear grids of 21 configs (63 on CUDA); and at
      once with stacked kernels (``group_size``: all configs in one group, one batched
      product; its numbers depend on the group) against the default (on a CPU, one
      product per config: the same bits in any group), so the price of that invariance
      is a ratio of one run;
  (3) achieved FLOP/s of ALF training against (0): analytic FLOPs (formula below), the
      matmul FLOPs actually executed (counted), and torch's FlopCounterMode as cross-checks;
      fp32 and bf16 autocast;
  (4) the paper grid for ALF on a FER2013-sized set (28,709 x 24 tokens x 768, 7 classes,
      63 configs, 40 epochs at batch 2048 raised to >= 1000 steps, 80/20 split, refit):
      run end to end where it fits (CUDA, or ``--fer full``), else extrapolated from k
      measured steps of each group size the memory budget makes.

FLOPs of one training step (forward + backward) of the fast head, per config, batch B,
T tokens of width D, H heads of width E = 2*(D//H), C classes (1 MAC = 2 FLOPs):

    MACs = B * (4*T*D*H + 6*H*E*D + 3*D*C) + 9*H*E*D

  forward: logits x^U (T*D*H), attention pooling a^T x^ (H*T*D), value projection of the
  pooled tokens (H*E*D), output projection (H*E*D), classifier (D*C); per step and batch-
  independent: W_q q, u = W_k^T q, W_v beta_v (3*H*E*D). Backward: the input x^ needs no
  gradient, so the two T-sized contractions cost 1x more each, the three others 2x more.
  This is the minimum (useful) count; an implementation that recomputes the pooled tokens
  in backward executes B*T*D*H more (reported as "executed").

The straightforward head, per step:

    MACs = B * (6*T*D*H*E + 6*T*H*E + 3*H*E*D + 3*D*C) + 3*D*H*E

  (per-token key and value projections, T*D*H*E each, forward + input and weight grads.)

    python benchmarks/probe.py              # full run (about 5-10 minutes on 2 CPU cores)
    python benchmarks/probe.py --quick      # smaller shapes, under 2 minutes
    python benchmarks/probe.py --json out.json --device cuda

Not a test: it asserts nothing, it prints figures and ratios (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from machine import cpu_info  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from featcache.probing.heads import AttentiveHeads, ReferenceAttentiveHead, head_dim_for  # noqa: E402
from featcache.probing.train import (  # noqa: E402
    TrainConfig,
    config_groups,
    default_memory_budget,
    estimate_memory,
    fit_grid,
    grid_points,
    plan_steps,
    stacked_group_size,
)

H200_BF16_TFLOPS = 790.0  # dense bf16 tensor-core peak quoted for an H200 (SXM)
FER = {"n_train": 28709, "n_test": 7178, "tokens": 24, "dim": 768, "classes": 7}

# -- small helpers -------------------------------------------------------------------------


def log(msg: str = "") -> None:
    print(msg, flush=True)


def load() -> float:
    return round(os.getloadavg()[0], 2)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timeit(fn: Callable[[], Any], dev: torch.device, repeats: int, warmup: int = 1) -> dict:
    """Wall time of fn (device-synchronised): best, median and every repeat, seconds."""
    for _ in range(warmup):
        fn()
        sync(dev)
    times = []
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return {"best": min(times), "median": statistics.median(times),
            "times": [round(t, 4) for t in times]}


def interleaved(fns: dict[str, Callable[[], Any]], dev: torch.device, repeats: int,
                warmup: int = 1) -> dict[str, dict]:
    """timeit for several functions, taken in turn (a, b, c, a, b, c, ...): a change of
    load on a shared machine then hits all of them alike, which keeps ratios honest."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
            sync(dev)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k] += timeit(fn, dev, 1, warmup=0)["times"]
    return {k: {"best": min(v), "median": statistics.median(v), "times": v}
            for k, v in times.items()}


def fmt_t(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.2f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    if s >= 1:
        return f"{s:.2f} s"
    return f"{s * 1e3:.1f} ms"


def table(rows: list[list[Any]], header: list[str]) -> None:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, r in enumerate(cells):
        log("  " + "  ".join(c.rjust(w) if i else c.ljust(w)
                             for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        if j == 0:
            log("  " + "  ".join("-" * w for w in widths))


def git_state() -> dict[str, Any]:
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
    dirty = run("git", "status", "--porcelain", "featcache/heads", "featcache/probing/train.py",
                "featcache/probing/optim.py")
    return {"commit": run("git", "rev-parse", "--short", "HEAD").strip(),
            "heads_train_modified": [ln[3:] for ln in dirty.splitlines() if ln.strip()]}


# -- FLOPs ---------------------------------------------------------------------------------


def fast_flops(B: int, T: int, D: int, H: int, C: int, G: int = 1,
               recompute: bool = False) -> int:
    """Training-step FLOPs (forward + backward) of G fast heads; formula in the docstring."""
    HE = H * head_dim_for(D, H)
    tdh = (5 if recompute else 4) * T * D * H
    return 2 * G * (B * (tdh + 6 * HE * D + 3 * D * C) + 9 * HE * D)


def fast_forward_flops(B: int, T: int, D: int, H: int, C: int, G: int = 1) -> int:
    """Eval-mode forward FLOPs of G fast heads (validation/test passes)."""
    HE = H * head_dim_for(D, H)
    return 2 * G * (B * (2 * T * D * H + 2 * HE * D + D * C) + 3 * HE * D)


def ref_flops(B: int, T: int, D: int, H: int, C: int) -> int:
    """Training-step FLOPs of one straightforward head; formula in the docstring."""
    HE = H * head_dim_for(D, H)
    return 2 * (B * (6 * T * D * HE + 6 * T * HE + 3 * HE * D + 3 * D * C) + 3 * D * HE)


_MATMULS = {"mm": (0, 1), "addmm": (1, 2), "bmm": (0, 1), "baddbmm": (1, 2)}


def count_matmul_flops(fn: Callable[[], Any]) -> dict[str, int]:
    """FLOPs of every mm/bmm/addmm/baddbmm that fn executes (out= and in-place variants
    included), beside torch's FlopCounterMode (which, as of torch 2.5-2.9, skips in-place
    ``baddbmm_``)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    total = [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            base = func.overloadpacket.__name__.rstrip("_")
            if base in _MATMULS:
                i, j = _MATMULS[base]
                a, b = args[i], args[j]
                if a.dim() == 3:
                    total[0] += 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
                else:
                    total[0] += 2 * a.shape[0] * a.shape[1] * b.shape[1]
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return {"executed": total[0], "flop_counter_mode": int(counter.get_total_flops())}


# -- heads ---------------------------------------------------------------------------------


def tokens(n: int, T: int, D: int, dev: torch.device, seed: int = 0) -> torch.Tensor:
    """Random tokens, L2-normalised per token like the cache's features at load time."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, T, D, generator=g)
    return F.normalize(x, dim=-1).to(dev)


def head_step(head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, G: int,
              amp: bool) -> Callable[[], None]:
    """One forward+backward (class-weightless cross entropy summed over configs)."""
    dev = x.device
    C = int(head.n_classes)

    def step() -> None:
        head.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, torch.bfloat16, enabled=amp):
            logits = head(x)
        if G > 1 or logits.dim() == 3:
            loss = F.cross_entropy(logits.float().reshape(-1, C), y.repeat(G),
                                   reduction="sum") / y.numel()
        else:
            loss = F.cross_entropy(logits.float(), y)
        loss.backward()

    return step


def make_fast(G: int, T: int, D: int, H: int, C: int, dev: torch.device,
              dropout: float = 0.1) -> AttentiveHeads:
    head = AttentiveHeads(G, D, T, C, H, [dropout] * G, generator=torch.Generator(),
                          device=dev)
    return head.train()


def make_ref(T: int, D: int, H: int, C: int, dev: torch.device,
             dropout: float = 0.1) -> ReferenceAttentiveHead:
    return ReferenceAttentiveHead(D, T, C, H, dropout).to(dev).train()


# -- (0) matmul peak and threads -----------------------------------------------------------


def matmul_peak(dev: torch.device, n: int, dtype: torch.dtype, repeats: int) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dev, dtype)
    b = torch.randn(n, n, generator=g).to(dev, dtype)
    t = timeit(lambda: a @ b, dev, repeats)
    flops = 2 * n**3
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), **t,
            "gflops_best": flops / t["best"] / 1e9, "gflops_median": flops / t["median"] / 1e9}


def section_peak(args: argparse.Namespace, dev: torch.device, res: dict) -> None:
    log(f"\n(0) matmul FLOP/s of this machine  [load {load()}]")
    n = args.matmul_n
    rows, out = [], {}
    for dt in (torch.float32, torch.bfloat16):
        r = matmul_peak(dev, n, dt, args.repeats + 2)
        out[r["dtype"]] = r
        note_peak(res, r["dtype"], r["gflops_best"])
        rows.append([f"{n}x{n} @ {n}x{n} {r['dtype']}", f"{r['gflops_best']:.1f}",
                     f"{r['gflops_median']:.1f}", fmt_t(r["best"])])
    table(rows, ["matmul", "GFLOP/s best", "GFLOP/s median", "time best"])
    res["matmul_peak"] = out


def section_threads(args: argparse.Namespace, dev: torch.device, res: dict) -> None:
    """CPU only: matmul and one ALF head step with 1 thread against one per core."""
    n_all = torch.get_num_threads()
    counts = sorted({1, len(os.sched_getaffinity(0))})
    log(f"\n(0b) threads: torch.set_num_threads(n), n in {counts}  [load {load()}]")
    B, T, D, H, C, G = args.thread_batch, 24, 768, 24, 7, 4
    x = tokens(B, T, D, dev)
    y = torch.randint(0, C, (B,), device=dev)
    rows, out = [], {}
    try:
        for n in counts:
            torch.set_num_threads(n)
            mm = matmul_peak(dev, 2048, torch.float32, args.repeats)
            mb = matmul_peak(dev, 2048, torch.bfloat16, args.repeats)
            head = make_fast(G, T, D, H, C, dev)
            st = timeit(head_step(head, x, y, G, False), dev, args.repeats)
            fl = fast_flops(B, T, D, H, C, G)
            out[str(n)] = {"matmul_fp32_gflops": mm["gflops_best"],
                           "matmul_bf16_gflops": mb["gflops_best"],
                           "alf_step_s": st, "alf_step_gflops": fl / st["best"] / 1e9}
            rows.append([n, f"{mm['gflops_best']:.1f}", f"{mb['gflops_best']:.1f}",
                         fmt_t(st["best"]), fmt_t(st["median"]),
                         f"{fl / st['best'] / 1e9:.1f}"])
    finally:
        torch.set_num_threads(n_all)
    table(rows, ["threads", "fp32 mm GFLOP/s", "bf16 mm GFLOP/s",
                 f"ALF G={G} B={B} step best", "median", "ALF GFLOP/s"])
    res["threads"] = out


# -- (1) fast head against the straightforward one -----------------------------------------


def section_heads(args: argparse.Namespace, dev: torch.device, amp: bool, res: dict) -> None:
    log(f"\n(1) fast attentive head vs straightforward head, forward+backward per step, "
        f"dropout 0.1, {'bf16 autocast' if amp else 'fp32'}  [load {load()}]")
    shapes = [("alf", args.alf_batch, 24, 768, 24), ("all-tokens", args.tok_batch, 197, 768, 8)]
    C, G = 7, args.stack
    rows, out = [], {}
    for name, B, T, D, H in shapes:
        x = tokens(B, T, D, dev)
        y = torch.randint(0, C, (B,), device=dev)
        ref, f1, fG = make_ref(T, D, H, C, dev), make_fast(1, T, D, H, C, dev), make_fast(
            G, T, D, H, C, dev)
        tt = interleaved({"ref": head_step(ref, x, y, 1, amp),
                          "f1": head_step(f1, x, y, 1, amp),
                          "fG": head_step(fG, x, y, G, amp)}, dev, args.repeats)
        t_ref, t_f1, t_fG = tt["ref"], tt["f1"], tt["fG"]
        del ref, f1, fG
        r1 = t_ref["best"] / t_f1["best"]
        rG = G * t_ref["best"] / t_fG["best"]
        rG_med = G * t_ref["median"] / t_fG["median"]
        out[name] = {
            "B": B, "T": T, "D": D, "H": H, "C": C, "G": G,
            "ref_step_s": t_ref, "fast_step_s_G1": t_f1, f"fast_step_s_G{G}": t_fG,
            "ratio_G1": r1, f"ratio_G{G}": rG, f"ratio_G{G}_median": rG_med,
            "flops_ref": ref_flops(B, T, D, H, C), "flops_fast": fast_flops(B, T, D, H, C),
            "flop_ratio": ref_flops(B, T, D, H, C) / fast_flops(B, T, D, H, C),
            "gflops_ref": ref_flops(B, T, D, H, C) / t_ref["best"] / 1e9,
            "gflops_fast_G": fast_flops(B, T, D, H, C, G) / t_fG["best"] / 1e9,
        }
        rows.append([f"{name} B={B} T={T} D={D} H={H}", fmt_t(t_ref["best"]),
                     fmt_t(t_f1["best"]), fmt_t(t_fG["best"] / G), f"{r1:.1f}x",
                     f"{rG:.1f}x ({rG_med:.1f}x)", f"{out[name]['flop_ratio']:.1f}x"])
        log(f"    {name}: done  [load {load()}]")
    table(rows, ["shape", "ref 1 cfg", "fast G=1", f"fast G={G} /cfg", "ratio G=1",
                 f"ratio G={G} best (median)", "FLOP ratio"])
    log(f"  ratio G={G}: {G} reference steps (the same configs one after another) over one "
        f"stacked step of {G} configs")
    res["heads"] = out


# -- (2) grid at once against one config at a time -----------------------------------------


def section_grid(args: argparse.Namespace, dev: torch.device, amp: bool, res: dict) -> None:
    log(f"\n(2) fit_grid: all points at once vs one fit_grid per point  [load {load()}]")
    rows, out = [], {}
    for kind in ("attentive", "linear"):
        N = args.grid_n
        if kind == "attentive":
            T, D, H = 24, args.grid_dim, 24
            x = tokens(N, T, D, dev, seed=1)
            cfg = TrainConfig(epochs=args.grid_epochs, min_total_steps=1, batch_size=1024,
                              dropouts=args.grid_dropouts, amp=amp)
        else:
            x = tokens(N, 1, 768, dev, seed=1)[:, 0]
            cfg = TrainConfig(epochs=args.grid_epochs * 10, min_total_steps=1, batch_size=1024,
                              amp=amp)
        y = torch.randint(0, 7, (N,), device=dev)
        points = grid_points(cfg, attentive=kind == "attentive")
        plan = plan_steps(N, cfg)
        info: dict[str, Any] = {}

        def at_once(kind: str = kind, x: torch.Tensor = x, y: torch.Tensor = y,
                    cfg: TrainConfig = cfg, points: list = points,
                    info: dict = info) -> None:
            grid = fit_grid(x, y, 7, kind, points, cfg)
            info["group_size"], info["default"] = grid.group_size, grid.curves

        def one_by_one(kind: str = kind, x: torch.Tensor = x, y: torch.Tensor = y,
                       cfg: TrainConfig = cfg, points: list = points) -> None:
            for p in points:
                fit_grid(x, y, 7, kind, [p], cfg)

        def stacked(kind: str = kind, x: torch.Tensor = x, y: torch.Tensor = y,
                    cfg: TrainConfig = cfg, points: list = points,
                    info: dict = info) -> None:
            info["stacked"] = fit_grid(x, y, 7, kind, points,
                                       dataclasses.replace(cfg, group_size=len(points))).curves

        # alternate the three so that a change of load hits all alike
        t_a: list[float] = []
        t_s: list[float] = []
        t_k: list[float] = []
        for _ in range(args.grid_repeats):
            t_a += timeit(at_once, dev, 1, warmup=0)["times"]
            t_s += timeit(one_by_one, dev, 1, warmup=0)["times"]
            t_k += timeit(stacked, dev, 1, warmup=0)["times"]
        ratio = min(t_s) / min(t_a)
        ratio_med = statistics.median(t_s) / statistics.median(t_a)
        shape = f"N={N} T={T} D={D}" if kind == "attentive" else f"N={N} d=768"
        name = "alf" if kind == "attentive" else "linear"
        flops = (fast_flops(plan.batch_size, T, D, H, 7, len(points)) * plan.total_steps
                 if kind == "attentive" else None)
        out[name] = {"N": N, "configs": len(points), "steps": plan.total_steps,
                     "batch": plan.batch_size, "group_size": info["group_size"],
                     "at_once_s": t_a, "one_by_one_s": t_s, "ratio": ratio,
                     "ratio_median": ratio_med, "stacked_s": t_k,
                     "stacked_speedup": min(t_a) / min(t_k),
                     # the spread stacking causes: the same configs' train losses
                     "stacked_max_rel_loss_diff": float(
                         ((info["stacked"] - info["default"]).abs()
                          / info["default"].abs()).max()),
                     "gflops_at_once": flops / min(t_a) / 1e9 if flops else None}
        rows.append([f"{name} {len(points)} cfgs, {shape}",
                     f"{plan.total_steps} x B={plan.batch_size}", info["group_size"],
                     fmt_t(min(t_a)), fmt_t(min(t_s)), f"{ratio:.2f}x ({ratio_med:.2f}x)",
                     fmt_t(min(t_k)), f"{min(t_a) / min(t_k):.2f}x",
                     f"{out[name]['stacked_max_rel_loss_diff']:.1e}"])
        log(f"    {name}: done  [load {load()}]")
    table(rows, ["grid", "steps", "group", "at once", "one by one", "ratio best (median)",
                 "stacked", "stacked / at once", "loss spread"])
    res["grid"] = out


# -- (3) FLOP/s of ALF training ------------------------------------------------------------


def section_flops(args: argparse.Namespace, dev: torch.device, res: dict) -> None:
    log(f"\n(3) FLOP/s of ALF training against the matmul FLOP/s of (0)  [load {load()}]")
    C = 7
    # cross-check of the formulas at a small batch (they are exact in B)
    checks = {}
    for name, B, T, D, H in (("alf", 64, 24, 768, 24), ("all-tokens", 16, 197, 768, 8)):
        G = 2
        x = tokens(B, T, D, dev)
        y = torch.randint(0, C, (B,), device=dev)
        fast = count_matmul_flops(head_step(make_fast(G, T, D, H, C, dev), x, y, G, False))
        ref = count_matmul_flops(head_step(make_ref(T, D, H, C, dev), x, y, 1, False))
        checks[name] = {
            "B": B, "G": G,
            "fast_analytic": fast_flops(B, T, D, H, C, G),
            "fast_analytic_with_recompute": fast_flops(B, T, D, H, C, G, recompute=True),
            "fast_executed": fast["executed"], "fast_flop_counter_mode": fast["flop_counter_mode"],
            "ref_analytic": ref_flops(B, T, D, H, C), "ref_executed": ref["executed"],
            "ref_flop_counter_mode": ref["flop_counter_mode"],
        }
    rows = []
    for name, c in checks.items():
        rows.append([f"{name} fast G={c['G']} B={c['B']}", f"{c['fast_analytic'] / 1e9:.3f}",
                     f"{c['fast_analytic_with_recompute'] / 1e9:.3f}",
                     f"{c['fast_executed'] / 1e9:.3f}", f"{c['fast_flop_counter_mode'] / 1e9:.3f}"])
        rows.append([f"{name} reference B={c['B']}", f"{c['ref_analytic'] / 1e9:.3f}", "",
                     f"{c['ref_executed'] / 1e9:.3f}", f"{c['ref_flop_counter_mode'] / 1e9:.3f}"])
    log("  FLOPs of one forward+backward (GFLOP), formula vs counted (exact in B, so a small"
        " B)")
    table(rows, ["head", "analytic", "analytic+recompute", "executed (counted)",
                 "FlopCounterMode"])

    # achieved FLOP/s of the head's step, fp32 and bf16 autocast, taken in turn with the
    # matmuls that define the peak (so both see the same load)
    B, T, D, H, G = args.alf_batch, 24, 768, 24, args.stack
    x = tokens(B, T, D, dev)
    y = torch.randint(0, C, (B,), device=dev)
    fl = fast_flops(B, T, D, H, C, G)
    n = args.matmul_n
    gen = torch.Generator(device="cpu").manual_seed(0)
    mats = {dt: [torch.randn(n, n, generator=gen).to(dev, dt) for _ in range(2)]
            for dt in (torch.float32, torch.bfloat16)}
    head = make_fast(G, T, D, H, C, dev)
    fns: dict[str, Callable[[], Any]] = {}
    out: dict[str, Any] = {"checks": checks}
    for amp in (False, True):
        key = "bf16" if amp else "fp32"
        dt = torch.bfloat16 if amp else torch.float32
        a, b = mats[dt]
        fns[f"matmul_{key}"] = lambda a=a, b=b: a @ b
        step = head_step(head, x, y, G, amp)
        try:
            step()
        except Exception as e:  # a head mid-rewrite must not sink the other figures
            out[f"head_step_{key}"] = {"error": f"{type(e).__name__}: {e}"}
            log(f"    head step {key}: FAILED {type(e).__name__}: {e}")
            continue
        fns[f"head_{key}"] = step
    tt = interleaved(fns, dev, args.repeats)
    del head, mats
    for key, dt in (("fp32", "float32"), ("bf16", "bfloat16")):
        note_peak(res, dt, 2 * n**3 / tt[f"matmul_{key}"]["best"] / 1e9)
        if f"head_{key}" not in tt:
            continue
        t = tt[f"head_{key}"]
        out[f"head_step_{key}"] = {"s": t, "gflops": fl / t["best"] / 1e9}
        res["_flops_rows"].append((f"head fwd+bwd G={G} B={B} "
                                   f"{'bf16 autocast' if key == 'bf16' else 'fp32'}",
                                   t["best"], fl / t["best"] / 1e9))
    log(f"    head steps and matmuls, in turn: done  [load {load()}]")
    if all("s" in out.get(f"head_step_{k}", {}) for k in ("fp32", "bf16")):
        out["bf16_speedup"] = (out["head_step_fp32"]["s"]["best"]
                               / out["head_step_bf16"]["s"]["best"])
    res["flops"].update(out)


def note_peak(res: dict, dtype: str, gflops: float) -> None:
    """The machine's matmul peak: the best of every same-thread-count matmul of the run."""
    peaks = res.setdefault("peak_gflops", {})
    peaks[dtype] = max(peaks.get(dtype, 0.0), gflops)


# -- (4) the paper grid on a FER2013-sized set ---------------------------------------------


def _groups(cfg: TrainConfig, dev: torch.device, n_points: int, per_config: int, shared: int,
            budget: int) -> list[int]:
    """Group sizes fit_grid makes."""
    fixed = stacked_group_size(cfg, dev)
    return [len(g) for g in config_groups(n_points, per_config, shared, budget, fixed)]


def section_fer(args: argparse.Namespace, dev: torch.device, amp: bool, res: dict) -> None:
    N, NT, T, D, C = (FER[k] for k in ("n_train", "n_test", "tokens", "dim", "classes"))
    H = T
    cfg = TrainConfig(amp=amp, memory_budget_bytes=(int(args.memory_gb * 2**30)
                                                    if args.memory_gb else None))
    points = grid_points(cfg, attentive=True)
    n_val = int(round(N * 0.2))
    n_tr = N - n_val
    plan_g, plan_r = plan_steps(n_tr, cfg), plan_steps(N, cfg)
    budget = cfg.memory_budget_bytes or default_memory_budget(dev)
    per_cfg, shared = estimate_memory("attentive", (T, D), C, plan_g.batch_size, H, device=dev)
    sizes = _groups(cfg, dev, len(points), per_cfg, shared, budget)
    log(f"\n(4) paper grid, ALF on a FER2013-sized set: {N} x {T} x {D}, {C} classes, "
        f"{len(points)} configs  [load {load()}]")
    log(f"  grid on {n_tr} (80%): {plan_g.steps_per_epoch} steps/epoch x {plan_g.epochs} "
        f"epochs = {plan_g.total_steps} steps at B={plan_g.batch_size}; validation on "
        f"{n_val}; refit on {N}: {plan_r.total_steps} steps at B={plan_r.batch_size}; "
        f"test on {NT}")
    log(f"  memory budget {budget / 2**30:.1f} GiB -> groups of {sorted(set(sizes))} "
        f"({len(sizes)} groups: {sizes})")
    out: dict[str, Any] = {"plan_grid": vars(plan_g), "plan_refit": vars(plan_r),
                           "groups": sizes, "budget_gib": budget / 2**30, "n_val": n_val}
    res["fer"] = out

    # measured fraction: k+1 steps of each distinct group size (and of the refit's single
    # config) at the real batch size B, through fit_grid itself. The set is one batch of B
    # samples and every epoch one step, so the per-epoch progress callback (which syncs the
    # device) timestamps every step; step 1 carries the group's setup, steps 2..k+1 are the
    # steady state (the best of them is used, the median gives a second total).
    k = args.fer_steps
    B = plan_g.batch_size
    xs = tokens(B, T, D, dev, seed=2)
    ys = torch.randint(0, C, (B,), device=dev)
    frac_cfg = TrainConfig(amp=amp, epochs=k + 1, min_total_steps=1, min_steps_per_epoch=1,
                           memory_budget_bytes=cfg.memory_budget_bytes)
    fplan = plan_steps(B, frac_cfg)
    assert fplan.batch_size == B and fplan.total_steps == k + 1, fplan
    step_s: dict[int, float] = {}
    step_med: dict[int, float] = {}
    first_s: dict[int, float] = {}
    eval_s: dict[int, float] = {}
    n_eval = min(args.fer_eval_n, B)
    for s in sorted(set(sizes) | {1}, reverse=True):
        stamps: list[float] = []
        sync(dev)
        t0 = time.perf_counter()
        grid = fit_grid(xs, ys, C, "attentive", points[:s], frac_cfg,
                        progress=lambda _, st=stamps: st.append(time.perf_counter()))
        if grid.group_size != s:
            log(f"  note: the {s}-config fraction was split into groups of {grid.group_size}")
        d = [b - a for a, b in zip([t0, *stamps[:-1]], stamps, strict=True)][: k + 1]
        first_s[s], step_s[s], step_med[s] = d[0], min(d[1:]), statistics.median(d[1:])
        te = timeit(lambda g=grid, xe=xs[:n_eval], ye=ys[:n_eval]: g.evaluate(xe, ye), dev, 1,
                    warmup=0)
        eval_s[s] = te["best"] / n_eval / s  # per sample, per config
        gf = fast_flops(B, T, D, H, C, s) / step_s[s] / 1e9
        log(f"    group of {s}: steps {', '.join(fmt_t(v) for v in d)} -> "
            f"{fmt_t(step_s[s])}/step best steady ({gf:.1f} GFLOP/s useful); eval of "
            f"{n_eval} samples {fmt_t(te['best'])}  [load {load()}]")
        del grid

    # extrapolation, t(s): steady step time of a group of s configs, t1(s): its first step,
    # e(s): eval seconds per sample and config:
    #   T = sum_groups [t1(|g|) + (S_grid - 1) t(|g|)] + t1(1) + (S_refit - 1) t(1)
    #       + n_val * 63 * e(group size) + n_test * e(1)
    gs = sizes[0]

    def extrapolate(t: dict[int, float]) -> dict[str, float]:
        parts = {
            "grid": sum(first_s[s] + (plan_g.total_steps - 1) * t[s] for s in sizes),
            "validation": n_val * len(points) * eval_s[gs],
            "refit": first_s[1] + (plan_r.total_steps - 1) * t[1],
            "test": NT * eval_s[1],
        }
        return {**parts, "total": sum(parts.values())}

    ext = extrapolate(step_s)
    t_grid, t_val, t_refit, t_test, total = ext.values()
    out["measured"] = {"steps_per_size": k + 1, "step_s_best": step_s, "step_s_median": step_med,
                       "first_step_s": first_s, "eval_s_per_sample_config": eval_s,
                       "eval_samples": n_eval}
    out["extrapolated_s"] = ext
    out["extrapolated_s_median_steps"] = extrapolate(step_med)
    measured = sum((k + 1) * s for s in step_s)  # config-steps
    needed = plan_g.total_steps * len(points) + plan_r.total_steps
    out["measured_fraction"] = measured / needed
    log(f"  extrapolated: grid {fmt_t(t_grid)} + validation {fmt_t(t_val)} + refit "
        f"{fmt_t(t_refit)} + test {fmt_t(t_test)} = {fmt_t(total)}  (measured {measured} of "
        f"{needed} config-steps: {100 * out['measured_fraction']:.2f}%); with median steps "
        f"{fmt_t(out['extrapolated_s_median_steps']['total'])}")

    # training-loop FLOP/s (the figure that matters for (3))
    fl_train = fast_flops(B, T, D, H, C, gs)
    gf = fl_train / step_s[gs] / 1e9
    # the same group's head forward+backward alone: the rest of the step is the loop's own
    # cost (batch gather, jitter, loss, per-config clipping, AdamW)
    head = make_fast(gs, T, D, H, C, dev)
    t_head = timeit(head_step(head, xs, ys, gs, amp), dev, args.repeats)
    del head
    res["flops"]["fit_grid_head_only"] = {"group": gs, "B": B, "s": t_head,
                                          "gflops": fl_train / t_head["best"] / 1e9}
    res["_flops_rows"].append((f"head fwd+bwd alone, same G={gs} B={B}", t_head["best"],
                               fl_train / t_head["best"] / 1e9))
    log(f"  training step of a group of {gs}: {fmt_t(step_s[gs])}, of which the head's "
        f"forward+backward alone {fmt_t(t_head['best'])} "
        f"({100 * t_head['best'] / step_s[gs]:.0f}%)")
    res["flops"]["fit_grid_step"] = {
        "group": gs, "B": B, "s": step_s[gs], "gflops": gf,
        "peak_dtype": "bfloat16" if amp and dev.type == "cuda" else "float32"}
    res["_flops_rows"].append((f"fit_grid step G={gs} B={B} (+ jitter, loss, clip, AdamW)",
                               step_s[gs], gf))

    # end to end where it fits (CUDA by default)
    if args.fer == "full" or (args.fer == "auto" and dev.type == "cuda"):
        from featcache.probing.selection import fit_and_select

        x = tokens(N, T, D, dev, seed=3)
        y = torch.randint(0, C, (N,), device=dev)
        xt = tokens(NT, T, D, dev, seed=4)
        yt = torch.randint(0, C, (NT,), device=dev)
        log("  running the whole recipe end to end ...")
        sync(dev)
        t0 = time.perf_counter()
        sel = fit_and_select(x, y, C, "attentive", cfg, SimpleNamespace(val_fraction=0.2),
                             0, H)
        sel.final.evaluate(xt, yt)
        sync(dev)
        out["full_run_s"] = time.perf_counter() - t0
        log(f"  MEASURED end to end (grid + validation + refit + test): "
            f"{fmt_t(out['full_run_s'])}")

    # back-of-envelope for an H200 (not a measurement)
    total_flops = (sum(plan_g.total_steps * fast_flops(B, T, D, H, C, s) for s in [63])
                   + plan_r.total_steps * fast_flops(plan_r.batch_size, T, D, H, C, 1)
                   + fast_forward_flops(n_val, T, D, H, C, 63)
                   + fast_forward_flops(NT, T, D, H, C, 1))
    out["total_flops"] = total_flops
    out["h200_envelope_s"] = {"at_100pct": total_flops / (H200_BF16_TFLOPS * 1e12),
                              "at_40pct": total_flops / (0.4 * H200_BF16_TFLOPS * 1e12)}
    log(f"  back-of-envelope, NOT measured: {total_flops / 1e15:.2f} PFLOP in all; on an H200 "
        f"({H200_BF16_TFLOPS:.0f} bf16 TFLOP/s dense) that is "
        f"{out['h200_envelope_s']['at_100pct']:.1f} s at 100% and "
        f"{out['h200_envelope_s']['at_40pct']:.1f} s at 40% of peak (one group of 63)")
    res["fer"] = out


# -- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller shapes (< 2 min on 2 cores)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--amp", default="auto", choices=("auto", "on", "off"),
                   help="bf16 autocast for (1), (2), (4): auto = on CUDA only (as the probe)")
    p.add_argument("--fer", default="auto", choices=("auto", "full", "extrapolate"),
                   help="(4): run end to end (auto: on CUDA) or extrapolate only")
    p.add_argument("--memory-gb", type=float, default=None, help="fit_grid memory budget")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per figure")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--only", default=None,
                   help="comma-separated sections to run (matmul_peak, threads, heads, grid, "
                        "flops, fer); default all")
    args = p.parse_args(argv)

    if args.device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(args.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            p.error("--device cuda, but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    amp = args.amp == "on" or (args.amp == "auto" and dev.type == "cuda")
    gpu = dev.type == "cuda"
    q = args.quick
    args.repeats = args.repeats or (2 if q else 3)
    args.matmul_n = 8192 if gpu else (2048 if q else 4096)
    args.thread_batch = 256 if q else 1024
    args.alf_batch = 512 if q else 2048
    args.tok_batch = 32 if q else 128
    args.stack = 8
    args.grid_n = 2048 if q else 4096
    args.grid_dim = 768 if gpu else 384
    args.grid_dropouts = (0.0, 0.1, 0.3) if gpu else (0.1,)
    args.grid_configs = 21 * len(args.grid_dropouts)
    args.grid_epochs = 1
    args.grid_repeats = 1 if q else 2
    args.fer_steps = 2 if q else 4
    args.fer_eval_n = 1024 if q else 2048

    t_start = time.perf_counter()
    res: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "benchmarks/probe.py", *sys.argv[1:]]),
        "quick": q, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if gpu else cpu_info()["cpu"],
        "torch": torch.__version__, "threads": torch.get_num_threads(), "amp": amp,
        "cpu": cpu_info(), "git": git_state(), "load_start": os.getloadavg(),
    }
    c = res["cpu"]
    log(f"probe benchmark  {res['date']}  torch {res['torch']}  device {dev} "
        f"({res['device_name']})")
    log(f"  CPU {c['cpu']}, {c['cores']} cores, torch threads {res['threads']}; "
        f"amx_bf16={c['amx_bf16']} avx512_bf16={c['avx512_bf16']} avx512f={c['avx512f']}; "
        f"load avg {tuple(round(v, 2) for v in res['load_start'])}")
    log(f"  git {res['git']['commit']}; uncommitted changes in "
        f"{res['git']['heads_train_modified'] or 'neither'} of heads.py/train.py; "
        f"{'quick' if q else 'full'} run; autocast bf16 for (1)(2)(4): {amp}")

    res["flops"], res["_flops_rows"], res["errors"] = {}, [], {}
    sections: list[tuple[str, Callable[[], None]]] = [
        ("matmul_peak", lambda: section_peak(args, dev, res)),
        ("threads", lambda: None if gpu else section_threads(args, dev, res)),
        ("heads", lambda: section_heads(args, dev, amp, res)),
        ("grid", lambda: section_grid(args, dev, amp, res)),
        ("flops", lambda: section_flops(args, dev, res)),
        ("fer", lambda: section_fer(args, dev, amp, res)),
    ]
    only = None if args.only is None else set(args.only.split(","))
    for name, run in sections:
        if only is not None and name not in only:
            continue
        try:
            run()
        except Exception as e:  # report and go on: one broken figure must not hide the rest
            res["errors"][name] = f"{type(e).__name__}: {e}"
            log(f"  {name}: FAILED {type(e).__name__}: {e}")

    peaks = res.get("peak_gflops", {})
    for v in res["flops"].values():
        if isinstance(v, dict) and "gflops" in v:
            for dt in peaks:
                v[f"of_{dt}_peak"] = v["gflops"] / peaks[dt]
            if "peak_dtype" in v:
                v["of_peak"] = v["gflops"] / peaks[v["peak_dtype"]]
    log("\n(3, continued) achieved FLOP/s (useful FLOPs of the formula / time) against the "
        "best matmul of the run (" + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items())
        + ")")
    table([[w, fmt_t(t), f"{gf:.1f}",
            *(f"{100 * gf / peaks[dt]:.0f}%" for dt in ("float32", "bfloat16") if dt in peaks)]
           for w, t, gf in res.pop("_flops_rows")],
          ["what", "time best", "GFLOP/s", "of fp32 mm", "of bf16 mm"][: 3 + len(peaks)])

    def val(fn: Callable[[], str]) -> str:
        try:
            return fn()
        except (KeyError, TypeError, ZeroDivisionError):
            return "n/a (failed)"

    h, g = res.get("heads", {}), res.get("grid", {})
    fl, fer = res["flops"], res.get("fer", {})
    G = args.stack
    log("\nSummary")
    summary = [
        [f"(1) fast/ref, ALF D=768 (G=1 | G={G} stacked)",
         val(lambda: f"{h['alf']['ratio_G1']:.1f}x | {h['alf'][f'ratio_G{G}']:.1f}x"),
         ">= 5x"],
        ["(1) fast/ref, all tokens T=197 H=8",
         val(lambda: f"{h['all-tokens']['ratio_G1']:.1f}x | "
                     f"{h['all-tokens'][f'ratio_G{G}']:.1f}x"), ">= 5x"],
        [f"(2) grid at once / one by one, ALF {args.grid_configs} cfgs",
         val(lambda: f"{g['alf']['ratio']:.2f}x"), ">= 1x CPU, >= 5x GPU"],
        ["(2) grid at once / one by one, linear 21 cfgs",
         val(lambda: f"{g['linear']['ratio']:.2f}x"), ">= 1x CPU, >= 5x GPU"],
        ["(2) stacked kernels (--group-size) / default, ALF | linear",
         val(lambda: f"{g['alf']['stacked_speedup']:.2f}x | "
                     f"{g['linear']['stacked_speedup']:.2f}x"), "CPU: <= 1.1x"],
        ["(3) ALF head step fp32, of fp32 matmul",
         val(lambda: f"{100 * fl['head_step_fp32']['of_float32_peak']:.0f}%"), ">= 40%"],
        ["(3) ALF fit_grid step (whole training step), of matmul",
         val(lambda: f"{100 * fl['fit_grid_step']['of_peak']:.0f}% of "
                     f"{fl['fit_grid_step']['peak_dtype']}"), ">= 40%"],
        ["(3) ALF head step bf16 autocast, of bf16 matmul",
         val(lambda: f"{100 * fl['head_step_bf16']['of_bfloat16_peak']:.0f}% "
                     f"({fl['bf16_speedup']:.2f}x fp32 speed)"), ""],
        ["(4) paper grid FER2013-sized, extrapolated",
         val(lambda: fmt_t(fer["extrapolated_s"]["total"])), "< 2 min on a GPU"],
    ]
    if "full_run_s" in fer:
        summary.append(["(4) paper grid, measured end to end", fmt_t(fer["full_run_s"]),
                        "< 2 min on a GPU"])
    summary.append(["(4) H200 back-of-envelope (not measured), 40% of 790 TFLOP/s",
                    val(lambda: f"{fer['h200_envelope_s']['at_40pct']:.1f} s"), ""])
    table(summary, ["figure", "value", "goal"])
    if res["errors"]:
        log(f"errors: {res['errors']}")
    res["load_end"] = os.getloadavg()
    res["wall_s"] = time.perf_counter() - t_start
    log(f"\nload avg at the end {tuple(round(v, 2) for v in res['load_end'])}; "
        f"benchmark wall time {fmt_t(res['wall_s'])}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1, default=str))
        log(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
