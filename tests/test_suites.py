"""Suites (`featcache run`) and lists of models and datasets (`extract --model a,b`), on
this machine: checking the file, planning, running, resuming. SLURM: test_suites_slurm.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cliutil import assert_user_error, run
from conftest import TIMM_TINY
from fakedata import make_imagefolder

import featcache
from featcache.catalogue import dataset_collections, model_collections, paper_datasets

TINY_ARGS = ["img_size=32", "patch_size=8", "depth=2", "embed_dim=48", "num_heads=3"]


def suite_file(tmp_path: Path, datasets: list[str], probe: str = "", extra: str = "",
               **top: object) -> Path:
    lines = [f"models = {json.dumps(top.pop('models', [TIMM_TINY]))}",
             f"datasets = {json.dumps(datasets)}",
             f"methods = {json.dumps(top.pop('methods', ['linear', 'concat']))}",
             f"seeds = {json.dumps(top.pop('seeds', [0]))}", 'cache = "cache"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in top.items()]
    lines += ["[extract]", 'weights = "random"', f"model_arg = {json.dumps(TINY_ARGS)}",
              "[probe]", 'grid = "quick"', "epochs = 2", "min_steps = 1", "threads = 1", probe,
              "[report]", "cka = false", "resamples = 0", 'format = ["csv"]', extra]
    path = tmp_path / "suite.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def folder_data(tmp_path: Path) -> str:
    make_imagefolder(tmp_path / "data", {"train": 12, "test": 6})
    return f"imagefolder:{tmp_path / 'data'}"


# -- collections ---------------------------------------------------------------------------

def test_collections_partition_the_papers_datasets_and_name_its_nine_models():
    sets = dataset_collections()
    assert sets["paper"] == list(paper_datasets())
    domains = sets["natural"] + sets["specialized"] + sets["structured"]
    assert sorted(domains) == sorted(sets["paper"]) and len(domains) == 20
    assert len(sets["natural"]) == 13 and "fer2013" in sets["structured"]
    models = model_collections()["paper"]
    assert len(models) == 9 and "clip-vit-b16" in models and "mae-vit-b16" not in models


def test_models_and_datasets_list_the_collections():
    result = run("datasets")
    assert result.exit_code == 0 and "specialized" in result.output
    rows = json.loads(run("models", "--json").stdout)
    assert not any("collection" in r for r in rows)  # --json stays the registry's rows
    assert "paper" in run("models").output


def test_expand_keeps_order_and_checks_every_name():
    from featcache.errors import FeatcacheError
    from featcache.suites.names import expand_datasets, expand_models

    assert expand_datasets("digits,FER2013,specialized,digits")[:3] == [
        "digits", "fer2013", "pcam"]
    with pytest.raises(FeatcacheError, match="unknown dataset 'nope'"):
        expand_datasets(["digits", "nope"])
    assert expand_models(f"{TIMM_TINY},paper")[0] == TIMM_TINY
    # a list's elements are whole: a local path may hold a comma
    assert expand_datasets(["imagefolder:/data/a,b"]) == ["imagefolder:/data/a,b"]


# -- extract with lists --------------------------------------------------------------------

@pytest.mark.slow
def test_a_failing_pair_is_one_line_and_the_others_finish(tmp_path, folder_data):
    result = run("extract", "--model", TIMM_TINY, "--dataset", f"{folder_data},fer2013",
                 "--no-download", "--weights", "random", "--cache", tmp_path / "c", "--json",
                 *[x for a in TINY_ARGS for x in ("--model-arg", a)])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 2, result.stderr  # the pair, then the summary
    assert lines[0].startswith("failed timm:vit_tiny_patch16_224 × fer2013: fer2013 split")
    assert "not downloaded" in lines[0]
    assert lines[1].startswith("error: 1 of 2 pairs failed")
    assert [r["split"] for r in json.loads(result.stdout)] == ["train", "test"]
    done = featcache.ls(tmp_path / "c")
    assert sorted(r["split"] for r in done if r["complete"]) == ["test", "train"]


# -- the suite file ------------------------------------------------------------------------

@pytest.mark.parametrize(("probe", "top", "fragments"), [
    ("batchsize = 4", {}, ["[probe] unknown key 'batchsize'", "batch_size", "suite.toml"]),
    ("", {"modles": ["x"]}, ["unknown key 'modles'", "models"]),
    ("shots = 'ten'", {}, ["[probe] shots = 'ten'", "a whole number"]),
    ("lrs = [0.1, 'x']", {}, ["[probe] lrs", "a list of numbers"]),
    ("val_fraction = 2.0", {}, ["[probe]", "validation fraction must lie in (0, 1)"]),
    ("[launcher]\nname = 'pbs'", {}, ["[launcher] name = 'pbs'", "local, slurm"]),
    ("", {"seeds": [-1]}, ["seeds = [-1]"]),
    ("", {"methods": ["alff"]}, ["methods: unknown method 'alff'", "alf"]),
    ("", {"models": ["timm:no_such_vit"]}, ["models:", "no_such_vit"]),
])
def test_a_bad_suite_file_is_one_line_naming_file_and_key(tmp_path, probe, top, fragments):
    path = suite_file(tmp_path, ["digits"], probe, **top)
    result = run("run", path, "--cache", tmp_path / "cache")
    assert_user_error(result, str(path), *fragments)
    assert not (tmp_path / "cache").exists()  # checked before anything ran


def test_unknown_dataset_and_shipped_paper_suite(tmp_path):
    path = suite_file(tmp_path, ["digits", "fer2014"])
    assert_user_error(run("run", path), "datasets:", "fer2014")
    plan = featcache.run("paper", cache=tmp_path / "c", dry_run=True)
    assert plan["totals"]["units"] == 9 * 20 * (1 + 4)
    assert plan["totals"]["bytes"] > 1e12 and plan["totals"]["unknown_costs"] == 0
    assert not (tmp_path / "c").exists()


def test_dry_run_writes_nothing_and_its_bytes_match_a_real_cache(tmp_path):
    """The plan's bytes: float16 CLS+AP of every layer, as the cache stores them."""
    path = suite_file(tmp_path, ["digits"])
    result = run("run", path, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert not (tmp_path / "cache").exists()
    assert [u["state"] for u in plan["units"]] == ["to do"] * 3
    (extract,) = [u for u in plan["units"] if u["kind"] == "extract"]
    featcache.extract(model=TIMM_TINY, dataset="digits", split="train", weights="random",
                      model_arg=TINY_ARGS, cache=tmp_path / "cache")
    cache = featcache.open_cache(extract["caches"][0])
    stored = sum(np.asarray(cache.group[k]).nbytes for k in ("cls", "ap"))
    assert extract["bytes"] == stored


def test_extract_flops_match_torchs_count():
    """The plan's FLOPs against torch's own count of the forward pass."""
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from featcache.suites.cost import extract_flops, guess_arch

    kwargs = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)
    arch = guess_arch(TIMM_TINY, kwargs)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **kwargs).eval()
    for block in model.blocks:  # attention as two counted products, not one fused kernel
        block.attn.fused_attn = False
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.forward_features(torch.zeros(4, 3, 32, 32))
    assert extract_flops(arch, 4) == counter.get_total_flops()


