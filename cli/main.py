"""The Typer app: each command lives in its own module and registers itself here."""

from __future__ import annotations

import inspect
import sys
from typing import TYPE_CHECKING, Any

import typer
from featcache.cli import (
    demo_cmd,
    evaluate_cmd,
    extract_cmd,
    predict_cmd,
    probe_cmd,
    report_cmd,
    run_cmd,
)
from typer.core import TyperGroup, TyperOption

if TYPE_CHECKING:  # Typer carries its own copy of click
    import click


class OneLineErrors(TyperGroup):
    """A mistyped option or value is one line on stderr (exit 2), like every other user
    error, instead of the usage box. (Typer's click exceptions are private: matched by
    their public base and their own `format_message`/`exit_code`.)"""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        if sys.stdout is None:  # started with stdout closed (`>&-`): results would be lost
            if sys.stderr is not None:
                sys.stderr.write("error: standard output is closed; redirect it to a file\n")
            sys.exit(2)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        except typer.TyperException as exc:
            if type(exc).__name__ == "NoArgsIsHelpError" or not hasattr(exc, "format_message"):
                exc.show() if hasattr(exc, "show") else typer.echo(str(exc), err=True)
                sys.exit(getattr(exc, "exit_code", 2))
            ctx = getattr(exc, "ctx", None)
            where = ctx.command_path if ctx is not None else "featcache"
            hint = f" (see `{where} --help`)" if exc.exit_code == 2 else ""
            typer.echo(f"error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        sys.exit(code if isinstance(code, int) else 0)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None:
            _plain_help(cmd, ctx)
        return cmd

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = super().get_params(ctx)
        _bare_flags(params)
        return params


def _plain_help(cmd: click.Command, ctx: click.Context) -> None:
    """A command's help as the terminal wraps it: a docstring's line breaks inside a
    paragraph are spaces (rich markup keeps them: "finite values,\n labels"); flags show
    no value."""
    if cmd.help:
        paragraphs = inspect.cleandoc(cmd.help).split("\n\n")
        cmd.help = "\n\n".join(p if p.startswith("\b") else " ".join(p.split())
                                for p in paragraphs)
    _bare_flags(cmd.get_params(ctx))


def _bare_flags(params: list[click.Parameter]) -> None:
    """A flag takes no value, so its help shows none (Typer's rich help printed `<bool>`
    after every flag, `--force <bool>`, as if it took one)."""
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag:
            param.display_type_rich = _no_value  # type: ignore[attr-defined]


def _no_value(ctx: click.Context) -> None:
    return None


app = typer.Typer(
    name="featcache",
    cls=OneLineErrors,
    help="Cache every layer of a frozen ViT once, then train probes from the cache in minutes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Each command module registers its own commands.
for _module in (extract_cmd, probe_cmd, report_cmd, predict_cmd, evaluate_cmd, demo_cmd,
                run_cmd):
    _module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
