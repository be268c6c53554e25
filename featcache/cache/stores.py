"""Where a cache root is: one function resolves every `--cache` (and $FEATCACHE_CACHE).

`resolve_root(value)` is what every command that takes a cache root calls (extract,
probe, ls, info, verify, export, report, runs; evaluate and suites too): a local `Path`,
or a `RemotePath` for an object store URL (`s3://bucket/prefix`, `gs://…`, any fsspec URL
whose package is installed). A URL it cannot serve is refused in one line, never taken
as a relative path: before this, `--cache s3://bucket/c` wrote the whole cache into a
local folder named `s3:` and the user believed it was in the bucket.

`RemotePath` gives the cache code the few `pathlib.Path` operations it uses, over fsspec;
zarr reads and writes the arrays through its `FsspecStore` (`zarr_store`). Typer hands
options over as `pathlib.Path`, which folds `s3://b/c` into `s3:/b/c`; both spellings
are recognised (a local folder whose first component ends in ':' is reached as
`./s3:/…`). See docs/cache-format.md, "Object stores".
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from featcache.errors import FeatcacheError

# a scheme of two or more letters, then ':/' (Path keeps one slash of '://')
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):/")


def url_scheme(value: str | Path | None) -> str | None:
    """The scheme of a URL-looking cache root ('s3', 'gs', 'file', ...), else None."""
    if value is None:
        return None
    found = _URL.match(str(value))
    return found.group(1).lower() if found else None


def unsupported_url(value: str | Path, option: str = "--cache", why: str = "") -> FeatcacheError:
    """The one line for a URL featcache cannot serve."""
    scheme = url_scheme(value)
    return FeatcacheError(
        f"{option} {_as_url(value)}: featcache cannot serve '{scheme}://' cache roots"
        f"{why or ''}; give a local folder, or an s3:// / gs:// URL (or ./NAME for a local "
        "folder whose name ends in ':')")


def _as_url(value: str | Path) -> str:
    """`s3:/b/c` (as Path spells it) back to `s3://b/c`."""
    text = str(value)
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.\-]+):/(?!/)", r"\1://", text)


def resolve_root(value: str | Path | RemotePath | None = None,
                 option: str = "--cache") -> Path | RemotePath:
    """The cache root a command was given (None: $FEATCACHE_CACHE, else the user's cache
    folder): a local path, or a `RemotePath` for an object store URL (s3://, gs://, any
    fsspec URL whose package is installed); a URL it cannot serve is refused in one line.
    Every command that takes a cache root calls this (evaluate and suites too)."""
    if isinstance(value, RemotePath):
        return value
    if value is None or not str(value).strip():
        return default_cache_root()
    return location(value, option)


def location(value: str | Path | RemotePath, option: str = "PATH") -> Path | RemotePath:
    """A cache path or root as given (`info PATH`, `verify PATH`): local or remote."""
    if isinstance(value, RemotePath):
        return value
    scheme = url_scheme(value)
    if scheme is None:
        return local_path(value, option)
    url = _as_url(value)
    if scheme in ("file", "local"):
        return Path(url.split("://", 1)[1]).expanduser()
    return RemotePath(url, _filesystem(scheme, url, option))


def local_path(value: str | Path, option: str = "PATH") -> Path:
    """A path that must be on this machine; a URL is refused in one line."""
    if isinstance(value, RemotePath) or url_scheme(value):
        raise FeatcacheError(f"{option} {_as_url(value)}: this needs a local folder, not an "
                             "object store URL")
    path = Path(value).expanduser()
    # `./s3:/b` is folded to `s3:/b` by Path: absolute, it is never read as a URL again
    return path.absolute() if url_scheme(path) else path


def is_remote(path: Any) -> bool:
    return isinstance(path, RemotePath)


# -- object stores ------------------------------------------------------------------------
# Credentials and endpoints come from the standard environment and the libraries' own
# config files (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL,
# AWS_DEFAULT_REGION, ~/.aws; GOOGLE_APPLICATION_CREDENTIALS for gs://): featcache passes
# none of them on and never writes one down (a cache, a record and a log hold URLs only).
RETRIES = 8  # botocore's adaptive mode: throttled (503 SlowDown) requests back off
STORE_OPTIONS: dict[str, dict[str, Any]] = {
    "s3": {"config_kwargs": {"retries": {"max_attempts": RETRIES, "mode": "adaptive"},
                             "connect_timeout": 10, "read_timeout": 60},
           "use_listings_cache": False},
    "gs": {"retries": 6},
}
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
             "abfs": "adlfs"}


def _filesystem(scheme: str, url: str, option: str) -> Any:
    import fsspec

    try:  # the package behind a scheme is imported only now (s3fs, gcsfs, pyarrow ...)
        return fsspec.get_filesystem_class(scheme)(**STORE_OPTIONS.get(scheme, {}))
    except (ValueError, ImportError) as exc:
        need = _PACKAGES.get(scheme)
        why = f" (install {need})" if need else f" ({str(exc).splitlines()[0][:80]})"
        raise unsupported_url(url, option, why) from None


class RemotePath:
    """A key prefix in an object store, with the few `pathlib.Path` operations the cache
    code uses (`/`, name, parent, is_file, read_text, ...), so that one `Cache` serves
    local folders and object stores. Errors of the store are one line
    (`store_error`)."""

    def __init__(self, url: str, fs: Any) -> None:
        self.url = url.rstrip("/")
        self.fs = fs
        self.scheme, self.key = self.url.split("://", 1)

    def __truediv__(self, part: str | Path) -> RemotePath:
        return RemotePath(f"{self.url}/{str(part).strip('/')}", self.fs)

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> RemotePath:
        if "/" not in self.key:
            return self
        return RemotePath(f"{self.scheme}://{self.key.rsplit('/', 1)[0]}", self.fs)

    def with_name(self, name: str) -> RemotePath:
        return self.parent / name

    def expanduser(self) -> RemotePath:
        return self

    def absolute(self) -> RemotePath:
        return self

    def is_file(self) -> bool:
        return bool(self._call(self.fs.isfile, self.key))

    def is_dir(self) -> bool:
        return bool(self._call(self.fs.isdir, self.key))

    def exists(self) -> bool:
        return bool(self._call(self.fs.exists, self.key))

    def read_bytes(self) -> bytes:
        return self._call(self.fs.cat_file, self.key)

    def read_text(self, errors: str = "strict") -> str:
        return self.read_bytes().decode("utf-8", errors=errors)

    def write_bytes(self, data: bytes) -> None:
        self._call(self.fs.pipe_file, self.key, data)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self._call(self.fs.rm_file, self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def listing(self) -> list[str]:
        """Every object under this prefix, as keys relative to it."""
        found = self._call(self.fs.find, self.key)
        return [k[len(self.key) + 1:] for k in found if k.startswith(self.key + "/")]

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError as exc:
            if "bucket" in str(exc).lower():
                raise store_error(self, exc) from None
            raise
        except (FileExistsError, NotImplementedError, TypeError, FeatcacheError):
            raise
        except Exception as exc:  # the store's own exception types vary by library
            raise store_error(self, exc) from None


def store_error(path: RemotePath, exc: BaseException) -> FeatcacheError:
    """One line for what an object store said: no bucket, no credentials, access denied,
    unreachable after retries."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    bucket = path.key.split("/", 1)[0]
    low = text.lower()
    if "nosuchbucket" in low or "bucket does not exist" in low:
        why = f"the bucket {bucket!r} does not exist; create it or fix the URL"
    elif "credential" in low or "signature" in low or "invalidaccesskeyid" in low:
        why = ("no valid credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
               "~/.aws/credentials, or the store's own variables)")
    elif "accessdenied" in low or "forbidden" in low or isinstance(exc, PermissionError):
        why = "access denied; check that your credentials may read and write this prefix"
    elif any(w in low for w in ("connect", "timeout", "timed out", "unreachable",
                                "endpoint", "connection")):
        why = (f"the store is unreachable after {RETRIES} tries ({text[:100]}); check "
               "AWS_ENDPOINT_URL and the network, then run the same command again")
    elif "slowdown" in low or "throttl" in low or "503" in low:
        why = (f"the store kept throttling after {RETRIES} tries with backoff; run the same "
               "command again later")
    else:
        why = text[:160]
    return FeatcacheError(f"{path.url}: {why}")


