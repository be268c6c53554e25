"""Text for people and for file names: sizes, filesystem-safe names."""

from __future__ import annotations

import re


def human_bytes(n: float) -> str:
    """1536 → "1.5 KiB"; "1000 bytes" below 1 KiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} bytes" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def slug(text: str) -> str:
    """A readable, filesystem-safe name (folders, figure files)."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "x"
