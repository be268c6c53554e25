"""Peers, side by side: featcache against thingsvision and CLIP_benchmark on the same work.

Each peer lives in a virtualenv of its own under ``.peers/`` (git-ignored), built once and
reused; the build time is reported apart from the figures:

  - ``thingsvision==2.7.3`` pins torchvision 0.15.2 (so torch 2.0.1), tensorflow < 2.16
    and numpy < 2: it cannot share featcache's environment and gets a whole one;
  - ``clip-benchmark==1.6.2`` pins nothing featcache's environment contradicts, but
    needs numpy < 2 (its accuracy() calls float() on a one-element array, which numpy 2
    refuses). Its venv reads the main venv's site-packages *after* its own (``.pth``
    lines): torch, torchvision, open_clip and scikit-learn are shared (the CUDA torch
    wheels are gigabytes), while everything it needs beyond them (numpy 1.26,
    transformers, webdataset, pycocoevalcap) is installed into its own site-packages and
    wins there. pip installs into that venv only; featcache itself is not importable from
    it (an editable install's finder is a ``.pth`` of the main venv, which a ``.pth``
    path does not run).

Every run is a fresh interpreter (this file, ``--child KIND``) on files this script
writes — a seeded checkpoint of timm ``vit_small_patch16_224``, a folder of JPEGs, cached
features — and the script reads back only what each one writes (its JSON line, its
output files). Peak RSS comes from the kernel (``wait4``), not from the child.

1. **Extraction**, every block's CLS and AP (13 layers of 384, the authors' tap points
   ``blocks.i.norm2`` and ``norm``), same checkpoint, same images, same batch size; the
   runs alternate (bare, featcache, thingsvision, ...) so a change of load hits each alike:
     - bare forward: ``forward_features`` over pre-decoded tensors (the floor), in the
       main venv and in thingsvision's (torch 2.0.1): each tool is compared with the floor
       of its own torch;
     - ``featcache.extract`` (the library call; its split's own time);
     - thingsvision as the authors drive it (their ``src/models/thingsvision.py``): one
       ``get_extractor`` per token kind (the ``_cls`` and ``_ap`` model configs), all 13
       modules hooked in one pass, ``token_extraction`` doing the reduction (no
       flattening), chunked ``.pt`` files merged into one per module, and the targets read
       by a second pass over the loader; ``num_workers=0`` (their rule for extraction);
     - thingsvision in one pass with ``token_extraction="cls_token+avg_pool"`` (the
       best a thingsvision user can do, for the profile).
2. **Correctness from a peer**: thingsvision's outputs against featcache's cache, layer
   by layer: the largest relative error of a token vector, max ||fc - tv|| / ||tv||,
   against fp16's unit roundoff 2^-11 (the cache stores float16).
3. **Linear probe** on the final-layer CLS of a 10-class image set this script makes
   (oriented gratings, the class is the orientation, heavy noise), extracted once by
   featcache; the three read the same L2-normalised features and the same validation
   split (featcache's ``stratified_split``, 20 %), and train the winner on train+val:
     - CLIP_benchmark's ``linear_probe.evaluate`` (its weight-decay search over 97 values,
       AdamW, its CLI defaults lr 0.1, 10 epochs, batch 64), fed through its feature files.
       It is CUDA-only (``assert device == 'cuda'``, ``.cuda()`` calls); on a CPU the
       child maps those calls to the CPU and changes nothing else;
     - featcache's linear grid (``featcache.probe``, method ``linear``, the paper grid);
     - scikit-learn's ``LogisticRegression`` (lbfgs), C over 13 values chosen on the same
       split.

    python benchmarks/peers.py                 # N = 512, 2 repeats (make bench-peers)
    python benchmarks/peers.py --quick         # N = 64, one repeat: the test's mode
    python benchmarks/peers.py --device cuda --json peers.json

Not a test: it prints figures and ratios (docs/benchmarks.md); tests/test_peers.py runs
``--quick`` and checks the tokens and the probes' accuracies.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS_DIR = ROOT / ".peers"
ARCH = "vit_small_patch16_224"
MODULES = [f"blocks.{i}.norm2" for i in range(12)] + ["norm"]  # the authors' taps
FP16_UNIT = 2.0 ** -11  # float16's unit roundoff: the largest relative error of rounding
AUTHORS_PASSES = ["cls_token", "avg_pool"]  # their _cls and _ap model configs
ONE_PASS = ["cls_token+avg_pool"]
PROBE_CLASSES = 10


# -- the peers' environments ---------------------------------------------------------------

class PeerEnv:
    """One peer's virtualenv: built once (a stamp records what), then reused."""

    def __init__(self, name: str, requirements: list[str], module: str, share_main: bool,
                 root: Path = PEERS_DIR) -> None:
        self.name, self.requirements, self.module = name, requirements, module
        self.share_main = share_main
        self.path = root / name
        self.python = self.path / "bin" / "python"
        self.stamp = self.path / "featcache-peer.json"

    def wanted(self) -> dict[str, Any]:
        return {"requirements": self.requirements, "share_main": self.share_main,
                "python": sys.version.split()[0],
                "main_sites": main_sites() if self.share_main else None}

    def ready(self) -> bool:
        try:
            stamp = json.loads(self.stamp.read_text())
        except (OSError, ValueError):
            return False
        return self.python.exists() and all(stamp.get(k) == v for k, v in self.wanted().items())

    def ensure(self, rebuild: bool = False) -> dict[str, Any]:
        """Reuse the environment, or build it (its seconds reported apart)."""
        if self.ready() and not rebuild:
            return {**json.loads(self.stamp.read_text()), "built_now": False}
        return self.build()

    def build(self) -> dict[str, Any]:
        shutil.rmtree(self.path, ignore_errors=True)
        log = self.path.parent / f"{self.name}-build.log"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        print(f"building {self.name}'s environment in {self.path} (once; log: {log}) ...",
              flush=True)
        t = time.perf_counter()
        with log.open("w") as out:
            steps = [[sys.executable, "-m", "venv", str(self.path)]]
            steps.append([str(self.python), "-m", "pip", "install", *self.requirements])
            steps.append([str(self.python), "-c", f"import {self.module}"])
            for i, cmd in enumerate(steps):
                if i == 1 and self.share_main:
                    self.link_main()
                out.write(f"$ {' '.join(cmd)}\n")
                out.flush()
                if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode:
                    shutil.rmtree(self.path, ignore_errors=True)
                    raise SystemExit(f"error: building {self.name}'s environment failed at "
                                     f"`{' '.join(cmd[-2:])}`; see {log} (pip needs the "
                                     "package registry)")
        freeze = subprocess.run([str(self.python), "-m", "pip", "freeze", "--local"],
                                capture_output=True, text=True).stdout.split()
        record = {**self.wanted(), "build_s": round(time.perf_counter() - t, 1),
                  "built_at": time.strftime("%Y-%m-%d %H:%M:%S"), "packages": freeze,
                  "bytes": dir_bytes(self.path)}
        self.stamp.write_text(json.dumps(record, indent=1))
        return {**record, "built_now": True}

    def link_main(self) -> None:
        """The main interpreter's site-packages, read after the peer's own (.pth lines)."""
        site = subprocess.run([str(self.python), "-c", "import sysconfig; "
                               "print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        Path(site, "zz-featcache-main-venv.pth").write_text("\n".join(main_sites()) + "\n")


def main_sites() -> list[str]:
    """Every site-packages this interpreter reads, in order (a venv may itself read
    another's through a .pth line, as the project's worktrees do)."""
    return [p for p in sys.path if p.rstrip("/").endswith("site-packages")]


def peer_envs(root: Path = PEERS_DIR) -> dict[str, PeerEnv]:
    return {"thingsvision": PeerEnv("thingsvision", ["thingsvision==2.7.3"], "thingsvision",
                                    share_main=False, root=root),
            # its accuracy() calls float() on a one-element array, which numpy 2 refuses
            # (TypeError): its own numpy < 2 shadows the main venv's
            "clip-benchmark": PeerEnv("clip-benchmark", ["clip-benchmark==1.6.2", "numpy<2"],
                                      "clip_benchmark.metrics.linear_probe", share_main=True,
                                      root=root)}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*")
               if f.is_file() and not f.is_symlink())


# -- running a child and what the kernel says about it -------------------------------------

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def run_child(python: Path | str, kind: str, spec: dict[str, Any], work: Path,
              threads: int | None = None) -> dict[str, Any]:
    """This file as ``--child kind`` under `python`; its last stdout line is its JSON.
    Adds the child's peak RSS (the kernel's ru_maxrss) and its wall time."""
    spec_file = work / f"spec-{kind}-{time.monotonic_ns()}.json"
    spec_file.write_text(json.dumps(spec))
    out_file = spec_file.with_suffix(".out")
    env = {**os.environ, "PYTHONNOUSERSITE": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("PYTHONPATH", None)
    if threads:  # the same for every tool (torch, numpy and sklearn read these at start)
        env.update({k: str(threads) for k in THREAD_VARS})
    t = time.perf_counter()
    with out_file.open("w") as out:
        proc = subprocess.Popen([str(python), str(Path(__file__).resolve()), "--child", kind,
                                 str(spec_file)], stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=work)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    text = out_file.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"error: the {kind} run failed (exit {proc.returncode}):\n"
                         + text[-3000:])
    result = json.loads(text.strip().splitlines()[-1])
    return {**result, "peak_rss_mib": usage.ru_maxrss / 1024, "process_wall_s": wall}


# -- inputs ---------------------------------------------------------------------------------

def write_inputs(work: Path, n: int, seed: int) -> dict[str, Any]:
    """A seeded checkpoint, n JPEGs (benchmarks/extract.py's) and their list in the order
    featcache's imagefolder reads them (by class, then path)."""
    import timm
    import torch
    from extract import make_images

    make_images(work / "images", n, seed)
    files = sorted((p.parent.name, str(p.relative_to(work / "images")))
                   for p in (work / "images" / "train").rglob("*.jpg"))
    classes = sorted({c for c, _ in files})
    listing = {"root": str(work / "images"), "files": [f for _, f in files],
               "labels": [classes.index(c) for c, _ in files]}
    (work / "files.json").write_text(json.dumps(listing))
    torch.manual_seed(seed)
    model = timm.create_model(ARCH, pretrained=False)
    torch.save(model.state_dict(), work / "vit_s16_seeded.pth")
    return {"checkpoint": str(work / "vit_s16_seeded.pth"), "files": str(work / "files.json"),
            "images": str(work / "images")}


def grating(rng: Any, angle: float, size: int) -> Any:
    """An oriented grating with a random frequency, phase and tint, plus heavy noise."""
    import numpy as np

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    freq, phase = rng.uniform(0.15, 0.45), rng.uniform(0, 2 * np.pi)
    wave = np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
    tint = rng.uniform(0.3, 1.0, 3)
    img = 127 + 60 * wave[..., None] * tint + rng.normal(0, 30, (size, size, 3))
    return img.clip(0, 255).astype(np.uint8)


def make_probe_images(folder: Path, n_train: int, n_test: int, size: int, seed: int) -> None:
    """10 classes; the class is the grating's orientation (18 degrees apart, jittered)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("test", n_test)):
        for i in range(count):
            c = i % PROBE_CLASSES
            angle = np.pi * (c + rng.uniform(-0.3, 0.3)) / PROBE_CLASSES
            d = folder / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(grating(rng, angle, size)).save(d / f"{i:05d}.jpg", quality=90)


# -- the children (each in its own interpreter; stdlib imports only at module level) --------

def load_listing(spec: dict[str, Any]) -> tuple[list[str], list[int]]:
    listing = json.loads(Path(spec["files"]).read_text())
    return [str(Path(listing["root"]) / f) for f in listing["files"]], listing["labels"]


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def child_bare(spec: dict[str, Any]) -> dict[str, Any]:
    """forward_features over pre-decoded tensors at the batch size: the floor."""
    import timm
    import torch
    from PIL import Image

    files, _ = load_listing(spec)
    model = timm.create_model(ARCH, pretrained=False)
    model.load_state_dict(torch.load(spec["checkpoint"], map_location="cpu"))
    model = model.eval().to(spec["device"])
    cfg = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**cfg, is_training=False)
    x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    bs, dev = spec["batch_size"], spec["device"]
    # torch 2.0's autocast asks the driver about bf16 even when disabled: enter it only on
    # a GPU (featcache's default there: bf16 autocast; thingsvision's: float32)
    amp = torch.autocast("cuda", torch.bfloat16) if spec.get("amp") else contextlib.nullcontext()
    with torch.inference_mode(), amp:
        model.forward_features(x[:2].to(dev))  # warm-up
        sync(dev)
        t = time.perf_counter()
        for s in range(0, len(x), bs):
            model.forward_features(x[s:s + bs].to(dev, non_blocking=True))
        sync(dev)
        seconds = time.perf_counter() - t
    return {"seconds": seconds, "n": len(x), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def child_featcache(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from featcache.extracting.run import ExtractOptions, extract

    opts = ExtractOptions(model=f"timm:{spec.get('arch', ARCH)}",
                          dataset=f"imagefolder:{spec['images']}",
                          split=tuple(spec.get("splits", ["train"])),
                          weights=spec["checkpoint"], cache=spec["out"],
                          batch_size=spec["batch_size"], device=spec["device"],
                          model_arg=spec.get("model_arg"), dtype=spec.get("dtype", "auto"))
    results = extract(opts)
    return {"seconds": results[0].seconds, "n": results[0].n, "path": str(results[0].path),
            "paths": {r.split: str(r.path) for r in results},
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def child_thingsvision(spec: dict[str, Any]) -> dict[str, Any]:
    """The authors' flow: per token kind one extractor, every module hooked in one pass,
    step files per module merged into one, then the targets from a second pass."""
    import thingsvision
    import torch
    from thingsvision import get_extractor
    from torch.utils.data import DataLoader

    files, labels = load_listing(spec)
    dev = spec["device"]
    extractors = {p: get_extractor(model_name=ARCH, source="timm", device=dev, pretrained=False,
                                   model_path=spec["checkpoint"],
                                   model_parameters={"token_extraction": p})
                  for p in spec["passes"]}  # model building is not timed (nor featcache's)
    t = time.perf_counter()
    for token, extractor in extractors.items():
        out = Path(spec["out"]) / token
        transform = extractor.get_transformations(resize_dim=256, crop_dim=224)
        loader = DataLoader(ListDataset(files, labels, transform), batch_size=spec["batch_size"],
                            shuffle=False, num_workers=0)
        extractor.activations = {}
        extractor._register_hooks(module_names=MODULES)
        tv_feature_files(extractor, loader, out)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(torch.cat([y for _, y in loader]), out / "targets_train.pt")
    sync(dev)
    return {"seconds": time.perf_counter() - t, "n": len(files), "torch": torch.__version__,
            "thingsvision": thingsvision.__version__, "threads": torch.get_num_threads()}


class ListDataset:
    """(image, label) from a file list, through a transform (a torch map-style dataset)."""

    def __init__(self, files: list[str], labels: list[int], transform: Any) -> None:
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        from PIL import Image

        return self.transform(Image.open(self.files[i]).convert("RGB")), self.labels[i]


def tv_feature_files(extractor: Any, loader: Any, out: Path) -> None:
    """Features per module as the authors write them: a step file every
    8000 // (3 * batch) + 1 batches (the batch length read from a first batch, as theirs
    does), then all step files of a module merged into features_train.pt."""
    import torch

    step = 8000 // (3 * len(next(iter(loader))[0])) + 1
    pending: dict[str, list[Any]] = {m: [] for m in MODULES}
    parts: dict[str, list[Path]] = {m: [] for m in MODULES}
    done = 0
    for i, (images, _) in enumerate(loader, start=1):
        acts = extractor._extract_batch(batch=images, module_names=MODULES, flatten_acts=False)
        first, done = done, done + len(images)
        for m in MODULES:
            pending[m].append(acts[m])
            if i % step == 0 or i == len(loader):
                (out / m).mkdir(parents=True, exist_ok=True)
                part = out / m / f"features_train_{first}-{done}.pt"
                torch.save(torch.cat(pending[m]), part)
                parts[m].append(part)
                pending[m] = []
    for m in MODULES:
        torch.save(torch.cat([torch.load(p) for p in parts[m]]), out / m / "features_train.pt")
        for p in parts[m]:
            p.unlink()


def child_clip_benchmark(spec: dict[str, Any]) -> dict[str, Any]:
    """CLIP_benchmark's linear probe through its API, on feature files written for it."""
    import torch
    from clip_benchmark.metrics import linear_probe

    device = spec["device"]
    if not device.startswith("cuda"):
        device = cuda_on_cpu()
    torch.manual_seed(spec["seed"])
    t = time.perf_counter()
    out = linear_probe.evaluate(
        None, None, None, -1, spec["batch_size"], 0, spec["lr"], spec["epochs"],
        spec["model_id"], spec["seed"], spec["feature_root"], device,
        val_dataloader=[], normalize=True, amp=spec["amp"], verbose=False)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "balanced_top1": 100 * float(out["lp_mean_per_class_recall"]),
            "top1": 100 * float(out["lp_acc1"]), "weight_decay": out["weight_decay"],
            "torch": torch.__version__}


