"""Commands of the cache side: extract, ls, info, export, models, datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from featcache.cli.common import (
    console,
    err_console,
    options_from,
    print_json,
    print_rows,
    user_errors,
)
from rich import box
from rich.table import Table

from featcache.errors import FeatcacheError
from featcache.text import human_bytes

CacheOpt = Annotated[Path | None, typer.Option(
    "--cache", help="Cache root (env FEATCACHE_CACHE; default ~/.cache/featcache).")]


@user_errors
def extract(
    model: Annotated[str, typer.Option(
        help="Registry name (see `featcache models`), timm:NAME or open_clip:ARCH:PRETRAINED; "
             "a comma list or a collection (paper) extracts every pair.")],
    dataset: Annotated[str, typer.Option(
        help="Registry name (see `featcache datasets`), imagefolder:PATH, wds:PATH, ...; a "
             "comma list or a collection (paper, natural, specialized, structured).")
    ] = "digits",
    split: Annotated[str, typer.Option(help="Comma-separated splits.")] = "train,test",
    weights: Annotated[str | None, typer.Option(
        help="Hub weights (default), a local checkpoint PATH, or random or random:SEED.")] = None,
    tap: Annotated[str, typer.Option(
        help="reference: each block's norm2 (ln_2) output + final; residual: block outputs.")
    ] = "reference",
    model_arg: Annotated[list[str] | None, typer.Option(
        help="Architecture override KEY=VALUE (repeatable), e.g. img_size=224.")] = None,
    cache: CacheOpt = None,
    data_root: Annotated[Path | None, typer.Option(
        help="Where datasets are downloaded (env FEATCACHE_DATA).")] = None,
    download: Annotated[bool, typer.Option(help="Download missing datasets from the hub.")
                        ] = True,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    workers: Annotated[int | None, typer.Option(
        help="DataLoader workers (default: on a GPU, CPUs - 1, at most 8; on a CPU, 0 up "
             "to 4 cores, else CPUs / 8).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(
        help="Compute dtype: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16.")] = "auto",
    all_tokens: Annotated[bool, typer.Option(
        "--all-tokens", help="Also store every token of the last layer.")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace a cache built with other settings.")] = False,
    skip_bad: Annotated[bool, typer.Option(
        "--skip-bad", help="Skip unreadable images (recorded in the cache) instead of stopping.")
    ] = False,
    shard_size: Annotated[int | None, typer.Option(
        help="Samples per shard (default: sized to ~64 MiB, at most 1024).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Run a frozen backbone once over a dataset and cache per-layer CLS+AP tokens."""
    from featcache import distributed
    from featcache.extracting.run import ExtractOptions
    from featcache.extracting.run import extract as run_extract
    from featcache.progress import Bars
    from featcache.suites.names import PairsFailed

    opts = options_from(ExtractOptions, locals())
    # Under torchrun only rank 0 speaks (its bar counts its own share of the shards).
    show = not json_out and distributed.env_rank() == 0
    failed: PairsFailed | None = None
    with Bars("img", enabled=show) as bars:
        try:
            results = run_extract(opts, progress=bars, on_failure=_pair_failed)
        except PairsFailed as exc:  # the other pairs' lines first, then the summary
            results, failed = exc.results, exc
    if distributed.env_rank() != 0:
        return
    _show_extracted(results, json_out)
    if failed is not None:
        raise failed


def _pair_failed(model: str, dataset: str, exc: Exception) -> None:
    from rich.markup import escape

    from featcache.distributed import env_rank

    if env_rank() == 0:
        err_console.print(f"[red]failed[/] {escape(model)} × {escape(dataset)}: "
                          f"{escape(' '.join(str(exc).split()))}", highlight=False,
                          soft_wrap=True)


