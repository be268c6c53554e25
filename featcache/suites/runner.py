"""`featcache run SUITE`: plan, run (here or on SLURM), follow, report; resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from featcache.errors import FeatcacheError
from featcache.suites.plan import Unit, make_plan
from featcache.suites.spec import Suite, load_suite
from featcache.suites.state import State, state_lock


class SuiteFailed(FeatcacheError):
    """Some units failed (the others are done); ``result`` holds the run's summary."""

    def __init__(self, result: dict[str, Any]) -> None:
        self.result = result
        failed = result["failed"]
        names = "; ".join(f["unit"] for f in failed[:3]) + (" …" if len(failed) > 3 else "")
        super().__init__(f"{len(failed)} unit{'s' if len(failed) > 1 else ''} of suite "
                         f"{result['suite']} failed ({names}); the rest is done: fix the causes "
                         "and run the same command again (it resumes)")


def run(suite: str | Path, cache: str | Path | None = None, dry_run: bool = False,
        status: bool = False, no_wait: bool = False, view: bool = True) -> dict[str, Any]:
    """`featcache run`: every extraction, probe and the report of a suite file (or of a
    shipped suite: `paper`). Done work is skipped; the same call finishes a killed run.
    ``dry_run``: the plan only; ``status``: the state only; ``no_wait`` (SLURM): return
    once everything is submitted. Raises `SuiteFailed` when units failed."""
    spec = load_suite(suite)
    root = _cache_root(spec, cache)
    state = State(state_folder(root, spec.name))
    units = make_plan(spec, root, state.done_probes())
    if dry_run:
        return _summary(spec, root, state, units, plan=True)
    if status:
        return _summary(spec, root, state, units, queue=_queue_if_slurm(spec))
    with state_lock(state.folder):
        failed, earlier = _launch(spec, state, units, no_wait, view)
        result = _summary(spec, root, state, units)
        result["failed"], result["resubmitted"] = failed, earlier
        if not no_wait and all(u.done for u in units):
            result["report"] = _report(spec, root, state)
    if failed:
        raise SuiteFailed(result)
    return result


def _cache_root(spec: Suite, cache: str | Path | None) -> Any:
    """--cache, else the suite's `cache` key, else $FEATCACHE_CACHE / the default: a
    folder, or an object store's root (a URL)."""
    from featcache.cache.stores import resolve_root

    return resolve_root(cache if cache is not None else spec.cache)


def state_folder(root: Any, name: str) -> Path:
    """<cache>/suites/<name>; for a cache in an object store, on this machine (as its
    runs are: `featcache.records.store.default_runs_root`), under the store's URL: the
    state is rewritten by a rename and locked by a file, which a store cannot do."""
    from featcache.cache.store import user_cache_root
    from featcache.cache.stores import is_remote

    if is_remote(root):
        return user_cache_root() / "suites" / _slug(str(root)) / _slug(name)
    return root / "suites" / _slug(name)


def _slug(name: str) -> str:
    from featcache.text import slug

    return slug(name)


def _launch(spec: Suite, state: State, units: list[Unit], no_wait: bool, view: bool
            ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(failures of this run, failures of earlier jobs that were resubmitted)."""
    if spec.launcher["name"] == "slurm":
        from featcache.suites.slurm import Slurm, squeue_states

        slurm = Slurm(units, state, spec.launcher, spec.name)
        slurm.refresh(squeue_states())
        earlier = slurm.failed_rows()
        slurm.submit()
        return ([] if no_wait else slurm.follow(view)), earlier
    from featcache.suites.local import local_devices, run_local
    from featcache.suites.view import SuiteView

    todo = sum(not u.done for u in units)
    with SuiteView(todo, enabled=view) as live:
        run_local(units, state, live, local_devices(spec.launcher.get("devices")))
    failed = [{"unit": u.label, "error": e, "log": state.get(u.key).get("log")}
              for u, e in live.failed]
    return failed, []


def _queue_if_slurm(spec: Suite) -> dict[str, str] | None:
    if spec.launcher["name"] != "slurm":
        return None
    from featcache.suites.slurm import check_slurm, squeue_states

    check_slurm()
    return squeue_states()


def _summary(spec: Suite, root: Any, state: State, units: list[Unit], plan: bool = False,
             queue: dict[str, str] | None = None) -> dict[str, Any]:
    rows = []
    for unit in units:
        entry = state.get(unit.key)
        job = entry.get("job")
        where = (queue or {}).get(str(job)) if entry.get("active") else None
        label = ("done" if unit.done else where or ("submitted" if entry.get("active")
                 else "failed" if entry.get("error") else "to do"))
        rows.append({**unit.as_json(), "label": unit.label, "state": label, "job": job,
                     "log": entry.get("log"), "error": entry.get("error")})
    todo = [r for r in rows if r["state"] != "done"]
    return {"suite": spec.name, "file": str(spec.path), "cache": str(root),
            "state_file": str(state.path), "launcher": spec.launcher["name"], "units": rows,
            "totals": {"units": len(rows), "done": len(rows) - len(todo), "to_do": len(todo),
                       "bytes": sum(r["bytes"] or 0 for r in todo if r["kind"] == "extract"),
                       "flops": sum(r["flops"] or 0 for r in todo),
                       "unknown_costs": sum(r["flops"] is None for r in todo)},
            "plan": plan, "failed": [], "report": None}


def _report(spec: Suite, root: Any, state: State) -> dict[str, str]:
    from featcache.reporting.build import report

    options = {"out": str(state.folder / "report"), **spec.report}
    out = Path(options["out"]).expanduser()
    if not out.is_absolute() and spec.path.is_file():  # like `cache`: beside the suite file
        options["out"] = str(spec.path.parent / out)
    data = report(cache=root, **options)
    return {k: str(v) for k, v in (data.written or {}).items()}
