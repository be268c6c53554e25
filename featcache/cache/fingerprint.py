"""Cache fingerprints compared: every setting that changes the cached numbers, named
when it differs (`featcache extract` refuses to mix a cache with other settings)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featcache.errors import FingerprintMismatch

if TYPE_CHECKING:
    from featcache.cache.store import Cache


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict → {"a.b.c": value}, for naming the setting that differs."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: obj}


# Recorded for people, not compared: where the data sat when the cache was made (a moved
# copy of the same files has the same content hash, `dataset.identity.sha256`).
INFORMATIONAL_KEYS = frozenset({"dataset.identity.location"})


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human lines `key: old → new` for every setting that differs."""
    a, b = flatten(old), flatten(new)
    for key in INFORMATIONAL_KEYS:
        a.pop(key, None)
        b.pop(key, None)
    lines = []
    # Settings first; what follows from them (layer lists, token counts) last.
    derived = ("layer_names", "layer_dims", "n_tokens", "n_prefix_tokens")
    for key in sorted(set(a) | set(b), key=lambda k: (k.rsplit(".", 1)[-1] in derived, k)):
        before, after = a.get(key, "<absent>"), b.get(key, "<absent>")
        if before != after:
            lines.append(f"{key}: {_short(before)} → {_short(after)}")
    return lines


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_fingerprint(cache: Cache, fingerprint: dict[str, Any]) -> None:
    """Refuse a cache built with other settings, naming the first settings that differ."""
    diff = fingerprint_diff(cache.fingerprint, fingerprint)
    if diff:
        shown = "; ".join(diff[:3])
        more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
        raise FingerprintMismatch(
            f"{cache.path} holds a cache built with other settings: {shown}{more}. "
            "Pass --overwrite to replace it, or --cache DIR to keep both; it was left untouched")


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks: a checkpoint's or a run file's identity."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
