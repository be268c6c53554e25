"""Running the CLI in tests, and what a user error must look like."""

from __future__ import annotations

from featcache.cli.main import app
from typer.testing import CliRunner


def run(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_user_error(result, *fragments: str) -> str:
    """Exit code 2, one `error:` line naming the problem, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]
