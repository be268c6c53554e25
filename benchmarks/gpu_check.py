"""Every CUDA path of featcache once, compared with the CPU path, then the GPU figures.

One command for the first GPU at hand (no arguments; < 8 minutes on one H200); it prints
a summary and writes `gpu_check.json`:

1. Smoke, small shapes, each result compared with the CPU path:
   - extract (timm and open_clip, both taps, every token of the last layer) under the
     GPU's autocast dtype: tokens within bf16/fp16 rounding of CPU fp32;
   - the fused AdamW kernel against torch's AdamW; the plain attentive pooling against
     the chunked one;
   - a grid trained with every config in one group, one per group and in pairs: the
     largest difference any config shows (0 on the CPU, where it is bitwise; reported
     on CUDA, whose batched kernels may round by the group's shape);
   - tokens on the device, in pinned host memory (staged to the device) and streamed
     from the cache: the same batches bit for bit;
   - probe (linear, concat, attentive, alf, layers) with each of those placements: the
     CPU's metrics within tolerance; predict reproduces a run's test metrics from the
     images on the GPU; report writes its files;
   - torchrun on the GPUs present (NCCL; two ranks share one GPU over gloo if there is
     one): extract, probe grid-parallel and data-parallel, against one process.
2. Figures: ViT-B/16 extraction images/s against a bare bf16 forward over the same
   pre-decoded batches (and whether decoding keeps up); the ALF paper grid end to end on
   a FER2013-sized synthetic cache (seconds, FLOP/s against the measured bf16 matmul
   peak); a grid trained at once against one config at a time; what bf16 extraction and
   bf16 heads change in linear and ALF numbers, and the time each saves; k-NN at
   ImageNet-1k's shape (50,000 × 1,281,167, D = 768) blocked, and beside one torch.topk
   over the full similarity matrix of 4,096 queries (`benchmarks/knn.py`); featcache
   beside thingsvision and CLIP_benchmark (benchmarks/peers.py) when their environments
   exist.
3. `--dry-run`: the same on the CPU with tiny shapes (fp32), run by the test suite so
   that the script cannot rot.

    python benchmarks/gpu_check.py              # or: make gpu-check
    python benchmarks/gpu_check.py --dry-run    # CPU, tiny, about a minute
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from machine import cpu_info  # noqa: E402

TIMM_TINY = ("timm:vit_tiny_patch16_224",
             {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 48, "num_heads": 3})
CLIP_TINY = ("open_clip:ViT-B-32", {
    "embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32,
                                    "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}})
METHODS = ("linear", "concat", "attentive", "alf", "layers")


class Check:
    """The results: each check's outcome and time, each figure's numbers."""

    def __init__(self, info: dict[str, Any], out: Path) -> None:
        self.info, self.out = info, out
        self.checks: list[dict[str, Any]] = []
        self.figures: dict[str, Any] = {}
        self.started = time.perf_counter()
        self.log = print

    def save(self, finished: bool) -> dict[str, Any]:
        """Written after every check: a run cut short (a loan that ends, a hang) still
        leaves what it measured."""
        result = {**self.info, "finished": finished,
                  "seconds": round(time.perf_counter() - self.started, 1),
                  "checks": self.checks, "figures": self.figures,
                  "failed": [c["name"] for c in self.checks if not c["ok"]]}
        self.out.write_text(json.dumps(result, indent=1, default=str))
        return result

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run one check; a failure is recorded (with its traceback) and the rest go on."""
        started = time.perf_counter()
        try:
            detail = fn()
            ok, error = True, None
        except Exception as exc:
            detail, ok = None, False
            error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"
        seconds = time.perf_counter() - started
        self.checks.append({"name": name, "ok": ok, "seconds": round(seconds, 2),
                            "detail": detail, "error": error})
        mark = "ok  " if ok else "FAIL"
        self.log(f"  [{mark}] {name} ({seconds:.1f} s)" + (f": {detail}" if ok and detail
                                                           else ""))
        if error:
            self.log("         " + error.splitlines()[0])
        self.save(finished=False)
        return detail


# -- 1. smoke -------------------------------------------------------------------------------

