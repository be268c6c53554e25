"""The stacked-heads base: many hyperparameter configs along a leading config axis.

Every parameter of a stacked head has shape ``(G, ...)``: config ``g`` owns slice ``[g]``
and nothing else. All configs read the same input batch, so a whole grid of probes is
trained in one pass over the cache (the DINOv2 linear-eval idea, extended here to the
attentive head of the paper). Because no operation mixes configs, the gradient of
``loss = sum_g loss_g`` w.r.t. config g's slice is exactly the gradient config g would
get alone.

A head kind (a subclass registered in `featcache.probing.heads.HEADS`) also owns what the
trainer needs to know about it: whether its grid has a dropout axis, how its input must
look, how to build a group of configs, and what a training step costs in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn


def uniform(shape: Sequence[int], bound: float, gen: torch.Generator | None) -> Tensor:
    """U(-bound, bound) on CPU in float32, the nn.Linear init, from an explicit generator."""
    return (torch.rand(tuple(shape), generator=gen) * 2 - 1) * bound


class StackedHeads(nn.Module):
    """Shared plumbing: config selection/concatenation and per-config export/import; and
    the head kind's answers to the trainer (`has_dropout`, `check_input`, `memory`,
    `build_group`)."""

    has_dropout: ClassVar[bool] = False  # the grid has an attention-dropout axis

    @property
    def any_dropout(self) -> bool:
        """Whether any config of this stack drops anything (its masks are drawn)."""
        return False

    @classmethod
    def check_input(cls, shape: Sequence[int], inputs: Sequence[int] | None,
                    plain: bool) -> bool:
        """Refuse features of the wrong shape (``shape`` per sample; ``plain``: a tensor
        rather than a FeatureSource). Returns whether batches are flattened."""
        raise NotImplementedError

    @classmethod
    def memory(cls, shape: Sequence[int], n_classes: int, batch_size: int,
               num_heads: int | None, device: torch.device | str | None,
               inputs: Sequence[int] | None = None) -> tuple[int, int]:
        """Training bytes of a step: (per config, shared by a group)."""
        raise NotImplementedError

    @classmethod
    def build_group(cls, configs: Sequence[int], points: Sequence[dict], shape: Sequence[int],
                    n_classes: int, num_heads: int | None, inputs: Sequence[int] | None,
                    generator: torch.Generator, device: torch.device | str,
                    widths: Sequence[int] | None = None) -> StackedHeads:
        """A stacked head for configs ``configs`` of the grid ``points`` (``widths``: each
        token's true width, `featcache.probing.tokens.features.token_widths`)."""
        raise NotImplementedError

    # export name -> attribute name of the stacked tensor (leading config axis)
    _KEYS: dict[str, str] = {}
    # export names whose single-config shape gets an extra leading 1 (the query)
    _KEEP_LEADING: frozenset[str] = frozenset()
    # constructor arguments that are lists with one entry per config
    _PER_CONFIG: tuple[str, ...] = ()

    n_configs: int

    def _ctor_kwargs(self) -> dict:
        raise NotImplementedError

    def _stacked(self, attr: str) -> Tensor:
        return getattr(self, attr)

    def export(self, g: int) -> dict[str, Tensor]:
        """Config g alone as a plain state dict (contiguous copies; safetensors-ready)."""
        out = {}
        for key, attr in self._KEYS.items():
            t = self._stacked(attr)[g].detach().clone().contiguous()
            if key in self._KEEP_LEADING:
                t = t.unsqueeze(0)
            out[key] = t
        return out

    @torch.no_grad()
    def load_config(self, g: int, state: dict[str, Tensor]) -> None:
        """Write a single-config state dict (the ``export`` format) into slice g."""
        missing = set(self._KEYS) - set(state)
        if missing:
            raise KeyError(f"state dict lacks {sorted(missing)}")
        for key, attr in self._KEYS.items():
            dst = self._stacked(attr)[g]
            dst.copy_(state[key].reshape(dst.shape))

    @torch.no_grad()
    def select(self, indices: Sequence[int]) -> StackedHeads:
        """A new stacked head holding only the given configs (copies)."""
        idx = list(indices)
        kwargs = self._ctor_kwargs()
        kwargs["n_configs"] = len(idx)
        for key in self._PER_CONFIG:
            if kwargs.get(key) is not None:
                kwargs[key] = [kwargs[key][i] for i in idx]
        ref = next(iter(self.parameters()))
        # a throwaway generator: building the shell must not advance the global RNG
        new = type(self)(**kwargs, generator=torch.Generator(), device=ref.device).to(ref.dtype)
        src = self.state_dict()
        new.load_state_dict({k: v[idx] for k, v in src.items()})
        return new

    @classmethod
    @torch.no_grad()
    def concat(cls, parts: Sequence[StackedHeads]) -> StackedHeads:
        """Stack several heads of the same shape into one (configs in the given order)."""
        if len(parts) == 1:
            return parts[0]
        kwargs = parts[0]._ctor_kwargs()
        kwargs["n_configs"] = sum(p.n_configs for p in parts)
        for key in cls._PER_CONFIG:
            if kwargs.get(key) is not None:
                kwargs[key] = [v for p in parts for v in p._ctor_kwargs()[key]]
        ref = next(iter(parts[0].parameters()))
        new = cls(**kwargs, generator=torch.Generator(), device=ref.device).to(ref.dtype)
        states = [p.state_dict() for p in parts]
        new.load_state_dict({k: torch.cat([s[k] for s in states]) for k in states[0]})
        return new


