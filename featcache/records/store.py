"""Run records: one directory per (cache pair, method, layer set, settings, seed), written
atomically.

`record.json` holds everything a report needs (its fields: `schema.RecordFields`),
`head.safetensors` the selected head's weights, `predictions.safetensors` the per-sample
test predictions (`predictions`). A record directory appears complete or not at all
(built aside, then renamed). This module is the one writer and the one reader.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from featcache import atomic
from featcache.cache.fingerprint import file_sha256
from featcache.errors import FeatcacheError, os_error
from featcache.records.schema import (
    HEAD_FILE,
    PREDICTIONS_FILE,
    RECORD_FILE,
    RECORD_FORMAT,
    SETTINGS_ID_LENGTH,
    run_variant,
)
from featcache.registry import METHODS
from featcache.text import slug


def default_runs_root(cache_root: str | Path | None = None) -> Path:
    """Runs live beside the caches they were trained on: <cache root>/runs; for a cache
    root on an object store, on this machine (<user cache dir>/featcache/runs): a record
    is written by a rename (atomic on a disk, not on a store), the report and `predict`
    read them back often, and they are small (`--runs` puts them anywhere)."""
    from featcache.cache.store import user_cache_root
    from featcache.cache.stores import is_remote, resolve_root

    root = resolve_root(cache_root)
    return (user_cache_root() if is_remote(root) else root) / "runs"


def settings_id(settings: dict[str, Any]) -> str:
    """A run's identity without its seed: a hash of every setting that changes its numbers
    (`featcache.probing.run.run_settings`). Runs that differ in any of them are different runs,
    side by side on disk, never averaged together."""
    blob = json.dumps(settings, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:SETTINGS_ID_LENGTH]


def run_name(method: str, layer_set: str, seed: int, ident: str | None = None) -> str:
    """`alf-all-<settings id>-seed0` (records before run identities: no id)."""
    middle = f"-{ident}" if ident else ""
    return f"{method}-{slug(layer_set.replace(',', '_'))}{middle}-seed{seed}"


def run_dir(runs_root: Path, model_dir: str, dataset_dir: str, method: str, layer_set: str,
            seed: int, ident: str | None = None) -> Path:
    return Path(runs_root) / model_dir / dataset_dir / run_name(method, layer_set, seed, ident)


@contextlib.contextmanager
def run_lock(path: Path) -> Iterator[bool]:
    """Claim a run across processes (a flock beside its folder). Yields False when another
    process holds it: that process is training it right now.

    The lock file is removed by its holder once done, so no empty files pile up beside
    the records: a process already waiting on the removed file then finds the record
    written (and skips the run) or, after a failed run, trains it itself."""
    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a+")  # noqa: SIM115 (closed below)
    except IsADirectoryError:
        raise FeatcacheError(f"{lock} (featcache's lock for this run) is a directory; remove "
                             "it and run again") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            lock.unlink(missing_ok=True)


def wait_for_run(path: Path) -> None:
    """Block until no process holds the run's lock (another probe finishing it)."""
    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
    with open(lock, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)


def write_run(path: Path, record: dict[str, Any], tensors: dict[str, Any] | None = None,
              predictions: dict[str, Any] | None = None) -> Path:
    """Write record.json (+ head.safetensors, + predictions.safetensors: the per-sample
    test predictions, `featcache.records.predictions`) into a temporary directory, then rename."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    # a failure (full disk, Ctrl-C) removes the half-built folder; only a kill leaves
    # one, hidden, for `recover` to clear
    with atomic.atomic_path(path) as tmp:
        tmp.mkdir()
        files: dict[str, Any] = {}
        if tensors:
            _save(save_file, {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                  tmp / HEAD_FILE)
            files[HEAD_FILE] = file_sha256(tmp / HEAD_FILE)
        if predictions:
            arrays = {k: v.detach().contiguous().cpu() for k, v in predictions.items()}
            _save(save_file, arrays, tmp / PREDICTIONS_FILE)
            # per array: a report reads index, label and pred of every run, never logits
            # (ImageNet's are 200 MB a run), so it checks what it reads, cheaply
            files[PREDICTIONS_FILE] = {k: array_digest(v.numpy()) for k, v in arrays.items()}
        record = {"format": RECORD_FORMAT, **record, "files": files}
        text = json.dumps(strict_json(record), indent=1, default=_jsonable, allow_nan=False)
        (tmp / RECORD_FILE).write_text(text)
    return path


def _save(save_file: Any, tensors: dict[str, Any], path: Path) -> None:
    """safetensors' own error for a full disk is no OSError: make it one (one line)."""
    from safetensors import SafetensorError

    try:
        save_file(tensors, str(path))
    except SafetensorError as exc:
        raise os_error(exc, path) from None


