"""What a probe reads: the (train, test) cache pairs under a root, the layers of a layer
set, and the tokens a method takes from them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from featcache.cache.fingerprint import flatten
from featcache.cache.kinds import FEATURE_KINDS
from featcache.cache.store import Cache, find_caches
from featcache.errors import FeatcacheError
from featcache.probing.methods import LAYER_SETS, Method, get_method

# Settings a train and a test cache may differ in; anything else must match.
PAIR_FREE_KEYS = ("dataset.split", "dataset.n", "dataset.identity")


def find_pairs(cache_root: Path, model: str | None = None, dataset: str | None = None,
               train_split: str = "train", test_split: str = "test") -> list[tuple[Cache, Cache]]:
    """Every complete (train, test) cache pair under the root, filtered by model/dataset."""
    damaged: list[tuple[Path, str]] = []
    caches = find_caches(cache_root, damaged)
    broken = {where: why for where, why in damaged}
    if not caches:
        if damaged:
            raise FeatcacheError(damaged[0][1])
        raise FeatcacheError(f"no caches under {cache_root}; make some with `featcache extract` "
                             "(or point --cache at the root you extracted into)")
    groups: dict[Path, dict[str, Cache]] = {}
    for c in caches:
        if model and model not in (c.model, c.path.parent.parent.name):
            continue
        if dataset and dataset not in (c.dataset, c.path.parent.name):
            continue
        groups.setdefault(c.path.parent, {})[c.split] = c
    if not groups:
        what = " and ".join(f"{k} {v!r}" for k, v in (("model", model), ("dataset", dataset)) if v)
        have = sorted({f"{c.model}/{c.dataset}" for c in caches})
        raise FeatcacheError(f"no cache of {what} under {cache_root}; there are: "
                             f"{', '.join(have[:6])}{' …' if len(have) > 6 else ''}")
    pairs, problems = [], []
    for folder, splits in sorted(groups.items()):
        train, test = splits.get(train_split), splits.get(test_split)
        if train is None or test is None:
            missing = train_split if train is None else test_split
            problems.append(broken.get(folder / missing, f"{folder} has no {missing!r} split"))
            continue
        unfinished = [c for c in (train, test) if not c.complete]
        if unfinished:
            problems.append(f"{unfinished[0].path} is incomplete (re-run its `featcache extract`"
                            " command to finish it)")
            continue
        check_pair(train, test)
        for cache in (train, test):  # a flagged shard without its files would read as fill
            cache.check_files()
        pairs.append((train, test))
    if not pairs:
        raise FeatcacheError(f"no complete {train_split}+{test_split} cache pair: {problems[0]}")
    return pairs


def check_pair(train: Cache, test: Cache) -> None:
    """Train and test must come from the same model, tap, weights and preprocessing."""
    a, b = flatten(train.fingerprint), flatten(test.fingerprint)
    for key in sorted(set(a) | set(b)):
        if key.startswith(PAIR_FREE_KEYS):
            continue
        if a.get(key) != b.get(key):
            raise FeatcacheError(
                f"{train.path} and {test.path} were built with different settings ({key}: "
                f"{a.get(key)!r} vs {b.get(key)!r}); re-extract one of them with the same options")


def layer_set_names(layer_set: str, layer_names: list[str]) -> list[str]:
    """Named set → layer names. The paper's "all" is blocks 1..L-1 plus the final output."""
    blocks = [n for n in layer_names if n.startswith("block")]
    n_blocks = len(blocks)
    if layer_set == "last":
        return ["final"]
    if layer_set == "all":
        return [*blocks[1:], "final"]
    if layer_set == "every":
        return list(layer_names)
    if layer_set == "middle+last":
        return [f"block{n_blocks // 2}", "final"]
    if layer_set == "quarterly":
        picks = sorted({round(n_blocks * q) for q in (0.25, 0.5, 0.75)} - {n_blocks})
        return [*(f"block{i}" for i in picks), "final"]
    names = []
    for item in layer_set.split(","):
        item = item.strip()
        if item.lstrip("-").isdigit():
            index = int(item)
            if not -len(layer_names) <= index < len(layer_names):
                raise FeatcacheError(f"layer {index} out of range: this cache has "
                                     f"{len(layer_names)} layers ({layer_names[0]} … final)")
            names.append(layer_names[index])
        elif item in layer_names:
            names.append(item)
        else:
            raise FeatcacheError(
                f"unknown layer set {layer_set!r}: use {', '.join(LAYER_SETS)}, indices like "
                f"3,7,-1, or names like block3,final (this cache has block0..block{n_blocks - 1},"
                " final)")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise FeatcacheError(f"--layers {layer_set!r} names {', '.join(twice)} twice; give "
                             "each layer once")
    return names


def canonical_layer_set(layer_set: str, layer_names: list[str]) -> str:
    """One name per choice of layers, so that `-1`, `11` and `last` (on a 12-block model)
    are one run and one report column: a named set when the layers are one, else the
    layer names (`block3,final`)."""
    names = layer_set_names(layer_set, layer_names)
    if layer_set in (*LAYER_SETS, "every"):
        return layer_set
    for named in LAYER_SETS:
        if layer_set_names(named, layer_names) == names:
            return named
    return ",".join(names)


def token_list(method: str | Method, layer_set: str, cache: Cache, token: str | None = None
               ) -> list[tuple[str, str]]:
    """The head's input tokens in order: (layer name, "cls" | "ap" | "pool"), from the
    token kinds the cache has.

    "probe" methods read the probe token of each layer (`--token`, else the model's: its
    own embedding, CLS for the paper's models, AP for MAE); a layer without it (the pool
    exists for the final layer only; a model without a class token has no CLS) falls back
    to CLS, else AP. "cls+ap" methods read CLS (where the model has one) and AP of each
    layer, and the final layer's pool where the model has one of its own.
    """
    kinds = cache.token_kinds
    if token is not None and token not in kinds:
        raise FeatcacheError(f"--token {token}: {cache.path} has no {token!r} tokens (this "
                             f"model's are {', '.join(kinds)})")
    probe_token = token or cache.attrs.get("probe_token") or "cls"
    layers = layer_set_names(layer_set, cache.layer_names)
    if get_method(method).tokens == "probe":
        return [(name, _at_layer(probe_token, name, kinds)) for name in layers]
    out = [(name, kind) for name in layers for kind in FEATURE_KINDS if kind in kinds]
    if "pool" in kinds and "final" in layers:
        out.append(("final", "pool"))
    return out


def _at_layer(kind: str, layer: str, kinds: list[str]) -> str:
    if kind in kinds and (kind != "pool" or layer == "final"):
        return kind
    return "cls" if "cls" in kinds else "ap"


def load_tokens(cache: Cache, tokens: list[tuple[str, str]]) -> np.ndarray:
    """(N, T, D) float32, each token vector L2-normalised (per layer and kind, as the paper).

    For inspection and independent references; probing itself keeps the cache's float16
    values in a `FeatureSource` and normalises per batch (`load_source`)."""
    from featcache.probing.tokens.features import load_source

    src = load_source(cache, tokens, torch.device("cpu"))
    return src.to_tensor().numpy()


def run_tokens(method: str, layer_set: str, cache: Cache, token: str | None
               ) -> tuple[list[tuple[str, str]], list[str]]:
    """What the head reads from the cache, and the record's names for those tokens."""
    if get_method(method).needs_all_tokens:
        return [("final", "all")], [f"final.token{i}" for i in range(cache.layout.n_tokens or 0)]
    tokens = token_list(method, layer_set, cache, token)
    return tokens, [f"{name}.{kind}" for name, kind in tokens]


