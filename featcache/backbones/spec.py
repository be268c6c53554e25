"""Model names → specs: the registry entries, their resolution, and the weights argument.

Light on purpose (no torch, timm or open_clip at import): `featcache models` lists names
without loading a library. A spec says which backend builds the model, with which
architecture, weights tag and preprocessing; `featcache.backbones.create_backbone` turns
it into a tapped model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from featcache.errors import FeatcacheError
from featcache.registry import BACKENDS, MODELS, resolve

TAPS = ("reference", "residual")


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: which backend builds it, with which architecture and weights."""

    name: str
    backend: str  # a registered backend: "timm", "open_clip", or a plugin's
    arch: str
    pretrained: str | None = None  # open_clip pretrained tag (timm's tag is in `arch`)
    kwargs: dict[str, Any] = field(default_factory=dict)
    # the token the linear baseline reads (AP for MAE); None: the model's own embedding
    probe_token: str | None = None
    description: str = ""
    # None: the backend's own preprocessing (timm's data config, open_clip's transform);
    # "thingsvision": the authors' transform for DINOv2 and MAE (backbones/preprocess.py)
    preprocess: str | None = None
    # Run at this size by interpolating the position embeddings once, the way DINOv2's own
    # torch-hub model does at run time (the authors' source); None: the model's size
    run_size: int | None = None
    paper_id: str | None = None  # the model's id in the paper's result tables
    extension: bool = False  # a registry entry beyond the paper's models
    token_kinds: tuple[str, ...] | None = None  # what its cache holds (None: known once built)


def register_model(name: str, target: str | ModelSpec, *, description: str = "",
                   probe_token: str | None = None, preprocess: str | None = None,
                   replace_existing: bool = False, **kwargs: Any) -> ModelSpec:
    """Give a model a registry name: `register_model("my-vit", "timm:vit_small_patch16_224
    .augreg_in21k", description=...)`. ``target`` is any name `create_backbone` accepts
    (`timm:NAME`, `open_clip:ARCH:TAG`, a plugin backend's `NAME:ARCH`) or a `ModelSpec`;
    ``kwargs`` are architecture overrides (as `--model-arg`)."""
    if isinstance(target, ModelSpec):
        spec = replace(target, name=name)
    else:
        base = parse_model_name(target)
        spec = replace(base, name=name, kwargs={**base.kwargs, **kwargs})
    changes: dict[str, Any] = {"extension": True}
    if description:
        changes["description"] = description
    if probe_token is not None:
        changes["probe_token"] = probe_token
    if preprocess is not None:
        changes["preprocess"] = preprocess
    return MODELS.add(name, replace(spec, **changes), replace=replace_existing)


def register_backend(name: str, backend: Any, replace_existing: bool = False) -> Any:
    """Make `NAME:ARCH[:TAG]` model names work through a `featcache.backbones.Backbone`
    subclass (see docs/extending.md for the contract)."""
    return BACKENDS.add(name, backend, replace=replace_existing)


def backend_class(name: str) -> Any:
    return resolve(BACKENDS.get(name))


def parse_model_name(name: str, model_kwargs: dict[str, Any] | None = None) -> ModelSpec:
    """`BACKEND:ARCH[:TAG]` (timm's tag goes in ARCH: `timm:vit_b16.augreg`) → a spec,
    checked by its backend. Registry names are resolved by `resolve_model`."""
    prefix, sep, rest = name.partition(":")
    if not sep or prefix not in BACKENDS:
        raise MODELS.unknown(name, extra=tuple(f"{b}:" for b in BACKENDS.names()))
    cls = backend_class(prefix)
    arch, pretrained = cls.split_name(rest, name)
    cls.check_arch(arch)
    return ModelSpec(name, prefix, arch, pretrained, dict(model_kwargs or {}),
                     cls.default_probe_token(arch))


def resolve_model(name: str, model_kwargs: dict[str, Any] | None = None) -> ModelSpec:
    """A registry name or `BACKEND:ARCH[:TAG]` → a spec, with architecture overrides."""
    extra = dict(model_kwargs or {})
    spec = MODELS.find(name)
    if spec is not None:
        return replace(spec, kwargs={**spec.kwargs, **extra})
    if ":" in name:
        return parse_model_name(name, extra)
    raise FeatcacheError(f"{MODELS.unknown(name)} Or use timm:NAME or "
                         "open_clip:ARCH:PRETRAINED.")


def models() -> list[dict[str, Any]]:
    """`featcache models`: the registry as rows (any other timm/open_clip ViT by prefix)."""
    return [{"name": s.name, "backend": s.backend, "arch": s.arch, "pretrained": s.pretrained,
             "probe_token": s.probe_token, "token_kinds": list(s.token_kinds or ()) or None,
             "description": s.description, "paper": s.paper_id is not None,
             "extension": s.extension}
            for _, s in MODELS.items()]


def parse_weights(weights: str | None) -> tuple[str, Any]:
    """`None`/"hub" → pretrained from the hub; "random[:SEED]"; or a local file path."""
    if weights in (None, "", "hub", "pretrained"):
        return "hub", None
    if weights == "random" or weights.startswith("random:"):
        seed_text = weights.partition(":")[2] or "0"
        try:
            seed = int(seed_text)
        except ValueError:
            seed = -1
        if not 0 <= seed < 2**63:  # torch's seeds are 64-bit
            raise FeatcacheError(f"bad --weights {weights!r}: use random or random:SEED, SEED "
                                 "a whole number from 0 to 2**63 - 1")
        return "random", seed
    path = Path(weights).expanduser()
    if path.is_dir():
        raise FeatcacheError(f"--weights {weights} is a folder; give the checkpoint file")
    if not path.is_file():
        raise FeatcacheError(f"--weights {weights}: no such file (give a checkpoint path, "
                             "'random[:SEED]', or leave it out for the hub weights)")
    return "file", path.resolve()


def check_tap(tap: str) -> None:
    if tap not in TAPS:
        raise FeatcacheError(f"unknown tap {tap!r}: choose one of {', '.join(TAPS)}")