def _show_extracted(results: list, json_out: bool) -> None:
    rows = [{"path": str(r.path), "split": r.split, "n": r.n, "status": r.status,
             "shards_written": r.shards_written, "seconds": round(r.seconds, 2),
             "images_per_s": round(r.images_per_s, 1), "skipped": r.n_skipped,
             "ranks": r.ranks} for r in results]
    if json_out:
        print_json(rows)
        return
    for r in results:
        skipped = f", {r.n_skipped} unreadable skipped (valid=False)" if r.n_skipped else ""
        if r.status == "complete":
            console.print(f"[green]already complete[/]: {r.path} ({r.n} images{skipped}); "
                          "nothing to do", soft_wrap=True)
        else:
            verb = "resumed and finished" if r.status == "resumed" else "wrote"
            shards = f"{r.shards_written} shard{'s' if r.shards_written != 1 else ''}"
            if r.ranks > 1:
                shards += f" on {r.ranks} ranks"
            console.print(f"[green]{verb}[/] {r.path}: {r.n} images, {shards} in "
                          f"{r.seconds:.1f} s ({r.images_per_s:.1f} img/s){skipped}",
                          soft_wrap=True)


@user_errors
def ls(
    cache: CacheOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the caches under the root: model, dataset, split, size, complete or not."""
    from featcache.cache.commands import ls as list_caches
    from featcache.cache.stores import resolve_root

    root = resolve_root(cache)
    rows = list_caches(root)
    if json_out:
        print_json(rows)
        return
    if not rows:
        console.print(f"no caches under {root}; make one with `featcache extract`")
        return
    # Narrow enough for 80 columns; the tap shows in the model dir (`@residual`), and
    # `ls --json` / `info` give everything else.
    table = Table(title=f"caches under {root}", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("model dir", overflow="fold")
    table.add_column("dataset dir", overflow="fold")
    for col in ("split", "N", "size", "done"):
        table.add_column(col, no_wrap=True, justify="right" if col in ("N", "size") else "left")
    for r in rows:
        done = f"{r['shards_done']}/{r['shards']} shards"
        status = "[green]yes[/]" if r["complete"] else f"[yellow]{done}[/]"
        path = Path(r["path"])
        table.add_row(path.parent.parent.name, path.parent.name, path.name, str(r["n"]),
                      human_bytes(r["bytes"]), status)
    console.print(table)
    console.print("full paths and fingerprints: `featcache ls --json`, `featcache info PATH`")


@user_errors
def info(
    path: Annotated[Path, typer.Argument(help="A cache directory (see `featcache ls`).")],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show one cache's fingerprint, layout and sizes."""
    from featcache.cache.commands import info as cache_info

    data = cache_info(path)
    if json_out:
        print_json(data)
        return
    console.print(f"[bold]{data['path']}[/]")
    for key in ("model", "weights", "tap", "dataset", "split", "n", "layers", "dim",
                "all_tokens", "complete"):
        console.print(f"  {key:>10}: {data[key]}")
    probe_token = data["attrs"].get("probe_token")
    console.print(f"  {'tokens':>10}: {', '.join(data['token_kinds'])}"
                  + (f" (linear probe: {probe_token})" if probe_token else ""))
    console.print(f"  {'shards':>10}: {data['shards_done']}/{data['shards']} done, "
                  f"{data['shard_size']} samples each")
    console.print(f"  {'size':>10}: {human_bytes(data['bytes'])}")
    console.print(f"  {'transform':>10}: {data['transform']}", soft_wrap=True)
    if data["missing_files"]:
        console.print(f"  [red]{'damaged':>10}[/]: {len(data['missing_files'])} flagged shard "
                      f"files are missing ({', '.join(data['missing_files'][:3])}); run "
                      f"`featcache verify {data['path']}`", soft_wrap=True, highlight=False)
    console.print(f"  {'layers':>10}: {', '.join(data['layer_names'])}")
    console.print("  full fingerprint: `featcache info PATH --json`")


@user_errors
def export(
    path: Annotated[Path, typer.Argument(help="A cache directory.")],
    format: Annotated[str, typer.Option(help="Export format (hdf5).")] = "hdf5",
    out: Annotated[Path | None, typer.Option(help="Output file (default: PATH.h5).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
) -> None:
    """Write a cache's arrays and attributes to another format (HDF5)."""
    from featcache.cache.commands import export as export_cache

    written = export_cache(path, format, out, overwrite)
    console.print(f"[green]wrote[/] {written} ({human_bytes(written.stat().st_size)})")


@user_errors
def models(json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """The model registry (any other timm or open_clip ViT works by prefix)."""
    from featcache.backbones import models as model_rows

    # the hub tags are long: in --json (an 80-column table of them wrapped every cell)
    print_rows(model_rows(), json_out, "models (also timm:NAME, open_clip:ARCH:PRETRAINED; "
               "hub tags: --json)", [
                   ("name", lambda r: r["name"]), ("backend", lambda r: r["backend"]),
                   ("tokens", lambda r: "+".join(r.get("token_kinds") or ()) or "?"),
                   ("set", lambda r: "paper" if r.get("paper") else "extension"
                    if r.get("extension") else ""),
                   ("description", lambda r: r["description"])])
    if not json_out:
        _collections("models")


@user_errors
def datasets(json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False
             ) -> None:
    """The dataset registry (also imagefolder:PATH, wds:PATH, torchvision:NAME, ...)."""
    from featcache.sources import datasets as dataset_rows

    print_rows(dataset_rows(), json_out, "datasets", [
        ("name", lambda r: r["name"]), ("source", lambda r: r["source"]),
        ("classes", lambda r: str(r.get("n_classes") or "?")),
        ("description", lambda r: r["description"])], overflow="fold")
    if not json_out:
        _collections("datasets")


def _collections(kind: str) -> None:
    """The names that stand for several (`--model paper`, `--dataset natural`)."""
    from featcache.suites.names import collection_rows

    option = "--model" if kind == "models" else "--dataset"
    console.print(f"collections ({option}, comma lists and suite files take them too):")
    for row in collection_rows(kind):
        console.print(f"  [bold]{row['collection']}[/] ({row['n']}): "
                      f"{', '.join(row['members'])}", highlight=False, soft_wrap=True)


@user_errors
def verify(
    path: Annotated[Path | None, typer.Argument(
        help="A cache directory; leave out to verify every cache under --cache.")] = None,
    cache: CacheOpt = None,
    repair: Annotated[bool, typer.Option(
        "--repair", help="Clear the damaged shards' done flags (and files), so that the same "
        "`featcache extract` command recomputes exactly those.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Read every shard of a cache: checksums, files of flagged shards, finite values,
    labels in range. Exit status as fsck's: 0 nothing damaged, 1 damage found and repaired
    (--repair: flags cleared, re-run the printed extract command), 2 something damaged and
    not repaired (or a user error)."""
    from featcache.cache.verification import verify as run_verify

    if path is not None and not (path / "zarr.json").exists() \
            and next(path.glob("*/*/*/zarr.json"), None) is not None:
        raise FeatcacheError(f"{path} is a cache root, not one cache; verify every cache "
                             f"under it with `featcache verify --cache {path}`")
    results = run_verify(path, cache, repair)
    if json_out:
        print_json([r.as_json() for r in results])
    else:
        for r in results:
            if r.metadata:
                console.print(f"[red]damaged[/] {r.path}: {r.metadata}", soft_wrap=True)
                continue
            if r.ok:
                todo = (f"; {r.unwritten} not written yet, finish with: {r.extract_command}"
                        if r.unwritten else "")
                console.print(f"[green]ok[/] {r.path} ({r.shards} shards{todo})",
                              soft_wrap=True, highlight=False)
                continue
            shards = ", ".join(f"{k} ({'; '.join(why)})" for k, why in sorted(r.damaged.items()))
            verb = "[yellow]repaired[/]" if r.repaired else "[red]damaged[/]"
            console.print(f"{verb} {r.path}: shard{'s' if len(r.damaged) > 1 else ''} "
                          f"{shards}", soft_wrap=True)
            if r.repaired:
                console.print(f"  their flags are cleared; recompute them with: "
                              f"{r.extract_command}", soft_wrap=True, highlight=False)
            else:
                console.print(f"  fix: featcache verify {r.path} --repair, then: "
                              f"{r.extract_command}", soft_wrap=True, highlight=False)
    raise typer.Exit(verify_status(results))


def verify_status(results: list) -> int:
    """fsck's convention: 0 clean, 1 damage found and repaired, 2 damage left."""
    if any(r.metadata or (not r.ok and not r.repaired) for r in results):
        return 2
    return 1 if any(r.repaired for r in results) else 0


def register(app: typer.Typer) -> None:
    for func in (extract, ls, info, export, verify, models, datasets):
        app.command()(func)
