"""Linear heads: G independent `Linear(d_in, n_classes)` probes stacked on a config axis."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from featcache.probing.heads.matmul import config_mm
from featcache.probing.heads.stacked import StackedHeads, uniform


class LinearHeads(StackedHeads):
    """G independent ``Linear(d_in, n_classes)`` probes reading the same features.

    Every config starts from the same init (drawn once from ``generator``), so a config's
    result does not depend on where it sits in the grid.

    ``inputs`` (one token index per config) makes the configs read different tokens of a
    (B, T, d_in) input: config g is a linear probe of token ``inputs[g]``. That is how the
    per-layer probes (`layers`) train every layer's whole grid in one pass: layers ×
    hyperparameters as the config axis. Configs stored token by token in equal runs
    (the usual layout) take one batched matmul; any other order gathers per config.

    ``widths`` (one per token, `featcache.probing.tokens.features.token_widths`) reads tokens
    narrower
    than D (CLIP's projected final layer) at their true width, as the authors' feature
    combiner concatenates them: the padding channels are masked out of the input (so
    jitter noise there never reaches the head), their weights start and stay at zero, and
    the init bound is 1/sqrt(true fan-in).
    """

    _KEYS = {"weight": "weight", "bias": "bias"}
    _PER_CONFIG = ("inputs",)

    def __init__(
        self,
        n_configs: int,
        d_in: int,
        n_classes: int,
        inputs: Sequence[int] | None = None,
        *,
        widths: Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.n_configs, self.d_in, self.n_classes = n_configs, d_in, n_classes
        self.inputs = None if inputs is None else [int(i) for i in inputs]
        if self.inputs is not None and len(self.inputs) != n_configs:
            raise ValueError(f"need one input index per config ({n_configs}), "
                             f"got {len(self.inputs)}")
        self._runs = _equal_runs(self.inputs) if self.inputs is not None else None
        self.widths = None if widths is None else tuple(int(w) for w in widths)
        self._masks: dict[torch.device, Tensor] = {}
        self.weight = nn.Parameter(torch.empty(n_configs, n_classes, d_in, device=device))
        self.bias = nn.Parameter(torch.empty(n_configs, n_classes, device=device))
        self.reset_parameters(generator)

    def _ctor_kwargs(self) -> dict:
        return {"n_configs": self.n_configs, "d_in": self.d_in, "n_classes": self.n_classes,
                "inputs": None if self.inputs is None else list(self.inputs),
                "widths": self.widths}

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """nn.Linear's init (U(±1/sqrt(fan-in))), the same draw copied to every config
        (scaled by each config's bound, zero on padding channels)."""
        if self.widths is None:
            bound = 1.0 / math.sqrt(self.d_in)
            w = uniform((self.n_classes, self.d_in), bound, generator)
            b = uniform((self.n_classes,), bound, generator)
            self.weight.copy_(w.expand_as(self.weight))
            self.bias.copy_(b.expand_as(self.bias))
            return
        # U(±1)·bound equals U(±bound) bit for bit (the draw times 1.0 is the draw)
        w = uniform((self.n_classes, self.d_in), 1.0, generator)
        b = uniform((self.n_classes,), 1.0, generator)
        mask = self._config_masks(torch.device("cpu"))  # (G, d_in)
        bounds = mask.sum(1).rsqrt().view(-1, 1, 1)  # (G, 1, 1): 1/sqrt(true fan-in)
        self.weight.copy_(torch.where(mask.unsqueeze(1) > 0, w * bounds, 0.0))
        self.bias.copy_(b * bounds.view(-1, 1))

    def _token_masks(self, device: torch.device) -> Tensor:
        """(T, D) float: 1 on a token's true channels, 0 on its padding."""
        D = self.d_in if self.inputs is not None else self.d_in // len(self.widths or (1,))
        widths = torch.tensor(self.widths, device=device).view(-1, 1)
        return (torch.arange(D, device=device).view(1, -1) < widths).float()

    def _config_masks(self, device: torch.device) -> Tensor:
        """(G, d_in): the channels each config reads."""
        tokens = self._token_masks(device)
        if self.inputs is None:
            return tokens.reshape(1, -1).expand(self.n_configs, -1)
        return tokens.index_select(0, torch.tensor(self.inputs, device=device))

    def _mask(self, device: torch.device) -> Tensor:
        """The input mask, made once per device: (d_in,) for flattened tokens, (T, D, 1)
        for configs reading one token each."""
        if device not in self._masks:
            tokens = self._token_masks(device)
            self._masks[device] = tokens.reshape(-1) if self.inputs is None else \
                tokens.unsqueeze(2)
        return self._masks[device]

    def forward(self, x: Tensor, **_: object) -> Tensor:
        """x (B, d_in) (or (B, T, d_in) with ``inputs``) → logits (G, B, C)."""
        G, C, D = self.n_configs, self.n_classes, self.d_in
        if x.device.type == "cpu":  # one product per config: no bits depend on G
            return self._per_config(x)
        if self.inputs is not None:
            if x.dim() != 3 or x.shape[2] != D or max(self.inputs) >= x.shape[1]:
                raise ValueError(f"expected (B, >{max(self.inputs)}, {D}) input, "
                                 f"got {tuple(x.shape)}")
            x = x.to(self.weight.dtype)
            masks = None if self.widths is None else self._mask(x.device)  # (T, D, 1)
            if self._runs is not None:  # tokens t0..t0+L-1, each read by G/L configs in a row
                t0, L = self._runs
                w = self.weight.view(L, (G // L) * C, D)
                b = self.bias.view(L, (G // L) * C, 1)
                xs = x[:, t0 : t0 + L].permute(1, 2, 0)  # (L, D, B)
                xs = xs if masks is None else xs * masks[t0 : t0 + L]
            else:
                w, b = self.weight, self.bias.unsqueeze(2)
                index = self._input_index(x.device)
                xs = x.index_select(1, index).permute(1, 2, 0)  # (G, D, B)
                xs = xs if masks is None else xs * masks.index_select(0, index)
            return torch.baddbmm(b, w, xs).view(G, C, -1).transpose(1, 2)
        if x.dim() != 2 or x.shape[1] != D:
            raise ValueError(f"expected (B, {D}) input, got {tuple(x.shape)}")
        x = x.to(self.weight.dtype)
        if self.widths is not None:  # padding channels (and any jitter there) read as 0
            x = x * self._mask(x.device)
        # (G·C, B) in memory, returned as a (G, B, C) view: a softmax over C is slow along a
        # short contiguous axis on CPU (10x for C = 10) and fast along the long B axis
        out = torch.addmm(self.bias.reshape(G * C, 1), self.weight.reshape(G * C, D), x.t())
        return out.view(G, C, -1).transpose(1, 2)


    def _per_config(self, x: Tensor) -> Tensor:
        """The CPU form (`config_mm`): config g's logits (C, B) from its own matmul."""
        D = self.d_in
        if self.inputs is None:
            if x.dim() != 2 or x.shape[1] != D:
                raise ValueError(f"expected (B, {D}) input, got {tuple(x.shape)}")
            x = x.to(self.weight.dtype)
            if self.widths is not None:  # padding channels (and any jitter there) read as 0
                x = x * self._mask(x.device)
            xs = x.t().unsqueeze(0)  # (1, D, B), shared
            return config_mm(self.weight, xs, self.bias).transpose(1, 2)
        if x.dim() != 3 or x.shape[2] != D or max(self.inputs) >= x.shape[1]:
            raise ValueError(f"expected (B, >{max(self.inputs)}, {D}) input, "
                             f"got {tuple(x.shape)}")
        xs = x.to(self.weight.dtype).permute(1, 2, 0)  # (T, D, B) views
        if self.widths is not None:  # each token's padding channels read as 0
            xs = xs * self._mask(x.device)
        return config_mm(self.weight, xs, self.bias, self.inputs).transpose(1, 2)

    @classmethod
    def check_input(cls, shape: Sequence[int], inputs: Sequence[int] | None,
                    plain: bool) -> bool:
        if inputs is not None:
            if len(shape) != 2 or not all(0 <= int(i) < shape[0] for i in inputs):
                raise ValueError(f"inputs need (N, T, D) features with token indices < T, "
                                 f"got samples of shape {tuple(shape)}")
            return False
        if len(shape) != 1 and (plain or len(shape) != 2):
            raise ValueError(f"linear head needs x of 2 dims, got samples of shape "
                             f"{tuple(shape)}")
        return len(shape) == 2  # a FeatureSource's (T, D) samples, read concatenated

    @staticmethod
    def _d_in(shape: Sequence[int], inputs: Sequence[int] | None) -> int:
        return int(shape[-1]) if inputs is not None else math.prod(shape)

    @classmethod
    def memory(cls, shape: Sequence[int], n_classes: int, batch_size: int,
               num_heads: int | None, device: torch.device | str | None,
               inputs: Sequence[int] | None = None) -> tuple[int, int]:
        """fp32 bytes: per config the parameters, gradients, Adam moments and a spare copy
        (5×) and the logits; shared the batch and its jitter noise (and a (B, T, D) batch
        read as a whole)."""
        B, C, d, f = batch_size, n_classes, cls._d_in(shape, inputs), 4
        params = C * d + C
        shared = 3 * B * d
        if len(shape) == 2:
            shared += 3 * B * math.prod(shape)  # the (B, T, D) batch itself
        return f * (5 * params + 4 * B * C), f * shared

    @classmethod
    def build_group(cls, configs: Sequence[int], points: Sequence[dict], shape: Sequence[int],
                    n_classes: int, num_heads: int | None, inputs: Sequence[int] | None,
                    generator: torch.Generator, device: torch.device | str,
                    widths: Sequence[int] | None = None) -> LinearHeads:
        sub = None if inputs is None else [int(inputs[i]) for i in configs]
        return cls(len(configs), cls._d_in(shape, inputs), n_classes, sub, widths=widths,
                   generator=generator, device=device)

    def _input_index(self, device: torch.device) -> Tensor:
        """``inputs`` as an index tensor on ``device``, made once (no copy per step)."""
        cache = self.__dict__.setdefault("_index_cache", {})
        if device not in cache:
            cache[device] = torch.tensor(self.inputs, dtype=torch.long, device=device)
        return cache[device]


def _equal_runs(inputs: list[int]) -> tuple[int, int] | None:
    """(first token, number of tokens) when ``inputs`` is t0,…,t0 (k times), t0+1 (k
    times), … — consecutive tokens in equal runs; else None."""
    if not inputs:
        return None
    t0, L = inputs[0], len(set(inputs))
    k, rem = divmod(len(inputs), L)
    if rem or inputs != [t0 + i // k for i in range(len(inputs))]:
        return None
    return t0, L