class _CpuNamedCuda(str):
    """'cpu' to torch, equal to 'cuda' for CLIP_benchmark's ``assert device == 'cuda'``."""

    def __eq__(self, other: object) -> bool:
        return other == "cuda" or str.__eq__(self, other)

    __hash__ = str.__hash__


def cuda_on_cpu() -> str:
    """CLIP_benchmark's linear probe is written for CUDA (``.cuda()`` on its head and
    batches); on a machine without one those calls stay on the CPU. Nothing else changes."""
    import torch

    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.Tensor.cuda = lambda self, *a, **k: self
    return _CpuNamedCuda("cpu")


def child_sklearn(spec: dict[str, Any]) -> dict[str, Any]:
    """LogisticRegression, C chosen on the same validation split, refit on train+val."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score

    d = np.load(spec["features"])
    tr, va = d["train_idx"], d["val_idx"]
    x, y = d["x_train"], d["y_train"]
    t = time.perf_counter()
    scores = []
    for c in spec["cs"]:
        clf = LogisticRegression(C=c, max_iter=spec["max_iter"]).fit(x[tr], y[tr])
        scores.append(balanced_accuracy_score(y[va], clf.predict(x[va])))
    best = spec["cs"][int(np.argmax(scores))]
    final = LogisticRegression(C=best, max_iter=spec["max_iter"]).fit(x, y)
    seconds = time.perf_counter() - t
    pred = final.predict(d["x_test"])
    return {"seconds": seconds, "balanced_top1": 100 * balanced_accuracy_score(d["y_test"], pred),
            "top1": 100 * float((pred == d["y_test"]).mean()), "C": best,
            "val_balanced_top1": [100 * s for s in scores]}


def child_featcache_probe(spec: dict[str, Any]) -> dict[str, Any]:
    from featcache.probing.run import probe

    t = time.perf_counter()
    (res,) = probe(method="linear", token="cls", cache=spec["cache"], runs=spec["runs"],
                   device=spec["device"], seeds=[spec["seed"]], grid=spec["grid"], force=True)
    seconds = time.perf_counter() - t
    record = json.loads((Path(res.path) / "record.json").read_text()) \
        if (Path(res.path) / "record.json").exists() else {}
    timings = record.get("timings", {})
    fit = sum(timings.get(k, 0.0) for k in ("grid_s", "select_s", "refit_s"))
    return {"seconds": fit or seconds, "call_s": seconds, "timings": timings,
            "balanced_top1": float(res.metrics["balanced_top1"]),
            "top1": float(res.metrics["top1"]), "selected": res.selected}


CHILDREN = {"bare": child_bare, "featcache": child_featcache, "thingsvision": child_thingsvision,
            "clip-benchmark": child_clip_benchmark, "sklearn": child_sklearn,
            "featcache-probe": child_featcache_probe}


# -- 1. extraction ------------------------------------------------------------------------

def extraction_runs(envs: dict[str, PeerEnv], inputs: dict[str, Any], work: Path,
                    args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Every run in a fresh process, alternating; outputs of the last repeat are kept."""
    base = {**inputs, "batch_size": args.batch_size, "device": args.device}
    tv = envs["thingsvision"].python
    gpu = args.device.startswith("cuda")
    runs = {"bare": (sys.executable, "bare", {"amp": gpu}),
            "featcache": (sys.executable, "featcache", {"out": str(work / "fc-cache")}),
            "thingsvision": (tv, "thingsvision", {"out": str(work / "tv-authors"),
                                                  "passes": AUTHORS_PASSES}),
            "thingsvision-one-pass": (tv, "thingsvision", {"out": str(work / "tv-one"),
                                                           "passes": ONE_PASS}),
            "bare-torch2.0": (tv, "bare", {"amp": False})}
    if gpu:  # featcache's GPU default is bf16 autocast; thingsvision computes in float32
        runs["bare-fp32"] = (sys.executable, "bare", {"amp": False})
        runs["featcache-fp32"] = (sys.executable, "featcache", {"out": str(work / "fc-fp32"),
                                                                "dtype": "fp32"})
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in runs}
    for rep in range(args.reps):
        for name, (python, kind, extra) in runs.items():
            if "out" in extra:
                shutil.rmtree(extra["out"], ignore_errors=True)
            r = run_child(python, kind, {**base, **extra}, work, args.threads)
            if "out" in extra:
                r["disk_bytes"] = dir_bytes(Path(extra["out"]))
            results[name].append(r)
            print(f"  repeat {rep + 1}/{args.reps} {name:22s} {r['n'] / r['seconds']:7.2f} img/s"
                  f"  peak RSS {r['peak_rss_mib']:7.0f} MiB  [load {os.getloadavg()[0]:.2f}]",
                  flush=True)
    return results


