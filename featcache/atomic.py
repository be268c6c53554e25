"""Files appear whole or not at all: written under a temporary name, renamed into place.

A full disk, a read-only folder or a kill mid-write leaves the previous file as it was
and no half-written or empty file behind (the temporary is removed on failure).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def check_target(path: str | Path, option: str, overwrite: bool = False,
                 inputs: tuple[str | Path, ...] | list[str | Path] = ()) -> Path:
    """Where a command will write one file, refused in one line before any work is done:
    no name, a folder, a device or other non-file (the rename would replace it), a
    missing folder, one of a run's own files, one of the command's ``inputs`` or a file
    inside one (a cache, a run folder, a checkpoint: --overwrite never writes over what
    the command reads), or an existing file without --overwrite."""
    from featcache.errors import FeatcacheError

    # a run folder's own files: no output option may land on them, --overwrite or not
    from featcache.records.schema import RECORD_FILE, RUN_FILES

    if not str(path).strip():
        raise FeatcacheError(f"{option} needs a file name")
    target = Path(path).expanduser()
    if target.is_dir():
        raise FeatcacheError(f"{option} {target} is a folder; give a file name")
    if target.exists() and not target.is_file():
        raise FeatcacheError(f"{option} {target} is not a regular file (a device, a pipe?); "
                             "give a file name")
    if not target.parent.is_dir():
        raise FeatcacheError(f"the folder of {option}, {target.parent}, does not exist; "
                             "create it first")
    if target.name in RUN_FILES and (target.parent / RECORD_FILE).is_file():
        raise FeatcacheError(f"{option} {target} is one of a run's own files; write "
                             "elsewhere")
    _refuse_inputs(target, option, inputs)
    if target.exists() and not overwrite:
        raise FeatcacheError(f"{target} exists; pass --overwrite to replace it")
    return target


def _refuse_inputs(target: Path, option: str, inputs: tuple | list) -> None:
    from featcache.errors import FeatcacheError

    where = target.resolve()
    for item in inputs:
        if not isinstance(item, (str, os.PathLike)):  # an object in a store: never local
            continue
        source = Path(item).expanduser().resolve()
        if where == source or source in where.parents:
            what = "is" if where == source else f"lies inside {source},"
            raise FeatcacheError(f"{option} {target} {what} one of this command's inputs; "
                                 "write elsewhere")


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on any
    failure (and on Ctrl-C) it is deleted. Works for files and folders."""
    path = Path(path)
    if path.exists() and not (path.is_file() or path.is_dir()):
        from featcache.errors import FeatcacheError

        raise FeatcacheError(f"{path} is not a regular file (a device, a pipe?): featcache "
                             "would replace it; give a file name")
    tmp = _temporary(path)
    _remove(tmp)
    try:
        yield tmp
        honour_umask(tmp)
        if path.is_dir() and tmp.is_dir():
            _swap_dirs(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def umask() -> int:
    """The process's umask (read from /proc where it is shown: setting it to read it back
    races with other threads creating files)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: Path) -> None:
    """Give a written file (or a written folder's files) the mode a plain `open` would:
    0666 less the umask. Some writers create theirs 0600 (safetensors does), so on a
    shared cluster a colleague could read a run's record but not its head."""
    mode = 0o666 & ~umask()
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()] \
        if path.is_dir() else []
    for file in files:
        if not file.is_symlink():
            os.chmod(file, mode)


def _swap_dirs(tmp: Path, path: Path) -> None:
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))
