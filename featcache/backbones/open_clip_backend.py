"""open_clip's image towers (`open_clip:ARCH[:PRETRAINED]`, also `open_clip:hf-hub:REPO`).

Two kinds: open_clip's own VisionTransformer (CLIP: a class token, the final layer read
after `ln_post` and the projection, as the paper), and towers that wrap a timm trunk
(`TimmModel`: SigLIP 2, PE-Core), read like timm's (`timm_backend`), whose pooled
embedding is taken after the tower's projection where it has one: the image embedding
the CLIP model is trained with."""

from __future__ import annotations

import dataclasses
import difflib
import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from featcache.backbones.base import Backbone, Geometry
from featcache.backbones.preprocess import jsonable
from featcache.backbones.spec import ModelSpec
from featcache.backbones.timm_backend import check_plain_vit, tower_final, tower_geometry
from featcache.backbones.weights import file_sha256, hub_error, hub_revision, kwargs_error, seeded
from featcache.errors import FeatcacheError
from featcache.hub import hub_access

_SCHEMAS = ("hf-hub:", "local-dir:")


def _agree_input_size(tower: nn.Module) -> nn.Module:
    """open_clip builds a timm trunk at timm's default size whatever the config's
    `image_size` says (`--model-arg vision_cfg=...image_size=...`); its own preprocessing
    then feeds images the trunk refuses. Resize the trunk (its position embedding,
    interpolated by timm) to the size the tower's preprocessing uses."""
    trunk = getattr(tower, "trunk", None)
    size = tuple(getattr(tower, "image_size", ()) or ())
    grid = getattr(getattr(trunk, "patch_embed", None), "img_size", None)
    if grid is not None and size and tuple(grid) != size and hasattr(tower, "set_input_size"):
        tower.set_input_size(size)
    return tower


