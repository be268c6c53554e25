"""The Typer app: each command lives in its own module and registers itself here."""

from __future__ import annotations

import typer
from featcache.cli import demo_cmd, extract_cmd, predict_cmd, probe_cmd, report_cmd

app = typer.Typer(
    name="featcache",
    help="Cache every layer of a frozen ViT once, then train probes from the cache in minutes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Each command module registers its own commands.
for _module in (extract_cmd, probe_cmd, report_cmd, predict_cmd, demo_cmd):
    _module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
