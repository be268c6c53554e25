"""docs/cli.md, generated from the Typer app itself so the reference cannot drift.

    python -m featcache.cli.docs > docs/cli.md      (a test fails when the file is stale)
"""

from __future__ import annotations

from typing import Any

import typer.main
from featcache.cli.main import app

HEADER = """# CLI reference

Generated from the Typer app by `python -m featcache.cli.docs > docs/cli.md` (`make docs`);
`tests/test_cli_docs.py` fails when this file and the code disagree.
Every command is a thin shell over the library: the same names work from Python
(`featcache.extract`, `featcache.probe`, `featcache.report`, ...).
"""


def _option_row(param: Any, ctx: Any) -> str:
    if param.param_type_name == "argument":
        names = f"`{param.name.upper()}`"
        kind = "argument"
    else:
        flags = [*param.opts, *param.secondary_opts]
        names = ", ".join(f"`{f}`" for f in flags)
        kind = "flag" if param.is_flag else param.display_type(ctx).strip("<>")
    default = getattr(param, "default", None)
    shown = "" if default in (None, False, ()) or callable(default) else f"`{default}`"
    help_text = (getattr(param, "help", None) or "").replace("|", "\\|").replace("\n", " ")
    required = " **required**" if param.required else ""
    return f"| {names} | {kind}{required} | {shown} | {help_text} |"


def render() -> str:
    group: Any = typer.main.get_command(app)  # typer vendors click: duck-type it
    ctx = group.context_class(group, info_name="featcache")
    parts = [HEADER]
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None
        summary = (command.help or "").strip().splitlines()[0] if command.help else ""
        parts.append(f"## `featcache {name}`\n\n{summary}\n")
        params = [p for p in command.params if p.name != "help"]
        if params:
            parts.append("| option | type | default | meaning |\n|---|---|---|---|")
            parts.extend(_option_row(p, ctx) for p in params)
            parts.append("")
    return "\n".join(parts).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
