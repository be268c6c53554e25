"""Commands of the probe side: probe, runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from featcache.cli.common import (
    console,
    err_console,
    options_from,
    print_rows,
    user_errors,
)


def _fmt(value: object) -> str:
    """A metric for the table ("—" for none, and for a record that holds no number)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f"{value:.2f}" if ok else "—"


@user_errors
def probe(
    method: Annotated[str, typer.Option(
        help="linear | concat | attentive | alf | layers | knn | knn-layers.")] = "alf",
    layers: Annotated[str | None, typer.Option(
        help="Layer set: last, middle+last, quarterly, all, or indices/names (3,7,-1).")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Only caches of this model.")] = None,
    dataset: Annotated[str | None, typer.Option(help="Only caches of this dataset.")] = None,
    cache: Annotated[Path | None, typer.Option(
        help="Cache root (env FEATCACHE_CACHE; default ~/.cache/featcache).")] = None,
    runs: Annotated[Path | None, typer.Option(help="Runs root (default: CACHE/runs).")] = None,
    local_cache: Annotated[Path | None, typer.Option(
        help="With an s3:// (or other object store) cache: keep a copy of every shard read "
             "in this folder, verified by the same checksums, and read it from there next "
             "time.")] = None,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds; mean ± std in reports.")
                     ] = "0",
    grid: Annotated[str, typer.Option(
        help="paper (3 lr × 7 wd × 3 dropout) or quick (small machines).")] = "paper",
    epochs: Annotated[int | None, typer.Option(help="Epochs (recipe: 40).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (recipe: 2048).")] = None,
    lrs: Annotated[str | None, typer.Option(help="Learning rates, e.g. 1e-1,1e-2,1e-3.")] = None,
    wds: Annotated[str | None, typer.Option(help="Weight decays, e.g. 1e-6,1e-3,1.")] = None,
    dropouts: Annotated[str | None, typer.Option(help="Attention dropouts, e.g. 0,0.1,0.3.")
                        ] = None,
    min_steps: Annotated[int | None, typer.Option(help="Minimum total steps (recipe: 1000).")
                         ] = None,
    shots: Annotated[int | None, typer.Option(help="K training examples per class.")] = None,
    token: Annotated[str | None, typer.Option(
        help="linear/layers: cls, ap or pool (default: the model's own embedding: "
             "CLS for the paper's models, AP for MAE).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    memory_gb: Annotated[float | None, typer.Option(
        help="Memory budget for the grid's heads, in GiB (2^30 bytes; default: half of free "
             "device memory).")
    ] = None,
    group_size: Annotated[int | None, typer.Option(
        help="Train the grid in groups of this many configs, one batched product per "
             "group: faster, but a config's numbers then depend on its group, so the run's "
             "identity names the size (default: each config its own products on a CPU, "
             "bitwise the same in any group; 16 on CUDA).")
    ] = None,
    parallel: Annotated[str, typer.Option(
        help="Under torchrun: grid (ranks share each grid's configs; each holds all tokens), "
             "data (ranks share the samples, whole shards each; for tokens one device "
             "cannot hold), auto (data when the tokens do not fit one device).")] = "auto",
    max_host_memory_gb: Annotated[float | None, typer.Option(
        help="Host memory the tokens may take, in GiB (2^30 bytes); beyond it (default: "
             "80 % of what is available) they are streamed from the cache, shuffled by "
             "buffers of shards.")
    ] = None,
    feature_memory_gb: Annotated[float | None, typer.Option(
        help="Keep the cached tokens on the device up to this size, in GiB (2^30 bytes), "
             "else stream them from host memory (default: half of free device memory).")
    ] = None,
    threads: Annotated[int | None, typer.Option(
        help="CPU threads for torch during the run (default: torch's).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Retrain finished runs.")] = False,
    protocol: Annotated[str, typer.Option(
        help="paper: as the authors' code (validation on jittered features, all-tokens "
             "features normalised per channel); clean: validation on clean features, every "
             "token normalised; paper also follows their batch plan.")] = "paper",
    precision: Annotated[str, typer.Option(
        help="Head training on CUDA: fp32 (TF32 off, as the authors), bf16 (autocast for the "
             "matmuls), or auto: fp32 under --protocol paper, bf16 under clean. The CPU "
             "always trains in fp32.")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
) -> None:
    """Train probes from the cache: the whole hyperparameter grid at once, select, refit."""
    from featcache.distributed import env_rank
    from featcache.probing.run import ProbeOptions
    from featcache.probing.run import probe as run_probe
    from featcache.progress import Bars

    opts = options_from(ProbeOptions, locals())
    # Under torchrun only rank 0 speaks (and writes the records).
    with Bars("epoch", enabled=not json_out and env_rank() == 0) as bars:
        results = run_probe(opts, progress=bars)
    if env_rank() != 0:
        return
    rows = [{"model": r.model, "dataset": r.dataset, "method": r.method,
             "layer_set": r.layer_set, "seed": r.seed, "status": r.status,
             **{k: r.metrics.get(k) for k in ("balanced_top1", "top1")},
             "selected": r.selected, "seconds": round(r.seconds, 2), "path": str(r.path)}
            for r in results]
    def selected(r: dict) -> str:
        return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in (r["selected"] or {}).items())

    # 80 columns: the names and the paper's number; wider terminals add the rest
    print_rows(rows, json_out, f"probe --method {method}: test accuracy (%)", [
        ("model", lambda r: short_model(str(r["model"]))), ("dataset", lambda r: r["dataset"]),
        ("layers", lambda r: r["layer_set"]), ("seed", lambda r: str(r["seed"])),
        ("balanced top-1", lambda r: _fmt(r["balanced_top1"])),
        ("top-1", lambda r: _fmt(r["top1"]), 100), ("selected", selected, 90),
        ("status", lambda r: "trained" if r["status"] == "trained"
         else "[dim]done before (--force)[/]")], overflow="fold")


