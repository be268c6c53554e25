"""Extraction benchmark: featcache extract against the bare forward, memory, disk, dtype.

Everything is measured in one run on the same synthetic images (224x224 JPEGs in a
temporary image folder) with a ViT-S/16-sized model at 224 px and random weights:

  (a) wall time of `featcache.extracting.run` (library call, default workers) against a bare loop
      of `model.forward_features` over pre-decoded, pre-transformed tensors at the same
      batch size (the floor); runs alternate and the best of each is kept;
  (b) peak RSS of a fresh process extracting N and 4N images (streaming: the same);
  (c) bytes on disk per image against the raw fp16 size, and what zstd / blosc would save;
  (d) bf16 autocast against fp32 on this CPU (AMX or not).

    python benchmarks/extract.py            # N = 256 (about 10 minutes on 2 slow cores)
    python benchmarks/extract.py --quick    # N = 48, a smoke run
    python benchmarks/extract.py --json out.json

Not a test: it asserts nothing, it prints figures and ratios (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from machine import cpu_info  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

MODEL = "timm:vit_small_patch16_224"


def make_images(folder: Path, n: int, seed: int = 0) -> None:
    """n JPEGs of 224x224 with smooth structure plus noise (realistic JPEG sizes)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:224, 0:224].astype(np.float32)
    for i in range(n):
        cls = i % 4
        d = folder / "train" / f"class{cls}"
        d.mkdir(parents=True, exist_ok=True)
        fx, fy, phase = rng.uniform(0.01, 0.08, 2).tolist() + [rng.uniform(0, 6.3)]
        base = np.stack([np.sin(xx * fx + phase), np.cos(yy * fy - phase),
                         np.sin((xx + yy) * (fx + fy) / 2)], -1)
        img = 127 + 90 * base + rng.normal(0, 18, (224, 224, 3))
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"{i:05d}.jpg", quality=90)


def floor_seconds(backbone: Any, x: Any, batch_size: int) -> float:
    import torch

    with torch.inference_mode():
        t = time.perf_counter()
        for s in range(0, len(x), batch_size):
            backbone.model.forward_features(x[s:s + batch_size])
        return time.perf_counter() - t


def extract_seconds(folder: Path, cache_root: Path, batch_size: int,
                    workers: int | None) -> tuple[float, float, Path]:
    """(library call wall time, the split's own extraction time, cache path)."""
    from featcache.extracting.run import ExtractOptions, extract

    shutil.rmtree(cache_root, ignore_errors=True)
    opts = ExtractOptions(model=MODEL, dataset=f"imagefolder:{folder}", split=("train",),
                          weights="random", cache=cache_root, batch_size=batch_size,
                          workers=workers)
    t = time.perf_counter()
    (result,) = extract(opts)
    return time.perf_counter() - t, result.seconds, result.path


MEMORY_CHILD = """
import json, os, sys, threading, time
sys.path.insert(0, {root!r})
from featcache.extracting.run import ExtractOptions, extract

def status_kib(pid, key):
    try:
        for line in open(f"/proc/{{pid}}/status"):
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0

def children(pid):
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(open(f"/proc/{{entry}}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return kids

peak = {{"total_kib": 0, "worker_kib": 0}}
stop = threading.Event()

main_rss = []

def sample():  # main + DataLoader workers, 5 times a second
    me = os.getpid()
    while not stop.is_set():
        workers = [status_kib(k, "VmRSS") for k in children(me)]
        main_rss.append(status_kib(me, "VmRSS"))
        peak["worker_kib"] = max([peak["worker_kib"], *workers])
        peak["total_kib"] = max(peak["total_kib"], main_rss[-1] + sum(workers))
        time.sleep(0.2)

threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter()
extract(ExtractOptions(model={model!r}, dataset={dataset!r}, split=("train",),
                       weights="random", cache={cache!r}, batch_size={bs},
                       shard_size={shard}))
stop.set()
print(json.dumps({{"main_mib": status_kib(os.getpid(), "VmHWM") / 1024,
                  "worker_mib": peak["worker_kib"] / 1024,
                  "total_mib": peak["total_kib"] / 1024,
                  "main_median_second_half_mib":
                      sorted(main_rss[len(main_rss) // 2:])[len(main_rss) // 4] / 1024,
                  "seconds": time.perf_counter() - t}}))
"""


MEMORY_SHARD = 64  # the same shard buffer in both runs (the default caps the shard at N)