def zarr_store(path: Path | RemotePath, mode: str) -> Any:
    """What `zarr.open_group` opens: a folder, or an FsspecStore on the object store."""
    if not is_remote(path):
        return str(path)
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(path.url, read_only=mode == "r",
                                storage_options=STORE_OPTIONS.get(path.scheme, {}))


def read_all(path: Path | RemotePath) -> np.ndarray | None:
    """A whole file's bytes as uint8 (None: no such file or object)."""
    try:
        if is_remote(path):
            return np.frombuffer(path.read_bytes(), dtype=np.uint8)
        return np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        return None


def upload_group(folder: Path, path: RemotePath) -> None:
    """Put a cache group built in a local folder at `path`, replacing whatever objects
    were under that prefix (a half-made or headless cache), its zarr.json last: a cache
    on a store has a zarr.json only once every array's metadata is there."""
    if path.listing():
        path._call(path.fs.rm, path.key, recursive=True)
    files = sorted(f for f in folder.rglob("*") if f.is_file())
    top = folder / "zarr.json"
    for f in [f for f in files if f != top] + [top]:
        (path / f.relative_to(folder).as_posix()).write_bytes(f.read_bytes())


_STORE_MODULES = ("aiohttp", "botocore", "aiobotocore", "s3fs", "gcsfs", "google", "fsspec")


