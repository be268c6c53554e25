"""The SLURM launcher, through submitit: one job per pair to extract (a job array when
there are several), `ranks_per_job` tasks in a job with a torchrun-style environment, and
probe jobs that wait for their caches (`--dependency=afterok`). Job ids live in the state
beside the cache; queued and running jobs are followed with `squeue` (clusters without
accounting have no `sacct`), ended ones are judged by the disk (a complete cache) and by
submitit's result files, never by SLURM's final state."""

from __future__ import annotations

import contextlib
import pickle
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from featcache.errors import FeatcacheError
from featcache.suites.local import _last_error
from featcache.suites.plan import Unit, _complete
from featcache.suites.state import State

ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING",
          "SUSPENDED", "STAGE_OUT", "SIGNALING"}


def check_slurm() -> None:
    for tool in ("sbatch", "squeue", "scancel"):
        if shutil.which(tool) is None:
            raise FeatcacheError(f"[launcher] name = \"slurm\" needs SLURM's {tool} on the PATH;"
                                 " run on a cluster's login node, or use name = \"local\"")


def squeue_states() -> dict[str, str]:
    """Job id (array tasks as 123_4) → state, for every job the queue still holds."""
    try:
        run = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T"], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FeatcacheError(f"squeue failed ({exc}); is SLURM reachable from here?") from None
    if run.returncode != 0:
        raise FeatcacheError(f"squeue failed: {' '.join(run.stderr.split())}; is SLURM "
                             "reachable from here?")
    return dict(line.split("|", 1) for line in run.stdout.split() if "|" in line)


def minutes(text: str) -> int:
    """SLURM's time formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole
    minutes, rounded up."""
    if not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", text.strip()):
        raise FeatcacheError(f"[launcher] time = {text!r}: use HH:MM:SS or D-HH:MM:SS")
    days, _, rest = text.strip().rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        hours, mins, secs = (parts + [0, 0])[:3]
    else:
        hours, mins, secs = ([0, *parts, 0] if len(parts) == 1 else [0, *parts]
                             if len(parts) == 2 else parts)
    return int(days or 0) * 1440 + hours * 60 + mins + (secs > 0)


def make_executor(folder: Path, launcher: dict[str, Any], name: str) -> Any:
    import submitit

    executor = submitit.SlurmExecutor(folder=folder / "%j")
    ranks = int(launcher.get("ranks_per_job") or launcher.get("gpus_per_job") or 1)
    params: dict[str, Any] = {
        "job_name": f"featcache-{name}", "time": minutes(launcher.get("time", "04:00:00")),
        "ntasks_per_node": ranks, "partition": launcher.get("partition"),
        "cpus_per_task": launcher.get("cpus_per_task"), "qos": launcher.get("qos"),
        "account": launcher.get("account"), "constraint": launcher.get("constraint"),
        "setup": launcher.get("setup"), "array_parallelism": launcher.get("array_parallelism",
                                                                          256)}
    if launcher.get("gpus_per_job"):
        params["gpus_per_node"] = int(launcher["gpus_per_job"])
    if launcher.get("mem_gb"):
        params["mem"] = f"{int(float(launcher['mem_gb']) * 1024)}M"
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


