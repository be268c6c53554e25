"""What the benchmarks say about the machine they ran on."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_info() -> dict[str, Any]:
    """CPU name, usable cores, the bf16-relevant flags, and the load average now."""
    flags: set[str] = set()
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.partition(":")[2].split())
            elif line.startswith("model name"):
                name = line.partition(":")[2].strip()
    except OSError:
        pass
    return {"cpu": name, "cores": len(os.sched_getaffinity(0)), "load_avg": os.getloadavg()[0],
            **{f: f in flags for f in ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f")}}
