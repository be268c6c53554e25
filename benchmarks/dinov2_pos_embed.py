"""How much DINOv2's tokens at 224 px depend on how the 518-px position embeddings are
interpolated: the authors' source (DINOv2's torch-hub model: bicubic, scale (16+0.1)/37,
no antialias; what featcache does) against timm's resampling at load (bicubic to 16x16,
antialias). Same random checkpoint, same images, every layer's CLS and AP.

    python benchmarks/dinov2_pos_embed.py [--arch vit_base_patch14_dinov2] [--images 64]

Random weights are unlike trained ones in two ways that matter here, so both can be
changed: i.i.d. position embeddings, rougher than trained ones (`--smooth` low-pass
filters them first: trained ones are smooth), and LayerScale at its 1e-5 init, which keeps
the blocks from mixing tokens at all (`--layerscale 0.1` sets every gamma). Prints the
relative L2 difference per layer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featcache.backbones import resolve_model  # noqa: E402
from featcache.backbones.preprocess import (  # noqa: E402
    resize_pos_embed_like_dinov2_hub,
    thingsvision_preprocess,
)
from featcache.backbones.timm_backend import TimmBackbone  # noqa: E402


def smooth_(pos: torch.Tensor, grid: int) -> None:
    """Low-pass the patch grid of a (1, P+N, D) position embedding in place."""
    n = grid * grid
    g = pos[:, -n:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    k = torch.ones(g.shape[1], 1, 5, 5) / 25
    g = F.conv2d(F.pad(g, (2, 2, 2, 2), mode="replicate"), k, groups=g.shape[1])
    g = g / g.std() * pos[:, -n:].std()
    pos[:, -n:] = g.permute(0, 2, 3, 1).reshape(1, n, -1)


def main() -> None:
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="vit_base_patch14_dinov2")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--smooth", action="store_true")
    parser.add_argument("--layerscale", type=float, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    native = timm.create_model(args.arch, pretrained=False, num_classes=0).eval()
    with torch.no_grad():
        if args.smooth:
            smooth_(native.pos_embed, native.patch_embed.grid_size[0])
        if args.layerscale is not None:
            for name, p in native.named_parameters():
                if name.endswith("gamma"):
                    p.fill_(args.layerscale)
    state = native.state_dict()
    timm_way = timm.create_model(args.arch, pretrained=False, num_classes=0, img_size=224)
    timm_way.load_state_dict(checkpoint_filter_fn(state, timm_way))
    hub_way = native
    resize_pos_embed_like_dinov2_hub(hub_way, 224)
    spec = resolve_model(f"timm:{args.arch}")
    transform, pp = thingsvision_preprocess()
    a = TimmBackbone(spec, hub_way, "reference", "random", transform, pp)
    b = TimmBackbone(spec, timm_way, "reference", "random", transform, pp)
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits().images[: args.images]
    x = torch.stack([transform(Image.fromarray((d * 255 / 16).astype("uint8")).convert("RGB"))
                     for d in digits])
    with torch.no_grad():
        ta, tb = a.tokens(x), b.tokens(x)
    pe = (hub_way.pos_embed - timm_way.pos_embed).norm() / timm_way.pos_embed.norm()
    how = ", ".join(x for x in ("smoothed pos-embed" if args.smooth else "",
                                f"LayerScale {args.layerscale:g}"
                                if args.layerscale is not None else "") if x)
    print(f"{args.arch}{f' ({how})' if how else ''}: position embeddings differ by {pe:.3f} "
          "(relative L2)")
    print(f"{'layer':>8} {'CLS rel. diff':>14} {'AP rel. diff':>13}")
    for i, name in enumerate(a.layer_names):
        rel = [((ta[k][:, i] - tb[k][:, i]).norm(dim=1) / tb[k][:, i].norm(dim=1)).mean()
               for k in ("cls", "ap")]
        print(f"{name:>8} {rel[0]:>14.4f} {rel[1]:>13.4f}")


if __name__ == "__main__":
    main()
