"""One unit of work, as a function a launcher calls: in this process, in a subprocess
(`python -m featcache.suites.jobs PAYLOAD.json`, one per GPU), or in a SLURM job."""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def run_unit(payload: dict[str, Any], progress: Any = None) -> dict[str, Any]:
    """{"kind": "extract" | "probe", "options": the command's keywords} → a summary."""
    import featcache

    options = dict(payload["options"])
    if payload["kind"] == "extract":
        results = featcache.extract(progress=progress, **options)
        return {"kind": "extract", "caches": [str(r.path) for r in results],
                "status": [r.status for r in results]}
    results = featcache.probe(progress=progress, **options)
    return {"kind": "probe", "runs": [str(r.path) for r in results],
            "status": [r.status for r in results]}


def torchrun_environment(job: Any, slurm_job_id: str | None = None) -> dict[str, str]:
    """What torchrun would set, from a SLURM job's tasks (submitit's JobEnvironment):
    featcache's ranks (`featcache.distributed`) read only these. The port comes from
    SLURM_JOB_ID, which differs between the tasks of an array (their `123_4` ids share
    123: two array tasks on one node once both bound the same port)."""
    raw = slurm_job_id or os.environ.get("SLURM_JOB_ID", "")
    digits = raw if raw.isdigit() else "".join(c for c in job.job_id if c.isdigit())
    port = 20000 + int(digits) % 20000 if digits else 29500
    per_node = max(1, job.num_tasks // max(1, job.num_nodes))
    return {"RANK": str(job.global_rank), "LOCAL_RANK": str(job.local_rank),
            "WORLD_SIZE": str(job.num_tasks), "LOCAL_WORLD_SIZE": str(per_node),
            "MASTER_ADDR": job.hostnames[0], "MASTER_PORT": str(port)}


def slurm_unit(payload: dict[str, Any]) -> dict[str, Any]:
    """A SLURM job's task: one rank of the unit when the job has several tasks."""
    import submitit

    job = submitit.JobEnvironment()
    if job.num_tasks > 1:
        os.environ.update(torchrun_environment(job))
    return run_unit(payload)


def main(argv: list[str]) -> int:
    """A local GPU worker: the payload file, then exit 0, or 2 with the error on stderr."""
    from featcache.errors import FeatcacheError

    with open(argv[0], encoding="utf-8") as handle:
        payload = json.load(handle)
    try:
        run_unit(payload)
    except FeatcacheError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