class Slurm:
    """Submit, follow and judge a suite's jobs."""

    def __init__(self, units: list[Unit], state: State, launcher: dict[str, Any],
                 name: str) -> None:
        check_slurm()
        self.units, self.state, self.launcher, self.name = units, state, launcher, name
        self.folder = state.folder / "jobs"
        self.by_key = {u.key: u for u in units}

    # -- what the queue and the disk say -----------------------------------------------------

    def refresh(self, queue: dict[str, str]) -> list[dict[str, Any]]:
        """Judge every job that has left the queue; returns the failures seen now."""
        failures = []
        for unit in self.units:
            entry = self.state.get(unit.key)
            if not entry.get("active") or entry.get("job") in queue:
                continue
            ok = _complete_all(unit) if unit.kind == "extract" else self._succeeded(entry)
            error = None if ok else _last_error(Path(entry.get("log", "")))
            unit.done = ok and (unit.kind == "extract" or _after_done(unit, self.by_key))
            self.state.set(unit.key, active=False, done=unit.done, error=error)
            if error is not None:
                failures.append({"unit": unit.label, "job": entry.get("job"),
                                 "log": entry.get("log"), "error": error})
                self._cancel_dependents(unit)
        self.state.save()
        return failures

    def failed_rows(self) -> list[dict[str, Any]]:
        """Units whose last job failed (listed with its log, then resubmitted)."""
        rows = []
        for unit in self.units:
            entry = self.state.get(unit.key)
            if entry.get("error") and not entry.get("active") and not unit.done:
                rows.append({"unit": unit.label, "job": entry.get("job"),
                             "log": entry.get("log"), "error": entry["error"]})
        return rows

    def _succeeded(self, entry: dict[str, Any]) -> bool:
        result = Path(entry.get("log", "")).with_name(f"{entry.get('job')}_0_result.pkl")
        try:
            with open(result, "rb") as handle:
                outcome = pickle.load(handle)
        except (OSError, pickle.UnpicklingError, EOFError):
            return False
        return bool(outcome) and outcome[0] == "success"

    def _cancel_dependents(self, unit: Unit) -> None:
        """Probes waiting on a failed extraction would wait forever (afterok)."""
        for other in self.units:
            entry = self.state.get(other.key)
            if other.after == unit.key and entry.get("active"):
                subprocess.run(["scancel", str(entry["job"])], capture_output=True, timeout=60)
                self.state.set(other.key, active=False, error="its extraction failed")

    # -- submitting ------------------------------------------------------------------------

    def submit(self) -> int:
        """Submit every unit that is neither done nor queued; returns how many."""
        todo = [u for u in self.units if not u.done and not self.state.get(u.key).get("active")]
        extracts = [u for u in todo if u.kind == "extract"]
        count = self._submit_batch(extracts, None)
        groups: dict[str | None, list[Unit]] = {}
        for unit in (u for u in todo if u.kind == "probe"):
            after = self.by_key[unit.after or ""]
            job = self.state.get(after.key)
            if after.done:
                groups.setdefault(None, []).append(unit)
            elif job.get("active"):
                groups.setdefault(str(job["job"]), []).append(unit)
        for dependency, group in groups.items():
            count += self._submit_batch(group, dependency)
        self.state.save()
        return count

    def _submit_batch(self, units: list[Unit], after_job: str | None) -> int:
        """One job, or one array of them, for these units."""
        from featcache.suites.jobs import slurm_unit

        if not units:
            return 0
        executor = make_executor(self.folder, self.launcher, self.name)
        executor.update_parameters(dependency=f"afterok:{after_job}" if after_job else None)
        payloads = [{"kind": u.kind, "options": u.options} for u in units]
        try:
            if len(units) == 1:
                jobs = [executor.submit(slurm_unit, payloads[0])]
            else:
                jobs = executor.map_array(slurm_unit, payloads)
        except Exception as exc:  # submitit's own error: sbatch's message
            raise FeatcacheError(f"sbatch refused the jobs: {' '.join(str(exc).split())[:400]}"
                                 ) from None
        for unit, job in zip(units, jobs, strict=True):
            self.state.set(unit.key, job=job.job_id, active=True, done=False, error=None,
                           log=str(job.paths.stderr), stamp=unit.stamp, launcher="slurm",
                           submitted=time.time(),
                           history=[*self.state.get(unit.key).get("history", []), job.job_id])
        return len(units)

    # -- following -------------------------------------------------------------------------

    def rows(self, queue: dict[str, str]) -> list[dict[str, Any]]:
        rows = []
        for unit in self.units:
            entry = self.state.get(unit.key)
            state = ("done" if unit.done else queue.get(str(entry.get("job")), "ENDED")
                     if entry.get("active") else "failed" if entry.get("error") else "to do")
            rows.append({"unit": unit.label, "key": unit.key, "job": entry.get("job"),
                         "state": state, "log": entry.get("log"), "error": entry.get("error")})
        return rows

    def active(self) -> bool:
        return any(self.state.get(u.key).get("active") for u in self.units)

    def follow(self, view: bool, poll_s: float = 2.0) -> list[dict[str, Any]]:
        """Until every job has left the queue; a live table of them meanwhile."""
        from rich.console import Console
        from rich.live import Live

        from featcache.suites.view import jobs_table

        failures: list[dict[str, Any]] = []
        console = Console(stderr=True)
        live = Live(console=console, auto_refresh=False, transient=False)
        with live if view else contextlib.nullcontext():
            while True:
                queue = squeue_states()
                failures += self.refresh(queue)
                if view:
                    live.update(jobs_table(self.rows(queue), f"suite {self.name} on SLURM"),
                                refresh=True)
                if not self.active():
                    return failures
                time.sleep(poll_s)


def _complete_all(unit: Unit) -> bool:
    return all(_complete(c) for c in unit.caches)


def _after_done(unit: Unit, by_key: dict[str, Unit]) -> bool:
    after = by_key.get(unit.after or "")
    return after is None or after.done or _complete_all(after)
