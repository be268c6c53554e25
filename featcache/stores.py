"""Where a cache root is: one function resolves every `--cache` (and $FEATCACHE_CACHE).

`resolve_root(value)` is what every command that takes a cache root calls (extract,
probe, ls, info, verify, export, report, predict, runs, and the commands other issues
add: evaluate, suites). A URL (`s3://bucket/prefix`, `gs://…`, any `scheme://`) is never
taken as a relative path: before this check, `--cache s3://bucket/c` wrote the whole
cache into a local folder named `s3:` and the user believed it was in the bucket.

Typer hands options over as `pathlib.Path`, which folds `s3://b/c` into `s3:/b/c`; both
spellings are recognised as URLs (a local folder whose first component ends in ':' is
reached as `./s3:/…`).
"""

from __future__ import annotations

import re
from pathlib import Path

from featcache.errors import FeatcacheError

# a scheme of two or more letters, then ':/' (Path keeps one slash of '://')
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):/")


def url_scheme(value: str | Path | None) -> str | None:
    """The scheme of a URL-looking cache root ('s3', 'gs', 'file', ...), else None."""
    if value is None:
        return None
    found = _URL.match(str(value))
    return found.group(1).lower() if found else None


def unsupported_url(value: str | Path, option: str = "--cache") -> FeatcacheError:
    """The one line for a URL featcache cannot serve."""
    scheme = url_scheme(value)
    return FeatcacheError(
        f"{option} {_as_url(value)}: featcache cannot serve '{scheme}://' cache roots; "
        "give a local folder (or ./NAME for a folder whose name ends in ':')")


def _as_url(value: str | Path) -> str:
    """`s3:/b/c` (as Path spells it) back to `s3://b/c`, for messages."""
    text = str(value)
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.\-]+):/(?!/)", r"\1://", text)


def resolve_root(value: str | Path | None = None, option: str = "--cache") -> Path:
    """The cache root a command was given (None: $FEATCACHE_CACHE, else the user's cache
    folder), as a local path; a URL it cannot serve is refused in one line."""
    if value is None or not str(value).strip():
        from featcache.cache import default_cache_root

        return default_cache_root()
    return local_path(value, option)


def local_path(value: str | Path, option: str = "PATH") -> Path:
    """A cache path given directly (`info PATH`, `verify PATH`, `export PATH`): local, or
    refused in one line when it is a URL."""
    if url_scheme(value):
        raise unsupported_url(value, option)
    path = Path(value).expanduser()
    # `./s3:/b` is folded to `s3:/b` by Path: absolute, it is never read as a URL again
    return path.absolute() if url_scheme(path) else path
