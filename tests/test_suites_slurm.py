"""Suites on a real SLURM: a one-node cluster on this machine (.ci/slurm-up.sh; .ci/run
installs Debian's slurm-wlm and munge and starts it). Jobs are real sbatch jobs running
tiny random backbones; every test is slow (job start-up is seconds)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from fakedata import make_imagefolder
from test_suites import suite_file

import featcache
from featcache.suites.runner import SuiteFailed

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
SLURM = '[launcher]\nname = "slurm"\ntime = "00:15:00"\n'


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster() -> None:
    """Start the test cluster (idempotent); skip, saying why, only where it cannot start."""
    if os.geteuid() != 0:
        pytest.skip("SLURM's daemons need root to start (.ci/slurm-up.sh); not root here")
    try:
        run = subprocess.run(["bash", str(ROOT / ".ci" / "slurm-up.sh")], capture_output=True,
                             text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.skip("SLURM's daemons did not come up within 180 s (.ci/slurm-up.sh)")
    if run.returncode != 0:
        pytest.skip(f"SLURM's daemons could not start here: {run.stderr.strip()[-300:]}")


def queue() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True)
    return out.stdout.split()


def wait_gone(job: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while job in queue() and time.time() < deadline:
        time.sleep(0.5)


def cache_arrays(path: str) -> dict[str, np.ndarray]:
    cache = featcache.open_cache(path)
    return {k: np.asarray(cache.group[k]) for k in ("cls", "ap", "labels", "valid")}


def records(cache: Path) -> dict[tuple[str, int], dict]:
    return {(r["method"], r["seed"]): r for r in featcache.runs(cache)}


def test_records_on_two_ranks_match_a_local_run_and_resubmitting_is_a_no_op(tmp_path):
    make_imagefolder(tmp_path / "data", {"train": 12, "test": 6})
    data = f"imagefolder:{tmp_path / 'data'}"
    local = featcache.run(suite_file(tmp_path, [data]), cache=tmp_path / "local", view=False)
    # two tasks per job, as gpus_per_job = 2 gives: ranks share each job's work (torchrun's
    # environment), and the numbers must not change
    path = suite_file(tmp_path, [data], extra=SLURM + "ranks_per_job = 2\n")
    first = featcache.run(path, cache=tmp_path / "slurm", no_wait=True, view=False)
    jobs = {u["key"]: u["job"] for u in first["units"]}
    assert all(jobs.values()) and len(set(jobs.values())) == 3  # an extract, an array of 2
    before = queue()
    again = featcache.run(path, cache=tmp_path / "slurm", no_wait=True, view=False)
    assert {u["key"]: u["job"] for u in again["units"]} == jobs
    assert len(queue()) <= len(before)  # nothing new was queued
    done = featcache.run(path, cache=tmp_path / "slurm", view=False)
    assert done["totals"]["to_do"] == 0 and done["report"]["csv"]
    assert {u["key"]: u["job"] for u in done["units"]} == jobs  # followed, not resubmitted
    ours, theirs = records(tmp_path / "slurm"), records(tmp_path / "local")
    assert ours.keys() == theirs.keys() == {("linear", 0), ("concat", 0)}
    for key, record in ours.items():
        for field in ("settings_id", "metrics", "val_balanced_top1", "selected"):
            assert record[field] == theirs[key][field], (key, field)
    ranks = featcache.open_cache(done["units"][0]["caches"][0]).attrs["environment"]
    assert ranks["world_size"] == 2
    for a, b in zip(local["units"][0]["caches"], done["units"][0]["caches"], strict=True):
        for name, array in cache_arrays(a).items():
            np.testing.assert_array_equal(array, cache_arrays(b)[name], err_msg=name)


def test_scancel_mid_extraction_resumes_bitwise(tmp_path):
    """Cancelled after some shards: the next run lists the job's failure, resubmits, and
    the cache is the one an uninterrupted local extraction writes."""
    # a backbone slow enough that the cancel lands mid-extraction on a quiet machine too
    # (depth 4 at 32 px finished before scancel took effect)
    model_arg = '["img_size=64", "patch_size=8", "depth=12", "embed_dim=192", "num_heads=3"]'
    extra = f"shard_size = 32\nbatch_size = 16\nmodel_arg = {model_arg}\n"
    path = suite_file(tmp_path, ["digits"], methods=["linear"], extra=SLURM)
    text = path.read_text().replace("[extract]\n", f"[extract]\n{extra}")
    text = text.replace('model_arg = ["img_size=32", "patch_size=8", "depth=2", "embed_dim=48"'
                        ', "num_heads=3"]\n', "", 1)
    path.write_text(text)
    plan = featcache.run(path, dry_run=True)
    train = plan["units"][0]["caches"][0]
    first = featcache.run(path, no_wait=True, view=False)
    job = first["units"][0]["job"]
    deadline = time.time() + 300
    while time.time() < deadline:
        if (Path(train) / "zarr.json").exists():
            done = featcache.open_cache(train).done()
            if 0 < done.sum() < len(done):
                break
        time.sleep(0.2)
    else:
        pytest.fail("the extraction job never had some but not all shards written")
    subprocess.run(["scancel", job], check=True)
    wait_gone(job)
    assert not featcache.open_cache(train).complete
    finished = featcache.run(path, view=False)
    (resubmitted,) = [f for f in finished["resubmitted"] if f["unit"].startswith("extract")]
    assert resubmitted["job"] == job and Path(resubmitted["log"]).is_file()
    assert finished["units"][0]["job"] != job and finished["totals"]["to_do"] == 0
    featcache.extract(model=plan["units"][0]["model"], dataset="digits", weights="random",
                      model_arg=["img_size=64", "patch_size=8", "depth=12", "embed_dim=192",
                                 "num_heads=3"], shard_size=32, batch_size=16,
                      cache=tmp_path / "uncut")
    for split in ("train", "test"):
        cut = cache_arrays(train.replace("/train", f"/{split}"))
        uncut = list((tmp_path / "uncut").glob(f"*/digits/{split}"))[0]
        for name, array in cache_arrays(str(uncut)).items():
            np.testing.assert_array_equal(cut[name], array, err_msg=f"{split} {name}")


def test_a_failing_job_is_reported_with_its_log_and_resubmitted(tmp_path):
    make_imagefolder(tmp_path / "data", {"train": 12, "test": 6}, corrupt={"train": [3]})
    path = suite_file(tmp_path, [f"imagefolder:{tmp_path / 'data'}"], extra=SLURM)
    with pytest.raises(SuiteFailed) as caught:
        featcache.run(path, view=False)
    (failure,) = caught.value.result["failed"]
    assert failure["unit"].startswith("extract ")
    assert "unreadable image" in failure["error"] and Path(failure["log"]).is_file()
    assert "unreadable image" in Path(failure["log"]).read_text()
    probes = [u for u in caught.value.result["units"] if u["kind"] == "probe"]
    assert all(u["job"] not in queue() for u in probes)  # not left waiting forever
    with pytest.raises(SuiteFailed) as again:  # the same command resubmits it
        featcache.run(path, view=False)
    assert again.value.result["resubmitted"][0]["job"] == failure["job"]
    assert again.value.result["units"][0]["job"] != failure["job"]
