"""k-NN benchmark: featcache's blocked k-NN against a plain `torch.topk` over the full
similarity matrix, and the ImageNet-1k shape extrapolated from a measured fraction.

Everything in one run, on random L2-normalised tokens stored as float16 (as a cache stores
them), on ``--device`` (CUDA when present with ``auto``):

  (1) blocked: `featcache.probing.knn.nearest` (k = 200, the protocol's largest) and the votes of
      k = 10, 20, 100, 200, for ``--queries`` × ``--bank`` samples at D = ``--dim``;
  (2) the same similarities as one matrix product and one `torch.topk` (where the matrix
      fits: ``--full-max-gb``), and the bare matrix product alone: what blocking and the
      running top-k cost over the arithmetic, and whether the neighbours agree;
  (3) ImageNet-1k (1,281,167 training × 50,000 validation samples, D = 768): the time
      extrapolated from (1) by the number of query × training pairs (the cost is the
      similarity matrix, computed once in blocks), and the memory a full matrix would take.

    python benchmarks/knn.py                       # CPU: 1,024 × 65,536 (about a minute)
    python benchmarks/knn.py --device cuda --queries 50000 --bank 1281167   # the real shape
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGENET = {"train": 1_281_167, "val": 50_000, "dim": 768}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tokens(n: int, dim: int, seed: int, device: torch.device) -> torch.Tensor:
    """(n, 1, dim) float16 tokens on ``device``, made in chunks (no float32 copy of all)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = torch.empty((n, 1, dim), dtype=torch.float16, device=device)
    for start in range(0, n, 65536):
        stop = min(n, start + 65536)
        out[start:stop, 0] = torch.randn(stop - start, dim, generator=g).to(device,
                                                                             torch.float16)
    return out


def timed(fn: Any, device: torch.device) -> tuple[float, Any]:
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def measure(queries: int, bank: int, dim: int, device: torch.device,
            full_max_gb: float = 4.0) -> dict[str, Any]:
    """(1) and (2) of the module doc, in one run; seconds and ratios."""
    from featcache.probing.knn import KS, nearest, vote
    from featcache.probing.tokens.features import FeatureSource

    q_raw, b_raw = tokens(queries, dim, 0, device), tokens(bank, dim, 1, device)
    labels = torch.randint(0, 1000, (bank,), generator=torch.Generator().manual_seed(2))
    labels = labels.to(device)
    q_src, b_src = FeatureSource(q_raw, device), FeatureSource(b_raw, device)
    nearest(q_src.subset(range(min(queries, 64))), b_src.subset(range(min(bank, 4096))), 10)
    blocked_s, (sims, idx) = timed(lambda: nearest(q_src, b_src, max(KS)), device)
    vote_s, _ = timed(lambda: [vote(sims[0], idx[0], labels, 1000, k) for k in KS], device)
    out: dict[str, Any] = {"queries": queries, "bank": bank, "dim": dim, "device": str(device),
                           "blocked_s": round(blocked_s, 3), "votes_s": round(vote_s, 3),
                           "pairs_per_s": queries * bank / blocked_s}
    full_gb = queries * bank * 4 / 2**30
    out["full_matrix_gb"] = round(full_gb, 2)
    qn = q_src.to_tensor()[:, 0]
    bn = b_src.to_tensor()[:, 0]
    matmul_s, _ = timed(lambda: _matmul_only(qn, bn), device)
    out["matmul_only_s"] = round(matmul_s, 3)
    out["blocked_over_matmul"] = round(blocked_s / matmul_s, 2)
    if full_gb <= full_max_gb:
        full_s, (fv, fi) = timed(lambda: (qn @ bn.T).topk(max(KS), dim=1), device)
        out["full_topk_s"] = round(full_s, 3)
        out["blocked_over_full_topk"] = round(blocked_s / full_s, 2)
        # the same k nearest similarities (topk's order among exact ties is its own)
        out["same_similarities"] = bool(torch.allclose(fv, sims[0], atol=1e-5))
    return out


def _matmul_only(qn: torch.Tensor, bn: torch.Tensor, block: int = 16384) -> None:
    """The similarities alone, in blocks of the bank, nothing kept: the arithmetic floor."""
    for start in range(0, len(bn), block):
        qn @ bn[start:start + block].T


def extrapolate(measured: dict[str, Any]) -> dict[str, Any]:
    """(3): ImageNet-1k's validation against its training set, from the measured pairs/s."""
    pairs = IMAGENET["train"] * IMAGENET["val"]
    scale = IMAGENET["dim"] / measured["dim"]
    seconds = pairs / measured["pairs_per_s"] * scale
    return {"pairs": pairs, "seconds": round(seconds, 1), "minutes": round(seconds / 60, 2),
            "full_matrix_gb": round(pairs * 4 / 2**30, 1),
            "from": f"{measured['queries']} × {measured['bank']} measured on "
                    f"{measured['device']}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--queries", type=int, default=1024)
    parser.add_argument("--bank", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--full-max-gb", type=float, default=4.0,
                        help="largest full similarity matrix to compare with")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    from featcache.distributed import resolve_device

    device = resolve_device(args.device)
    measured = measure(args.queries, args.bank, args.dim, device, args.full_max_gb)
    result = {"measured": measured, "imagenet_1k": extrapolate(measured)}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
