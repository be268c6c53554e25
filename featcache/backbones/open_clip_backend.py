"""open_clip's image towers (`open_clip:ARCH[:PRETRAINED]`, also `open_clip:hf-hub:REPO`):
the VisionTransformer tower with a class token, read after `ln_post` and the projection."""

from __future__ import annotations

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
from featcache.backbones.weights import file_sha256, hub_error, hub_revision, kwargs_error, seeded
from featcache.errors import FeatcacheError
from featcache.hub import hub_access

_SCHEMAS = ("hf-hub:", "local-dir:")


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
            except (TypeError, ValueError, KeyError, AssertionError) as exc:
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
        return model.visual, weights_id

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
        if not hasattr(model, "transformer") or not hasattr(model, "ln_post"):
            raise FeatcacheError(f"{spec.name}: its image tower ({type(model).__name__}) is "
                                 "not open_clip's VisionTransformer; for a timm tower use "
                                 "timm:NAME")

    def setup(self) -> Geometry:
        v = self.model
        if getattr(v, "attn_pool", None) is not None:
            raise FeatcacheError(f"{self.spec.name}: open_clip towers with attentional pooling "
                                 "are not supported (no single CLS token)")
        resblocks = v.transformer.resblocks
        self._lnd = not getattr(v.transformer, "batch_first", True)
        for block in resblocks:
            self.tap_module(block.ln_2 if self.tap == "reference" else block)
        width = v.transformer.width
        size = tuple(int(s) for s in v.image_size)
        return Geometry(len(resblocks), width, v.proj.shape[1] if v.proj is not None else width,
                        1, 1 + int(v.grid_size[0]) * int(v.grid_size[1]), (3, *size))

    def batch_first(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1) if self._lnd else x

    def run(self, images: torch.Tensor) -> torch.Tensor:
        v = self.model
        x = v._embeds(images)
        x = v.transformer(x)
        x = v.ln_post(x)
        return x @ v.proj if v.proj is not None else x
