"""`featcache verify`: read every byte of a cache and say exactly what is damaged.

Checks, per shard: its done flag, that every array's file is there, that every chunk's
checksum matches (reading it), that the features are finite and the labels are classes.
Metadata damage (a malformed or edited zarr.json) is reported for the whole cache: it
cannot be repaired shard by shard. `--repair` clears the done flags (and removes the
files) of the damaged shards, so the same `featcache extract` command recomputes exactly
those, bitwise equal to a clean run.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featcache.cache.store import (
    LOST_GROUP,
    Cache,
    find_caches,
    headless,
    open_cache,
)
from featcache.cache.stores import location, resolve_root, store_failure
from featcache.errors import FeatcacheError


@dataclass
class VerifyResult:
    """One cache's verdict: `ok`, or the damaged shards (or the metadata) and why."""

    path: Path
    ok: bool
    shards: int = 0
    damaged: dict[int, list[str]] = field(default_factory=dict)  # shard -> reasons
    metadata: str | None = None  # why the cache cannot be opened at all
    repaired: list[int] = field(default_factory=list)
    unwritten: int = 0  # shards without a done flag (an unfinished or repaired cache)
    extract_command: str | None = None  # what recomputes the repaired shards

    def as_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "ok": self.ok, "shards": self.shards,
                "damaged": {str(k): v for k, v in sorted(self.damaged.items())},
                "metadata": self.metadata, "repaired": self.repaired,
                "unwritten": self.unwritten,
                "extract_command": self.extract_command}


def check_cache(cache: Cache) -> dict[int, list[str]]:
    """{shard: reasons} for every damaged shard (empty: the cache is sound)."""
    damaged: dict[int, list[str]] = {}

    def bad(shard: int, why: str) -> None:
        damaged.setdefault(shard, []).append(why)

    done = cache.done()
    for name, shard in cache.missing_files():
        bad(shard, f"{name}: file missing")
    for k in np.flatnonzero(done) if cache.has_identity else ():
        for why in identity_problems(cache, int(k)):
            bad(int(k), why)
    n_classes = len(cache.class_names)
    for k in np.flatnonzero(done):
        k = int(k)
        rows = cache.layout.rows(k)
        for name in cache.arrays:
            if any(why.startswith(f"{name}:") for why in damaged.get(k, [])):
                continue
            try:
                values = np.asarray(cache.group[name][rows])
            except Exception as exc:
                if store_failure(cache.path, exc):  # the network, not the bytes: no damage
                    raise store_failure(cache.path, exc) from None
                bad(k, f"{name}: {_why(exc)}")
                continue
            if values.dtype.kind == "f" and not np.isfinite(values).all():
                bad(k, f"{name}: non-finite values (a missing chunk reads as NaN)")
            elif name == "labels" and ((values < 0) | (values >= n_classes)).any():
                bad(k, f"labels: outside 0..{n_classes - 1} (a missing chunk reads as -1)")
    return damaged


def identity_problems(cache: Cache, shard: int) -> list[str]:
    """Why shard `shard`'s files are not the ones recorded for it (format 4)."""
    from featcache.cache.identity import WRONG_PLACE

    out = []
    for name in cache.arrays:
        try:
            expected = cache.recorded_crcs(name, shard)
        except FeatcacheError as exc:
            if " is damaged: " not in str(exc):
                raise  # the store failed, not the cache: never damage
            return [f"{name}: {str(exc).split(' is damaged: ')[-1].split('. Run')[0]}"]
        try:
            found = cache.shard_crcs(name, shard)
        except ValueError:
            continue  # an unreadable index: the read below names it
        if found is not None and expected is not None and (
                found.shape != expected.shape or (found != expected).any()):
            out.append(f"{name}: {WRONG_PLACE}")
    return out


def _why(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "checksum" in text.lower():
        return "checksum mismatch (flipped or truncated bytes)"
    return f"cannot be decoded ({type(exc).__name__}: {text[:100]})"


def extract_command(cache: Cache) -> str:
    """The `featcache extract` command that (re)computes this cache's missing shards."""
    fp = cache.fingerprint
    model, data = fp.get("model", {}), fp.get("dataset", {})
    q = shlex.quote  # pasted into a shell as it is printed
    parts = ["featcache extract", f"--model {q(str(model.get('model')))}",
             f"--dataset {q(str(data.get('name')))}", f"--split {q(str(data.get('split')))}"]
    weights = str(model.get("weights") or "")
    if weights.startswith("random:"):
        parts.append(f"--weights {weights}")
    elif weights.startswith("file:"):
        parts.append("--weights PATH-OF-THE-SAME-CHECKPOINT")
    if model.get("tap") not in (None, "reference"):
        parts.append(f"--tap {model['tap']}")
    for key, value in (model.get("model_kwargs") or {}).items():
        parts.append(f"--model-arg {q(f'{key}={json.dumps(value)}')}")
    if fp.get("all_tokens"):
        parts.append("--all-tokens")
    dtype = fp.get("compute_dtype")
    if dtype in ("bfloat16", "float16"):
        parts.append(f"--dtype {'bf16' if dtype == 'bfloat16' else 'fp16'}")
    if cache.attrs.get("batch_size"):  # caches written before it was recorded lack it
        parts.append(f"--batch-size {int(cache.attrs['batch_size'])}")
    root = cache.path.parent.parent.parent
    parts.append(f"--cache {q(str(root))}")
    return " ".join(parts)


def verify_cache(path: str | Path, repair: bool = False) -> VerifyResult:
    """Verify one cache (and, with ``repair``, clear its damaged shards)."""
    path = location(path)
    try:
        cache = open_cache(path, "r+" if repair else "r")
    except FeatcacheError as exc:
        if headless(path):
            return VerifyResult(path, False, metadata=LOST_GROUP)
        if not (path / "zarr.json").is_file():
            raise
        return VerifyResult(path, False, metadata=str(exc))
    damaged = check_cache(cache)
    result = VerifyResult(path, not damaged, cache.layout.n_shards, damaged)
    if damaged and repair:
        from featcache.cache.files import write_lock

        with write_lock(path):
            cache.clear_shards(sorted(damaged))
        result.repaired = sorted(damaged)
    result.unwritten = int((~cache.done()).sum())
    if result.unwritten or damaged:
        result.extract_command = extract_command(cache)
    return result


def verify(path: str | Path | None = None, cache: str | Path | None = None,
           repair: bool = False) -> list[VerifyResult]:
    """`featcache verify`: one cache (``path``) or every cache under a root (``cache``)."""
    if path is not None:
        return [verify_cache(path, repair)]
    root = resolve_root(cache)
    problems: list[tuple[Path, str]] = []
    found = find_caches(root, problems)
    results = [verify_cache(c.path, repair) for c in found]
    # caches whose metadata could not even be read
    results += [VerifyResult(where, False, metadata=why) for where, why in problems]
    if not results:
        raise FeatcacheError(f"no caches under {root}; give a cache PATH or --cache ROOT")
    return results