def test_slurm_times_in_minutes():
    from featcache.suites.slurm import minutes

    assert [minutes(t) for t in ("30", "90:00", "04:00:00", "00:10:30", "1-00:00:00", "2-3")
            ] == [30, 90, 240, 11, 1440, 3060]


# -- running -------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_suite_runs_resumes_and_reports(tmp_path, folder_data):
    path = suite_file(tmp_path, [folder_data])
    first = featcache.run(path, view=False)
    assert first["totals"]["done"] == 3 and first["report"]["csv"]
    runs = featcache.runs(tmp_path / "cache")
    assert sorted(r["method"] for r in runs) == ["concat", "linear"]
    state = Path(first["state_file"]).read_text()
    again = featcache.run(path, view=False)  # nothing to do: nothing runs
    assert again["totals"]["to_do"] == 0
    assert json.loads(Path(first["state_file"]).read_text())["units"].keys() == \
        json.loads(state)["units"].keys()
    assert len(featcache.runs(tmp_path / "cache")) == len(runs)
    status = run("run", path, "--status", "--json")
    assert [u["state"] for u in json.loads(status.stdout)["units"]] == ["done"] * 3


def test_a_slurm_jobs_tasks_get_torchruns_environment():
    from types import SimpleNamespace

    from featcache.suites.jobs import torchrun_environment

    job = SimpleNamespace(job_id="4242_3", global_rank=3, local_rank=1, num_tasks=4,
                          num_nodes=2, hostnames=["node-a", "node-b"])
    env = torchrun_environment(job, slurm_job_id="4245")
    assert env == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "node-a", "MASTER_PORT": str(20000 + 4245)}
    # the tasks of one array run side by side: each its own port
    other = SimpleNamespace(**{**vars(job), "job_id": "4242_4"})
    assert torchrun_environment(other, "4246")["MASTER_PORT"] != env["MASTER_PORT"]


@pytest.mark.slow
def test_one_pair_per_device_runs_probes_after_their_caches(tmp_path):
    """The several-GPU scheduler (one unit per device, probes once their cache is complete),
    driven on the CPU: `devices` only sets each worker's CUDA_VISIBLE_DEVICES."""
    names = []
    for i in range(2):
        make_imagefolder(tmp_path / f"data{i}", {"train": 12, "test": 6}, seed=i)
        names.append(f"imagefolder:{tmp_path / f'data{i}'}")
    path = suite_file(tmp_path, names, methods=["linear"],
                      extra="[launcher]\nname = \"local\"\ndevices = [0, 1]")
    result = featcache.run(path, view=False)
    assert result["totals"]["done"] == 4
    logs = sorted((tmp_path / "cache" / "suites" / "suite" / "logs").glob("*.log"))
    assert len(logs) == 4
    order = {u["key"]: json.loads(Path(result["state_file"]).read_text())["units"][u["key"]]
             for u in result["units"]}
    for unit in result["units"]:
        if unit["kind"] == "probe":  # it started after its extraction had finished
            assert order[unit["key"]]["started"] >= order[unit["after"]]["updated"]
    assert len(featcache.runs(tmp_path / "cache")) == 2