def store_failure(path: Any, exc: BaseException) -> FeatcacheError | None:
    """The one line for an exception raised while reading `path` when it is the store's
    doing (network, credentials, throttling), not damaged bytes; None otherwise. Zarr
    hands both out as plain exceptions: a dropped connection must not be reported as a
    damaged shard (`verify --repair` would then delete good data)."""
    if not is_remote(path) or isinstance(exc, FeatcacheError):
        return exc if isinstance(exc, FeatcacheError) else None
    module = type(exc).__module__.split(".")[0]
    if isinstance(exc, (OSError, TimeoutError)) or module in _STORE_MODULES:
        return store_error(path, exc)
    return None


def keep_local_copies(caches: list[Any], folder: str | Path) -> None:
    """`probe --local-cache DIR`: the caches on an object store read their shard objects
    through a copy under DIR (`<DIR>/<scheme>/<bucket>/<key>`), kept after the read; a
    local cache needs none and is left alone."""
    root = local_path(folder, "--local-cache")
    if root.exists() and not root.is_dir():
        raise FeatcacheError(f"--local-cache {root} is a file; give a folder")
    for cache in caches:
        if is_remote(cache.path):
            cache.local_copy = root


def copy_path(folder: Path, path: RemotePath) -> Path:
    """Where the local copy of an object lives."""
    return folder / path.scheme / path.key


def through_copy(folder: Path, path: RemotePath, check: Any) -> np.ndarray | None:
    """An object's bytes from its local copy when that passes ``check(data)`` (a copy
    that does not is replaced), else from the store, saved as the copy when it passes
    (written to a temporary name and renamed: never half a copy). None: no object."""
    from featcache import atomic

    local = copy_path(folder, path)
    if local.is_file():
        data = np.fromfile(local, dtype=np.uint8)
        if check(data):
            return data
        local.unlink(missing_ok=True)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        return None
    data = np.frombuffer(blob, dtype=np.uint8)
    if check(data):
        local.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(local, blob)
    return data


# The default roots live here, beside `resolve_root` (the cache's store imports this module:
# the other way round would be a circle).
def default_cache_root() -> Any:
    """$FEATCACHE_CACHE (a folder or an object store URL), else <user cache dir>/featcache."""
    env = os.environ.get("FEATCACHE_CACHE")
    if env:
        return location(env, "$FEATCACHE_CACHE")
    return user_cache_root()


def user_cache_root() -> Path:
    """<user cache dir>/featcache: $XDG_CACHE_HOME/featcache or ~/.cache/featcache."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "featcache"