def array_digest(array: Any) -> str:
    """sha256 of an array's bytes (C order)."""
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def check_file(run_dir: Path, name: str, record: dict[str, Any]) -> None:
    """A run's file must be the one its record was written with: a head with a flipped
    bit still loads and predicts, confidently and wrongly; a predictions file copied from
    another run still gives intervals. Records before format 4 name no digests."""
    want = (record.get("files") or {}).get(name)
    if not isinstance(want, str):
        return
    file = Path(run_dir) / name
    try:
        ok = file_sha256(file) == want
    except OSError as exc:
        raise FeatcacheError(f"cannot read {file} ({exc.strerror or exc}); run the same "
                             "`featcache probe` command again with --force") from None
    if not ok:
        raise FeatcacheError(f"{file} is not the file its record was written with (damaged "
                             "or replaced); run the same `featcache probe` command again "
                             "with --force")


PROBE_AGAIN = "run the same `featcache probe` command again with --force"


def check_record(record: dict[str, Any]) -> None:
    """A record must be what the probe wrote: every file it lists is there, its settings
    hash to its settings id (which its folder name repeats), and what it says of itself
    (method, layer set, tokens, model, dataset, seed, caches) agrees with those settings
    and its fingerprints. A hand edit, or a file gone, is one line naming it. Records
    before run identities (format 1) carry no settings: only their files are checked."""
    folder = Path(record.get("path") or ".")
    for name in record.get("files") or {}:
        if not (folder / name).is_file():
            raise FeatcacheError(f"{folder}: its record lists {name} but the file is missing "
                                 f"(damaged run); {PROBE_AGAIN}")
    settings = record.get("settings")
    if not isinstance(settings, dict):
        return
    problem = _identity_problem(record, settings, folder)
    if problem:
        raise FeatcacheError(f"{folder}/record.json: {problem}: the record was changed after "
                             f"the run; {PROBE_AGAIN}")


def _identity_problem(record: dict[str, Any], settings: dict[str, Any],
                      folder: Path) -> str | None:
    ident = settings_id(settings)
    if record.get("settings_id") != ident:
        return f"its settings hash to {ident}, not to its settings id {record.get('settings_id')}"
    named = parse_run_name(folder.name)
    if named.get("settings_id") not in (None, ident):
        return f"its folder is named for settings id {named['settings_id']}, not {ident}"
    if "seed" in named and record.get("seed") != named["seed"]:
        return f"'seed' is {record.get('seed')!r} but its folder says {named['seed']}"
    for key in ("method", "layer_set", "tokens"):
        if key in settings and record.get(key) != settings[key]:
            return f"'{key}' is {record.get(key)!r} but its settings say {settings[key]!r}"
    prints = record.get("fingerprints") if isinstance(record.get("fingerprints"), dict) else {}
    caches = settings.get("caches") if isinstance(settings.get("caches"), dict) else {}
    for split, want in caches.items():
        if settings_id(prints.get(split)) != want:
            return f"its {split} cache's fingerprint is not the one its settings name"
    train = prints.get("train") or {}
    said = {"model": (train.get("model") or {}).get("model"),
            "dataset": (train.get("dataset") or {}).get("name")}
    for key, value in said.items():
        if value is not None and record.get(key) != value:
            return f"'{key}' is {record.get(key)!r} but its train cache says {value!r}"
    return None


