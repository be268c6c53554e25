"""timm's VisionTransformer family (`timm:NAME`): ViT, DeiT, DINOv2 (with registers),
MAE, AugReg, and any timm ViT with `blocks` and `patch_embed`."""

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
    def default_probe_token(cls, arch: str) -> str:
        return "ap" if ".mae" in arch else "cls"

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
            except (TypeError, ValueError, AssertionError) as exc:
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
        if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
            raise FeatcacheError(f"{spec.name}: not a plain timm ViT (no blocks/patch_embed); "
                                 "featcache supports VisionTransformer-style models")
        if tap == "reference":
            from timm.models import vision_transformer as vt

            odd = [type(b).__name__ for b in model.blocks
                   if not hasattr(b, "norm2") or isinstance(b, (vt.ResPostBlock,
                                                                vt.ParallelThingsBlock))]
            if odd:
                raise FeatcacheError(f"{spec.name}: its blocks ({odd[0]}) have no pre-MLP "
                                     "norm2 to tap; use --tap residual")

    def setup(self) -> Geometry:
        m = self.model
        if not getattr(m, "has_class_token", getattr(m, "cls_token", None) is not None):
            raise FeatcacheError(f"{self.spec.name} has no CLS token; featcache caches CLS+AP per "
                                 "layer and needs a ViT with a class token")
        n_prefix = int(m.num_prefix_tokens)
        grid = m.patch_embed.grid_size
        for block in m.blocks:
            self.tap_module(block.norm2 if self.tap == "reference" else block)
        # Models pooled by `avg` keep `norm` as Identity and normalise after pooling.
        self._post_norm = m.fc_norm if isinstance(m.norm, nn.Identity) else nn.Identity()
        size = tuple(int(s) for s in m.patch_embed.img_size)
        return Geometry(len(m.blocks), m.embed_dim, m.embed_dim, n_prefix,
                        n_prefix + int(grid[0]) * int(grid[1]), (3, *size))

    def run(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(images)

    def final(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if isinstance(self._post_norm, nn.Identity):
            return super().final(x)
        cls, ap = self.reduce(x)
        return self._post_norm(cls), self._post_norm(ap), self._post_norm(x)
