"""Backbones: one registry of short names, one `create_backbone` entry point, one API.

Every backbone, whatever library builds it, answers the same questions (the contract in
`featcache.backbones.base`): how to preprocess an image, which layers it has and how wide
they are, and `tokens(images)`, the CLS and average-pooled patch (AP) token of every
layer, reduced on the device. timm and open_clip are the built-in backends; plugins add
others with `register_backend`, and models with `register_model`.
"""

from __future__ import annotations

from typing import Any

from featcache.backbones.spec import (
    TAPS,
    ModelSpec,
    backend_class,
    models,
    parse_weights,
    register_backend,
    register_model,
    resolve_model,
)
from featcache.registry import BACKENDS

__all__ = ["TAPS", "ModelSpec", "create_backbone", "models", "parse_weights",
           "register_backend", "register_model", "resolve_model"]

# featcache's own backends, imported when first used
BACKENDS.add("timm", "featcache.backbones.timm_backend:TimmBackbone")
BACKENDS.add("open_clip", "featcache.backbones.open_clip_backend:OpenClipBackbone")


def create_backbone(name: str, weights: str | None = None, tap: str = "reference",
                    model_kwargs: dict[str, Any] | None = None) -> Any:
    """The one entry point: build the model, its preprocessing and its tap hooks.

    ``name``: a registry name (`featcache models`) or `BACKEND:ARCH[:TAG]`; ``weights``:
    the hub's (None), a checkpoint path, or `random[:SEED]`. The result's `.transform` is
    what images go through, `.tokens(images)` the per-layer CLS and AP."""
    from featcache.backbones.spec import check_tap

    check_tap(tap)
    spec = resolve_model(name, model_kwargs)
    kind, value = parse_weights(weights)
    return backend_class(spec.backend).create(spec, kind, value, tap)
