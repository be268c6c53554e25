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


def slow_extract(cli: list[str], pause: float):
    """`featcache CLI...` in a child process that sleeps `pause` s after each finished shard,
    so that a kill lands mid-run (stdout and stderr piped)."""
    import os
    import subprocess
    import sys

    script = ("import time, sys; from featcache.cache import store as c\n"
              "w = c.Cache.write_shard\n"
              f"def slow(self, *a):\n    w(self, *a); time.sleep({pause})\n"
              "c.Cache.write_shard = slow\n"
              "from featcache.cli.main import app; sys.argv[0] = 'featcache'; app()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", script, *cli], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def kill_9_when(child, ready, poll: float, limit: float = 120.0) -> None:
    """SIGKILL ``child`` once ``ready()`` holds (asked every ``poll`` s, for at most
    ``limit`` s); the test fails if the child ended first. The child never outlives it."""
    import signal
    import time

    try:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and child.poll() is None and not ready():
            time.sleep(poll)
        assert child.poll() is None, child.communicate()
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
