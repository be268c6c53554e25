"""Preprocessing as the authors gave it to each model, and DINOv2's run-time resizing.

The backends' own transforms (timm's data config, open_clip's) live with the backends;
here: thingsvision's default transform (the authors' for DINOv2 and MAE), DINOv2's
torch-hub position-embedding interpolation, and the one-line description of any of them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# thingsvision's default transform, which the authors' extraction applies to DINOv2 and MAE
# (`get_transformations(resize_dim=256, crop_dim=224)`: Resize(256) on the shorter side with
# torchvision's default bilinear interpolation, CenterCrop(224), ToTensor, ImageNet mean/std).
THINGSVISION = {
    "recipe": "thingsvision-default",
    "input_size": [3, 224, 224],
    "resize": 256,
    "resize_mode": "shortest",
    "interpolation": "bilinear",
    "crop": 224,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}


def thingsvision_preprocess() -> tuple[Callable, dict[str, Any]]:
    from torchvision import transforms as T

    cfg = THINGSVISION
    transform = T.Compose([
        T.Resize(cfg["resize"], interpolation=T.InterpolationMode.BILINEAR),
        T.CenterCrop(cfg["crop"]),
        T.ToTensor(),
        T.Normalize(cfg["mean"], cfg["std"]),
    ])
    return transform, jsonable(cfg)


# DINOv2's torch-hub model (`interpolate_pos_encoding`, hub defaults interpolate_offset=0.1,
# interpolate_antialias=False): bicubic, scale factor (new + 0.1) / old, no antialias, in
# float32. timm resamples at load to the exact size with antialias, which gives other
# embeddings (docs/method.md measures the gap); featcache follows the authors' source.
DINOV2_INTERPOLATE_OFFSET = 0.1


def resize_pos_embed_like_dinov2_hub(model: nn.Module, size: int) -> None:
    """Run a timm ViT built at its native size (DINOv2: 518 px) at `size` px, with position
    embeddings interpolated once the way DINOv2's hub model does it on every forward."""
    import torch.nn.functional as F

    grid_old = tuple(int(g) for g in model.patch_embed.grid_size)
    patch = int(model.patch_embed.patch_size[0])
    new = size // patch
    if grid_old == (new, new):
        return
    model.featcache_pos_embed = (f"dinov2-hub: {grid_old[0]}x{grid_old[1]} -> {new}x{new}, "
                                 f"bicubic, scale ({new}+{DINOV2_INTERPOLATE_OFFSET})/"
                                 f"{grid_old[0]}, no antialias")
    old = model.pos_embed.detach()
    n_patch = grid_old[0] * grid_old[1]
    prefix, grid = old[:, : old.shape[1] - n_patch], old[:, old.shape[1] - n_patch:]
    dim = grid.shape[-1]
    scale = (new + DINOV2_INTERPOLATE_OFFSET) / grid_old[0]
    resized = F.interpolate(
        grid.float().reshape(1, grid_old[0], grid_old[1], dim).permute(0, 3, 1, 2),
        scale_factor=(scale, scale), mode="bicubic", antialias=False)
    if tuple(resized.shape[-2:]) != (new, new):
        raise RuntimeError(f"position embeddings came out {tuple(resized.shape[-2:])}, "
                           f"expected {(new, new)}")
    resized = resized.permute(0, 2, 3, 1).reshape(1, new * new, dim).to(old.dtype)
    model.set_input_size(img_size=(size, size))  # patch grid, sizes and config
    with torch.no_grad():
        model.pos_embed.copy_(torch.cat([prefix, resized], dim=1))


def describe_preprocess(pp: dict[str, Any]) -> str:
    """One line for people: what an image goes through before the backbone."""
    def nums(values: Any) -> str:
        return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"

    norm = f"mean {nums(pp.get('mean', []))}, std {nums(pp.get('std', []))}"
    if pp.get("recipe") == "thingsvision-default":
        return (f"Resize({pp['resize']}, shorter side, {pp['interpolation']}) → "
                f"CenterCrop({pp['crop']}) → {norm} (thingsvision's default, as the authors)")
    if "input_size" in pp:  # a timm data config
        size = pp["input_size"][-1]
        crop_pct = float(pp.get("crop_pct", 1.0))
        resize = int(size / crop_pct) if pp.get("crop_mode", "center") == "center" else size
        return (f"Resize({resize}, {pp.get('interpolation')}) → CenterCrop({size}) → {norm} "
                "(timm's config)")
    size = pp.get("size")
    size = size[-1] if isinstance(size, list) else size
    return (f"Resize({size}, {pp.get('resize_mode', 'shortest')}, {pp.get('interpolation')}) "
            f"→ CenterCrop({size}) → {norm} (open_clip's)")


def jsonable(obj: Any) -> Any:
    """What the fingerprint stores: plain JSON (tuples as lists, anything odd as text)."""
    return json.loads(json.dumps(obj, default=str))