@user_errors
def runs(
    cache: Annotated[Path | None, typer.Option(help="Cache root (runs under CACHE/runs).")
                     ] = None,
    runs: Annotated[Path | None, typer.Option(help="Runs root.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List trained runs with their test metrics."""
    from featcache.records.listing import runs as run_rows
    from featcache.records.store import default_runs_root

    root = runs or default_runs_root(cache)
    problems: list[str] = []
    rows = run_rows(cache, runs, problems)
    skipped = [n for n in problems if n.startswith("skipped")]
    for note in problems[:5]:  # a skipped record, or a note on one that is listed
        label, text = ("skipped", note.removeprefix("skipped: ").removeprefix("skipped ")) \
            if note in skipped else ("note", note)
        err_console.print(f"[yellow]{label}:[/] {text}", highlight=False, soft_wrap=True)
    if skipped:
        err_console.print(f"[yellow]{len(skipped)} unreadable record(s) skipped[/]"
                          + (f" ({len(problems) - 5} notes not shown)" if len(problems) > 5
                             else ""))
    variants = any(r["variant"] for r in rows)  # a column of "paper recipe" says nothing
    shown = print_rows(rows, json_out, f"runs under {root}", [
        ("model", lambda r: short_model(str(r["model"]))), ("dataset", lambda r: str(r["dataset"])),
        ("method", lambda r: str(r["method"])), ("layers", lambda r: str(r["layer_set"])),
        *([("variant", lambda r: r["variant"] or "paper")] if variants else []),
        ("seed", lambda r: str(r["seed"])),
        ("balanced top-1", lambda r: _fmt(r["balanced_top1"])),
        ("top-1", lambda r: _fmt(r["top1"]), 100),
        ("settings id", lambda r: str(r["settings_id"] or ""), 120)])
    if not shown and not json_out:
        console.print(f"no runs under {root}; train some with `featcache probe`")


def short_model(name: str) -> str:
    """A model's name without its backend (`timm:`, `open_clip:`) below 100 columns:
    the full name is in --json and the run's path."""
    return name.split(":", 1)[-1] if console.width < 100 else name


def register(app: typer.Typer) -> None:
    for func in (probe, runs):
        app.command()(func)