class OpenClipBackbone(Backbone):
    backend = "open_clip"

    @classmethod
    def split_name(cls, rest: str, full: str) -> tuple[str, str | None]:
        if rest.startswith(_SCHEMAS):
            return rest, None
        parts = rest.split(":")
        if len(parts) not in (1, 2) or not parts[0]:
            raise FeatcacheError(f"bad open_clip model name {full!r}: use "
                                 "open_clip:ARCH[:PRETRAINED], e.g. open_clip:ViT-B-16:openai")
        return parts[0], parts[1] if len(parts) == 2 else None

    @classmethod
    def check_arch(cls, arch: str) -> None:
        import open_clip

        if arch.startswith(_SCHEMAS):
            return
        names = open_clip.list_models()
        if arch not in names:
            close = difflib.get_close_matches(arch, names, n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise FeatcacheError(f"open_clip has no architecture {arch!r}.{hint}")

    @classmethod
    def build(cls, spec: ModelSpec, kind: str, value: Any) -> tuple[nn.Module, str]:
        import open_clip

        kwargs = dict(spec.kwargs)

        def build(pretrained: str | None = None) -> nn.Module:
            try:
                return open_clip.create_model(spec.arch, pretrained=pretrained, **kwargs)
            except (TypeError, ValueError, KeyError, AssertionError, RuntimeError,
                    ArithmeticError) as exc:
                if kwargs:
                    raise kwargs_error(spec, exc) from None
                raise

        schema = spec.arch.startswith(_SCHEMAS)
        if kind == "random":
            # open_clip logs a warning that the model is random: here that is the point.
            quiet = logging.getLogger()
            level = quiet.level
            quiet.setLevel(logging.ERROR)
            try:
                model = seeded(value, build)
            finally:
                quiet.setLevel(level)
            weights_id = f"random:{value}"
        elif kind == "file":
            try:
                model = build(str(value))
            except FeatcacheError:
                raise
            except Exception as exc:
                raise FeatcacheError(f"--weights {value}: open_clip could not load it as a "
                                     "whole CLIP checkpoint "
                                     f"({str(exc).splitlines()[0][:200]})") from None
            weights_id = f"file:sha256:{file_sha256(value)}"
        else:
            if not spec.pretrained and not schema:
                raise FeatcacheError(f"{spec.name}: no pretrained tag; use "
                                     "open_clip:ARCH:PRETRAINED or --weights")
            with hub_access() as offline:
                try:
                    model = build(None if schema else spec.pretrained)
                except FeatcacheError:
                    raise
                except Exception as exc:
                    raise hub_error(spec, exc, offline) from None
            weights_id = (f"hub:open_clip:{spec.arch}"
                          + (f":{spec.pretrained}" if not schema else ""))
            revision = cls._revision(spec)
            if revision:
                weights_id += f"@{revision}"
        return _agree_input_size(model.visual), weights_id

    @staticmethod
    def _revision(spec: ModelSpec) -> str | None:
        try:
            import open_clip

            if spec.arch.startswith("hf-hub:"):
                repo = spec.arch.removeprefix("hf-hub:")
            else:
                repo = (open_clip.get_pretrained_cfg(spec.arch, spec.pretrained or "") or {}
                        ).get("hf_hub", "")
            return hub_revision(repo or None, ("open_clip_model.safetensors",
                                               "open_clip_pytorch_model.bin",
                                               "open_clip_config.json"))
        except Exception:  # only the revision is lost, never the weights
            return None

    @classmethod
    def make_transform(cls, spec: ModelSpec, model: nn.Module
                       ) -> tuple[Callable, dict[str, Any]]:
        from open_clip.transform import PreprocessCfg, image_transform_v2

        cfg = dict(getattr(model, "preprocess_cfg", {}) or {})
        cfg["size"] = tuple(int(s) for s in model.image_size)
        fields = PreprocessCfg.__dataclass_fields__
        pp = PreprocessCfg(**{k: v for k, v in cfg.items() if k in fields})
        return image_transform_v2(pp, is_train=False), jsonable(asdict(pp))

    @classmethod
    def check_model(cls, spec: ModelSpec, model: nn.Module, tap: str) -> None:
        if hasattr(model, "trunk"):  # a timm trunk (SigLIP 2, PE-Core)
            check_plain_vit(spec, model.trunk, tap)
            return
        if not hasattr(model, "transformer") or not hasattr(model, "ln_post"):
            raise FeatcacheError(f"{spec.name}: its image tower ({type(model).__name__}) is "
                                 "neither open_clip's VisionTransformer nor a timm trunk")

    @property
    def _trunk(self) -> nn.Module | None:
        """The timm trunk of a TimmModel tower (None for open_clip's own ViT)."""
        return getattr(self.model, "trunk", None)

    def setup(self) -> Geometry:
        v = self.model
        if self._trunk is not None:
            geometry = tower_geometry(self, self._trunk)
            return dataclasses.replace(geometry, embedding="pool",
                                       pool_dim=_output_width(v, geometry.width))
        if getattr(v, "attn_pool", None) is not None:
            raise FeatcacheError(f"{self.spec.name}: open_clip towers with their own "
                                 "attentional pooling (CoCa) are not supported")
        resblocks = v.transformer.resblocks
        self._lnd = not getattr(v.transformer, "batch_first", True)
        for block in resblocks:
            self.tap_module(block.ln_2 if self.tap == "reference" else block)
        width = v.transformer.width
        size = tuple(int(s) for s in v.image_size)
        return Geometry(len(resblocks), width, v.proj.shape[1] if v.proj is not None else width,
                        1, 1 + int(v.grid_size[0]) * int(v.grid_size[1]), (3, *size))

    def batch_first(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1) if getattr(self, "_lnd", False) else x

    def run(self, images: torch.Tensor) -> torch.Tensor:
        if self._trunk is not None:
            return self._trunk.forward_features(images)
        v = self.model
        x = v._embeds(images)
        x = v.transformer(x)
        x = v.ln_post(x)
        return x @ v.proj if v.proj is not None else x

    def final(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        return tower_final(self, x) if self._trunk is not None else super().final(x)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The tower's image embedding: the trunk's pool and head, then the tower's own
        projection (what `visual(images)` returns)."""
        return self.model.head(self._trunk.forward_head(x))


def _output_width(tower: nn.Module, width: int) -> int:
    """The width of a TimmModel tower's output: its last linear layer's, if any."""
    last = width
    for part in (tower.trunk.head, tower.head):
        for module in part.modules():
            if isinstance(module, nn.Linear):
                last = module.out_features
    return last