def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def extract_pair(work: Path, model: tuple[str, dict], tap: str, device: torch.device,
                 dtype: str) -> dict[str, float]:
    """Extract digits' test split on the device and on the CPU (fp32); compare."""
    from featcache.cache.store import open_cache
    from featcache.extracting.run import extract

    name, kwargs = model
    paths = {}
    for where, dev, dt in (("dev", str(device), dtype), ("cpu", "cpu", "fp32")):
        (res,) = extract(model=name, model_arg=dict(kwargs), weights="random:0", tap=tap,
                         dataset="digits", split="test", cache=work / f"{where}-{tap}",
                         batch_size=128, workers=0, device=dev, dtype=dt, all_tokens=True)
        paths[where] = res.path
    a, b = open_cache(paths["dev"]), open_cache(paths["cpu"])
    errors = {kind: relative_error(a.read(kind), b.read(kind))
              for kind in (*a.token_kinds, "last_tokens")}
    limit = 1e-5 if dtype == "fp32" else 3e-2  # bf16 keeps 8 bits of mantissa
    bad = {k: v for k, v in errors.items() if not v <= limit}
    if bad:
        raise AssertionError(f"tokens differ from the CPU's beyond {limit}: {bad}")
    return {k: float(f"{v:.2e}") for k, v in errors.items()}


def placements_equal(work: Path, device: torch.device) -> dict[str, Any]:
    """The same tokens resident on the device, in pinned host memory (staged through two
    pinned buffers, copied without blocking) and streamed from the cache give the same
    batches bit for bit: data movement has no rounding to hide a race behind."""
    from probecache import SynthSpec, make_pair

    from featcache.probing.pairs import token_list
    from featcache.probing.tokens.features import load_source
    from featcache.probing.tokens.streaming import StreamedSource

    train, _ = make_pair(work / "placements", SynthSpec(n_blocks=3, dim=24, n_classes=3,
                                                        n_train=700, n_test=10,
                                                        shard_size=32, seed=2))
    tokens = token_list("alf", "all", train)
    resident = load_source(train, tokens, device, budget_bytes=1 << 40)
    host = load_source(train, tokens, device, budget_bytes=0)
    streamed = load_source(train, tokens, device, budget_bytes=0, host_budget_bytes=40_000,
                           stream=StreamedSource)
    kinds = [type(s).__name__ + ":" + getattr(s, "placement", "stream")
             for s in (resident, host, streamed)]
    if len(set(kinds)) != 3:
        raise AssertionError(f"expected three placements, got {kinds}")
    batches = 0
    for a, b in zip(resident.epoch_batches(9, torch.Generator().manual_seed(0)),
                    host.epoch_batches(9, torch.Generator().manual_seed(0)), strict=True):
        if not (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])):
            raise AssertionError("a training batch staged from pinned host memory differs "
                                 "from the device-resident one")
        batches += 1
    for (sa, xa), (sb, xb), (sc, xc) in zip(resident.batches(100), host.batches(100),
                                            streamed.batches(100), strict=True):
        if not (sa == sb == sc and torch.equal(xa, xb) and torch.equal(xa, xc)):
            raise AssertionError(f"evaluation batch {sa} differs between placements")
        batches += 1
    seen = torch.zeros(len(streamed), dtype=torch.long)
    for idx, xb in streamed.epoch_batches(9, torch.Generator().manual_seed(0)):
        if not torch.equal(xb, resident.gather(idx.to(resident.index_device))):
            raise AssertionError("a streamed training batch holds other tokens than it names")
        seen[idx.cpu()] += 1
        batches += 1
    if not bool((seen == 1).all()):
        raise AssertionError("a streamed epoch did not visit every sample exactly once")
    return {"placements": kinds, "batches_compared": batches}


