"""What every command shares: consoles, the user-error guard, JSON printing."""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from featcache.errors import FeatcacheError

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])
Opts = TypeVar("Opts")


def user_errors(func: F) -> F:
    """Turn a FeatcacheError into one red line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except FeatcacheError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]: what was finished is kept; "
                              "re-run the same command to resume.")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def options_from(cls: type[Opts], params: dict[str, Any]) -> Opts:
    """The library's options object from a command's local names: its parameters carry
    the options' own names (`--workers` is `workers`; `tests/test_cli_docs.py` checks it
    for every command), anything else (`--json`, imports) is not an option."""
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in params.items() if k in fields})


def print_json(obj: Any) -> None:
    """Machine-readable output: plain JSON on stdout, nothing else."""
    typer.echo(json.dumps(obj, indent=2, default=str))