def extraction_table(results: dict[str, list[dict[str, Any]]], n: int) -> dict[str, Any]:
    """Best and median images/s of each run, ratios to the floor of the same torch."""
    floor_of = {"bare": "bare", "featcache": "bare", "thingsvision": "bare-torch2.0",
                "thingsvision-one-pass": "bare-torch2.0", "bare-torch2.0": "bare-torch2.0",
                "bare-fp32": "bare-fp32", "featcache-fp32": "bare-fp32"}
    best = {k: min(r["seconds"] for r in v) for k, v in results.items()}
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in results.items()}
    rows = {}
    for name, runs in results.items():
        floor = floor_of[name]
        rows[name] = {
            "img_s": n / best[name], "img_s_median": n / med[name],
            "over_own_floor": best[floor] / best[name],
            "over_main_floor": best["bare"] / best[name],
            "over_own_floor_median": med[floor] / med[name],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            "disk_bytes": runs[-1].get("disk_bytes", 0), "torch": runs[-1].get("torch"),
            "seconds": [r["seconds"] for r in runs]}
    fc, tv = rows["featcache"], rows["thingsvision"]
    goals = {"featcache_over_thingsvision": fc["img_s"] / tv["img_s"],
             "featcache_over_thingsvision_median": fc["img_s_median"] / tv["img_s_median"],
             "featcache_over_bare": fc["over_own_floor"]}
    goals["speed_goal_met"] = (goals["featcache_over_thingsvision"] >= 1.5
                               and goals["featcache_over_bare"] >= 0.9)
    return {"rows": rows, "goals": goals}