def kernels_match(device: torch.device) -> dict[str, Any]:
    """The two kernels the GPU takes its own way: torch's fused AdamW (per config, host
    lrs) against `torch.optim.AdamW`, and the plain attentive pooling (one bmm, the GPU's
    default) against the chunked one (the CPU's), both in fp32 on the device."""
    import featcache.probing.heads.pooling as pooling
    from featcache.probing.optim import BatchedAdamW
    from featcache.probing.train import TrainConfig, fit_grid

    g = torch.Generator().manual_seed(0)
    lrs, wds = [1e-1, 1e-2, 1e-3], [0.0, 1e-2, 1.0]
    init = [torch.randn(s, generator=g).to(device) for s in ((3, 40, 500), (3, 7))]
    ours = [p.clone().requires_grad_(True) for p in init]
    opt = BatchedAdamW(ours, lrs, wds)
    if not opt.fused:
        raise AssertionError(f"the fused AdamW kernel does not run on {device}")
    singles = [[p[c].detach().clone().requires_grad_(True) for p in init] for c in range(3)]
    refs = [torch.optim.AdamW(singles[c], lr=lrs[c], weight_decay=wds[c], foreach=False)
            for c in range(3)]
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g).to(device) for p in init]
        for p, gr in zip(ours, grads, strict=True):
            p.grad = gr.clone()
        opt.step(lrs)
        for c in range(3):
            for p, gr in zip(singles[c], grads, strict=True):
                p.grad = gr[c].clone()
            refs[c].step()
    adamw = max(float((ours[i][c] - singles[c][i]).detach().abs().max())
                for c in range(3) for i in range(2))
    if adamw > 1e-5:
        raise AssertionError(f"fused AdamW differs from torch's by {adamw:.2e}")
    n, T, D, C = 96, 5, 32, 3
    y = torch.randint(0, C, (n,), generator=g)
    x = torch.nn.functional.normalize(torch.randn(n, T, D, generator=g), dim=-1)
    x[:, 2] += torch.randn(C, D, generator=g)[y]
    x, y = x.to(device), y.to(device)
    cfg = TrainConfig(epochs=3, batch_size=32, min_total_steps=0, amp=False)
    points = [{"lr": 1e-2, "wd": 1e-4, "dropout": 0.0}, {"lr": 1e-3, "wd": 1e-2, "dropout": 0.1}]
    default = pooling._use_chunks
    curves = {}
    try:
        for form, chunks in (("plain", False), ("chunked", True)):
            pooling._use_chunks = lambda *_, c=chunks: c
            curves[form] = fit_grid(x, y, C, "attentive", points, cfg).curves
    finally:
        pooling._use_chunks = default
    pool = float((curves["plain"] - curves["chunked"]).abs().max())
    if pool > 1e-3:
        raise AssertionError(f"plain pooling's loss curve differs from the chunked one's by "
                             f"{pool:.2e}")
    return {"fused_adamw_max_diff": float(f"{adamw:.2e}"),
            "plain_vs_chunked_loss_max_diff": float(f"{pool:.2e}")}


