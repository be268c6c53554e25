"""User-facing errors: one line that names the problem and the fix, never a traceback."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path


class FeatcacheError(Exception):
    """A problem with the user's input or environment; the CLI prints it as one line.
    Under torchrun rank 0 alone says it, unless `every_rank` (a rank's own problem)."""

    every_rank = False


class RankError(FeatcacheError):
    """A problem only this rank knows of (under torchrun): every rank says its own."""

    every_rank = True


class FingerprintMismatch(FeatcacheError):
    """A cache exists at the target path but was built with other settings."""


class FeatcacheWarning(UserWarning):
    """Something the user asked for that featcache does differently than the words say
    (an option that does not apply, fewer samples than asked); the CLI prints it as one
    yellow line, Python shows it as a warning."""


def warn(message: str) -> None:
    import warnings

    warnings.warn(message, FeatcacheWarning, stacklevel=3)


def os_error(exc: BaseException, path: Path) -> OSError:
    """An OSError for a library's error text that carries an `os error N` (Rust) or
    `errno = N` (HDF5)."""
    found = re.search(r"os error (\d+)|errno = (\d+)", str(exc))
    code = int(next(g for g in found.groups() if g)) if found else errno.EIO
    return OSError(code, os.strerror(code), str(path))
