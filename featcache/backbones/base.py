"""The backend contract: every backbone, whatever library builds it, answers the same
questions in the same way.

A backend is a `Backbone` subclass registered under a name (`register_backend`); model
names `NAME:ARCH[:TAG]` and registry entries with `backend=NAME` go through it. It says
how to build a model (`build`), how to preprocess an image (`make_transform`), and, once
built, where its tap points are and how its token stream is shaped (`setup`, returning a
`Geometry`) and how to run it (`run`). The base class does the rest the same way for
every backend: hooks that reduce each tapped block to CLS and AP on the device, the final
layer, padding to one width, and the fingerprint's description.
"""

from __future__ import annotations

import abc
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from featcache.backbones.preprocess import thingsvision_preprocess
from featcache.backbones.spec import ModelSpec, check_tap
from featcache.errors import FeatcacheError


@dataclass(frozen=True)
class Geometry:
    """What `Backbone.setup` reports about the tapped model."""

    n_blocks: int  # tapped blocks (layers block0 … block{n-1}, then "final")
    width: int  # the blocks' token width
    final_dim: int  # the final layer's width (CLIP's projection: narrower)
    n_prefix: int  # tokens before the patches: CLS and registers (excluded from AP)
    n_tokens: int  # every token of the final layer
    input_size: tuple[int, int, int]  # (3, H, W) the model takes
    has_cls: bool = True  # token 0 is a class token
    # The model's own image embedding, as its authors publish it: "cls" (the final CLS),
    # "ap" (the final AP: global average pooling) or "pool" (anything else, e.g. an
    # attention pool: then stored as its own token, `pool_dim` wide)
    embedding: str = "cls"
    pool_dim: int | None = None

    @property
    def token_kinds(self) -> list[str]:
        return ["cls"] * self.has_cls + ["ap"] + ["pool"] * (self.pool_dim is not None)


