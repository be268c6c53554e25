"""The files beside a cache while it is written: the writer's lock, a replacement being
built (`.NAME.next`), and what a killed writer leaves behind (`remove_leftovers`)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from featcache.errors import FeatcacheError


def next_path(path: Path) -> Path:
    """Where `--overwrite` builds a replacement: beside the old cache, which stays in place
    (and usable) until the new one is complete. A killed replacement resumes from here."""
    path = Path(path)
    return path.with_name(f".{path.name}.next")


def promote(new: Path, path: Path) -> None:
    """Put a complete replacement in place of the old cache: old aside, new in, old gone.
    A kill between the two renames is finished by `recover_leftovers`."""
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _store_lock(path: Any) -> Iterator[None]:
    """The lock on an object store: `.NAME.lock` created with If-None-Match (S3's
    conditional create; a store that cannot do it is refused in one line). It names its
    holder (host, pid); one left by a killed writer on this host is taken over, one of
    another host is for the user to remove (no store tells whether its writer lives)."""
    import json
    import socket

    lock = path.with_name(f".{path.name}.lock")
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    body = json.dumps(me).encode()
    try:
        lock._call(lock.fs.pipe_file, lock.key, body, mode="create")
    except FileExistsError:
        _take_over(lock, me, body, path)
    except (TypeError, NotImplementedError):
        raise FeatcacheError(f"{lock}: this store cannot create an object only if it is "
                             "absent, so featcache cannot keep two extractions apart there; "
                             "extract to an s3:// store (or a local folder)") from None
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            lock.unlink(missing_ok=True)


def _take_over(lock: Any, me: dict[str, Any], body: bytes, path: Any) -> None:
    import json

    try:
        holder = json.loads(lock.read_bytes())
    except (FileNotFoundError, ValueError):
        holder = {}
    if holder.get("host") == me["host"] and not process_alive(int(holder.get("pid") or 0)):
        lock.write_bytes(body)  # its writer died (kill -9): resume
        return
    raise FeatcacheError(
        f"another featcache process is writing {path} right now (pid {holder.get('pid')} on "
        f"{holder.get('host')}); wait for it to finish (nothing was changed). If it is gone, "
        f"delete {lock} and run again")


def remove_leftovers(path: Path) -> list[Path]:
    """Tidy up after a killed writer. Call only while holding `write_lock(path)`:

    - half-built caches (`.NAME.tmp-PID`) are deleted;
    - a replacement killed between its two renames is finished: with the old cache moved
      aside (`.NAME.old-PID`) and no cache at NAME, the complete `.NAME.next` goes in, or,
      without one, the old cache comes back; once NAME exists, old copies are deleted;
    - zarr's unfinished file writes (`*.partial`) inside the cache or its replacement go.
    `.NAME.next` itself is kept: the next `--overwrite` run resumes it."""
    from featcache.cache.stores import is_remote

    if is_remote(path):  # nothing is built beside a cache on a store (`create_cache`)
        return []
    path = Path(path)
    gone: list[Path] = []
    if not path.parent.is_dir():
        return gone
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
        gone.append(stale)
    olds = sorted(path.parent.glob(f".{path.name}.old-*"))
    nxt = next_path(path)
    if olds and not path.exists():
        if (nxt / "zarr.json").is_file() and _is_complete(nxt):
            os.replace(nxt, path)
        else:
            os.replace(olds.pop(), path)
    for stale in olds:
        if stale.exists():
            shutil.rmtree(stale, ignore_errors=True)
            gone.append(stale)
    for folder in (path, nxt):
        if folder.is_dir():
            for partial in folder.rglob("*.partial"):
                partial.unlink(missing_ok=True)
                gone.append(partial)
    return gone


def _is_complete(path: Path) -> bool:
    from featcache.cache.store import Cache

    try:
        return Cache(path).complete
    except FeatcacheError:
        return False


class NotWritable(FeatcacheError):
    """The cache's folder cannot be written (read-only, no permission)."""


ORPHAN_WAIT_S = 30.0  # DataLoader workers notice their parent's death within ~5 s


def _lock(handle: Any, lock_path: Path) -> bool:
    """Take the lock; False if a live process holds it. A writer killed with -9 leaves its
    DataLoader workers holding the (inherited) lock until they notice, seconds later: when
    the pid written in the lock file is dead, wait for them rather than refuse."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        pass
    try:
        holder = int(lock_path.read_text().strip() or "0")
    except (OSError, ValueError):
        holder = 0
    if holder <= 0 or process_alive(holder):
        return False
    deadline = time.monotonic() + ORPHAN_WAIT_S
    while time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            continue
    return False


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one we may not signal counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def write_lock(path: Path) -> Iterator[None]:
    """One writer per cache at a time, across processes (an advisory flock on
    `.NAME.lock` beside the cache, removed when the writer is done). On an object store,
    the lock is an object created only if absent (a conditional PUT), see `_store_lock`."""
    from featcache.cache.stores import is_remote

    if is_remote(path):
        with _store_lock(path):
            yield
        return
    path = Path(path)
    lock_path = path.with_name(f".{path.name}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a+")  # noqa: SIM115 (closed below, after the yield)
    except IsADirectoryError:
        raise FeatcacheError(f"{lock_path} (featcache's lock file for {path}) is a directory;"
                             " remove it and run again") from None
    except (PermissionError, OSError) as exc:
        if isinstance(exc, PermissionError) or exc.errno in (errno.EROFS, errno.EACCES):
            raise NotWritable(f"cannot write in {path.parent}: {exc.strerror}; choose a "
                              "writable --cache root") from None
        raise
    with handle:
        if not _lock(handle, lock_path):
            raise FeatcacheError(f"another featcache process is writing {path} right now; "
                                 "wait for it to finish (nothing was changed)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))  # who holds it: see `_lock`
        handle.flush()
        try:
            yield
        finally:  # no empty lock files left beside the caches (a second writer never waits)
            lock_path.unlink(missing_ok=True)


