"""`featcache demo`: the whole pipeline offline, on a small random ViT and sklearn's digits."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from featcache.cli.common import console, user_errors

from featcache.offline_demo import DEMO_MODEL


@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's cache and report.")
                   ] = Path("demo-out"),
    model: Annotated[str, typer.Option(
        help="The backbone (default: a 12-block width-192 ViT at 64 px).")
    ] = DEMO_MODEL,
    dataset: Annotated[str, typer.Option(help="The dataset.")] = "digits",
    weights: Annotated[str, typer.Option(
        help="random or random:SEED (offline), hub, or a checkpoint PATH.")] = "random",
    grid: Annotated[str, typer.Option(help="quick (default) or paper.")] = "quick",
) -> None:
    """Extract, probe (linear, concat, ALF, per layer) and report, offline, in about a
    minute: a small random ViT on sklearn's digits, through the code paths real runs take."""
    from featcache.offline_demo import demo as run_demo

    run_demo(out, model, dataset, weights, grid, console=console)


def register(app: typer.Typer) -> None:
    app.command()(demo)
