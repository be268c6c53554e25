"""`featcache evaluate`: a trained probe scored on another dataset's cache (shift)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from featcache.cli.common import console, print_json, user_errors


@user_errors
def evaluate(
    run_dir: Annotated[Path, typer.Argument(
        help="A run folder (`featcache runs` lists them: the path column).")],
    dataset: Annotated[str | None, typer.Option(
        help="The test set: a dataset name as `extract` takes it (imagenet-r, …), or the "
             "dataset of a cache under --cache as `featcache ls` shows it.")] = None,
    split: Annotated[str, typer.Option(help="The split of --dataset.")] = "test",
    cache: Annotated[Path | None, typer.Option(
        help="The cache root to look in (default: the run's own).")] = None,
    test_cache: Annotated[Path | None, typer.Option(
        help="A cache folder to score, instead of --dataset.")] = None,
    class_map: Annotated[Path | None, typer.Option(
        help="JSON {test class: training class (or a list of them)} for names that differ.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print the result as JSON ({\"metrics\": …, \"n\": …, …}).")] = False,
) -> None:
    """Score a run's selected probe on another cache of the same backbone (a test set
    under shift: ImageNet-V2, -Sketch, -R, -A, ObjectNet). Classes are matched by name;
    a test set with a subset of the classes is scored on the logits restricted to it. The
    result is kept beside the run (its shift/ folder) for the report."""
    from featcache.serving.shift import evaluate as run_evaluate

    result = run_evaluate(run_dir, dataset=dataset, split=split, cache=cache,
                          test_cache=test_cache, class_map=class_map, device=device)
    if json_out:
        print_json({k: v for k, v in result.items() if k != "per_class"})
        return
    m = result["metrics"]
    subset = "" if result["classes"] == result["training_classes_scored"] else \
        f"; logits restricted to its {result['training_classes_scored']} training classes"
    console.print(f"{result['test_dataset']} {result['split']}: balanced top-1 "
                  f"{m['balanced_top1']:.2f} %, top-1 {m['top1']:.2f} % on {result['n']} "
                  f"images ({result['classes']} classes{subset})", highlight=False)
    console.print(f"[green]kept[/] {result['file']}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("evaluate")(evaluate)
