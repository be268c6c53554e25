"""What every command shares: consoles, the user-error guard, JSON printing."""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from featcache.errors import FeatcacheError, FeatcacheWarning

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])
Opts = TypeVar("Opts")


def user_errors(func: F) -> F:
    """Turn a FeatcacheError, or anything the disk says (full, read-only, permissions), into
    one red line on stderr and exit code 2 (no traceback); show featcache's warnings as
    yellow lines, each once."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("always", FeatcacheWarning)
            warnings.showwarning = _show_warning(warnings.showwarning)
            try:
                return func(*args, **kwargs)
            except FeatcacheError as exc:
                _error(str(exc), exc.every_rank)
            except OSError as exc:  # a disk or a path the user gave: never a traceback
                _error(disk_error(exc))
            except MemoryError:
                _error("out of memory: use fewer layers (--layers), fewer samples (--shots), "
                       "a smaller --batch-size or --memory-gb, or a larger machine")
            except RuntimeError as exc:  # under torchrun: a rank died mid-collective
                from featcache.distributed import peer_died

                line = peer_died(exc)
                if line is None:
                    raise
                _error(line, every_rank=True)
            except KeyboardInterrupt:
                err_console.print(f"[yellow]interrupted[/]: {_after_interrupt(func)}",
                                  highlight=False)
                raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


# the commands whose work is kept piece by piece, so that the same command resumes it
RESUMABLE = ("extract", "probe", "demo")


def _after_interrupt(func: Callable[..., Any]) -> str:
    if func.__name__ in RESUMABLE:
        return "what was finished is kept; re-run the same command to resume."
    return "no file is left half-written; run the same command again."


def _error(text: str, every_rank: bool = False) -> None:
    from featcache.distributed import env_rank

    text = " ".join(str(text).split())  # one line, whatever a library's text held
    if env_rank() == 0 or every_rank:  # under torchrun the line is said once, by rank 0
        # escaped: a message may quote "[probe]" or "[default]", which rich would eat
        err_console.print(f"[bold red]error:[/] {escape(text)}", highlight=False,
                          soft_wrap=True)
    raise typer.Exit(2) from None


def disk_error(exc: OSError) -> str:
    """One line for an OSError: what failed, where, and what to do."""
    where = f" ({exc.filename})" if exc.filename else ""
    what = exc.strerror or str(exc) or type(exc).__name__
    fixes = {
        errno.ENOSPC: "the disk is full: free space and run the same command again (finished "
                      "work is kept)",
        errno.EDQUOT: "the disk quota is used up: free space and run the same command again",
        errno.EROFS: "the file system is read-only: choose a writable folder",
        errno.EACCES: "no permission: fix the permissions or choose another folder",
        errno.EPERM: "not permitted: fix the permissions or choose another folder",
        errno.ENOENT: "no such file or folder: check the path",
        errno.ENOTDIR: "a file stands where a folder was expected: check the path",
        errno.EISDIR: "a folder stands where a file was expected: check the path",
        errno.ELOOP: "a symbolic link loops: fix or remove it",
        errno.ENAMETOOLONG: "a file name is too long for the file system: use shorter names",
    }
    fix = fixes.get(exc.errno or -1, "check the path, its permissions and free disk space")
    return f"{what}{where}; {fix}"


def _show_warning(original: Any) -> Any:
    shown: set[str] = set()

    def show(message: Any, category: type, *args: Any, **kwargs: Any) -> None:
        if not issubclass(category, FeatcacheWarning):
            return original(message, category, *args, **kwargs)
        text = str(message)
        if text not in shown:
            shown.add(text)
            err_console.print(f"[yellow]warning:[/] {text}", highlight=False, soft_wrap=True)
        return None

    return show


def options_from(cls: type[Opts], params: dict[str, Any]) -> Opts:
    """The library's options object from a command's local names: its parameters carry
    the options' own names (`--workers` is `workers`; `tests/test_cli_docs.py` checks it
    for every command), anything else (`--json`, imports) is not an option."""
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in params.items() if k in fields})


Column = tuple  # (header, cell of a row) or (header, cell, the terminal width it needs)


def print_rows(rows: list[dict[str, Any]], json_out: bool, title: str,
               columns: list[Column], **column_style: Any) -> bool:
    """A command's rows: JSON on stdout with `--json`, else a table of `columns`
    (header, cell of a row[, the terminal width from which the column is shown]: a
    narrow terminal gets fewer columns, never words broken inside cells). Returns False
    when there was nothing to show."""
    if json_out:
        print_json(rows)
        return bool(rows)
    if not rows:
        return False
    from rich import box
    from rich.table import Table

    shown = [c for c in columns if len(c) < 3 or console.width >= c[2]]
    cells = [[column[1](row) for column in shown] for row in rows]
    words = [max(_longest_word(t) for t in (col[0], *(line[i] for line in cells)))
             for i, col in enumerate(shown)]
    # each column takes its widest word plus 3 (padding and a separator), no outer edges
    while sum(words) + 3 * len(words) - 3 > console.width and any(len(c) > 2 for c in shown):
        drop = max((i for i, c in enumerate(shown) if len(c) > 2), key=lambda i: shown[i][2])
        del shown[drop], words[drop]
        cells = [line[:drop] + line[drop + 1:] for line in cells]
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    style = {**column_style, "overflow": "fold"}
    for i, (header, *_) in enumerate(shown):
        # the first column is a name to copy into a command: never wrapped or cut; the
        # others wrap at spaces, never inside a word where the terminal is wide enough
        table.add_column(header, **({**style, "no_wrap": True, "overflow": "ignore"}
                                    if i == 0 else {**style, "min_width": words[i]}))
    for line in cells:
        table.add_row(*line)
    console.print(table)
    return True


def _longest_word(text: str) -> int:
    from rich.text import Text

    return max((len(w) for w in Text.from_markup(text).plain.split()), default=0)


def print_json(obj: Any) -> None:
    """Machine-readable output: plain JSON on stdout, nothing else (strict: a NaN from a
    damaged record is null, which every JSON reader takes)."""
    from featcache.records.store import strict_json

    typer.echo(json.dumps(strict_json(obj), indent=2, default=str, allow_nan=False))