def grouping_spread(device: torch.device, dry: bool) -> dict[str, Any]:
    """The same grid (attentive with a dropout axis; linear) trained with all configs in
    one group, one per group and in pairs, in fp32 on the device: the largest difference
    of any config's parameters and loss curve between groupings. Bitwise (0) on the CPU
    (`tests/test_grid_invariance.py`); on CUDA (stacked kernels, so the run's identity
    names the group size) the spread between group sizes, refused only if it looks like
    a bug (above 1e-2)."""
    import dataclasses

    from featcache.probing.train import TrainConfig, fit_grid, grid_points

    g = torch.Generator().manual_seed(0)
    n, T, D, C = (96, 5, 24, 3) if dry else (2048, 24, 384, 7)
    y = torch.randint(0, C, (n,), generator=g)
    x = torch.nn.functional.normalize(torch.randn(n, T, D, generator=g), dim=-1)
    x[:, 2] += torch.randn(C, D, generator=g)[y]
    x, y = x.to(device), y.to(device)
    cfg = TrainConfig(epochs=1, batch_size=32 if dry else 512, min_total_steps=5 if dry
                      else 50, lrs=(0.1,) if dry else (0.1, 0.01), wds=(1e-4, 0.1),
                      dropouts=(0.0, 0.3),
                      amp=False)
    out: dict[str, Any] = {}
    for head in ("attentive", "linear"):
        xs = x if head == "attentive" else x.flatten(1)
        points = grid_points(cfg, attentive=head == "attentive")
        # on CUDA the kernels are stacked and the groups fixed (--group-size); on the
        # CPU each config has its own products and the memory budget groups them
        every, single = ((dataclasses.replace(cfg, group_size=len(points)),
                          dataclasses.replace(cfg, group_size=1)) if device.type == "cuda"
                         else (cfg, dataclasses.replace(cfg, memory_budget_bytes=1)))
        fits = [fit_grid(xs, y, C, head, points, every),
                fit_grid(xs, y, C, head, points, single)]
        pairs = [fit_grid(xs, y, C, head, points[i: i + 2], every)
                 for i in range(0, len(points), 2)]
        worst = 0.0
        for c in range(len(points)):
            want = fits[0].heads.select([c]).state_dict()
            for got in (fits[1].heads.select([c]), pairs[c // 2].heads.select([c % 2])):
                for key, value in got.state_dict().items():
                    worst = max(worst, float((value.double() - want[key].double()).abs().max()))
            for curve in (fits[1].curves[c], pairs[c // 2].curves[c % 2]):
                worst = max(worst, float((curve - fits[0].curves[c]).abs().max()))
        out[head] = {"configs": len(points), "max_diff": float(f"{worst:.3e}")}
        if (device.type == "cpu" and worst != 0.0) or worst > 1e-2:
            raise AssertionError(f"{head}: a config's numbers move by {worst:.2e} with its "
                                 "group")
    return out


def streaming_budget(train: Any, method: str, tokens: list[str]) -> float:
    """The largest host budget (GB) at which this method's train tokens are streamed from
    the cache: all of them do not fit it, a buffer of shards does."""
    from featcache.probing.run import ProbeOptions, stream_buffer

    gb = 1.0
    while gb > 1e-9:
        shards = stream_buffer(train, tokens, ProbeOptions(method=method,
                                                           max_host_memory_gb=gb))
        if shards:
            return gb
        gb *= 0.8
    raise AssertionError(f"{method}: no host budget streams its tokens")


def probe_all(work: Path, device: torch.device, dry: bool) -> dict[str, Any]:
    """Every method: device-resident, host-staged and cache-streamed tokens on the device,
    and the CPU: each record says where its tokens were; metrics within tolerance of the
    CPU's (equal, on the CPU itself)."""
    from probecache import SynthSpec, make_pair

    from featcache.probing.pairs import find_pairs
    from featcache.probing.run import probe

    root = work / "synth"
    spec = SynthSpec(n_blocks=4, dim=32, n_classes=4, n_train=600, n_test=400,
                     shard_size=64, signal={("block2", "ap"): 0.5, ("final", "cls"): 0.35},
                     all_tokens=9,
                     token_signal=(3, 0.5), seed=1)
    make_pair(root, spec)
    quick = dict(cache=root, grid="quick", threads=None if not dry else 1)
    out: dict[str, Any] = {}
    train = find_pairs(root)[0][0]
    for method in METHODS:
        got: dict[str, float] = {}
        tokens: list[str] = []  # the head's tokens, from the first (device) run's record
        for where, extra in (("device", dict(device=str(device))),
                             ("host", dict(device=str(device), feature_memory_gb=0.0)),
                             ("stream", dict(device=str(device), feature_memory_gb=0.0)),
                             ("cpu", dict(device="cpu"))):
            if where == "stream":
                extra["max_host_memory_gb"] = streaming_budget(train, method, tokens)
            (res,) = probe(method=method, runs=work / "runs" / where, **quick, **extra)
            got[where] = res.metrics["balanced_top1"]
            record = json.loads((res.path / "record.json").read_text())
            settings, placement = record["settings"], record["config"]["feature_placement"]
            tokens = settings["tokens"]
            streamed = (where == "stream", "stream_buffer_shards" in settings,
                        placement == "stream")
            if len(set(streamed)) != 1:  # the identity says what really happened
                raise AssertionError(f"{method} {where}: placement {placement}, "
                                     f"stream_buffer_shards in the identity: {streamed[1]}")
        # On the CPU the placements run the same ops: equal. On a GPU jitter and dropout
        # come from CUDA's generator (Philox), other numbers than the CPU's for one seed:
        # like another seed (on the CPU, 8 other seeds moved these by at most 2.5 points).
        tolerance = 1e-9 if str(device) == "cpu" else 5.0
        if abs(got["device"] - got["host"]) > tolerance:
            raise AssertionError(f"{method}: device {got['device']} vs host {got['host']}")
        if abs(got["device"] - got["cpu"]) > tolerance:
            raise AssertionError(f"{method}: device {got['device']:.2f} vs cpu "
                                 f"{got['cpu']:.2f} (tolerance {tolerance})")
        if abs(got["stream"] - got["device"]) > 10.0:  # another shuffle: within noise
            raise AssertionError(f"{method}: streamed {got['stream']:.2f} vs in memory "
                                 f"{got['device']:.2f}")
        out[method] = {k: round(v, 2) for k, v in got.items()}
    return out


def predict_and_report(work: Path, device: torch.device) -> dict[str, Any]:
    """A run on digits, predicted from the images on the device; the report's files."""
    from featcache.extracting.run import extract
    from featcache.probing.run import probe
    from featcache.reporting.build import report
    from featcache.serving.inference import predict

    name, kwargs = TIMM_TINY
    root = work / "digits"
    extract(model=name, model_arg=dict(kwargs), weights="random:1", dataset="digits",
            cache=root, batch_size=128, workers=0, device="cpu")
    (run,) = probe(method="alf", cache=root, grid="quick", device="cpu")
    result = predict(run.path, dataset="digits", split="test", device=str(device),
                     batch_size=128, workers=0)
    if result.metrics is None or abs(result.metrics["balanced_top1"]
                                      - run.metrics["balanced_top1"]) > 1.0:
        raise AssertionError(f"predict on {device}: {result.metrics} vs the record's "
                             f"{run.metrics}")
    data = report(runs=root / "runs", out=work / "report", cka=False)
    missing = [k for k in ("html", "md", "csv") if not Path(data.written[k]).is_file()]
    if missing:
        raise AssertionError(f"report did not write {missing}")
    return {"predict_agreement": result.agreement, "reproduces_record":
            result.reproduces_record, "report_rows": len(data.rows)}


def torchrun_check(work: Path, device: torch.device, dry: bool) -> dict[str, Any]:
    """Extract and probe (grid- and data-parallel) on ranks; compare with one process."""
    from probecache import SynthSpec, make_pair

    from featcache.cache.store import open_cache
    from featcache.extracting.run import extract
    from featcache.probing.run import probe

    n_gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    ranks = max(2, min(n_gpus, 8))
    root = work / "ranks"
    make_pair(root / "synth", SynthSpec(n_blocks=3, dim=16, n_classes=3, n_train=320,
                                        n_test=96, shard_size=32, seed=5,
                                        signal={("block1", "ap"): 2.0}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(ranks), str(Path(__file__).resolve()), "--torchrun-worker", str(root),
           "--device", str(device.type)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # tiny shapes: a minute at most; a hang (a collective no rank reaches) must not eat
    # the whole GPU loan
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = launcher.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, 9)  # the launcher and every rank with it
        launcher.communicate()
        raise AssertionError(f"torchrun on {ranks} ranks did not finish in 240 s") from None
    if launcher.returncode != 0:
        raise AssertionError(f"torchrun on {ranks} ranks failed: {stderr[-1500:]}")
    name, kwargs = TIMM_TINY
    (one,) = extract(model=name, model_arg=dict(kwargs), weights="random:0",
                     dataset="digits", split="test", cache=root / "one", batch_size=64,
                     workers=0, device=str(device))
    ddp = open_cache(root / "ddp" / one.path.relative_to(root / "one"))
    err = relative_error(ddp.read("cls"), open_cache(one.path).read("cls"))
    if err > 3e-2:
        raise AssertionError(f"torchrun extract differs from one process: {err}")
    out: dict[str, Any] = {"ranks": ranks, "backend": "nccl" if 0 < ranks <= n_gpus
                           else "gloo", "extract_relative_error": err}
    for mode in ("grid", "data"):
        rec = json.loads(next((root / f"runs-{mode}").rglob("record.json")).read_text())
        (ref,) = probe(method="alf", cache=root / "synth", runs=root / "runs-one",
                       grid="quick", device=str(device))
        diff = abs(rec["metrics"]["balanced_top1"] - ref.metrics["balanced_top1"])
        if diff > 5.0:
            raise AssertionError(f"{mode}-parallel alf: {rec['metrics']['balanced_top1']:.2f}"
                                 f" vs one process {ref.metrics['balanced_top1']:.2f}")
        out[f"{mode}_parallel_alf"] = round(rec["metrics"]["balanced_top1"], 2)
    return out


def torchrun_worker(root: Path, device: str) -> None:
    """What each rank does in `torchrun_check`: extract, then probe in both modes."""
    from featcache.extracting.run import extract
    from featcache.probing.run import probe

    name, kwargs = TIMM_TINY
    extract(model=name, model_arg=dict(kwargs), weights="random:0", dataset="digits",
            split="test", cache=root / "ddp", batch_size=64, workers=0)
    for mode in ("grid", "data"):
        probe(method="alf", cache=root / "synth", runs=root / f"runs-{mode}", grid="quick",
              parallel=mode)


# -- 2. figures ------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def extraction_figure(work: Path, device: torch.device, dry: bool) -> dict[str, Any]:
    """ViT-B/16 (tiny when dry) extraction against a bare autocast forward over the same
    pre-decoded batches; and the decoding rate alone."""
    from extract import make_images
    from torch.utils.data import DataLoader

    from featcache.backbones import create_backbone
    from featcache.extracting.run import _Prepared, extract, plan_workers, resolve_dtype
    from featcache.sources import open_dataset

    n, batch = (64, 32) if dry else (4096, 256)
    name, kwargs = (TIMM_TINY if dry else ("timm:vit_base_patch16_224", {}))
    folder = work / "images"
    make_images(folder, n)
    dtype = resolve_dtype("auto", device)
    backbone = create_backbone(name, "random:0", "reference", dict(kwargs)).to(device).eval()
    data = open_dataset(f"imagefolder:{folder}", "train")
    workers, _ = plan_workers(device, None)
    loader = DataLoader(_Prepared(data, backbone.transform, backbone.input_size),
                        batch_size=batch, num_workers=workers)
    started = time.perf_counter()
    # copied out of the workers' shared memory (a container's /dev/shm may be small)
    decoded = [images.clone() for images, _, _ in loader]
    decode_s = time.perf_counter() - started
    x = [b.to(device) for b in decoded]

    def bare() -> float:
        sync(device)
        t = time.perf_counter()
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype,
                                                    enabled=dtype != torch.float32):
            for xb in x:
                backbone.model.forward_features(xb)
        sync(device)
        return time.perf_counter() - t

    bare()  # warm-up (kernels, cuDNN choices)
    bare_s = min(bare() for _ in range(2))
    times = []
    for i in range(2):
        t = time.perf_counter()
        extract(model=name, model_arg=dict(kwargs), weights="random:0",
                dataset=f"imagefolder:{folder}", split="train", cache=work / f"vitb-{i}",
                batch_size=batch, device=str(device))
        times.append(time.perf_counter() - t)
    extract_s = min(times)
    return {"model": name, "images": n, "batch": batch, "dtype": str(dtype),
            "workers": workers, "extract_img_s": round(n / extract_s, 1),
            "bare_forward_img_s": round(n / bare_s, 1),
            "extract_over_bare": round(extract_s / bare_s, 3),
            "decode_img_s": round(n / decode_s, 1),
            "decoding_keeps_up": n / decode_s >= n / bare_s}


def alf_grid_figure(work: Path, device: torch.device, dry: bool) -> dict[str, Any]:
    """The ALF paper grid (63 configs; 40 epochs) end to end on a FER2013-sized synthetic
    cache; its FLOP/s against the measured matmul peak."""
    from probe import matmul_peak
    from probecache import SynthSpec, make_pair
    from scaling import grid_flops

    from featcache.probing.run import probe

    blocks, dim, n_train, n_test = (4, 32, 600, 200) if dry else (12, 768, 28709, 7178)
    root = work / "fer"
    make_pair(root, SynthSpec(n_blocks=blocks, dim=dim, n_classes=7, n_train=n_train,
                              n_test=n_test, shard_size=1024 if not dry else 64, seed=3,
                              signal={("block2", "ap"): 1.0}))
    kwargs = dict(grid="quick", epochs=2, min_steps=10) if dry else {}
    t = time.perf_counter()
    (res,) = probe(method="alf", cache=root, device=str(device), **kwargs)
    seconds = time.perf_counter() - t
    flops = grid_flops(n_train, 2 * blocks, dim, 7) if not dry else None
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_peak(device, 256 if dry else 8192, dtype, 3)["gflops_best"]
    out = {"seconds": round(seconds, 1), "balanced_top1": round(res.metrics["balanced_top1"],
                                                                2),
           f"matmul_{str(dtype).replace('torch.', '')}_gflops": round(peak, 1)}
    if flops:
        achieved = flops / seconds / 1e9
        out.update(pflop=round(flops / 1e15, 2), gflops=round(achieved, 1),
                   fraction_of_peak=round(achieved / peak, 3))
    return out


def grid_at_once_figure(device: torch.device, dry: bool) -> dict[str, Any]:
    """8 ALF configs trained at once against one fit per config (same steps)."""
    from featcache.probing.train import TrainConfig, fit_grid, grid_points

    n, tokens, dim = (256, 8, 32) if dry else (16384, 24, 768)
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(n, tokens, dim, generator=g), dim=-1)
    x, y = x.to(device), torch.randint(0, 7, (n,), generator=g).to(device)
    cfg = TrainConfig(epochs=2, min_total_steps=1, batch_size=1024, lrs=(1e-2, 1e-3),
                      wds=(1e-4, 1e-2), dropouts=(0.0, 0.1))
    points = grid_points(cfg, attentive=True)

    def at_once() -> None:
        fit_grid(x, y, 7, "attentive", points, cfg)

    def one_by_one() -> None:
        for p in points:
            fit_grid(x, y, 7, "attentive", [p], cfg)

    times = {}
    for name, fn in (("at_once", at_once), ("one_by_one", one_by_one)):
        fn()  # warm-up
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times[name] = time.perf_counter() - t
    return {"configs": len(points), "n": n, "at_once_s": round(times["at_once"], 3),
            "one_by_one_s": round(times["one_by_one"], 3),
            "ratio": round(times["one_by_one"] / times["at_once"], 2)}


def precision_figure(work: Path, device: torch.device, dry: bool) -> dict[str, Any]:
    """What bf16 changes, on the same data (sklearn's digits, a random ViT-B/16; tiny when
    dry): extraction in bf16 autocast against fp32, and heads trained in bf16 autocast
    against fp32 (`--precision`), for linear and ALF; balanced top-1 and seconds of each.
    On the CPU only fp32 runs (bf16 matmuls can be 250x slower there)."""
    from extract import make_images

    from featcache.extracting.run import extract
    from featcache.probing.run import probe

    name, kwargs = (TIMM_TINY if dry else ("timm:vit_base_patch16_224", {}))
    dataset = "digits"
    if dry:  # 48 + 24 generated images: the code path, in seconds
        make_images(work / "tiny-images", 48)
        make_images(work / "tiny-test", 24, seed=1)
        (work / "tiny-test" / "train").rename(work / "tiny-images" / "test")
        dataset = f"imagefolder:{work / 'tiny-images'}"
    dtypes = ("fp32",) if device.type != "cuda" else ("fp32", "bf16")
    out: dict[str, Any] = {"model": name, "dataset": dataset,
                           **({"skipped": "bf16 on the CPU"} if device.type != "cuda" else {})}
    for dtype in dtypes:
        root = work / f"precision-{dtype}"
        t = time.perf_counter()
        for split in ("train", "test"):
            extract(model=name, model_arg=dict(kwargs), weights="random:0", dataset=dataset,
                    split=split, cache=root, dtype=dtype, device=str(device))
        out[f"extract_{dtype}_s"] = round(time.perf_counter() - t, 1)
        for method in ("linear", "alf"):
            for heads in dtypes:
                quick = dict(grid="quick", epochs=2, min_steps=10) if dry else {}
                t = time.perf_counter()
                (res,) = probe(method=method, cache=root, device=str(device), precision=heads,
                               runs=work / f"runs-{dtype}-{heads}", **quick)
                key = f"{method} extract={dtype} heads={heads}"
                out[key] = {"balanced_top1": round(res.metrics["balanced_top1"], 2),
                            "seconds": round(time.perf_counter() - t, 1)}
    return out


def knn_matches_cpu(device: torch.device) -> dict[str, Any]:
    """featcache.probing.knn's neighbours on the device against the CPU's, duplicated training
    rows included (ties: the lower row first on both)."""
    from featcache.probing.knn import nearest
    from featcache.probing.tokens.features import FeatureSource

    g = torch.Generator().manual_seed(0)
    q = torch.randn(300, 2, 32, generator=g).half()
    b = torch.randn(6000, 2, 32, generator=g).half()
    b[3000:3200] = b[:200]
    sc, ic = nearest(FeatureSource(q), FeatureSource(b), 50)
    sd, idd = nearest(FeatureSource(q.to(device), device), FeatureSource(b.to(device), device),
                      50)
    same = float((ic == idd.cpu()).float().mean())
    err = float((sc - sd.cpu()).abs().max())
    assert err < 1e-5 and same > 0.999, (err, same)
    return {"same_neighbours": same, "max_similarity_error": err}


def knn_figure(device: torch.device, dry: bool) -> dict[str, Any]:
    """benchmarks/knn.py: ImageNet-1k's shape (50,000 × 1,281,167 at D = 768) measured whole,
    and 4,096 of its queries beside one torch.topk over their full similarity matrix."""
    from knn import IMAGENET, measure

    if dry:
        return {"tiny": measure(256, 8192, 64, device, full_max_gb=1.0)}
    shape = (IMAGENET["val"], IMAGENET["train"], IMAGENET["dim"])
    return {"imagenet_1k": measure(*shape, device, full_max_gb=0.0),
            "beside_full_topk": measure(4096, IMAGENET["train"], IMAGENET["dim"], device,
                                        full_max_gb=40.0)}


def peers_figure(work: Path, device: torch.device, dry: bool) -> dict[str, Any]:
    """benchmarks/peers.py on the GPU (thingsvision and CLIP_benchmark on the same work),
    when the peers' environments were built (`make bench-peers`; they need the registry)."""
    from peers import peer_envs

    missing = [name for name, env in peer_envs().items() if not env.ready()]
    if dry or missing:
        return {"skipped": "a dry run" if dry else f"no environment for {', '.join(missing)} "
                "in .peers/ (make bench-peers builds them)"}
    out = work / "peers.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--device",
                    str(device), "--json", str(out)], check=True, timeout=1200)
    fig = json.loads(out.read_text())
    return {"extraction": fig["extraction"]["goals"], "probe": fig["probe"]["goals"],
            "tokens_within_fp16": fig["tokens"]["within_fp16"]}


# -- main -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny shapes, fp32: the script's own check")
    parser.add_argument("--out", default="gpu_check.json", help="where the JSON goes")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    parser.add_argument("--skip", default="", help="comma-separated check names to skip")
    parser.add_argument("--torchrun-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.torchrun_worker:
        torchrun_worker(Path(args.torchrun_worker), args.device or "cpu")
        return 0
    device = torch.device(args.device or ("cpu" if args.dry_run else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU here; use --dry-run for the CPU form", file=sys.stderr)
        return 2
    from featcache.extracting.run import DTYPES, resolve_dtype

    auto = resolve_dtype("auto", device)
    dtype = next(name for name, value in DTYPES.items() if value == auto)  # fp32, bf16, fp16
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    info = {"machine": cpu_info(), "torch": torch.__version__, "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "gpus": torch.cuda.device_count(), "dry_run": args.dry_run, "dtype": dtype}
    ctx = Check(info, Path(args.out))
    print(f"gpu_check on {info['gpu'] or 'CPU (dry run)'}; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("1. smoke: every path once, against the CPU")
        for model, label in ((TIMM_TINY, "timm"), (CLIP_TINY, "open_clip")):
            for tap in ("reference", "residual"):
                name = f"extract {label} {tap}"
                if name not in skip:
                    ctx.run(name, lambda m=model, t=tap: extract_pair(work, m, t, device,
                                                                       dtype))
        for name, fn in (("fused AdamW and plain pooling", lambda: kernels_match(device)),
                         ("grid grouping changes no config",
                          lambda: grouping_spread(device, args.dry_run)),
                         ("tokens placed three ways, same batches",
                          lambda: placements_equal(work, device)),
                         ("probe every method and placement",
                          lambda: probe_all(work, device, args.dry_run)),
                         ("predict and report", lambda: predict_and_report(work, device)),
                         ("k-NN on the device equals the CPU", lambda: knn_matches_cpu(device)),
                         ("torchrun", lambda: torchrun_check(work, device, args.dry_run))):
            if name not in skip:
                ctx.run(name, fn)
        print("2. figures")
        for name, fn in (("extraction vs bare forward",
                          lambda: extraction_figure(work, device, args.dry_run)),
                         ("ALF paper grid, FER2013-sized",
                          lambda: alf_grid_figure(work, device, args.dry_run)),
                         ("grid at once vs one by one",
                          lambda: grid_at_once_figure(device, args.dry_run)),
                         ("bf16 against fp32: extraction and heads",
                          lambda: precision_figure(work, device, args.dry_run)),
                         ("k-NN blocked vs full topk, ImageNet-1k shape",
                          lambda: knn_figure(device, args.dry_run)),
                         ("peers (thingsvision, CLIP_benchmark)",
                          lambda: peers_figure(work, device, args.dry_run))):
            if name not in skip:
                ctx.figures[name] = ctx.run(name, fn)
        shutil.rmtree(work, ignore_errors=True)
    result = ctx.save(finished=True)
    failed = result["failed"]
    print(f"{len(ctx.checks) - len(failed)}/{len(ctx.checks)} passed in "
          f"{result['seconds']:.0f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else "") + f"; wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
