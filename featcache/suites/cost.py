"""What a unit of work will take, computed (not measured): cache bytes, backbone FLOPs of
extraction, and the FLOPs of a probe's grid. The model behind docs/scaling.md
(benchmarks/scaling.py reads it from here).

Sizes: the catalogue's training-set sizes (the test split adds in proportion; digits and
local data: their own sizes where known). Architectures: read off the model's name (ViT
S/B/L/H/g, patch, input size) or its --model-arg overrides; unknown ones are None ("?").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

GRID_POINTS = {"attentive": 63, "alf": 63}  # 3 lr × 7 wd × 3 dropout; the others 21
# (blocks, width) by the size word in a model's name
SIZES = {"tiny": (12, 192), "small": (12, 384), "base": (12, 768), "large": (24, 1024),
         "huge": (32, 1280), "giant": (40, 1536), "so400m": (27, 1152)}
LETTERS = {"t": "tiny", "s": "small", "b": "base", "l": "large", "h": "huge", "g": "giant"}
KNOWN_SIZES = {"digits": (1347, 10)}  # (train images, classes) beyond the catalogue


@dataclass(frozen=True)
class Arch:
    blocks: int
    dim: int
    patch: int
    image: int

    @property
    def tokens(self) -> int:
        return (self.image // self.patch) ** 2 + 1


def guess_arch(model: str, model_arg: dict[str, Any] | None = None) -> Arch | None:
    """A ViT's shape from its name (`clip-vit-b16`, `timm:vit_large_patch14_dinov2`,
    `open_clip:ViT-B-32:openai`), overridden by `--model-arg` (depth, embed_dim, ...)."""
    from featcache.backbones import resolve_model

    spec = resolve_model(model, {})
    text = f"{model} {spec.arch}".lower()
    word = next((w for w in SIZES if w in text), None)
    letter = re.search(r"vit[-_]([tsblhg])[-_/]?(\d+)", text)
    if word is None and letter:
        word = LETTERS[letter.group(1)]
    patch = re.search(r"patch(\d+)", text) or letter
    size = re.search(r"_(\d{3})(?:\b|_|\.)", text)
    kw = dict(spec.kwargs or {}, **(model_arg or {}))
    if word is None and "depth" not in kw:
        return None
    blocks, dim = SIZES.get(word or "", (0, 0))
    return Arch(int(kw.get("depth", blocks)), int(kw.get("embed_dim", dim)),
                int(kw.get("patch_size", patch.group(2 if patch is letter else 1)
                           if patch else 16)),
                int(kw.get("img_size", spec.run_size or (size.group(1) if size else 224))))


def dataset_size(name: str) -> tuple[int, int] | None:
    """(train images, classes) of a dataset the catalogue knows."""
    from featcache.catalogue import paper_datasets

    entry = paper_datasets().get(name)
    if entry is not None:
        return entry.train_size, entry.classes
    return KNOWN_SIZES.get(name)


def extract_flops(arch: Arch, n: int) -> float:
    """Forward FLOPs of n images: the patch embedding, then per block 12·T·D² MACs (qkv,
    proj, MLP 4×) and 2·T²·D (attention's two products)."""
    t, d = arch.tokens, arch.dim
    patches = 2.0 * (t - 1) * 3 * arch.patch**2 * d
    return n * (patches + 2.0 * arch.blocks * (12 * t * d * d + 2 * t * t * d))


def cache_bytes(arch: Arch, n: int, all_tokens: bool) -> float:
    """float16 CLS + AP of every block and the final layer, plus the last layer's tokens."""
    per_image = 2 * 2 * (arch.blocks + 1) * arch.dim
    if all_tokens:
        per_image += 2 * arch.tokens * arch.dim
    return float(n * per_image)


def alf_macs(batch: int, tokens: int, dim: int, classes: int, heads: int | None = None
             ) -> float:
    """Forward + backward MACs of one config's training step (docs/benchmarks.md); ALF has
    a head per token, the all-tokens baseline 8."""
    from featcache.probing.heads import head_dim_for

    heads = heads or tokens
    e = head_dim_for(dim, heads)
    return (batch * (4 * tokens * dim * heads + 6 * heads * e * dim + 3 * dim * classes)
            + 9 * heads * e * dim)


def linear_macs(batch: int, features: int, classes: int) -> float:
    return 3.0 * batch * features * classes  # forward, and backward's two products


def grid_flops(n: int, tokens: int, dim: int, classes: int, configs: int = 63,
               attentive: bool = True, heads: int | None = None) -> float:
    """A grid (configs on 80 % of train) and the refit (one config on all of it), with the
    recipe's step plan (`featcache.probing.train.plan_steps`)."""
    from featcache.probing.train import TrainConfig, plan_steps

    cfg = TrainConfig()
    n_grid = n - math.ceil(0.2 * n)
    flops = 0.0
    for size, count in ((n_grid, configs), (n, 1)):
        plan = plan_steps(size, cfg)
        macs = (alf_macs(plan.batch_size, tokens, dim, classes, heads) if attentive
                else linear_macs(plan.batch_size, tokens * dim, classes))
        flops += 2 * macs * plan.total_steps * count
    return flops


def probe_flops(method: str, arch: Arch, n: int, classes: int, seeds: int) -> float:
    """A method's grid and refit for every seed (the paper's layer sets)."""
    tokens = {"linear": 1, "concat": 2 * (arch.blocks + 1), "alf": 2 * (arch.blocks + 1),
              "attentive": arch.tokens, "layers": arch.blocks + 1}.get(method, 1)
    attentive = method in GRID_POINTS
    configs = GRID_POINTS.get(method, 21)
    heads = 8 if method == "attentive" else None
    return seeds * grid_flops(n, tokens, arch.dim, classes, configs, attentive, heads)
