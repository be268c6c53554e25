"""Probe heads: many hyperparameter configs stacked along a leading config axis.

Every parameter of a stacked head has shape ``(G, ...)``: config ``g`` owns slice ``[g]``
and nothing else. All configs read the same input batch, so a whole grid of probes is
trained in one pass over the cache (the DINOv2 linear-eval idea, extended here to the
attentive head of the paper). Because no operation mixes configs, the gradient of
``loss = sum_g loss_g`` w.r.t. config g's slice is exactly the gradient config g would
get alone.

``AttentiveHeads`` uses the one-query fast form (see ``docs/design.md``): keys and values
are never materialised per token. ``ReferenceAttentiveHead`` is the straightforward
single-config head it must agree with; ``AttentiveHeads.export(g)`` returns a state dict
that ``ReferenceAttentiveHead.load_state_dict`` accepts, and ``load_config`` goes the
other way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LinearHeads",
    "pool_project",
    "AttentiveHeads",
    "ReferenceAttentiveHead",
    "attention_summary",
    "head_dim_for",
]

LN_EPS = 1e-5
BN_EPS = 1e-5
BN_MOMENTUM = 0.1
QUERY_INIT_STD = 0.02


def head_dim_for(dim: int, num_heads: int) -> int:
    """Per-head width of the reference probe: doubled on purpose (paper's ablation)."""
    return max(1, 2 * (dim // num_heads))


def _uniform(shape: Sequence[int], bound: float, gen: torch.Generator | None) -> Tensor:
    """U(-bound, bound) on CPU in float32, the nn.Linear init, from an explicit generator."""
    return (torch.rand(tuple(shape), generator=gen) * 2 - 1) * bound


def _bcast(v: Tensor, ndim: int) -> Tensor:
    """View a (G,) tensor as (G, 1, ..., 1) so it broadcasts over a stacked parameter."""
    return v.view((v.shape[0],) + (1,) * (ndim - 1))


class _StackedHeads(nn.Module):
    """Shared plumbing: config selection/concatenation and per-config export/import."""

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
    def select(self, indices: Sequence[int]) -> _StackedHeads:
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
    def concat(cls, parts: Sequence[_StackedHeads]) -> _StackedHeads:
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


class LinearHeads(_StackedHeads):
    """G independent ``Linear(d_in, n_classes)`` probes reading the same features.

    Every config starts from the same init (drawn once from ``generator``), so a config's
    result does not depend on where it sits in the grid.

    ``inputs`` (one token index per config) makes the configs read different tokens of a
    (B, T, d_in) input: config g is a linear probe of token ``inputs[g]``. That is how the
    per-layer probes (`layers`) train every layer's whole grid in one pass: layers ×
    hyperparameters as the config axis. Configs stored token by token in equal runs
    (the usual layout) take one batched matmul; any other order gathers per config.
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
        self.weight = nn.Parameter(torch.empty(n_configs, n_classes, d_in, device=device))
        self.bias = nn.Parameter(torch.empty(n_configs, n_classes, device=device))
        self.reset_parameters(generator)

    def _ctor_kwargs(self) -> dict:
        return {"n_configs": self.n_configs, "d_in": self.d_in, "n_classes": self.n_classes,
                "inputs": None if self.inputs is None else list(self.inputs)}

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """nn.Linear's init (U(±1/sqrt(d_in))), the same draw copied to every config."""
        bound = 1.0 / math.sqrt(self.d_in)
        w = _uniform((self.n_classes, self.d_in), bound, generator)
        b = _uniform((self.n_classes,), bound, generator)
        self.weight.copy_(w.expand_as(self.weight))
        self.bias.copy_(b.expand_as(self.bias))

    def forward(self, x: Tensor, **_: object) -> Tensor:
        """x (B, d_in) (or (B, T, d_in) with ``inputs``) → logits (G, B, C)."""
        G, C, D = self.n_configs, self.n_classes, self.d_in
        if self.inputs is not None:
            if x.dim() != 3 or x.shape[2] != D or max(self.inputs) >= x.shape[1]:
                raise ValueError(f"expected (B, >{max(self.inputs)}, {D}) input, "
                                 f"got {tuple(x.shape)}")
            x = x.to(self.weight.dtype)
            if self._runs is not None:  # tokens t0..t0+L-1, each read by G/L configs in a row
                t0, L = self._runs
                w = self.weight.view(L, (G // L) * C, D)
                b = self.bias.view(L, (G // L) * C, 1)
                xs = x[:, t0 : t0 + L].permute(1, 2, 0)  # (L, D, B)
            else:
                w, b = self.weight, self.bias.unsqueeze(2)
                xs = x.index_select(1, self._input_index(x.device)).permute(1, 2, 0)  # (G,D,B)
            return torch.baddbmm(b, w, xs).view(G, C, -1).transpose(1, 2)
        if x.dim() != 2 or x.shape[1] != D:
            raise ValueError(f"expected (B, {D}) input, got {tuple(x.shape)}")
        x = x.to(self.weight.dtype)
        # (G·C, B) in memory, returned as a (G, B, C) view: a softmax over C is slow along a
        # short contiguous axis on CPU (10x for C = 10) and fast along the long B axis
        out = torch.addmm(self.bias.reshape(G * C, 1), self.weight.reshape(G * C, D), x.t())
        return out.view(G, C, -1).transpose(1, 2)


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


class AttentiveHeads(_StackedHeads):
    """G one-query attentive probes (the paper's head) in the fast form.

    Per config: learnable query (1×D) → LN_q → W_q; LN_k/LN_v on the tokens; bias-free
    W_k, W_v; softmax attention with dropout p_g on the weights; W_o (with bias, as in the
    reference's ``nn.Linear`` projection); BatchNorm1d(D) → Linear(D, C). No residual,
    no MLP, no positional embedding.

    Fast form (exact, not an approximation): the LN normalisation x̂ is shared by LN_k, LN_v
    and all configs; only the affine differs. Keys fold into u_{g,h} = s·γ_k ⊙ W_kᵀ q
    (the β_k term is constant over tokens and cancels in softmax), so the logits are one
    matmul x̂ U. Values are pooled first and projected once:
    Σ_t a_t W_v LN_v(x_t) = W_v(γ_v ⊙ Σ_t a_t x̂_t) + (Σ_t a_t) W_v β_v, which stays exact
    after dropout (Σ_t a_t ≠ 1).

    Two facts of the reference architecture worth knowing: β_k never reaches the output
    (so here it gets no gradient at all), and without dropout β_v and the output bias only
    add a shift that the train-mode BatchNorm removes, so their gradients are rounding
    noise (in the reference head as much as here).
    """

    _KEYS = {
        "query": "query",
        "norm_q.weight": "norm_q_weight",
        "norm_q.bias": "norm_q_bias",
        "norm_k.weight": "norm_k_weight",
        "norm_k.bias": "norm_k_bias",
        "norm_v.weight": "norm_v_weight",
        "norm_v.bias": "norm_v_bias",
        "q_proj.weight": "q_weight",
        "k_proj.weight": "k_weight",
        "v_proj.weight": "v_weight",
        "out_proj.weight": "out_weight",
        "out_proj.bias": "out_bias",
        "bn.weight": "bn_weight",
        "bn.bias": "bn_bias",
        "bn.running_mean": "bn_running_mean",
        "bn.running_var": "bn_running_var",
        "bn.num_batches_tracked": "bn_num_batches_tracked",
        "fc.weight": "fc_weight",
        "fc.bias": "fc_bias",
    }
    _KEEP_LEADING = frozenset({"query"})
    _PER_CONFIG = ("dropout",)

    def __init__(
        self,
        n_configs: int,
        dim: int,
        n_tokens: int,
        n_classes: int,
        num_heads: int,
        dropout: Tensor | Sequence[float] | float = 0.0,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        G, D = n_configs, dim
        self.n_configs, self.dim, self.n_tokens = n_configs, dim, n_tokens
        self.n_classes, self.num_heads = n_classes, num_heads
        self.head_dim = head_dim_for(dim, num_heads)
        self.inner = num_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        HE = self.inner

        def p(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(G, *shape, device=device))

        self.query = p(D)
        self.norm_q_weight, self.norm_q_bias = p(D), p(D)
        self.norm_k_weight, self.norm_k_bias = p(D), p(D)
        self.norm_v_weight, self.norm_v_bias = p(D), p(D)
        self.q_weight, self.k_weight, self.v_weight = p(HE, D), p(HE, D), p(HE, D)
        self.out_weight, self.out_bias = p(D, HE), p(D)
        self.bn_weight, self.bn_bias = p(D), p(D)
        self.fc_weight, self.fc_bias = p(n_classes, D), p(n_classes)
        self.register_buffer("bn_running_mean", torch.zeros(G, D, device=device))
        self.register_buffer("bn_running_var", torch.ones(G, D, device=device))
        self.register_buffer(
            "bn_num_batches_tracked", torch.zeros(G, dtype=torch.long, device=device)
        )
        self.register_buffer("dropout", torch.zeros(G, device=device))
        self.set_dropout(dropout)
        self.reset_parameters(generator)

    def _ctor_kwargs(self) -> dict:
        return {
            "n_configs": self.n_configs,
            "dim": self.dim,
            "n_tokens": self.n_tokens,
            "n_classes": self.n_classes,
            "num_heads": self.num_heads,
            "dropout": list(self._dropout_list),
        }

    def set_dropout(self, dropout: Tensor | Sequence[float] | float) -> None:
        """Set per-config attention-dropout probabilities (kept on the host too, so the
        forward can skip mask sampling without a device sync)."""
        vals = torch.as_tensor(dropout, dtype=torch.float64).flatten().tolist()
        if len(vals) == 1:
            vals = vals * self.n_configs
        if len(vals) != self.n_configs:
            raise ValueError(f"need {self.n_configs} dropout values, got {len(vals)}")
        if any(not 0.0 <= v < 1.0 for v in vals):
            raise ValueError(f"dropout probabilities must be in [0, 1), got {vals}")
        self._dropout_list = vals
        self._any_dropout = any(v > 0 for v in vals)
        with torch.no_grad():
            self.dropout.copy_(torch.tensor(vals, dtype=self.dropout.dtype))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # keep the host copy in step; rounding undoes the float32 storage of e.g. 0.1
        self.set_dropout([round(v, 6) for v in self.dropout.detach().cpu().tolist()])

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Reference init, one draw copied to every config (grid position never matters)."""
        D, HE, C = self.dim, self.inner, self.n_classes
        draws = {
            "query": torch.randn(D, generator=generator) * QUERY_INIT_STD,
            "q_weight": _uniform((HE, D), 1 / math.sqrt(D), generator),
            "k_weight": _uniform((HE, D), 1 / math.sqrt(D), generator),
            "v_weight": _uniform((HE, D), 1 / math.sqrt(D), generator),
            "out_weight": _uniform((D, HE), 1 / math.sqrt(HE), generator),
            "out_bias": _uniform((D,), 1 / math.sqrt(HE), generator),
            "fc_weight": _uniform((C, D), 1 / math.sqrt(D), generator),
            "fc_bias": _uniform((C,), 1 / math.sqrt(D), generator),
        }
        for name, value in draws.items():
            t = getattr(self, name)
            t.copy_(value.expand_as(t))
        for name in ("norm_q_weight", "norm_k_weight", "norm_v_weight", "bn_weight"):
            getattr(self, name).fill_(1.0)
        for name in ("norm_q_bias", "norm_k_bias", "norm_v_bias", "bn_bias"):
            getattr(self, name).zero_()
        self.bn_running_mean.zero_()
        self.bn_running_var.fill_(1.0)
        self.bn_num_batches_tracked.zero_()

    def sample_dropout_mask(
        self, batch: int, n_tokens: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """Inverted-dropout mask in the internal layout (B, T, G, H): keep prob 1-p_g,
        kept entries scaled by 1/(1-p_g); p_g = 0 gives exact ones.

        One uniform draw (B, T, H) is shared by all configs (config g keeps u < 1-p_g).
        Each config still sees exactly its own dropout distribution (configs never
        interact, so the correlation between them is harmless), and its masks no longer
        depend on which or how many configs share its group: grid results are the same
        whatever the memory budget's grouping.
        """
        H = self.num_heads
        keep = (1.0 - self.dropout).view(1, 1, -1, 1)
        r = torch.rand(
            (batch, n_tokens, 1, H), generator=generator, device=keep.device, dtype=keep.dtype
        )
        return (r < keep).to(keep.dtype) / keep

    def forward(
        self,
        x: Tensor,
        *,
        return_attention: bool = False,
        generator: torch.Generator | None = None,
        dropout_mask: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x (B, T, D) → logits (G, B, C) [, attention (G, B, H, T) before dropout].

        ``dropout_mask`` (G, B, H, T), already scaled, replaces the sampled mask (tests);
        ``generator`` drives mask sampling in train mode.
        """
        if x.dim() != 3 or x.shape[1:] != (self.n_tokens, self.dim):
            raise ValueError(
                f"expected (B, {self.n_tokens}, {self.dim}) input, got {tuple(x.shape)}"
            )
        G, H, E, D = self.n_configs, self.num_heads, self.head_dim, self.dim
        B, T, _ = x.shape
        wdt = self.query.dtype
        x = x.to(wdt)

        # Per-step, per-config quantities (independent of the batch size).
        qn = F.layer_norm(self.query, (D,), eps=LN_EPS) * self.norm_q_weight + self.norm_q_bias
        q = torch.bmm(qn.unsqueeze(1), self.q_weight.transpose(1, 2)).view(G, H, E)
        k_w = self.k_weight.view(G, H, E, D)
        u = torch.einsum("ghe,ghed->ghd", q, k_w)
        u = u * (self.norm_k_weight * self.scale).unsqueeze(1)  # (G, H, D)
        v_w = self.v_weight.view(G, H, E, D)
        v_w_scaled = v_w * self.norm_v_weight.view(G, 1, 1, D)  # W_v diag(γ_v)
        v_b = torch.einsum("ghed,gd->ghe", v_w, self.norm_v_bias)  # W_v β_v

        # Shared by every config: one normalisation of the tokens.
        xh = F.layer_norm(x, (D,), eps=LN_EPS)  # (B, T, D)
        scores = xh @ u.reshape(G * H, D).t()  # (B, T, G*H)
        attn = torch.softmax(scores, dim=1)  # autocast runs softmax in fp32
        a = attn
        if dropout_mask is not None:
            a = a * dropout_mask.to(a.dtype).permute(1, 3, 0, 2).reshape(B, T, G * H)
        elif self.training and self._any_dropout:
            a = a * self.sample_dropout_mask(B, T, generator).to(a.dtype).view(B, T, G * H)
        a_sum = a.sum(dim=1)  # (B, G*H); 1 without dropout

        o = pool_project(a.view(B, T, G, H), xh, v_w_scaled)  # pool first, project once
        o = o + a_sum.view(B, G, H, 1) * v_b
        # (G, D, B) in memory from here on: BatchNorm reads it as (1, G·D, B) and every
        # gradient comes back contiguous (CPU BatchNorm backward on a transposed (B, G·D)
        # gradient is ~10x slower), and the logits come out as (G, C, B), so the loss's
        # softmax over C runs along a long inner axis
        h = torch.baddbmm(
            self.out_bias.unsqueeze(2), self.out_weight, o.reshape(B, G, H * E).permute(1, 2, 0)
        )
        h = h.to(self.bn_weight.dtype)
        if self.training:
            self.bn_num_batches_tracked.add_(1)
        h = F.batch_norm(
            h.view(1, G * D, B),
            self.bn_running_mean.view(-1),
            self.bn_running_var.view(-1),
            self.bn_weight.view(-1),
            self.bn_bias.view(-1),
            self.training,
            BN_MOMENTUM,
            BN_EPS,
        )
        logits = torch.baddbmm(self.fc_bias.unsqueeze(2), self.fc_weight, h.view(G, D, B))
        logits = logits.transpose(1, 2)  # (G, B, C) view
        if return_attention:
            return logits, attn.view(B, T, G, H).permute(2, 0, 3, 1)
        return logits


class ReferenceAttentiveHead(nn.Module):
    """The straightforward single-config attentive probe: per-token keys and values.

    The independent check for ``AttentiveHeads`` and the benchmark baseline. Its
    ``state_dict`` keys are exactly those of ``AttentiveHeads.export(g)``.
    """

    def __init__(
        self,
        dim: int,
        n_tokens: int,
        n_classes: int,
        num_heads: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.dim, self.n_tokens, self.n_classes = dim, n_tokens, n_classes
        self.num_heads = num_heads
        self.head_dim = head_dim_for(dim, num_heads)
        inner = num_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.query = nn.Parameter(torch.randn(1, dim) * QUERY_INIT_STD)
        self.norm_q = nn.LayerNorm(dim, eps=LN_EPS)
        self.norm_k = nn.LayerNorm(dim, eps=LN_EPS)
        self.norm_v = nn.LayerNorm(dim, eps=LN_EPS)
        self.q_proj = nn.Linear(dim, inner, bias=False)
        self.k_proj = nn.Linear(dim, inner, bias=False)
        self.v_proj = nn.Linear(dim, inner, bias=False)
        self.attn_drop = nn.Dropout(dropout)
        self.out_proj = nn.Linear(inner, dim)
        self.bn = nn.BatchNorm1d(dim, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.fc = nn.Linear(dim, n_classes)

    def forward(
        self,
        x: Tensor,
        *,
        return_attention: bool = False,
        dropout_mask: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x (B, T, D) → logits (B, C) [, attention (B, H, T) before dropout]."""
        if x.dim() != 3 or x.shape[1:] != (self.n_tokens, self.dim):
            raise ValueError(
                f"expected (B, {self.n_tokens}, {self.dim}) input, got {tuple(x.shape)}"
            )
        B, T, D = x.shape
        H, E = self.num_heads, self.head_dim
        x = x.to(self.query.dtype)
        q = self.q_proj(self.norm_q(self.query)).view(H, E)
        k = self.k_proj(self.norm_k(x)).view(B, T, H, E).transpose(1, 2)  # (B, H, T, E)
        v = self.v_proj(self.norm_v(x)).view(B, T, H, E).transpose(1, 2)
        scores = (k @ q.view(1, H, E, 1)).squeeze(-1) * self.scale  # (B, H, T)
        attn = scores.softmax(dim=-1)
        a = attn * dropout_mask if dropout_mask is not None else self.attn_drop(attn)
        o = (a.unsqueeze(2) @ v).reshape(B, H * E)
        h = self.bn(self.out_proj(o))
        logits = self.fc(h)
        return (logits, attn) if return_attention else logits


# Scratch for one chunk of the pooled tokens (samples × configs·heads × D) on CPU: reused,
# instead of a (B, G·H, D) tensor per step (one in forward, two in backward). Three of the
# six matmuls of a chunk have the chunk's samples as their M or K: below ~50 samples they
# slow down 2-3x (ALF D = 768: 7 samples per chunk ran the projection at 28 GFLOP/s, 56 at
# 68), so a chunk holds few configs and many samples: 4 ALF configs (96 rows) × 56 samples
# at D = 768 in fp32 (113 at D = 384).
_POOL_CHUNK_BYTES = 16 << 20
_POOL_CHUNK_ROWS = 96  # configs·heads per chunk (whole configs)


def _spans(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(n, i + size)) for i in range(0, n, size)]


class _PoolProject(torch.autograd.Function):
    """o[b,g,h] = W[g,h] · Σ_t a[b,t,g,h] x̂[b,t] computed in cache-sized chunks.

    The same contraction as ``bmm`` (pool) then ``einsum`` (project), but the pooled
    tensor (B, G·H, D), G·H/T times the size of the input batch, exists only one chunk at a
    time (reused scratch; recomputed in backward rather than stored). On CPU this avoids
    allocating and page-faulting hundreds of MB per step and is ~2x faster at ALF shapes.
    """

    @staticmethod
    def forward(ctx, a: Tensor, xh: Tensor, w: Tensor) -> Tensor:
        B, T, G, H = a.shape
        E, D = w.shape[2], w.shape[3]
        gc, bc = _pool_chunks(B, G, H, D, a.element_size())
        out = a.new_empty(B, G, H, E)
        scratch = a.new_empty(bc * gc * H * D)
        for g0, g1 in _spans(G, gc):
            n = (g1 - g0) * H
            w_t = w[g0:g1].reshape(n, E, D).transpose(1, 2)
            for b0, b1 in _spans(B, bc):
                m = b1 - b0
                a_c = a[b0:b1, :, g0:g1].reshape(m, T, n)
                z_buf = scratch[: m * n * D].view(m, n, D)
                z = torch.bmm(a_c.transpose(1, 2), xh[b0:b1], out=z_buf)
                o = torch.bmm(z.transpose(0, 1), w_t)  # (n, m, E)
                out[b0:b1, g0:g1].copy_(o.view(g1 - g0, H, m, E).permute(2, 0, 1, 3))
        ctx.save_for_backward(a, xh, w)
        return out

    @staticmethod
    def backward(ctx, d_out: Tensor) -> tuple[Tensor | None, ...]:
        a, xh, w = ctx.saved_tensors
        need_a, need_x, need_w = ctx.needs_input_grad
        B, T, G, H = a.shape
        E, D = w.shape[2], w.shape[3]
        gc, bc = _pool_chunks(B, G, H, D, a.element_size())
        d_a = torch.empty_like(a) if need_a else None
        d_x = torch.zeros_like(xh) if need_x else None
        d_w = torch.zeros_like(w) if need_w else None
        s_dz = a.new_empty(bc * gc * H * D)
        s_z = a.new_empty(bc * gc * H * D) if need_w else None
        for g0, g1 in _spans(G, gc):
            n = (g1 - g0) * H
            w_c = w[g0:g1].reshape(n, E, D)
            for b0, b1 in _spans(B, bc):
                m = b1 - b0
                a_c = a[b0:b1, :, g0:g1].reshape(m, T, n)
                x_c = xh[b0:b1]
                do_t = d_out[b0:b1, g0:g1].permute(1, 2, 0, 3).reshape(n, m, E)
                if need_a or need_x:
                    dz = torch.bmm(do_t, w_c, out=s_dz[: m * n * D].view(n, m, D))
                    dz = dz.transpose(0, 1)  # (m, n, D)
                    if need_a:
                        d_a[b0:b1, :, g0:g1] = torch.bmm(x_c, dz.transpose(1, 2)).view(
                            m, T, g1 - g0, H)
                    if need_x:
                        d_x[b0:b1].baddbmm_(a_c, dz)
                if need_w:
                    z = torch.bmm(a_c.transpose(1, 2), x_c, out=s_z[: m * n * D].view(m, n, D))
                    d_w[g0:g1].view(n, E, D).baddbmm_(do_t.transpose(1, 2), z.transpose(0, 1))
        return d_a, d_x, d_w


def _pool_chunks(B: int, G: int, H: int, D: int, itemsize: int) -> tuple[int, int]:
    """(configs, samples) per chunk of the pooled tokens."""
    gc = max(1, min(G, _POOL_CHUNK_ROWS // max(H, 1)))
    bc = max(1, min(B, _POOL_CHUNK_BYTES // (gc * H * D * itemsize)))
    return gc, bc


def pool_scratch_bytes(B: int, H: int, D: int, itemsize: int = 4) -> int:
    """Bytes of one chunk's scratch in the CPU pooling, the most any number of configs
    gives (the forward holds one chunk, the backward two)."""
    g_max = max(1, _POOL_CHUNK_ROWS // max(H, 1))
    rows = max(gc * bc for gc, bc in (_pool_chunks(B, g, H, D, itemsize)
                                      for g in range(1, g_max + 1)))
    return rows * H * D * itemsize


def pool_project(a: Tensor, xh: Tensor, w: Tensor) -> Tensor:
    """Σ_t a[b,t,g,h] (W[g,h] x̂[b,t]) as pool-then-project: (B,T,G,H), (B,T,D),
    (G,H,E,D) → (B,G,H,E). Chunked on CPU (see ``_PoolProject``); two bmm elsewhere
    (GPUs have the bandwidth, and fewer, larger kernels suit them better).

    The plain form: the pool is batched over samples, z (B, G·H, D); the projection over
    heads, reading z as (G·H, B, D) (a strided view: each head's rows are contiguous, one
    leading dimension apart). cuBLAS and CPU float32 GEMMs read that view in place, so z
    is written once and never copied, and autograd saves the view itself. CPU GEMMs in
    bf16/fp16 (oneDNN) want dense operands and would copy the view twice, the second time
    transposed for the weight gradient (~1/3 of a bf16 step); there z is laid out as
    (G·H, B, D) once, explicitly, and that copy is what autograd saves, whose transpose
    the weight gradient then reads in place.
    """
    if _use_chunks(a, xh, w):
        return _PoolProject.apply(a, xh, w)
    B, T, G, H = a.shape
    E, D = w.shape[2], w.shape[3]
    z = torch.bmm(a.reshape(B, T, G * H).transpose(1, 2), xh)  # (B, G*H, D)
    zt = z.transpose(0, 1)  # (G*H, B, D) view
    if _dense_gemm_only(z):
        zt = zt.contiguous()
    o = torch.bmm(zt, w.reshape(G * H, E, D).transpose(1, 2))  # (G*H, B, E)
    return o.view(G, H, B, E).permute(2, 0, 1, 3)


def _dense_gemm_only(t: Tensor) -> bool:
    """Whether batched GEMMs on ``t``'s device and dtype copy a strided operand (CPU in
    reduced precision) rather than read it in place (CUDA; CPU float32/64)."""
    return t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16)


def _use_chunks(a: Tensor, xh: Tensor, w: Tensor) -> bool:
    """The chunked form on CPU (same dtypes, no autocast); the plain form elsewhere."""
    return a.device.type == "cpu" and a.dtype == xh.dtype == w.dtype and not _cpu_autocast()


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def attention_summary(attn: Tensor, per_head: bool = False) -> Tensor:
    """Mean attention per input token over samples (and heads): (G, B, H, T) → (G, T),
    or (G, H, T) with ``per_head``. These are the paper's per-layer heatmap values."""
    if per_head:
        return attn.float().mean(dim=1)
    return attn.float().mean(dim=(1, 2))
