"""Probe heads: many hyperparameter configs stacked along a leading config axis.

Head kinds by name (`HEADS`): "linear" (`LinearHeads`) and "attentive" (the paper's
attentive head, `AttentiveHeads`, in the one-query fast form: keys and values are never
materialised per token; see docs/method.md). A method names its head kind; the trainer
asks the kind how to check its input, what a step costs in memory, and how to build a
group of configs.
"""

from __future__ import annotations

from featcache.probing.heads.attentive import (
    AttentiveHeads,
    ReferenceAttentiveHead,
    attention_summary,
    head_dim_for,
)
from featcache.probing.heads.linear import LinearHeads
from featcache.probing.heads.pooling import pool_project, pool_scratch_bytes
from featcache.probing.heads.stacked import StackedHeads

__all__ = [
    "HEADS",
    "AttentiveHeads",
    "LinearHeads",
    "ReferenceAttentiveHead",
    "StackedHeads",
    "attention_summary",
    "head_dim_for",
    "pool_project",
    "pool_scratch_bytes",
]

HEADS: dict[str, type[StackedHeads]] = {"linear": LinearHeads, "attentive": AttentiveHeads}