# -- 2. tokens against thingsvision's -------------------------------------------------------

def token_errors(fc_path: Path, tv_dir: Path) -> list[dict[str, Any]]:
    """Per layer and kind: max over images of ||fc - tv|| / ||tv|| (fc: the cache's float16,
    tv: thingsvision's float32), and the same over fp16's unit roundoff."""
    import numpy as np
    import torch
    import zarr

    g = zarr.open_group(str(fc_path), mode="r")
    names = list(g.attrs["layer_names"])
    rows = []
    for kind, token in (("cls", "cls_token"), ("ap", "avg_pool")):
        fc_all = np.asarray(g[kind][...], dtype=np.float64)
        for i, module in enumerate(MODULES):
            tv = torch.load(tv_dir / token / module / "features_train.pt",
                            map_location="cpu").double().numpy()
            fc = fc_all[:, i]
            err = np.linalg.norm(fc - tv, axis=1) / np.linalg.norm(tv, axis=1)
            rows.append({"layer": names[i], "module": module, "kind": kind,
                         "max_rel_error": float(err.max()),
                         "over_fp16_unit": float(err.max() / FP16_UNIT)})
    return rows


def labels_agree(fc_path: Path, tv_dir: Path) -> bool:
    """featcache's rows and thingsvision's come in the same image order (same labels)."""
    import numpy as np
    import torch
    import zarr

    fc = np.asarray(zarr.open_group(str(fc_path), mode="r")["labels"][...])
    tv = torch.load(tv_dir / AUTHORS_PASSES[0] / "targets_train.pt").numpy()
    return bool(np.array_equal(fc, tv))


