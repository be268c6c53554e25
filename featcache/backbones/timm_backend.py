"""timm's plain ViTs (`timm:NAME`): the VisionTransformer family (ViT, DeiT, DINOv2 with
registers, MAE, AugReg, SigLIP, AIMv2) and the Eva family (EVA-02, DINOv3, PE-Core): any
timm ViT with `blocks` and `patch_embed`, with or without a class token.

The final layer's pooled embedding follows the model's own pooling (`forward_head` with
`pre_logits`): the final CLS for token pooling, the final AP for average pooling (the
same numbers, so nothing more is stored), and a token of its own, `pool`, for anything
else (SigLIP's and PE-Core's attention pools)."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from featcache.backbones.base import Backbone, Geometry
from featcache.backbones.preprocess import jsonable, resize_pos_embed_like_dinov2_hub
from featcache.backbones.spec import ModelSpec
from featcache.backbones.weights import (
    file_sha256,
    hub_error,
    hub_revision,
    kwargs_error,
    load_state,
    seeded,
)
from featcache.errors import FeatcacheError
from featcache.hub import hub_access


class TimmBackbone(Backbone):
    backend = "timm"

    @classmethod
    def split_name(cls, rest: str, full: str) -> tuple[str, str | None]:
        return rest, None  # timm's pretrained tag is part of the name: vit_b16.augreg

    @classmethod
    def check_arch(cls, arch: str) -> None:
        import timm

        base = arch.split(".")[0]
        if not timm.is_model(base):
            close = difflib.get_close_matches(base, timm.list_models("vit*"), n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise FeatcacheError(f"timm has no model {base!r}.{hint}")

    @classmethod
    def default_probe_token(cls, arch: str) -> str | None:
        return "ap" if ".mae" in arch else None  # MAE is probed on AP (the paper's appendix)

    @classmethod
    def build(cls, spec: ModelSpec, kind: str, value: Any) -> tuple[nn.Module, str]:
        model, weights_id = cls._build(spec, kind, value)
        if spec.run_size is not None and "img_size" not in spec.kwargs:
            resize_pos_embed_like_dinov2_hub(model, spec.run_size)
        return model, weights_id

    @classmethod
    def _build(cls, spec: ModelSpec, kind: str, value: Any) -> tuple[nn.Module, str]:
        import timm

        kwargs = {"num_classes": 0, **spec.kwargs}

        def build(pretrained: bool = False) -> nn.Module:
            try:
                return timm.create_model(spec.arch, pretrained=pretrained, **kwargs)
            except (TypeError, ValueError, AssertionError, RuntimeError, ArithmeticError) as exc:
                if spec.kwargs:
                    raise kwargs_error(spec, exc) from None
                raise

        if kind == "random":  # seeded, without touching the caller's RNG
            return seeded(value, build), f"random:{value}"
        if kind == "file":
            model = build()
            load_state(model, value)
            return model, f"file:sha256:{file_sha256(value)}"
        with hub_access() as offline:
            try:
                model = build(True)
            except FeatcacheError:
                raise
            except Exception as exc:  # network, missing weights: many exception types
                raise hub_error(spec, exc, offline) from None
        hub_id = model.pretrained_cfg.get("hf_hub_id")
        revision = hub_revision(hub_id, ("model.safetensors", "pytorch_model.bin",
                                         "open_clip_model.safetensors"))
        ident = hub_id or spec.arch
        return model, f"hub:{ident}" + (f"@{revision}" if revision else "")

    @classmethod
    def make_transform(cls, spec: ModelSpec, model: nn.Module
                       ) -> tuple[Callable, dict[str, Any]]:
        import timm.data

        cfg = timm.data.resolve_model_data_config(model)
        # Architecture overrides (img_size=…) are not in pretrained_cfg: trust the model.
        size = tuple(int(s) for s in model.patch_embed.img_size)
        cfg["input_size"] = (3, *size)
        transform = timm.data.create_transform(**cfg, is_training=False)
        return transform, jsonable(cfg)

    @classmethod
    def check_model(cls, spec: ModelSpec, model: nn.Module, tap: str) -> None:
        check_plain_vit(spec, model, tap)

    def setup(self) -> Geometry:
        return tower_geometry(self, self.model)

    def run(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(images)

    def final(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        return tower_final(self, x)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(x, pre_logits=True)


# -- shared with open_clip's towers that wrap a timm trunk (SigLIP 2, PE-Core) ------------

HIERARCHICAL = ("SwinTransformer", "SwinTransformerV2", "Hiera", "ConvNeXt", "ResNet",
                "EfficientNet", "MaxxVit", "DaVit", "MViT", "PoolFormer")


def check_plain_vit(spec: ModelSpec, model: nn.Module, tap: str) -> None:
    """Refuse, with one clear line, what the hooks cannot read correctly."""
    name = type(model).__name__
    if name.startswith(HIERARCHICAL):
        raise FeatcacheError(
            f"{spec.name}: {name} is not a plain ViT. Hierarchical backbones (Swin, Hiera, "
            "ConvNeXt, ...) change width and token grid from stage to stage, and featcache "
            "reads one token sequence of one width (blocks and patch_embed), so their "
            "stage-wise features are not supported; use a plain ViT")
    if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
        raise FeatcacheError(
            f"{spec.name}: {name} is not a plain ViT that featcache can read: it needs "
            "`blocks` and a fixed-grid `patch_embed` (one token sequence per image of one "
            "size); variable-resolution and convolutional models are not supported")
    if tap == "reference":
        from timm.models import vision_transformer as vt

        odd = [type(b).__name__ for b in model.blocks
               if not hasattr(b, "norm2") or isinstance(b, (vt.ResPostBlock,
                                                            vt.ParallelThingsBlock))
               or "PostNorm" in type(b).__name__]
        if odd:
            raise FeatcacheError(f"{spec.name}: its blocks ({odd[0]}) have no pre-MLP "
                                 "norm2 to tap; use --tap residual")


def tower_geometry(backbone: Backbone, m: nn.Module) -> Geometry:
    """Hook a timm ViT's blocks and describe its tokens and pooling."""
    has_cls = bool(getattr(m, "has_class_token", getattr(m, "cls_token", None) is not None))
    n_prefix = int(getattr(m, "num_prefix_tokens", int(has_cls)))
    grid = m.patch_embed.grid_size
    for block in m.blocks:
        backbone.tap_module(block.norm2 if backbone.tap == "reference" else block)
    # Models pooled by `avg` keep `norm` as Identity and normalise after pooling.
    backbone._post_norm = (m.fc_norm if isinstance(getattr(m, "norm", None), nn.Identity)
                           and hasattr(m, "fc_norm") else nn.Identity())
    pool = str(getattr(m, "global_pool", "token") or "")
    attention_pool = getattr(m, "attn_pool", None) is not None
    if attention_pool or pool not in ("token", "avg", ""):
        embedding, pool_dim = "pool", int(m.num_features)
    elif pool == "avg" or not has_cls:
        embedding, pool_dim = "ap", None
    else:
        embedding, pool_dim = "cls", None
    size = tuple(int(s) for s in m.patch_embed.img_size)
    return Geometry(len(m.blocks), int(m.embed_dim), int(m.embed_dim), n_prefix,
                    n_prefix + int(grid[0]) * int(grid[1]), (3, *size), has_cls, embedding,
                    pool_dim)


def tower_final(backbone: Backbone, x: torch.Tensor
                ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    post = backbone._post_norm
    if isinstance(post, nn.Identity):
        return Backbone.final(backbone, x)
    cls, ap = backbone.reduce(x)
    return (None if cls is None else post(cls)), post(ap), post(x)
