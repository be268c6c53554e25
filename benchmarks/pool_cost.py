"""What storing a model's own pooled embedding (`pool`) costs, beside CLS + AP.

One run, one machine: a random PE-Core-B/16-shaped ViT (CLS and an attention pool, at
224 px) built by timm. Time: `Backbone.tokens` on one batch (every tap, CLS and AP of
each layer, the pool), against the pool alone (`Backbone.pooled` on the same final
tokens: the extra work the pool adds). Bytes: the cache's bytes per image with and
without the `pool` array (float16, as stored). Medians over the repeats.

    python benchmarks/pool_cost.py [--batch 16] [--repeats 5] [--arch ...]

Decision (issue "Beyond the class token"): `pool` is stored only where it is neither the
final CLS nor the final AP; where stored, it should cost a few % at most. docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import cpu_info  # noqa: E402

from featcache.backbones import create_backbone  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="timm:vit_pe_core_base_patch16_224")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    backbone = create_backbone(args.arch, "random:0", "reference")
    x = torch.randn(args.batch, *backbone.input_size)
    with torch.inference_mode():
        backbone.tokens(x)  # warm-up
        whole, pool = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            backbone.tokens(x)
            whole.append(time.perf_counter() - t0)
            final = backbone.run(x)
            t0 = time.perf_counter()
            backbone.pooled(final)
            pool.append(time.perf_counter() - t0)
    t_whole, t_pool = statistics.median(whole), statistics.median(pool)
    per_layer = 2 * len(backbone.layer_names) * backbone.dim  # float16 bytes of one image's CLS/AP
    kinds = backbone.token_kinds
    base = per_layer * len([k for k in kinds if k != "pool"])
    extra = 2 * (backbone.pool_dim or 0)
    print(f"machine: {cpu_info()}, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}")
    print(f"model: {args.arch} (random), layers {len(backbone.layer_names)}, width {backbone.dim}, "
          f"tokens {'+'.join(kinds)}, batch {args.batch}")
    print(f"time: tokens() {t_whole * 1e3:.1f} ms/batch, of which the pool "
          f"{t_pool * 1e3:.2f} ms: ratio {t_pool / t_whole:.4f}")
    print(f"bytes/image: CLS+AP {base}, pool {extra}: ratio {extra / base:.4f}")


if __name__ == "__main__":
    main()
