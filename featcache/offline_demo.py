"""The offline demo: extract → probe (linear, concat, ALF, per-layer) → report, in minutes.

No weights or datasets can be fetched offline, so it runs a small randomly initialised
ViT on scikit-learn's bundled digits, through exactly the code paths real runs take.
Online, `--model clip-vit-b16 --weights hub --dataset fer2013` runs the same pipeline on
real data.

    featcache demo --out demo-out          (make demo)
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console

DEMO_MODEL = "timm:vit_tiny_patch16_224"
# 12 blocks of width 192 at 64 px (8-px patches: 64 patch tokens): ALF reads 24 tokens.
DEMO_MODEL_KWARGS: dict[str, Any] = {"img_size": 64, "patch_size": 8}
DEMO_METHODS = ("linear", "concat", "alf", "layers")


def _check_writable(out: Path) -> None:
    """`--out` must be a folder featcache can write (said with the demo's own option)."""
    from featcache.errors import FeatcacheError

    if out.exists() and not out.is_dir():
        raise FeatcacheError(f"--out {out} is a file; give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe_file = out / f".write-test-{os.getpid()}"
        probe_file.touch()
        probe_file.unlink()
    except OSError as exc:
        raise FeatcacheError(f"cannot write in --out {out}: {exc.strerror or exc}; choose a "
                             "writable folder") from None


def demo(out: str | Path = "demo-out", model: str = DEMO_MODEL, dataset: str = "digits",
         weights: str | None = "random", grid: str = "quick",
         model_arg: dict[str, Any] | None = None, methods: tuple[str, ...] = DEMO_METHODS,
         epochs: int | None = None, min_steps: int | None = None,
         console: Console | None = None) -> dict[str, Any]:
    """`featcache demo`: the whole pipeline under `out` (cache in out/cache, report in
    out/report). ``weights`` "hub" (or None) uses the hub weights."""
    if weights == "hub":
        weights = None
    model_kwargs = model_arg
    from featcache.extracting.run import ExtractOptions, extract
    from featcache.probing.run import ProbeOptions, probe
    from featcache.progress import Bars
    from featcache.records.store import default_runs_root
    from featcache.reporting.build import build_report, prepare_report, render_table

    console = console or Console()
    out = Path(out)
    cache_root, report_dir = out / "cache", out / "report"
    from featcache.probing.run import check_options

    for method in methods:  # before minutes of extraction, not after
        check_options(ProbeOptions(method=method, cache=cache_root, grid=grid, epochs=epochs,
                                   min_steps=min_steps))
    _check_writable(out)
    kwargs = DEMO_MODEL_KWARGS if model_kwargs is None and model == DEMO_MODEL else model_kwargs
    timings: dict[str, float] = {}

    console.rule(f"[bold]1/3 extract[/]: {model} ({weights or 'hub weights'}) on {dataset}")
    started = time.perf_counter()
    with Bars("img", console=console) as bars:
        results = extract(ExtractOptions(model=model, dataset=dataset, weights=weights,
                                         model_arg=dict(kwargs or {}), cache=cache_root),
                          progress=bars)
    timings["extract_s"] = time.perf_counter() - started
    for r in results:
        console.print(f"  {r.split}: {r.n} images → {r.path} ({r.status})")

    console.rule("[bold]2/3 probe[/]: " + ", ".join(methods))
    started = time.perf_counter()
    for method in methods:
        with Bars("epoch", console=console) as bars:
            # Heads this small gain nothing from intra-op threads, and on a busy 2-core
            # machine spinning threads made the ALF grid over 10x slower: one thread.
            probe(ProbeOptions(method=method, cache=cache_root, grid=grid, epochs=epochs,
                               min_steps=min_steps, threads=1), progress=bars)
    timings["probe_s"] = time.perf_counter() - started

    console.rule("[bold]3/3 report[/]")
    started = time.perf_counter()
    runs_root = default_runs_root(cache_root)
    written = build_report(runs_root, report_dir)
    render_table(prepare_report(runs_root, None, cka=False).rows, console=console)
    timings["report_s"] = time.perf_counter() - started
    for kind, path in written.items():
        console.print(f"  {kind}: {path}")
    console.print(f"[bold green]done[/] in {sum(timings.values()):.0f} s "
                  f"(extract {timings['extract_s']:.0f} s, probe {timings['probe_s']:.0f} s, "
                  f"report {timings['report_s']:.0f} s). Open {written.get('html')} in a browser.")
    return {"written": written, "timings": timings, "cache_root": cache_root}
