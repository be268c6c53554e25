"""The local launcher. On a CPU machine the units run in order in this process (each
model's pending extractions in one `extract` call: one backbone build per model). On a
machine with several GPUs each pair runs in its own process on one GPU, one at a time
per GPU: pairs need no communication, so N GPUs run N pairs at full speed, where torchrun
would split one pair's shards across them and synchronise them at every split."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from featcache.errors import FeatcacheError
from featcache.suites.plan import Unit
from featcache.suites.state import State


def local_devices(requested: list[int] | None) -> list[int]:
    """The GPUs to spread pairs over: the suite's `devices`, else every visible one."""
    if requested is not None:
        return list(requested)
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def run_local(units: list[Unit], state: State, view: Any, devices: list[int]) -> None:
    if len(devices) > 1:
        return _run_on_gpus(units, state, view, devices)
    for model in dict.fromkeys(u.model for u in units):
        mine = [u for u in units if u.model == model]
        _extract_model(mine, state, view)
        for unit in mine:
            if unit.kind == "probe" and not unit.done and _ready(unit, units):
                _run_in_process(unit, state, view)
    return None


def _ready(unit: Unit, units: list[Unit]) -> bool:
    return any(u.key == unit.after and u.done for u in units)


def _extract_model(units: list[Unit], state: State, view: Any) -> None:
    """A model's pending pairs in one call; each failing pair fails alone."""
    import featcache
    from featcache.suites.names import PairsFailed

    todo = [u for u in units if u.kind == "extract" and not u.done]
    if not todo:
        return
    failed: dict[str, str] = {}
    options = {**todo[0].options, "dataset": [u.dataset for u in todo]}
    for unit in todo:
        view.started(unit)
    try:
        featcache.extract(progress=view.bars, on_failure=lambda m, d, exc: failed.update(
            {d: str(exc)}), **options)
    except PairsFailed:
        pass
    except FeatcacheError as exc:  # one pair: its error is the call's
        failed.update({u.dataset: str(exc) for u in todo})
    for unit in todo:
        _finish(unit, state, view, failed.get(unit.dataset))


def _run_in_process(unit: Unit, state: State, view: Any) -> None:
    from featcache.suites.jobs import run_unit

    view.started(unit)
    try:
        run_unit({"kind": unit.kind, "options": unit.options}, progress=view.bars)
        error = None
    except FeatcacheError as exc:
        error = str(exc)
    _finish(unit, state, view, error)


def _finish(unit: Unit, state: State, view: Any, error: str | None, log: str | None = None
            ) -> None:
    unit.done = error is None
    state.set(unit.key, done=unit.done, stamp=unit.stamp, error=error, log=log,
              launcher="local", active=False)
    state.save()
    view.finished(unit, error)


# -- several GPUs -------------------------------------------------------------------------

def _run_on_gpus(units: list[Unit], state: State, view: Any, devices: list[int]) -> None:
    free = list(devices)
    running: dict[Future[tuple[int, str]], tuple[Unit, int]] = {}
    waiting = [u for u in units if not u.done]
    with ThreadPoolExecutor(len(devices)) as pool:
        while waiting or running:
            for unit in [u for u in waiting if u.kind == "extract" or _ready(u, units)]:
                if not free:
                    break
                device = free.pop(0)
                waiting.remove(unit)
                state.set(unit.key, started=time.time(), device=device)
                view.started(unit)
                running[pool.submit(_subprocess, unit, state.folder, device)] = (unit, device)
            if not running:  # what is left waits on failed extractions
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                unit, device = running.pop(future)
                free.append(device)
                code, log = future.result()
                error = None if code == 0 else _last_error(Path(log))
                _finish(unit, state, view, error, log)
    return None


def _subprocess(unit: Unit, folder: Path, device: int) -> tuple[int, str]:
    logs = folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    name = unit.key.replace("/", "__")
    payload = logs / f"{name}.json"
    payload.write_text(json.dumps({"kind": unit.kind, "options": unit.options}))
    log = logs / f"{name}.{int(time.time())}.log"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(device)}
    with open(log, "w") as out:
        code = subprocess.call([sys.executable, "-m", "featcache.suites.jobs", str(payload)],
                               stdout=out, stderr=subprocess.STDOUT, env=env)
    return code, str(log)


def _last_error(log: Path) -> str:
    """The line of a log that says what went wrong: the exception that ended it (Python's
    last `...Error: text` line), else SLURM's word (CANCELLED, TIME LIMIT), else the end."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return f"no log at {log}"
    for line in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception|Interrupt|Exit)\b[^:]*:", line):
            return line
    for line in reversed(lines):
        if "error" in line.lower() and "exited with exit code" not in line.lower():
            return line
    return lines[-1] if lines else "(empty log)"
