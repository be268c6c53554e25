"""The paper's attentive head, G configs at once, in the one-query fast form; and the
straightforward single-config head it must agree with (`ReferenceAttentiveHead`).

``AttentiveHeads.export(g)`` returns a state dict that ``ReferenceAttentiveHead
.load_state_dict`` accepts, and ``load_config`` goes the other way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featcache.probing.heads.matmul import aligned, config_mm
from featcache.probing.heads.pooling import pool_project, pool_scratch_bytes
from featcache.probing.heads.stacked import StackedHeads, uniform

LN_EPS = 1e-5
BN_EPS = 1e-5
BN_MOMENTUM = 0.1
QUERY_INIT_STD = 0.02


def head_dim_for(dim: int, num_heads: int) -> int:
    """Per-head width of the reference probe: doubled on purpose (paper's ablation)."""
    return max(1, 2 * (dim // num_heads))


class AttentiveHeads(StackedHeads):
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

    has_dropout = True

    @property
    def any_dropout(self) -> bool:
        return self._any_dropout
    # the BatchNorm over the batch: F.batch_norm's signature; data-parallel training
    # swaps in `featcache.probing.tokens.dataparallel.sync_batch_norm` (statistics of the global
    # batch)
    batch_norm = staticmethod(F.batch_norm)

    @classmethod
    def check_input(cls, shape: Sequence[int], inputs: Sequence[int] | None,
                    plain: bool) -> bool:
        if inputs is not None:
            raise ValueError("inputs (a token per config) are for linear heads only")
        if len(shape) != 2:
            raise ValueError(f"attentive head needs x of 3 dims, got samples of shape "
                             f"{tuple(shape)}")
        return False

    @classmethod
    def memory(cls, shape: Sequence[int], n_classes: int, batch_size: int,
               num_heads: int | None, device: torch.device | str | None,
               inputs: Sequence[int] | None = None) -> tuple[int, int]:
        """fp32 bytes of a step. Per config: parameters, gradients, the two Adam moments
        and one spare copy (autocast weight copies on CUDA; W_v diag(γ_v) and its gradient
        on CPU), and the activations of one batch. Shared: the batch, its jitter noise,
        the shared LayerNorm output (and on CPU the pooling's scratch chunks).

        The pooling path differs per device (`pool_project`), and sets the largest term.
        On CUDA (and under autocast) the pooled tokens (B, H, D) per config are
        materialised, kept for backward and met by a gradient of the same size: 3·B·H·D
        counted. On CPU they exist only as two reused chunks (shared), and what a config
        keeps is B·T·H attention-sized tensors (scores, softmax, mask, weights and their
        gradients: 6 counted), B·H·E pooled-and-projected values (3) and B·D BatchNorm
        inputs/outputs (4). At ALF's FER2013 shape (B = 1914, T = H = 24, D = 768, C = 7)
        that is 172 MiB per config against 124 MiB measured (peak RSS slope over groups of
        1 to 13 configs), and a shared 570 MiB against ~250 MiB measured."""
        B, C, f = batch_size, n_classes, 4
        T, D = shape
        H = num_heads or T
        HE = H * head_dim_for(D, H)
        params = 4 * HE * D + C * D + C + 11 * D
        shared = 4 * B * T * D
        if torch.device(device if device is not None else "cpu").type == "cpu":
            acts = 6 * B * T * H + 3 * B * HE + 4 * B * D + 4 * B * C
            shared += 2 * pool_scratch_bytes(B, H, D, f) // f
        else:
            acts = 6 * B * T * H + 3 * B * H * D + 6 * B * HE + 8 * B * D + 4 * B * C
        return f * (5 * params + acts), f * shared

    @classmethod
    def build_group(cls, configs: Sequence[int], points: Sequence[dict], shape: Sequence[int],
                    n_classes: int, num_heads: int | None, inputs: Sequence[int] | None,
                    generator: torch.Generator, device: torch.device | str,
                    widths: Sequence[int] | None = None) -> AttentiveHeads:
        # ``widths`` unused: narrower tokens stay zero-padded to D, as the authors' ALF
        T, D = shape
        drops = [float(points[i].get("dropout", 0.0)) for i in configs]
        return cls(len(configs), D, T, n_classes, num_heads or T, drops, generator=generator,
                   device=device)

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
            "q_weight": uniform((HE, D), 1 / math.sqrt(D), generator),
            "k_weight": uniform((HE, D), 1 / math.sqrt(D), generator),
            "v_weight": uniform((HE, D), 1 / math.sqrt(D), generator),
            "out_weight": uniform((D, HE), 1 / math.sqrt(HE), generator),
            "out_bias": uniform((D,), 1 / math.sqrt(HE), generator),
            "fc_weight": uniform((C, D), 1 / math.sqrt(D), generator),
            "fc_bias": uniform((C,), 1 / math.sqrt(D), generator),
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
        """Inverted-dropout mask (G, B, H, T) (the layout ``forward(dropout_mask=…)``
        takes): keep prob 1-p_g, kept entries scaled by 1/(1-p_g); p_g = 0 gives exact ones.

        One uniform draw (B, T, H) is shared by all configs (config g keeps u < 1-p_g).
        Each config still sees exactly its own dropout distribution (configs never
        interact, so the correlation between them is harmless), and its masks no longer
        depend on which or how many configs share its group: grid results are the same
        whatever the memory budget's grouping.
        """
        H = self.num_heads
        keep = (1.0 - self.dropout).view(-1, 1, 1, 1)
        r = torch.rand(
            (batch, n_tokens, H), generator=generator, device=keep.device, dtype=keep.dtype
        )
        return (r.permute(0, 2, 1).unsqueeze(0) < keep).to(keep.dtype) / keep

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

        # Per-step, per-config quantities (independent of the batch size). Every matmul
        # is per config (`config_mm`): its bits never depend on the configs beside it.
        qn = F.layer_norm(self.query, (D,), eps=LN_EPS) * self.norm_q_weight + self.norm_q_bias
        q = config_mm(qn.unsqueeze(1), self.q_weight.transpose(1, 2)).view(G, H, E)
        u = _fold_keys(q, self.k_weight.view(G, H, E, D))
        u = u * (self.norm_k_weight * self.scale).unsqueeze(1)  # (G, H, D)
        v_w = self.v_weight.view(G, H, E, D)
        v_w_scaled = v_w * self.norm_v_weight.view(G, 1, 1, D)  # W_v diag(γ_v)
        # W_v β_v as β_vᵀ W_vᵀ, a (1, D) @ (D, HE) per config, like q (a matrix-vector
        # product W_v β_v rounded with the number of configs)
        v_b = config_mm(self.norm_v_bias.unsqueeze(1), self.v_weight.transpose(1, 2))
        v_b = v_b.view(G, H, E)

        # Shared by every config: one normalisation of the tokens.
        xh = F.layer_norm(x, (D,), eps=LN_EPS)  # (B, T, D)
        # Scores laid out (G·H, B, T): the configs' heads are the matmul's rows and the
        # softmax runs along each contiguous row, so neither rounds a config differently
        # with the number of configs beside it (as columns, N = G·H, they did: MKL picks
        # its kernel by N; a softmax over a non-last axis vectorises across the configs)
        scores = config_mm(u, xh.view(1, B * T, D).transpose(1, 2)).view(G * H, B, T)
        attn = torch.softmax(scores, dim=-1)  # autocast runs softmax in fp32
        a = attn
        if dropout_mask is not None:
            a = a * dropout_mask.to(a.dtype).permute(0, 2, 1, 3).reshape(G * H, B, T)
        elif self.training and self._any_dropout:
            mask = self.sample_dropout_mask(B, T, generator)
            a = a * mask.to(a.dtype).permute(0, 2, 1, 3).reshape(G * H, B, T)
        a_sum = a.sum(dim=-1)  # (G*H, B); 1 without dropout

        o = pool_project(a.view(G, H, B, T), xh, v_w_scaled)  # pool first, project once
        o = o + _value_bias(a_sum.view(G, H, B, 1), v_b).permute(2, 0, 1, 3)
        # (G, D, B) in memory from here on: BatchNorm reads it as (1, G·D, B) and every
        # gradient comes back contiguous (CPU BatchNorm backward on a transposed (B, G·D)
        # gradient is ~10x slower), and the logits come out as (G, C, B), so the loss's
        # softmax over C runs along a long inner axis
        h = config_mm(self.out_weight, o.reshape(B, G, H * E).permute(1, 2, 0), self.out_bias)
        h = h.to(self.bn_weight.dtype)
        if self.training:
            self.bn_num_batches_tracked.add_(1)
        h = self.batch_norm(
            h.view(1, G * D, B),
            self.bn_running_mean.view(-1),
            self.bn_running_var.view(-1),
            self.bn_weight.view(-1),
            self.bn_bias.view(-1),
            self.training,
            BN_MOMENTUM,
            BN_EPS,
        )
        logits = config_mm(self.fc_weight, h.view(G, D, B), self.fc_bias)
        logits = logits.transpose(1, 2)  # (G, B, C) view
        if return_attention:
            return logits, attn.view(G, H, B, T).permute(0, 2, 1, 3)
        return logits


def _value_bias(a_sum: Tensor, v_b: Tensor) -> Tensor:
    """(Σ_t a_t) W_v β_v, (G, H, B, 1), (G, H, E) → (G, H, B, E). On CPU config by config:
    the gradient of v_b sums over the samples, and one reduction over the whole stack
    splits its work over threads by the number of configs."""
    if a_sum.device.type != "cpu":
        return a_sum * v_b.unsqueeze(2)
    return torch.stack([a_sum[g] * v_b[g].unsqueeze(1) for g in range(v_b.shape[0])])


def _fold_keys(q: Tensor, k_w: Tensor) -> Tensor:
    """u[g,h] = q[g,h] W_k[g,h], (G, H, E), (G, H, E, D) → (G, H, D): a bmm over heads per
    config on CPU (its shape is a config's), one einsum elsewhere."""
    if q.device.type != "cpu":
        return torch.einsum("ghe,ghed->ghd", q, k_w)
    return torch.stack([torch.bmm(aligned(q[g]).unsqueeze(1), aligned(k_w[g])).squeeze(1)
                        for g in range(q.shape[0])])


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
def attention_summary(attn: Tensor, per_head: bool = False) -> Tensor:
    """Mean attention per input token over samples (and heads): (G, B, H, T) → (G, T),
    or (G, H, T) with ``per_head``. These are the paper's per-layer heatmap values."""
    if per_head:
        return attn.float().mean(dim=1)
    return attn.float().mean(dim=(1, 2))