def peak_memory(folder: Path, cache: Path, batch_size: int) -> dict[str, float]:
    """Peak RSS of a fresh process (VmHWM: exact), of its largest DataLoader worker and of
    the two together (sampled at 5 Hz; shared pages count twice)."""
    code = MEMORY_CHILD.format(root=str(ROOT), model=MODEL, dataset=f"imagefolder:{folder}",
                               cache=str(cache), bs=batch_size, shard=MEMORY_SHARD)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def disk_figures(path: Path, n: int) -> dict[str, Any]:
    """Bytes per image on disk vs raw fp16, and cls+ap re-encoded with compressors."""
    import zarr
    from zarr.codecs import BloscCodec, ZstdCodec

    def size(p: Path) -> int:
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())

    g = zarr.open_group(str(path), mode="r")
    raw = sum(g[k].nbytes for k in ("cls", "ap", "labels", "valid"))
    stored = size(path)
    out: dict[str, Any] = {"raw_bytes_per_image": raw / n, "disk_bytes_per_image": stored / n,
                           "disk_over_raw": stored / raw, "compression": {}}
    features = {k: g[k][...] for k in ("cls", "ap")}
    feature_raw = sum(a.nbytes for a in features.values())
    codecs = {"none": None, "zstd-3": [ZstdCodec(level=3)],
              "blosc-zstd-5-shuffle": [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")],
              "blosc-lz4-5-bitshuffle": [BloscCodec(cname="lz4", clevel=5,
                                                    shuffle="bitshuffle")]}
    with tempfile.TemporaryDirectory() as tmp:
        for name, comp in codecs.items():
            target = Path(tmp) / name
            grp = zarr.open_group(str(target), mode="w")
            t = time.perf_counter()
            for k, a in features.items():
                src = g[k]
                arr = grp.create_array(k, shape=a.shape, dtype=a.dtype, chunks=src.chunks,
                                       shards=src.shards, compressors=comp)
                arr[...] = a
            write_s = time.perf_counter() - t
            t = time.perf_counter()
            for k in features:
                grp[k][...]
            read_s = time.perf_counter() - t
            out["compression"][name] = {"bytes_over_raw": size(target) / feature_raw,
                                        "write_s": write_s, "read_s": read_s}
    return out


def dtype_figures(backbone: Any, x: Any, batch_size: int, reps: int = 2) -> dict[str, float]:
    """Images/s of the forward in fp32 and under bf16 autocast (alternating, best of reps),
    and how far bf16 moves the cached tokens (cosine similarity to fp32, every layer)."""
    import torch

    best = {"fp32": float("inf"), "bf16": float("inf")}
    tokens = {}
    for _ in range(reps):
        for name in best:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                        enabled=name == "bf16"):
                t = time.perf_counter()
                for s in range(0, len(x), batch_size):
                    backbone.model.forward_features(x[s:s + batch_size])
                best[name] = min(best[name], time.perf_counter() - t)
                tokens[name] = backbone.tokens(x[:batch_size])["cls"].float()
    cos = torch.nn.functional.cosine_similarity(tokens["fp32"], tokens["bf16"], dim=-1)
    return {"fp32_img_s": len(x) / best["fp32"], "bf16_img_s": len(x) / best["bf16"],
            "bf16_speedup": best["fp32"] / best["bf16"], "bf16_min_cosine": float(cos.min()),
            "bf16_mean_cosine": float(cos.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 48: a smoke run")
    parser.add_argument("--n", type=int, default=None, help="images for (a) [256]")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3, help="alternating repeats in (a)")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers for extract [library default]")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write figures here")
    args = parser.parse_args()
    n = args.n or (48 if args.quick else 256)
    bs = args.batch_size

    import torch

    from featcache.backbones import create_backbone
    from featcache.extracting.run import plan_workers
    from featcache.sources import open_dataset

    info = cpu_info()
    info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                default_workers=plan_workers(torch.device("cpu"), None)[0], n=n,
                batch_size=bs, model=MODEL)
    print(f"# {info['cpu']}, {info['cores']} cores, amx_bf16={info['amx_bf16']}, "
          f"avx512_bf16={info['avx512_bf16']}, load {info['load_avg']:.2f}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; N={n}, batch {bs}, "
          f"{MODEL} random weights at 224 px; extract workers: "
          f"{args.workers if args.workers is not None else info['default_workers']}")
    figures: dict[str, Any] = {"machine": info}
    with tempfile.TemporaryDirectory(prefix="featcache-bench-") as tmp_text:
        tmp = Path(tmp_text)
        t = time.perf_counter()
        make_images(tmp / "n", n)
        print(f"made {n} JPEGs in {time.perf_counter() - t:.1f} s")

        # (a) extract vs the bare forward on pre-decoded tensors
        backbone = create_backbone(MODEL, "random")
        data = open_dataset(f"imagefolder:{tmp / 'n'}", "train")
        t = time.perf_counter()
        x = torch.stack([backbone.transform(data.load(i)) for i in range(len(data))])
        decode_s = time.perf_counter() - t
        with torch.inference_mode():
            backbone.model.forward_features(x[:2])  # warm-up
        floors, calls, loops = [], [], []
        path = tmp / "cache"
        for _ in range(args.reps):
            floors.append(floor_seconds(backbone, x, bs))
            call_s, loop_s, cache_path = extract_seconds(tmp / "n", path, bs, args.workers)
            calls.append(call_s)
            loops.append(loop_s)
        floor, call, loop = min(floors), min(calls), min(loops)
        figures["wall"] = {"decode_ms_per_image": 1e3 * decode_s / n, "floor_s": floor,
                           "extract_call_s": call, "extract_split_s": loop,
                           "floor_img_s": n / floor, "extract_img_s": n / loop,
                           "ratio_split": loop / floor, "ratio_call": call / floor,
                           "all_floor_s": floors, "all_split_s": loops, "all_call_s": calls,
                           "median_ratio_split": float(np.median(loops) / np.median(floors))}
        w = figures["wall"]
        print("\n(a) wall time, same images, same batch size")
        print(f"  decode + preprocess (one core):   {w['decode_ms_per_image']:7.1f} ms/img")
        print(f"  bare forward_features (floor):    {floor:7.2f} s  {n / floor:6.2f} img/s")
        print(f"  featcache extract, split:         {loop:7.2f} s  {n / loop:6.2f} img/s")
        print(f"  featcache extract, library call:  {call:7.2f} s  (+ model build, indexing)")
        print(f"  ratio extract / floor:            {w['ratio_split']:7.3f}  (best of "
              f"{args.reps} each; medians {w['median_ratio_split']:.3f}; library call "
              f"{w['ratio_call']:.3f}; goal <= 1.15)")

        # (c) disk
        disk = disk_figures(cache_path, n)
        figures["disk"] = disk
        print("\n(c) bytes on disk per image (cls + ap + labels + valid)")
        print(f"  raw fp16: {disk['raw_bytes_per_image']:.0f} B, on disk: "
              f"{disk['disk_bytes_per_image']:.0f} B, ratio {disk['disk_over_raw']:.3f}")
        for name, c in disk["compression"].items():
            print(f"  {name:24s} size/raw {c['bytes_over_raw']:.3f}   write {c['write_s']:.3f} s"
                  f"   read {c['read_s']:.3f} s")

        # (d) bf16 autocast vs fp32
        sub = x[: min(len(x), 64)]
        dt = dtype_figures(backbone, sub, bs)
        figures["dtype"] = dt
        print(f"\n(d) autocast on this CPU (amx_bf16={info['amx_bf16']}): fp32 "
              f"{dt['fp32_img_s']:.2f} img/s, bf16 {dt['bf16_img_s']:.2f} img/s, "
              f"bf16/fp32 speed {dt['bf16_speedup']:.2f}x; CLS cosine to fp32 min "
              f"{dt['bf16_min_cosine']:.4f}, mean {dt['bf16_mean_cosine']:.4f}")
        del x

        # (b) peak memory: N and 4N images, each in a fresh process
        if not args.skip_memory:
            make_images(tmp / "n4", 4 * n, seed=1)
            mem_n = peak_memory(tmp / "n", tmp / "mem-n", bs)
            mem_4n = peak_memory(tmp / "n4", tmp / "mem-4n", bs)
            figures["memory"] = {"n": mem_n, "4n": mem_4n,
                                 "ratio_main": mem_4n["main_mib"] / mem_n["main_mib"],
                                 "ratio_total": mem_4n["total_mib"] / mem_n["total_mib"]}
            print("\n(b) peak RSS of a fresh extraction process (+ its DataLoader worker), "
                  f"shards of {MEMORY_SHARD}")
            for label, count, m in (("N ", n, mem_n), ("4N", 4 * n, mem_4n)):
                print(f"  {label} = {count:5d}: main {m['main_mib']:7.1f} MiB (median of the 2nd "
                      f"half {m['main_median_second_half_mib']:6.1f}), worker "
                      f"{m['worker_mib']:6.1f} MiB, together {m['total_mib']:7.1f} MiB "
                      f"({m['seconds']:.1f} s)")
            print(f"  ratio 4N / N: main {figures['memory']['ratio_main']:.3f}, together "
                  f"{figures['memory']['ratio_total']:.3f}  (goal: within 10%)")
    figures["machine"]["load_avg_end"] = os.getloadavg()[0]
    if info["load_avg"] > 0.5 * info["cores"]:
        print(f"\nwarning: load average {info['load_avg']:.2f} on {info['cores']} cores at the "
              "start: other processes shared the CPU, wall-time figures are unreliable")
    figures["self_peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
        print(f"\nfigures written to {args.json}")


if __name__ == "__main__":
    main()
