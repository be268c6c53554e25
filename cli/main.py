"""The Typer app: each command lives in its own module and registers itself here."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="featcache",
    help="Cache every layer of a frozen ViT once, then train probes from the cache in minutes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Each module defines `register(app)`; a module still being written is simply absent.
_COMMAND_MODULES = ("cli.extract_cmd", "cli.probe_cmd", "cli.report_cmd")

for _name in _COMMAND_MODULES:
    try:
        _module = importlib.import_module(_name)
    except ModuleNotFoundError as _exc:
        if _exc.name != _name:
            raise
        continue
    _module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
