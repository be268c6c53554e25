"""The numbers behind docs/scaling.md, computed (not measured): token bytes per model and
dataset, the probing mode each needs on one or eight GPUs, and the FLOPs of the paper grid.

Inputs: the paper's 20 datasets' training sizes and classes (the package's catalogue;
ImageNet-1k among them: 1,281,167 / 1,000); ViT-B (12 blocks, 768) and ViT-L (24 blocks, 1024);
ALF over `all` layers reads CLS+AP of blocks 1..L-1 and the final layer: 2·L tokens.
Memory rules are featcache's own: tokens may take half of a GPU's memory
(`features.DEVICE_FRACTION`), the host 80 % of its RAM (`HOST_FRACTION`). FLOPs: the fast
attentive head's count from docs/benchmarks.md, the recipe's steps from
`featcache.probing.train.plan_steps` (40 epochs, batch 2048, ≥ 1000 steps), the 63-point grid on
80 % of train, the refit of one config on all of it.

    python benchmarks/scaling.py [--gflops 54.3] [--host-gb 512]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from featcache.catalogue import paper_datasets  # noqa: E402
from featcache.probing.tokens.features import DEVICE_FRACTION, HOST_FRACTION  # noqa: E402
from featcache.suites.cost import grid_flops  # noqa: E402  (as `featcache run --dry-run`)

MODELS = {"ViT-B": (12, 768), "ViT-L": (24, 1024)}
GPUS = {"80 GB": 80e9, "141 GB": 141e9}


def mode(nbytes: float, gpu: float, ranks: int, host: float) -> str:
    device = DEVICE_FRACTION * gpu
    if ranks == 1:
        if nbytes <= device:
            return "device"
        return "host" if nbytes <= HOST_FRACTION * host else "stream"
    if nbytes <= device:
        return "grid"
    return "data" if nbytes / ranks <= device else "data, host"


def human(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gflops", type=float, default=54.3,
                        help="measured FLOP/s of ALF training (docs/benchmarks.md, CPU)")
    parser.add_argument("--host-gb", type=float, default=512.0, help="host RAM of a node")
    args = parser.parse_args()
    host = args.host_gb * 1e9
    rows = [(d.display, d.train_size, d.classes) for d in paper_datasets().values()]
    head = ["dataset", "train", "classes"]
    for model in MODELS:
        head += [f"{model} ALF tokens", f"{model} 1×80", f"{model} 1×141", f"{model} 8×80",
                 f"{model} 8×141"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, n, classes in rows:
        cells = [name, f"{n:,}", str(classes)]
        for blocks, dim in MODELS.values():
            nbytes = n * 2 * blocks * dim * 2
            cells.append(human(nbytes))
            for ranks in (1, 8):
                for gpu in GPUS.values():
                    cells.append(mode(nbytes, gpu, ranks, host))
        print("| " + " | ".join(cells) + " |")
    print()
    print(f"| dataset | model | paper grid (PFLOP) | time at {args.gflops:.1f} GFLOP/s |")
    print("|---|---|---:|---:|")
    for name, n, classes in rows:
        if name not in ("FER2013", "CIFAR-100", "SVHN", "PCAM", "ImageNet-1k"):
            continue
        for model, (blocks, dim) in MODELS.items():
            flops = grid_flops(n, 2 * blocks, dim, classes)
            seconds = flops / (args.gflops * 1e9)
            print(f"| {name} | {model} | {flops / 1e15:.2f} | {seconds / 3600:,.1f} h |")


if __name__ == "__main__":
    main()
