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
        if "dropout" in kwargs:
            kwargs["dropout"] = [kwargs["dropout"][i] for i in idx]
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
        if "dropout" in kwargs:
            kwargs["dropout"] = [d for p in parts for d in p._ctor_kwargs()["dropout"]]
        ref = next(iter(parts[0].parameters()))
        new = cls(**kwargs, generator=torch.Generator(), device=ref.device).to(ref.dtype)
        states = [p.state_dict() for p in parts]
        new.load_state_dict({k: torch.cat([s[k] for s in states]) for k in states[0]})
        return new


class LinearHeads(_StackedHeads):
    """G independent ``Linear(d_in, n_classes)`` probes reading the same features.

    Every config starts from the same init (drawn once from ``generator``), so a config's
    result does not depend on where it sits in the grid.
    """

    _KEYS = {"weight": "weight", "bias": "bias"}

    def __init__(
        self,
        n_configs: int,
        d_in: int,
        n_classes: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.n_configs, self.d_in, self.n_classes = n_configs, d_in, n_classes
        self.weight = nn.Parameter(torch.empty(n_configs, n_classes, d_in, device=device))
        self.bias = nn.Parameter(torch.empty(n_configs, n_classes, device=device))
        self.reset_parameters(generator)

    def _ctor_kwargs(self) -> dict:
        return {"n_configs": self.n_configs, "d_in": self.d_in, "n_classes": self.n_classes}

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """nn.Linear's init (U(±1/sqrt(d_in))), the same draw copied to every config."""
        bound = 1.0 / math.sqrt(self.d_in)
        w = _uniform((self.n_classes, self.d_in), bound, generator)
        b = _uniform((self.n_classes,), bound, generator)
        self.weight.copy_(w.expand_as(self.weight))
        self.bias.copy_(b.expand_as(self.bias))

    def forward(self, x: Tensor, **_: object) -> Tensor:
        """x (B, d_in) → logits (G, B, C)."""
        if x.dim() != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"expected (B, {self.d_in}) input, got {tuple(x.shape)}")
        x = x.to(self.weight.dtype)
        G, C = self.n_configs, self.n_classes
        out = (x @ self.weight.reshape(G * C, self.d_in).t()).view(-1, G, C)
        return out.permute(1, 0, 2) + self.bias.unsqueeze(1)


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

        z = torch.bmm(a.transpose(1, 2), xh)  # (B, G*H, D): pool first ...
        o = torch.einsum("bghd,ghed->bghe", z.view(B, G, H, D), v_w_scaled)  # ... project once
        o = o + a_sum.view(B, G, H, 1) * v_b
        h = torch.einsum("bgf,gdf->bgd", o.reshape(B, G, H * E), self.out_weight)
        h = h + self.out_bias
        h = h.to(self.bn_weight.dtype).reshape(B, G * D)
        if self.training:
            self.bn_num_batches_tracked.add_(1)
        h = F.batch_norm(
            h,
            self.bn_running_mean.view(-1),
            self.bn_running_var.view(-1),
            self.bn_weight.view(-1),
            self.bn_bias.view(-1),
            self.training,
            BN_MOMENTUM,
            BN_EPS,
        )
        logits = torch.einsum("bgd,gcd->gbc", h.view(B, G, D), self.fc_weight)
        logits = logits + self.fc_bias.unsqueeze(1)
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


def attention_summary(attn: Tensor, per_head: bool = False) -> Tensor:
    """Mean attention per input token over samples (and heads): (G, B, H, T) → (G, T),
    or (G, H, T) with ``per_head``. These are the paper's per-layer heatmap values."""
    if per_head:
        return attn.float().mean(dim=1)
    return attn.float().mean(dim=(1, 2))