class Backbone(nn.Module, abc.ABC):
    """A frozen ViT with hooks at its tap points; `tokens()` returns per-layer CLS and AP
    (CLS where the model has a class token), and the model's pooled embedding where it is
    neither (an attention pool).

    Layers are `block0 … block{L-1}` (the tap inside/after each block) and `final`
    (the model's own normed output; for CLIP after `ln_post` and the projection).
    """

    backend: ClassVar[str] = ""

    # -- what a backend defines ----------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def split_name(cls, rest: str, full: str) -> tuple[str, str | None]:
        """`ARCH[:TAG]` of a `BACKEND:ARCH[:TAG]` model name → (arch, pretrained tag)."""

    @classmethod
    def check_arch(cls, arch: str) -> None:
        """Refuse an architecture the library does not know, suggesting close names."""

    @classmethod
    def default_probe_token(cls, arch: str) -> str | None:
        """The token the linear baseline reads for an unregistered architecture (None:
        the model's own embedding, `Geometry.embedding`)."""
        return None

    @classmethod
    @abc.abstractmethod
    def build(cls, spec: ModelSpec, kind: str, value: Any) -> tuple[nn.Module, str]:
        """The model with its weights (`kind` "hub" | "random" | "file", from
        `parse_weights`), and the weights' identity for the fingerprint."""

    @classmethod
    @abc.abstractmethod
    def make_transform(cls, spec: ModelSpec, model: nn.Module
                       ) -> tuple[Callable, dict[str, Any]]:
        """The model's own preprocessing: the transform and its description (JSON)."""

    @classmethod
    def check_model(cls, spec: ModelSpec, model: nn.Module, tap: str) -> None:
        """Refuse, with one clear line, a model the hooks cannot read correctly."""

    @abc.abstractmethod
    def setup(self) -> Geometry:
        """Hook the tap points (`self.tap_module(module)` per block, in order) and report
        the token stream's geometry. `self.model` and `self.tap` are set."""

    @abc.abstractmethod
    def run(self, images: torch.Tensor) -> torch.Tensor:
        """The forward pass: the final layer's normed tokens (B, T, final_dim)."""

    def final(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """The final layer's CLS (None without one), AP and all tokens, from `run`'s
        output."""
        cls, ap = self.reduce(x)
        return cls, ap, x

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The model's pooled embedding (B, pool_dim) from `run`'s output; only called when
        `setup` reported a `pool_dim`."""
        raise NotImplementedError(f"{type(self).__name__} reports a pool but has no pooled()")

    def batch_first(self, x: torch.Tensor) -> torch.Tensor:
        """A tapped block's output as (B, T, D) (open_clip's older towers are (T, B, D))."""
        return x

    # -- the same for every backend ------------------------------------------------------
    @classmethod
    def create(cls, spec: ModelSpec, kind: str, value: Any, tap: str) -> Backbone:
        check_tap(tap)
        model, weights_id = cls.build(spec, kind, value)
        cls.check_model(spec, model, tap)
        transform, preprocess = (thingsvision_preprocess() if spec.preprocess == "thingsvision"
                                 else cls.make_transform(spec, model))
        return cls(spec, model, tap, weights_id, transform, preprocess)

    def __init__(self, spec: ModelSpec, model: nn.Module, tap: str, weights_id: str,
                 transform: Callable, preprocess: dict[str, Any]) -> None:
        super().__init__()
        check_tap(tap)
        self.spec = spec
        self.model = model.eval().requires_grad_(False)
        self.tap = tap
        self.weights_id = weights_id
        self.transform = transform
        self.preprocess = preprocess
        # (CLS, AP) per tapped block while `tokens()` runs; None otherwise, so that a forward
        # called on `self.model` directly records (and keeps) nothing.
        self._taps: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.geometry = self.setup()
        g = self.geometry
        self.n_blocks, self.width, self.final_dim = g.n_blocks, g.width, g.final_dim
        if self.n_blocks < 1:  # e.g. --model-arg depth=0: no layer to fuse, nothing to study
            raise FeatcacheError(f"{spec.name}: the model has no transformer blocks; check "
                                 "its --model-arg (depth, layers)")
        self.n_prefix, self.n_tokens, self.input_size = g.n_prefix, g.n_tokens, g.input_size
        self.has_cls, self.pool_dim, self.token_kinds = g.has_cls, g.pool_dim, g.token_kinds
        # the linear baseline's token: the registry's choice, else the model's embedding
        self.probe_token = spec.probe_token or g.embedding
        self.layer_names = [f"block{i}" for i in range(self.n_blocks)] + ["final"]
        self.layer_dims = [self.width] * self.n_blocks + [self.final_dim]
        self.dim = max(self.layer_dims)

    def tap_module(self, module: nn.Module) -> None:
        """Hook a tap point. The hook holds the backbone weakly: no reference cycle, so a
        dropped backbone (and its weights) is freed at once, not at the next GC pass."""
        owner = weakref.ref(self)

        def hook(mod: nn.Module, inputs: Any, output: Any) -> None:
            backbone = owner()
            if backbone is not None:
                backbone._hook(output)

        module.register_forward_hook(hook)

    def _hook(self, output: Any) -> None:
        if self._taps is None:
            return
        out = output[0] if isinstance(output, tuple) else output
        # Reduced at once: only (B, D) pairs outlive the block, not (B, T, D) activations.
        self._taps.append(self.reduce(self.batch_first(out)))

    def reduce(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """CLS = first token (None without a class token); AP = mean over patch tokens only
        (no CLS, no registers).

        The mean is taken in float32 whatever the compute dtype (a bf16 mean over 196 tokens
        would lose the precision the fp16 cache keeps).
        """
        cls = x[:, 0].float() if self.has_cls else None
        return cls, x[:, self.n_prefix:].float().mean(dim=1)

    @torch.inference_mode()
    def tokens(self, images: torch.Tensor, all_tokens: bool = False) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) → ap (and cls, with a class token): (B, n_layers, dim) zero-padded;
        pool (with a distinct pooled embedding): (B, 1, pool_dim); last: (B, T, final_dim)."""
        self._taps = []
        try:
            final = self.run(images)
            pairs = self._taps
        finally:
            self._taps = None
        if len(pairs) != self.n_blocks:
            raise RuntimeError(f"expected {self.n_blocks} tapped blocks, got {len(pairs)}")
        final_cls, final_ap, final_tokens = self.final(final)
        pairs.append((final_cls, final_ap))
        out = {"ap": torch.stack([_pad(a, self.dim) for _, a in pairs], 1)}
        if self.has_cls:
            out["cls"] = torch.stack([_pad(c, self.dim) for c, _ in pairs], 1)
        if self.pool_dim is not None:
            out["pool"] = self.pooled(final).float().unsqueeze(1)
        if all_tokens:
            out["last"] = final_tokens.float()
        return out

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
            # only when they differ from the paper's CLS+AP layout (fingerprints of caches
            # made before stay equal)
            **({"token_kinds": self.token_kinds, "embedding": self.geometry.embedding,
                "pool_dim": self.pool_dim} if self.token_kinds != ["cls", "ap"] else {}),
        }


def _pad(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Zero-pad the feature axis to `dim` (CLIP's projected final layer is narrower)."""
    if x.shape[-1] == dim:
        return x
    return torch.nn.functional.pad(x, (0, dim - x.shape[-1]))