def recover(path: Path) -> None:
    """Tidy up after a probe killed while writing this record: delete half-built
    temporaries (`.NAME.tmp-PID`) of dead processes, and put back a finished record that
    was moved aside (`.NAME.old-PID`) if the kill came before its replacement took its
    place. Live processes' files are left alone."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for kind in ("old", "tmp"):  # a moved-aside record first: it may be all there is
        for item in sorted(path.parent.glob(f".{path.name}.{kind}-*")):
            pid = item.name.rsplit("-", 1)[-1]
            if pid.isdigit() and _alive(int(pid)):
                continue
            if kind == "old" and not path.exists() and (item / RECORD_FILE).is_file():
                os.replace(item, path)
            else:
                shutil.rmtree(item, ignore_errors=True)


def _alive(pid: int) -> bool:
    from featcache.cache.files import process_alive

    if pid == os.getpid():
        return False  # our own leftovers are from an earlier, failed write
    return process_alive(pid)


def strict_json(obj: Any) -> Any:
    """Strict JSON: NaN and ±inf (a diverged loss curve) become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return strict_json(obj.tolist())
    return obj


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


class RunRecord(dict):
    """A run's `record.json`: a dict, as the JSON is, with its identity as properties.

    `read_run` reads one (checked: a damaged record is one line saying how to get it
    back); `list_runs` reads every record under a runs root, for `featcache runs` and the
    report alike. A record that lacks an identity key takes it from its folder's name
    (`parse_run_name`)."""

    @property
    def model(self) -> str:
        return str(self.get("model") or "")

    @property
    def dataset(self) -> str:
        return str(self.get("dataset") or "")

    @property
    def method(self) -> str:
        return str(self.get("method") or "")

    @property
    def layer_set(self) -> str | None:
        return self.get("layer_set")

    @property
    def seed(self) -> int:
        return int(self.get("seed") or 0)

    @property
    def metrics(self) -> dict[str, Any]:
        return self.get("metrics") or {}

    @property
    def folder(self) -> Path:
        return Path(self["path"])


def parse_run_name(name: str) -> dict[str, Any]:
    """What a run folder's name says (`run_name` backwards):
    `<method>-<layer set>[-<settings id>]-seed<k>` → method, layer_set, settings_id, seed."""
    out: dict[str, Any] = {}
    stem, _, seed = name.rpartition("-seed")
    if not stem or not seed.isdigit():
        return out
    out["seed"] = int(seed)
    match = re.search(rf"-([0-9a-f]{{{SETTINGS_ID_LENGTH}}})$", stem)
    if match:
        out["settings_id"] = match.group(1)
        stem = stem[: match.start()]
    method, _, layer_set = stem.partition("-")
    out["method"] = method
    if layer_set:
        out["layer_set"] = layer_set
    return out


def read_run(path: Path) -> RunRecord:
    """A record; a damaged one is one line saying how to get it back."""
    path = Path(path)
    file = path / RECORD_FILE if path.is_dir() else path
    fix = (f"delete {file.parent} and run the same `featcache probe` command again (or pass "
           "--force) to retrain it")
    try:
        record = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
        raise FeatcacheError(f"cannot read run record {file}: unreadable ({why}); "
                             f"{fix}") from None
    if not isinstance(record, dict):
        raise FeatcacheError(f"run record {file} holds a JSON {type(record).__name__}, not an "
                             f"object; {fix}")
    for key, kind in (("metrics", dict), ("selected", (dict, type(None))), ("seed", int)):
        if key in record and not isinstance(record[key], kind):
            raise FeatcacheError(f"run record {file}: '{key}' is a "
                                 f"{type(record[key]).__name__}; {fix}")
    bad = [k for k, v in (record.get("metrics") or {}).items()
           if not isinstance(v, (int, float, type(None))) or isinstance(v, bool)]
    if bad:
        raise FeatcacheError(f"run record {file}: metric '{bad[0]}' is not a number; {fix}")
    record["path"] = str(file.parent)
    return RunRecord(record)


def is_finished(path: Path) -> bool:
    """A record is finished when its directory (renamed into place whole) exists."""
    recover(path)
    return (Path(path) / RECORD_FILE).is_file()


