"""docs/cli.md must be what the Typer app says today (regenerate: `make docs`)."""

from pathlib import Path

from cli.docs import render

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def test_cli_reference_is_current() -> None:
    assert DOC.read_text() == render(), "docs/cli.md is stale: run `make docs`"


def test_every_command_is_documented() -> None:
    text = render()
    for command in ("extract", "ls", "info", "export", "models", "datasets", "probe", "runs",
                    "report"):
        assert f"## `featcache {command}`" in text
