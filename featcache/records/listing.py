"""`featcache runs`: every run record under a runs root, each checked whole (its files,
then every test metric against its predictions) before it is listed. It reads both the
record store and the predictions, which is why it sits beside them, not in either."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from featcache.errors import FeatcacheError
from featcache.records.predictions import checked_run
from featcache.records.store import default_runs_root, list_runs, misplaced_root, summary_row


def runs(cache: str | Path | None = None, runs: str | Path | None = None,
         problems: list[str] | None = None) -> list[dict[str, Any]]:
    """`featcache runs`: a summary row per run record under the runs root (default
    <cache root>/runs); records that cannot be read are described in ``problems``."""
    from featcache.cache.stores import is_remote, local_path, resolve_root

    root = resolve_root(cache) if runs is None and cache is not None else None
    if root is not None and not is_remote(root) and root.is_file():
        raise FeatcacheError(f"the cache root {cache} is a file, not a folder; point --cache "
                             "at a folder")
    root = local_path(runs, "--runs") if runs is not None else default_runs_root(cache)
    notes = problems if problems is not None else []
    rows = []
    found = list_runs(root, notes)
    if not found and not notes:
        misplaced_root(root, "--runs" if runs is not None else "--cache")
    for rec in found:
        try:
            checked_run(rec)  # its metrics from its predictions, never only read
        except FeatcacheError as exc:
            notes.append(f"skipped: {exc}")
            continue
        rows.append(summary_row(rec))
    return rows