def list_runs(runs_root: Path, problems: list[str] | None = None) -> list[RunRecord]:
    """Every readable record under a root, at its fixed depth
    (`<model_dir>/<dataset>/<run>/record.json`: never a walk into caches); half-written
    temporaries are invisible. Unreadable records, and records whose identity neither they
    nor their folder name say, are skipped and described in ``problems``."""
    root = Path(runs_root).expanduser()
    notes = problems if problems is not None else []
    if root.exists() and not root.is_dir():
        raise FeatcacheError(f"the runs root {root} is a file, not a folder; give the folder "
                             "that holds the runs (<cache root>/runs by default)")
    if not root.is_dir():
        return []
    records = []
    for file in sorted(root.glob("*/*/*/record.json")):
        rel = file.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue  # a run being written (or replaced) right now: not a record yet
        try:
            rec = read_run(file)
        except FeatcacheError as exc:
            notes.append(f"skipped: {exc}")
            continue
        guessed = {"model_dir": rel.parts[0], "dataset": rel.parts[1],
                   **parse_run_name(rel.parts[2])}
        for key, value in guessed.items():
            if rec.get(key) in (None, ""):
                rec[key] = value
        rec["model"] = rec.get("model") or rec.get("model_dir")
        rec["model_dir"] = rec.get("model_dir") or rec.get("model")
        missing = [k for k in ("model", "dataset", "method") if not rec.get(k)]
        if missing:
            notes.append(f"skipped {file}: no {', '.join(missing)} in the record or its path")
            continue
        fmt = rec.get("format", 1)
        if isinstance(fmt, int) and fmt > RECORD_FORMAT:
            notes.append(f"{file}: record format {fmt} is newer than this featcache knows "
                         f"({RECORD_FORMAT}); read what is recognisable")
        rec["method"] = str(rec["method"]).lower()
        # the method's spec by its registered name (a plugin's too), not by importing the
        # probe: records never import probing (tests/test_layout.py)
        spec = METHODS.find(rec["method"].strip())
        if rec.get("layer_set") is None and spec is not None and spec.show_layers != "always":
            rec["layer_set"] = spec.default_layers
        rec.setdefault("seed", 0)
        if rec["seed"] is None:
            rec["seed"] = 0
        records.append(rec)
    return records


def misplaced_root(root: Path, option: str) -> None:
    """A root that holds no runs where they live, but is one run's folder, lies inside a
    runs root, or is itself the runs root given as --cache: one line naming the right
    option (it said 'no runs; train some', of a folder full of them)."""
    fix = "; give --runs {}"
    if (root / RECORD_FILE).is_file():
        raise FeatcacheError(f"{root} is one run's folder, not a runs root" +
                             fix.format(root.parents[2]))
    for depth in (1, 2):
        if next(root.glob("*/" * depth + RECORD_FILE), None) is not None:
            raise FeatcacheError(f"{root} lies inside a runs root (<runs>/<model>/<dataset>"
                                 "/<run>)" + fix.format(root.parents[3 - depth - 1]))
    cache = root.parent if option == "--cache" else None
    if cache is not None and next(cache.glob("*/*/*/record.json"), None) is not None:
        raise FeatcacheError(f"--cache {cache} is a runs root, not a cache root" +
                             fix.format(cache))


def summary_row(record: dict[str, Any]) -> dict[str, Any]:
    """The line `featcache runs` prints for a record."""
    metrics = record.get("metrics") or {}
    return {
        "model": record.get("model"),
        "dataset": record.get("dataset"),
        "method": record.get("method"),
        "layer_set": record.get("layer_set"),
        "variant": run_variant(record),
        "settings_id": record.get("settings_id"),
        "seed": record.get("seed"),
        "balanced_top1": metrics.get("balanced_top1"),
        "top1": metrics.get("top1"),
        "metrics": metrics,
        "val_balanced_top1": (record.get("val_metrics") or {}).get("balanced_top1"),
        "selected": record.get("selected"),
        "created": record.get("created"),
        "path": record.get("path"),
    }
