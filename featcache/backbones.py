"""Backbones: one registry of short names, one `create_backbone` entry point, one API.

Every backbone, whatever library builds it, answers the same questions: how to preprocess
an image, which layers it has and how wide they are, and `tokens(images)`, the CLS and
average-pooled patch (AP) token of every layer, reduced on the device.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featcache.errors import FeatcacheError
from featcache.hub import hub_access

TAPS = ("reference", "residual")


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: which library builds it, with which architecture and weights."""

    name: str
    backend: str  # "timm" | "open_clip"
    arch: str
    pretrained: str | None  # timm tag already in `arch`; open_clip pretrained tag
    kwargs: dict[str, Any] = field(default_factory=dict)
    probe_token: str = "cls"  # the token the paper's linear baseline reads (AP for MAE)
    description: str = ""
    # None: the backend's own preprocessing (timm's data config, open_clip's transform);
    # "thingsvision": the authors' transform for DINOv2 and MAE (see THINGSVISION)
    preprocess: str | None = None
    # Run at this size by interpolating the position embeddings once, the way DINOv2's own
    # torch-hub model does at run time (the authors' source); None: the model's size
    run_size: int | None = None


def _timm(name: str, arch: str, desc: str, probe_token: str = "cls",
          preprocess: str | None = None, run_size: int | None = None, **kw: Any) -> ModelSpec:
    return ModelSpec(name, "timm", arch, None, kw, probe_token, desc, preprocess, run_size)


def _clip(name: str, arch: str, desc: str) -> ModelSpec:
    return ModelSpec(name, "open_clip", arch, "openai", {}, "cls", desc)


# The paper's models (paper.md), plus MAE from its appendix and DINOv2 with registers.
# DINOv2 and MAE go through the authors' transform (thingsvision's default); DINOv2 runs
# at 224 px with its 518-px position embeddings interpolated as its torch-hub model does.
_DINO = dict(preprocess="thingsvision", run_size=224)
MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        _clip("clip-vit-b32", "ViT-B-32", "OpenCLIP ViT-B/32, OpenAI weights"),
        _clip("clip-vit-b16", "ViT-B-16", "OpenCLIP ViT-B/16, OpenAI weights"),
        _clip("clip-vit-l14", "ViT-L-14", "OpenCLIP ViT-L/14, OpenAI weights"),
        _timm("dinov2-vit-s14", "vit_small_patch14_dinov2.lvd142m", "DINOv2 ViT-S/14", **_DINO),
        _timm("dinov2-vit-b14", "vit_base_patch14_dinov2.lvd142m", "DINOv2 ViT-B/14", **_DINO),
        _timm("dinov2-vit-l14", "vit_large_patch14_dinov2.lvd142m", "DINOv2 ViT-L/14", **_DINO),
        _timm("dinov2reg-vit-s14", "vit_small_patch14_reg4_dinov2.lvd142m",
              "DINOv2 ViT-S/14 with 4 register tokens", **_DINO),
        _timm("dinov2reg-vit-b14", "vit_base_patch14_reg4_dinov2.lvd142m",
              "DINOv2 ViT-B/14 with 4 register tokens", **_DINO),
        _timm("vit-s16", "vit_small_patch16_224.augreg_in21k_ft_in1k",
              "supervised ViT-S/16 (AugReg, IN-21k → IN-1k)"),
        _timm("vit-b16", "vit_base_patch16_224.augreg2_in21k_ft_in1k",
              "supervised ViT-B/16 (AugReg2, IN-21k → IN-1k)"),
        _timm("vit-l16", "vit_large_patch16_224.augreg_in21k_ft_in1k",
              "supervised ViT-L/16 (AugReg, IN-21k → IN-1k)"),
        _timm("mae-vit-b16", "vit_base_patch16_224.mae", "MAE ViT-B/16 (probed on AP)", "ap",
              preprocess="thingsvision"),
        _timm("mae-vit-l16", "vit_large_patch16_224.mae", "MAE ViT-L/16 (probed on AP)", "ap",
              preprocess="thingsvision"),
    ]
}


def list_models() -> list[ModelSpec]:
    return list(MODELS.values())


def models() -> list[dict[str, Any]]:
    """`featcache models`: the registry as rows (any other timm/open_clip ViT by prefix)."""
    return [{"name": s.name, "backend": s.backend, "arch": s.arch, "pretrained": s.pretrained,
             "probe_token": s.probe_token, "description": s.description}
            for s in list_models()]


