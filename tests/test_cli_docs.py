"""docs/cli.md must be what the Typer app says today (regenerate: `make docs`)."""

from pathlib import Path

from featcache.cli.docs import render

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def test_cli_reference_is_current() -> None:
    assert DOC.read_text() == render(), "docs/cli.md is stale: run `make docs`"


def test_every_command_is_documented() -> None:
    text = render()
    for command in ("extract", "ls", "info", "export", "models", "datasets", "probe", "runs",
                    "report", "predict", "export-model"):
        assert f"## `featcache {command}`" in text


def _commands():
    import typer.main
    from featcache.cli.main import app

    group = typer.main.get_command(app)
    ctx = group.context_class(group, info_name="featcache")
    return [(name, group.get_command(ctx, name)) for name in group.list_commands(ctx)]


def _squash(text: str) -> str:
    return " ".join(text.split())


def test_help_keeps_every_word(monkeypatch) -> None:
    """Rich markup must not eat help text (a bracketed "[default: …]" once vanished)."""
    from featcache.cli.main import app
    from typer.testing import CliRunner

    runner = CliRunner()
    for name, command in _commands():
        result = runner.invoke(app, [name, "--help"], env={"COLUMNS": "2000",
                                                           "TERMINAL_WIDTH": "2000"})
        assert result.exit_code == 0, result.output
        shown = _squash(result.output)
        first = _squash((command.help or "").split("\n\n")[0])
        assert first in shown, f"featcache {name} --help lost its summary"
        for param in command.params:
            text = _squash(getattr(param, "help", None) or "")
            assert text in shown, f"featcache {name} --help lost {param.name}'s help {text!r}"


def test_help_shows_no_value_after_a_flag_and_wraps_as_the_terminal_wants() -> None:
    """`--force <bool>` read as if the flag took a value; a docstring's line breaks cut
    command summaries ("finite values,\n labels in range")."""
    import re

    from featcache.cli.main import app
    from typer.testing import CliRunner

    runner = CliRunner()
    top = runner.invoke(app, ["--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert top.exit_code == 0 and "<bool>" not in top.output
    for name, command in _commands():
        result = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200",
                                                           "TERMINAL_WIDTH": "200"})
        assert "<bool>" not in result.output, name
        flags = [p for p in command.params if getattr(p, "is_flag", False)]
        for flag in flags:  # its row: the flag, spaces, then its help (no value between)
            opt = [o for o in flag.opts if o.startswith("--")][0]
            assert re.search(re.escape(opt) + r"(/--[\w-]+)?\s+[A-Z(`]", result.output) or \
                re.search(re.escape(opt) + r"\s+\S", result.output), (name, opt)
        summary = _squash((command.help or "").split("\n\n")[0])
        # at 200 columns a summary of under ~190 characters is one line
        if len(summary) < 150:
            lines = [ln.strip(" │") for ln in result.output.splitlines()]
            assert summary in lines or any(ln.strip() == summary for ln in lines), \
                (name, summary)


def test_every_command_is_a_library_function_with_the_same_option_names() -> None:
    """`--workers` ↔ `workers`: each command's options are keywords of the function of the
    same name on the package (extract/probe: fields of their options class)."""
    import dataclasses
    import inspect

    import featcache

    classes = {"extract": featcache.ExtractOptions, "probe": featcache.ProbeOptions}
    for name, command in _commands():
        name = name.replace("-", "_")  # export-model ↔ featcache.export_model
        func = getattr(featcache, name)
        assert inspect.isfunction(func), f"featcache.{name} is {func!r}, not a function"
        assert name in featcache.__all__
        if name in classes:
            names = {f.name for f in dataclasses.fields(classes[name])}
        else:
            names = set(inspect.signature(func).parameters)
        options = {p.name for p in command.params} - {"json_out", "help"}
        assert options <= names, f"featcache.{name} lacks {sorted(options - names)}"


def test_no_submodule_shadows_a_command() -> None:
    """Importing every module of the package leaves every command a function."""
    import importlib
    import inspect
    import pkgutil

    import featcache

    for info in pkgutil.walk_packages(featcache.__path__, "featcache."):
        importlib.import_module(info.name)
    for name, _ in _commands():
        assert inspect.isfunction(getattr(featcache, name.replace("-", "_"))), name


def test_no_module_shadows_a_package_function() -> None:
    """`import featcache.X` sets the attribute X of the package to the module: a module
    named like a command (`featcache/verify.py` was) would replace `featcache.verify`."""
    import importlib
    import inspect
    import pkgutil

    import featcache

    for info in pkgutil.walk_packages(featcache.__path__, "featcache."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    for name in featcache._LAZY:
        assert not inspect.ismodule(getattr(featcache, name)), name
