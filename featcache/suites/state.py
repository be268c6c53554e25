"""A suite's state beside the cache (<cache>/suites/<name>/state.json): per unit of work
the job that runs it, its log, and whether it finished. Written atomically, under a lock
held by the one `featcache run` that may submit (two would submit everything twice)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from featcache.errors import FeatcacheError


class State:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / "state.json"
        self.units: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                self.units = json.loads(self.path.read_text())["units"]
            except (ValueError, KeyError, TypeError) as exc:
                raise FeatcacheError(f"{self.path} is damaged ({exc}); remove it (jobs still "
                                     "queued are then not followed, but none is lost)") from None

    def save(self) -> None:
        from featcache.atomic import write_text

        self.folder.mkdir(parents=True, exist_ok=True)
        write_text(self.path, json.dumps({"units": self.units}, indent=1, sort_keys=True))

    def get(self, key: str) -> dict[str, Any]:
        return self.units.get(key, {})

    def set(self, key: str, **values: Any) -> None:
        self.units[key] = {**self.units.get(key, {}), **values, "updated": time.time()}

    def done_probes(self) -> dict[str, str]:
        return {k: v.get("stamp", "") for k, v in self.units.items() if v.get("done")}


@contextlib.contextmanager
def state_lock(folder: Path) -> Iterator[None]:
    """One driver per suite at a time (an flock, released if the process dies)."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / "state.lock", "a+")  # noqa: SIM115 (held for the block)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FeatcacheError(f"another `featcache run` of this suite is running (lock "
                                 f"{folder / 'state.lock'}); wait for it, or follow it with "
                                 "--status") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()