def resolve_model(name: str, model_kwargs: dict[str, Any] | None = None) -> ModelSpec:
    """A registry name, `timm:ARCH[.TAG]` or `open_clip:ARCH[:PRETRAINED]` → a spec."""
    extra = dict(model_kwargs or {})
    if name in MODELS:
        spec = MODELS[name]
        return replace(spec, kwargs={**spec.kwargs, **extra})
    if name.startswith("timm:"):
        arch = name[5:]
        _check_timm_arch(arch)
        return ModelSpec(name, "timm", arch, None, extra, "ap" if ".mae" in arch else "cls")
    if name.startswith("open_clip:"):
        parts = name.split(":")
        if len(parts) not in (2, 3) or not parts[1]:
            raise FeatcacheError(f"bad open_clip model name {name!r}: use "
                                 "open_clip:ARCH[:PRETRAINED], e.g. open_clip:ViT-B-16:openai")
        _check_open_clip_arch(parts[1])
        return ModelSpec(name, "open_clip", parts[1], parts[2] if len(parts) == 3 else None, extra)
    close = difflib.get_close_matches(name, list(MODELS), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise FeatcacheError(f"unknown model {name!r}.{hint} See `featcache models`, or use "
                         "timm:NAME or open_clip:ARCH:PRETRAINED.")


def _check_timm_arch(arch: str) -> None:
    import timm

    base = arch.split(".")[0]
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models("vit*"), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise FeatcacheError(f"timm has no model {base!r}.{hint}")


def _check_open_clip_arch(arch: str) -> None:
    import open_clip

    if arch.startswith(("hf-hub:", "local-dir:")):
        return
    names = open_clip.list_models()
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise FeatcacheError(f"open_clip has no architecture {arch!r}.{hint}")


def parse_weights(weights: str | None) -> tuple[str, Any]:
    """`None`/"hub" → pretrained from the hub; "random[:SEED]"; or a local file path."""
    if weights in (None, "", "hub", "pretrained"):
        return "hub", None
    if weights == "random" or weights.startswith("random:"):
        seed_text = weights.partition(":")[2] or "0"
        try:
            return "random", int(seed_text)
        except ValueError:
            raise FeatcacheError(f"bad --weights {weights!r}: use random or random:SEED") from None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FeatcacheError(f"--weights {weights}: no such file (give a checkpoint path, "
                             "'random[:SEED]', or leave it out for the hub weights)")
    return "file", path.resolve()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Backbone(nn.Module):
    """A frozen ViT with hooks at the tap points; `tokens()` returns per-layer CLS and AP.

    Layers are `block0 … block{L-1}` (the tap inside/after each block) and `final`
    (the model's own normed output; for CLIP after `ln_post` and the projection).
    """

    def __init__(self, spec: ModelSpec, model: nn.Module, tap: str, weights_id: str,
                 transform: Callable, preprocess: dict[str, Any]) -> None:
        super().__init__()
        if tap not in TAPS:
            raise FeatcacheError(f"unknown tap {tap!r}: choose one of {', '.join(TAPS)}")
        self.spec = spec
        self.model = model.eval().requires_grad_(False)
        self.tap = tap
        self.weights_id = weights_id
        self.transform = transform
        self.preprocess = preprocess
        # (CLS, AP) per tapped block while `tokens()` runs; None otherwise, so that a forward
        # called on `self.model` directly records (and keeps) nothing.
        self._taps: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._setup()
        self.layer_names = [f"block{i}" for i in range(self.n_blocks)] + ["final"]
        self.layer_dims = [self.width] * self.n_blocks + [self.final_dim]
        self.dim = max(self.layer_dims)

    # Subclasses define _setup (hooks, n_blocks, width, final_dim, n_prefix, n_tokens)
    # and _run (the forward that returns the normed, projected output tokens).
    def _setup(self) -> None:
        raise NotImplementedError

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _register(self, module: nn.Module) -> None:
        """Hook a tap point. The hook holds the backbone weakly: no reference cycle, so a
        dropped backbone (and its weights) is freed at once, not at the next GC pass."""
        owner = weakref.ref(self)

        def hook(mod: nn.Module, inputs: Any, output: Any) -> None:
            backbone = owner()
            if backbone is not None:
                backbone._hook(mod, inputs, output)

        module.register_forward_hook(hook)

    def _hook(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        if self._taps is None:
            return
        out = output[0] if isinstance(output, tuple) else output
        # Reduced at once: only (B, D) pairs outlive the block, not (B, T, D) activations.
        self._taps.append(self._reduce(self._batch_first(out)))

    def _batch_first(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _reduce(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLS = first token; AP = mean over patch tokens only (no CLS, no registers).

        The mean is taken in float32 whatever the compute dtype (a bf16 mean over 196 tokens
        would lose the precision the fp16 cache keeps).
        """
        return x[:, 0].float(), x[:, self.n_prefix:].float().mean(dim=1)

    @torch.inference_mode()
    def tokens(self, images: torch.Tensor, all_tokens: bool = False) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) → cls, ap: (B, n_layers, dim) zero-padded; last: (B, T, final_dim)."""
        self._taps = []
        try:
            final = self._run(images)
            pairs = self._taps
        finally:
            self._taps = None
        if len(pairs) != self.n_blocks:
            raise RuntimeError(f"expected {self.n_blocks} tapped blocks, got {len(pairs)}")
        final_cls, final_ap, final_tokens = self._final(final)
        pairs.append((final_cls, final_ap))
        out = {
            "cls": torch.stack([_pad(c, self.dim) for c, _ in pairs], 1),
            "ap": torch.stack([_pad(a, self.dim) for _, a in pairs], 1),
        }
        if all_tokens:
            out["last"] = final_tokens.float()
        return out

    def _final(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The final layer's CLS, AP and all tokens, from the model's normed output."""
        cls, ap = self._reduce(x)
        return cls, ap, x

    def describe(self) -> dict[str, Any]:
        """What the fingerprint records about the model."""
        return {
            "model": self.spec.name,
            "backend": self.spec.backend,
            "arch": self.spec.arch,
            "pretrained": self.spec.pretrained,
            "model_kwargs": self.spec.kwargs,
            "weights": self.weights_id,
            "tap": self.tap,
            "preprocess": self.preprocess,
            **({"pos_embed": pos} if (pos := getattr(self.model, "featcache_pos_embed", None))
               else {}),
            "layer_names": self.layer_names,
            "layer_dims": self.layer_dims,
            "n_prefix_tokens": self.n_prefix,
            "n_tokens": self.n_tokens,
        }


def _pad(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Zero-pad the feature axis to `dim` (CLIP's projected final layer is narrower)."""
    if x.shape[-1] == dim:
        return x
    return torch.nn.functional.pad(x, (0, dim - x.shape[-1]))


class TimmBackbone(Backbone):
    def _setup(self) -> None:
        m = self.model
        if not getattr(m, "has_class_token", getattr(m, "cls_token", None) is not None):
            raise FeatcacheError(f"{self.spec.name} has no CLS token; featcache caches CLS+AP per "
                                 "layer and needs a ViT with a class token")
        self.n_blocks = len(m.blocks)
        self.width = m.embed_dim
        self.final_dim = m.embed_dim
        self.n_prefix = int(m.num_prefix_tokens)
        grid = m.patch_embed.grid_size
        self.n_tokens = self.n_prefix + int(grid[0]) * int(grid[1])
        for block in m.blocks:
            self._register(block.norm2 if self.tap == "reference" else block)
        # Models pooled by `avg` keep `norm` as Identity and normalise after pooling.
        self._post_norm = m.fc_norm if isinstance(m.norm, nn.Identity) else nn.Identity()

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(images)

    def _final(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if isinstance(self._post_norm, nn.Identity):
            return super()._final(x)
        cls, ap = self._reduce(x)
        return self._post_norm(cls), self._post_norm(ap), self._post_norm(x)


class OpenClipBackbone(Backbone):
    def _setup(self) -> None:
        v = self.model
        if getattr(v, "attn_pool", None) is not None:
            raise FeatcacheError(f"{self.spec.name}: open_clip towers with attentional pooling "
                                 "are not supported (no single CLS token)")
        resblocks = v.transformer.resblocks
        self.n_blocks = len(resblocks)
        self.width = v.transformer.width
        self.final_dim = v.proj.shape[1] if v.proj is not None else self.width
        self.n_prefix = 1
        self.n_tokens = 1 + int(v.grid_size[0]) * int(v.grid_size[1])
        self._lnd = not getattr(v.transformer, "batch_first", True)
        for block in resblocks:
            self._register(block.ln_2 if self.tap == "reference" else block)

    def _batch_first(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1) if self._lnd else x

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        v = self.model
        x = v._embeds(images)
        x = v.transformer(x)
        x = v.ln_post(x)
        return x @ v.proj if v.proj is not None else x


def create_backbone(name: str, weights: str | None = None, tap: str = "reference",
                    model_kwargs: dict[str, Any] | None = None) -> Backbone:
    """The one entry point: build the model, its preprocessing and its tap hooks."""
    if tap not in TAPS:
        raise FeatcacheError(f"unknown tap {tap!r}: choose one of {', '.join(TAPS)}")
    spec = resolve_model(name, model_kwargs)
    kind, value = parse_weights(weights)
    if spec.backend == "timm":
        model, weights_id = _build_timm(spec, kind, value)
        _check_timm_model(spec, model, tap)
        if spec.run_size is not None and "img_size" not in spec.kwargs:
            resize_pos_embed_like_dinov2_hub(model, spec.run_size)
        transform, preprocess = (thingsvision_preprocess() if spec.preprocess == "thingsvision"
                                 else _timm_preprocess(model))
        return TimmBackbone(spec, model, tap, weights_id, transform, preprocess)
    model, weights_id = _build_open_clip(spec, kind, value)
    _check_open_clip_model(spec, model)
    transform, preprocess = _open_clip_preprocess(model)
    return OpenClipBackbone(spec, model, tap, weights_id, transform, preprocess)


def _check_timm_model(spec: ModelSpec, model: nn.Module, tap: str) -> None:
    """Refuse, with one clear line, what the hooks cannot read correctly."""
    if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
        raise FeatcacheError(f"{spec.name}: not a plain timm ViT (no blocks/patch_embed); "
                             "featcache supports VisionTransformer-style models")
    if tap == "reference":
        from timm.models import vision_transformer as vt

        odd = [type(b).__name__ for b in model.blocks
               if not hasattr(b, "norm2") or isinstance(b, (vt.ResPostBlock,
                                                            vt.ParallelThingsBlock))]
        if odd:
            raise FeatcacheError(f"{spec.name}: its blocks ({odd[0]}) have no pre-MLP norm2 to "
                                 "tap; use --tap residual")


def _check_open_clip_model(spec: ModelSpec, visual: nn.Module) -> None:
    if not hasattr(visual, "transformer") or not hasattr(visual, "ln_post"):
        raise FeatcacheError(f"{spec.name}: its image tower ({type(visual).__name__}) is not "
                             "open_clip's VisionTransformer; for a timm tower use timm:NAME")


def _hub_error(spec: ModelSpec, exc: Exception, offline: str | None) -> FeatcacheError:
    fix = "go online once, or pass --weights PATH (a local checkpoint) or --weights random"
    if offline is not None:
        return FeatcacheError(f"could not load the hub weights of {spec.name}: the hub is out "
                              f"of reach ({offline}) and they are not in the local cache; {fix}")
    return FeatcacheError(
        f"could not load the hub weights of {spec.name} ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); {fix}")


def _kwargs_error(spec: ModelSpec, exc: Exception) -> FeatcacheError:
    text = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return FeatcacheError(f"{spec.name}: the architecture does not accept --model-arg "
                          f"{_kwargs_text(spec.kwargs)} ({text})")


def _kwargs_text(kwargs: dict[str, Any]) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in kwargs.items()) or "(none)"


def _hub_revision(repo_id: str | None, filenames: tuple[str, ...]) -> str | None:
    """The commit of a hub file already in the local HF cache (best effort, offline)."""
    if not repo_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        for filename in filenames:
            found = try_to_load_from_cache(repo_id.strip("/"), filename)
            if isinstance(found, str):
                parts = Path(found).parts
                if "snapshots" in parts:
                    return parts[parts.index("snapshots") + 1]
    except Exception:  # any problem here only loses the revision, never the weights
        return None
    return None


def _build_timm(spec: ModelSpec, kind: str, value: Any) -> tuple[nn.Module, str]:
    import timm

    kwargs = {"num_classes": 0, **spec.kwargs}

    def build(pretrained: bool) -> nn.Module:
        try:
            return timm.create_model(spec.arch, pretrained=pretrained, **kwargs)
        except (TypeError, ValueError, AssertionError) as exc:
            if spec.kwargs:
                raise _kwargs_error(spec, exc) from None
            raise

    if kind == "random":
        with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's RNG
            torch.manual_seed(value)
            return build(False), f"random:{value}"
    if kind == "file":
        model = build(False)
        _load_state(model, value)
        return model, f"file:sha256:{file_sha256(value)}"
    with hub_access() as offline:
        try:
            model = build(True)
        except FeatcacheError:
            raise
        except Exception as exc:  # network, missing weights: many exception types
            raise _hub_error(spec, exc, offline) from None
    hub_id = model.pretrained_cfg.get("hf_hub_id")
    revision = _hub_revision(hub_id, ("model.safetensors", "pytorch_model.bin",
                                      "open_clip_model.safetensors"))
    ident = hub_id or spec.arch
    return model, f"hub:{ident}" + (f"@{revision}" if revision else "")


def _read_state(path: Path) -> dict[str, Any]:
    """A state dict from a safetensors or torch file; anything else is a clear error."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FeatcacheError(f"--weights {path}: not a readable checkpoint (a safetensors "
                             f"file or a torch state dict): {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:120] if str(exc) else ''}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FeatcacheError(f"--weights {path}: holds no state dict of tensors")
    return state


def _load_state(model: nn.Module, path: Path) -> None:
    """Load a checkpoint (safetensors or torch) holding the model's state dict."""
    state = _read_state(path)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise FeatcacheError(f"--weights {path}: does not fit this architecture "
                             f"({str(exc).splitlines()[0][:200]})") from None
    head_only = all(k.startswith(("head.", "fc_norm.")) for k in missing)
    if (missing and not head_only) or (unexpected and not all(
            k.startswith("head.") for k in unexpected)):
        raise FeatcacheError(f"--weights {path}: does not fit this architecture "
                             f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")


def _build_open_clip(spec: ModelSpec, kind: str, value: Any) -> tuple[nn.Module, str]:
    import logging

    import open_clip

    kwargs = dict(spec.kwargs)

    def build(pretrained: str | None) -> nn.Module:
        try:
            return open_clip.create_model(spec.arch, pretrained=pretrained, **kwargs)
        except (TypeError, ValueError, KeyError, AssertionError) as exc:
            if kwargs:
                raise _kwargs_error(spec, exc) from None
            raise

    schema = spec.arch.startswith(("hf-hub:", "local-dir:"))
    if kind == "random":
        # open_clip logs a warning that the model is random: here that is the point.
        quiet = logging.getLogger()
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(value)
                model = build(None)
        finally:
            quiet.setLevel(level)
        weights_id = f"random:{value}"
    elif kind == "file":
        try:
            model = build(str(value))
        except FeatcacheError:
            raise
        except Exception as exc:
            raise FeatcacheError(f"--weights {value}: open_clip could not load it as a whole "
                                 f"CLIP checkpoint ({str(exc).splitlines()[0][:200]})") from None
        weights_id = f"file:sha256:{file_sha256(value)}"
    else:
        if not spec.pretrained and not schema:
            raise FeatcacheError(f"{spec.name}: no pretrained tag; use open_clip:ARCH:PRETRAINED"
                                 " or --weights")
        with hub_access() as offline:
            try:
                model = build(None if schema else spec.pretrained)
            except FeatcacheError:
                raise
            except Exception as exc:
                raise _hub_error(spec, exc, offline) from None
        weights_id = f"hub:open_clip:{spec.arch}" + (f":{spec.pretrained}" if not schema else "")
        revision = _open_clip_revision(spec)
        if revision:
            weights_id += f"@{revision}"
    return model.visual, weights_id


def _open_clip_revision(spec: ModelSpec) -> str | None:
    try:
        import open_clip

        if spec.arch.startswith("hf-hub:"):
            repo = spec.arch.removeprefix("hf-hub:")
        else:
            repo = (open_clip.get_pretrained_cfg(spec.arch, spec.pretrained or "") or {}).get(
                "hf_hub", "")
        return _hub_revision(repo or None, ("open_clip_model.safetensors",
                                            "open_clip_pytorch_model.bin",
                                            "open_clip_config.json"))
    except Exception:
        return None


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
    return transform, _jsonable(cfg)


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


def _timm_preprocess(model: nn.Module) -> tuple[Callable, dict[str, Any]]:
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    # Architecture overrides (img_size=…) are not reflected in pretrained_cfg: trust the model.
    size = tuple(int(s) for s in model.patch_embed.img_size)
    cfg["input_size"] = (3, *size)
    transform = timm.data.create_transform(**cfg, is_training=False)
    return transform, _jsonable(cfg)


def _open_clip_preprocess(visual: nn.Module) -> tuple[Callable, dict[str, Any]]:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = dict(getattr(visual, "preprocess_cfg", {}) or {})
    cfg["size"] = tuple(int(s) for s in visual.image_size)
    pp = PreprocessCfg(**{k: v for k, v in cfg.items() if k in PreprocessCfg.__dataclass_fields__})
    transform = image_transform_v2(pp, is_train=False)
    return transform, _jsonable(asdict(pp))


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))