# -- 3. linear probe ------------------------------------------------------------------------

def probe_inputs(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Extract the probe set once with featcache; write its final-layer CLS (L2-normalised,
    as featcache's probe reads it) for CLIP_benchmark (.pt files) and sklearn (.npz)."""
    import numpy as np
    import torch
    import zarr

    from featcache.probing.selection import stratified_split

    folder = work / "probe-images"
    make_probe_images(folder, args.probe_train, args.probe_test, args.probe_size, args.seed)
    spec = {"images": str(folder), "checkpoint": "random", "out": str(work / "probe-cache"),
            "batch_size": args.batch_size, "device": args.device,
            "model_arg": {"img_size": args.probe_size}}
    t = time.perf_counter()
    r = run_child(sys.executable, "featcache", {**spec, "splits": ["train", "test"]}, work,
                  args.threads)
    paths = {k: Path(v) for k, v in r["paths"].items()}
    extract_s = time.perf_counter() - t

    def final_cls(path: Path) -> tuple[Any, Any]:
        g = zarr.open_group(str(path), mode="r")
        x = np.asarray(g["cls"][:, -1], dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True), np.asarray(g["labels"][...])

    (x_tr, y_tr), (x_te, y_te) = final_cls(paths["train"]), final_cls(paths["test"])
    tr, va = stratified_split(y_tr, 0.2, args.seed)
    npz = work / "probe-features.npz"
    np.savez(npz, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, train_idx=tr,
             val_idx=va)
    model_id = "vit_s16-probe-set"
    feature_dir = work / "clip-features" / model_id
    feature_dir.mkdir(parents=True, exist_ok=True)
    for name, x, y in (("train", x_tr[tr], y_tr[tr]), ("val", x_tr[va], y_tr[va]),
                       ("test", x_te, y_te)):
        torch.save(torch.from_numpy(x), feature_dir / f"features_{name}.pt")
        torch.save(torch.from_numpy(y).long(), feature_dir / f"targets_{name}.pt")
    return {"cache_root": str(work / "probe-cache"), "npz": str(npz),
            "feature_root": str(work / "clip-features"), "model_id": model_id,
            "extract_s": extract_s, "n_train": len(tr), "n_val": len(va), "n_test": len(y_te),
            "dim": int(x_tr.shape[1])}


def probe_runs(envs: dict[str, PeerEnv], data: dict[str, Any], work: Path,
               args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    import numpy as np

    amp = args.device.startswith("cuda")
    runs = {
        "CLIP_benchmark": (envs["clip-benchmark"].python, "clip-benchmark", {
            "feature_root": data["feature_root"], "model_id": data["model_id"],
            "batch_size": 64, "lr": 0.1, "epochs": 10, "seed": args.seed, "amp": amp,
            "device": args.device}),
        "featcache": (sys.executable, "featcache-probe", {
            "cache": data["cache_root"], "runs": str(work / "probe-runs"),
            "device": args.device, "seed": args.seed, "grid": args.probe_grid}),
        "sklearn": (sys.executable, "sklearn", {
            "features": data["npz"], "cs": np.logspace(-2, 4, 13).tolist(),
            "max_iter": 1000})}
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in runs}
    for rep in range(args.probe_reps):
        for name, (python, kind, spec) in runs.items():
            r = run_child(python, kind, spec, work, args.threads)
            results[name].append(r)
            print(f"  repeat {rep + 1}/{args.probe_reps} {name:15s} {r['seconds']:7.2f} s  "
                  f"test balanced top-1 {r['balanced_top1']:6.2f}  [load "
                  f"{os.getloadavg()[0]:.2f}]", flush=True)
    return results


def probe_table(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    rows = {name: {"seconds": min(r["seconds"] for r in runs),
                   "seconds_median": statistics.median(r["seconds"] for r in runs),
                   "balanced_top1": runs[-1]["balanced_top1"],
                   "all_seconds": [r["seconds"] for r in runs],
                   "peak_rss_mib": max(r["peak_rss_mib"] for r in runs)}
            for name, runs in results.items()}
    best = max(r["balanced_top1"] for r in rows.values())
    fc, cb = rows["featcache"], rows["CLIP_benchmark"]
    goals = {"clip_benchmark_over_featcache_time": cb["seconds"] / fc["seconds"],
             "featcache_points_below_best": best - fc["balanced_top1"]}
    goals["probe_goal_met"] = (goals["clip_benchmark_over_featcache_time"] > 1
                               and goals["featcache_points_below_best"] <= 1.0)
    return {"rows": rows, "goals": goals}


# -- the table ------------------------------------------------------------------------------

def print_table(fig: dict[str, Any]) -> None:
    ex, tok, pr = fig["extraction"], fig["tokens"], fig["probe"]
    n = fig["settings"]["n"]
    print(f"\n{'=' * 96}\nPEERS, same work, one run ({fig['settings']['device']}; N={n} "
          f"JPEGs, batch {fig['settings']['batch_size']}, {ARCH} seeded checkpoint, "
          f"{fig['settings']['reps']} alternating repeats, best shown)")
    print(f"\n{'extraction (13 layers x CLS+AP)':34s} {'img/s':>8s} {'/own bare':>10s} "
          f"{'/bare 2.x':>10s} {'peak RSS':>10s} {'on disk':>10s}  torch")
    for name, r in ex["rows"].items():
        print(f"{name:34s} {r['img_s']:8.2f} {r['over_own_floor']:10.3f} "
              f"{r['over_main_floor']:10.3f} {r['peak_rss_mib']:7.0f} MiB "
              f"{r['disk_bytes'] / 2**20:6.2f} MiB  {r['torch']}")
    g = ex["goals"]
    print(f"featcache / thingsvision: {g['featcache_over_thingsvision']:.2f}x (medians "
          f"{g['featcache_over_thingsvision_median']:.2f}x; goal >= 1.5); featcache / bare: "
          f"{g['featcache_over_bare']:.3f} (goal >= 0.9)")
    worst = max(tok["layers"], key=lambda r: r["max_rel_error"])
    print(f"\ntokens vs thingsvision (max ||fc - tv|| / ||tv|| per layer; fp16 unit roundoff "
          f"{FP16_UNIT:.2e}); same image order: {tok['labels_agree']}")
    for kind in ("cls", "ap"):
        errs = [r for r in tok["layers"] if r["kind"] == kind]
        print(f"  {kind:3s} " + " ".join(f"{r['max_rel_error']:.1e}" for r in errs))
    print(f"  worst: {worst['layer']} {worst['kind']} {worst['max_rel_error']:.2e} = "
          f"{worst['over_fp16_unit']:.2f} x 2^-11; within fp16 rounding: "
          f"{tok['within_fp16']}")
    d = fig["probe_data"]
    print(f"\nlinear probe, final-layer CLS ({d['n_train']} train / {d['n_val']} val / "
          f"{d['n_test']} test, {PROBE_CLASSES} classes, d={d['dim']})")
    print(f"{'':34s} {'select+train':>13s} {'median':>8s} {'bal. top-1':>11s} "
          f"{'peak RSS':>10s}")
    for name, r in pr["rows"].items():
        print(f"{name:34s} {r['seconds']:11.2f} s {r['seconds_median']:6.2f} s "
              f"{r['balanced_top1']:10.2f} {r['peak_rss_mib']:7.0f} MiB")
    g = pr["goals"]
    print(f"CLIP_benchmark / featcache time: {g['clip_benchmark_over_featcache_time']:.2f}x "
          f"(goal > 1); featcache below the best: {g['featcache_points_below_best']:.2f} points "
          f"(goal <= 1)")
    envs = fig["environments"]
    print("\nenvironments: " + "; ".join(
        f"{k} {'built now in ' + str(v['build_s']) + ' s' if v['built_now'] else 'reused'}"
        f" ({v['bytes'] / 2**30:.2f} GiB)" for k, v in envs.items()))


# -- main -----------------------------------------------------------------------------------

def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="the smallest mode (N=64, one repeat, 600 probe images, featcache's "
                        "quick grid)")
    p.add_argument("--n", type=int, default=None, help="JPEGs for the extraction [512]")
    p.add_argument("--batch-size", type=int, default=64, help="[64, the authors' default]")
    p.add_argument("--reps", type=int, default=None, help="alternating extraction repeats [2]")
    p.add_argument("--probe-train", type=int, default=None, help="probe train images [2400]")
    p.add_argument("--probe-test", type=int, default=None, help="probe test images [600]")
    p.add_argument("--probe-size", type=int, default=64, help="probe images' side in px")
    p.add_argument("--probe-reps", type=int, default=None, help="probe repeats [1]")
    p.add_argument("--probe-grid", default=None,
                   help="featcache's linear grid: paper (21 configs, >= 1000 steps) or quick "
                        "(4 configs, >= 200 steps) [paper; quick with --quick]")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of every run (OMP_NUM_THREADS ...) [each tool's default]")
    p.add_argument("--peers-dir", type=Path, default=PEERS_DIR,
                   help="where the peers' virtualenvs live [.peers/]")
    p.add_argument("--rebuild", action="store_true", help="rebuild the peers' environments")
    p.add_argument("--work", type=Path, default=None,
                   help="keep the inputs and outputs here [a temporary folder]")
    p.add_argument("--json", type=Path, default=None, help="write every figure and repeat")
    p.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    args.n = args.n or (64 if quick else 512)
    args.reps = args.reps or (1 if quick else 2)
    args.probe_train = args.probe_train or (480 if quick else 2400)
    args.probe_test = args.probe_test or (120 if quick else 600)
    args.probe_reps = args.probe_reps or 1
    args.probe_grid = args.probe_grid or ("quick" if quick else "paper")
    return args


def check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA GPU here; use "
                         "--device cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise SystemExit(f"error: --device {device}: use cpu or cuda")


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch
    from machine import cpu_info

    envs = peer_envs(args.peers_dir)
    built = {name: env.ensure(args.rebuild) for name, env in envs.items()}
    environments = {k: {key: v.get(key) for key in ("build_s", "built_now", "built_at",
                                                    "bytes", "requirements", "share_main")}
                    for k, v in built.items()}
    info = {**cpu_info(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    settings = {"n": args.n, "batch_size": args.batch_size, "reps": args.reps,
                "device": args.device, "seed": args.seed, "probe_reps": args.probe_reps,
                "probe_size": args.probe_size, "probe_grid": args.probe_grid,
                "threads": args.threads}
    print(f"# {info['cpu']}, {info['cores']} cores, load {info['load_avg']:.2f}; torch "
          f"{torch.__version__}; {args.device}", flush=True)
    inputs = write_inputs(work, args.n, args.seed)
    print("1. extraction (each run a fresh process)", flush=True)
    ex_runs = extraction_runs(envs, inputs, work, args)
    extraction = extraction_table(ex_runs, args.n)
    # the tokens of featcache's float32 compute (its CPU default; on a GPU its fp32 run)
    fc_path = Path(ex_runs.get("featcache-fp32", ex_runs["featcache"])[-1]["path"])
    layers = token_errors(fc_path, work / "tv-authors")
    # 1 % over 2^-11: the two torch builds' own fp32 arithmetic differs by ~1e-6 relative
    tokens = {"layers": layers, "labels_agree": labels_agree(fc_path, work / "tv-authors"),
              "within_fp16": all(r["max_rel_error"] <= 1.01 * FP16_UNIT for r in layers)}
    print("2. linear probe (each run a fresh process)", flush=True)
    data = probe_inputs(work, args)
    probe_res = probe_runs(envs, data, work, args)
    return {"machine": info, "settings": settings, "environments": environments,
            "extraction": {**extraction, "runs": ex_runs}, "tokens": tokens,
            "probe_data": data, "probe": {**probe_table(probe_res), "runs": probe_res},
            "load_avg_end": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child:
        sys.path.insert(0, str(HERE))
        spec = json.loads(Path(args.child[1]).read_text())
        print(json.dumps(CHILDREN[args.child[0]](spec)), flush=True)
        return 0
    sys.path.insert(0, str(HERE))  # machine.py, extract.py
    check_device(args.device)
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        figures = run(args, args.work.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="featcache-peers-") as tmp:
            figures = run(args, Path(tmp))
    print_table(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1, default=str))
        print(f"\nfigures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
