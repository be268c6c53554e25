"""The cache side of the CLI: extract, ls, info, export, models, datasets; bad inputs give
one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from cliutil import assert_user_error, run
from conftest import CLIP_TINY, CLIP_TINY_KW, TIMM_TINY, TIMM_TINY_KW, model_args

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TINY = ["--model", TIMM_TINY, "--weights", "random", *model_args(TIMM_TINY_KW)]




@pytest.fixture(scope="module")
def cli_root(wds_path, tmp_path_factory) -> Path:
    """One extraction through the CLI (both splits, all tokens) shared by the read tests."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cli")
    result = run("extract", *TINY, "--dataset", f"wds:{wds_path}", "--cache", root,
                 "--batch-size", 8, "--shard-size", 16, "--workers", 0, "--all-tokens")
    torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("wrote") == 2
    return root


def cache_dirs(root: Path) -> dict[str, Path]:
    return {p.parent.name: p.parent for p in root.rglob("zarr.json")
            if p.parent.name in ("train", "test")}


def test_rerun_on_a_complete_cache_is_a_no_op_that_says_so(cli_root, wds_path):
    before = {p: p.stat().st_mtime_ns for p in cli_root.rglob("*") if p.is_file()}
    result = run("extract", *TINY, "--dataset", f"wds:{wds_path}", "--cache", cli_root,
                 "--workers", 0, "--all-tokens")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("already complete") == 2
    assert "nothing to do" in result.stdout
    after = {p: p.stat().st_mtime_ns for p in cli_root.rglob("*") if p.is_file()}
    assert before == after
    as_json = run("extract", *TINY, "--dataset", f"wds:{wds_path}", "--cache", cli_root,
                  "--workers", 0, "--all-tokens", "--json")
    rows = json.loads(as_json.stdout)
    assert [r["status"] for r in rows] == ["complete", "complete"]


def test_ls_json(cli_root):
    result = run("ls", "--cache", cli_root, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert sorted(r["split"] for r in rows) == ["test", "train"]
    for row in rows:
        assert row["model"] == TIMM_TINY and row["tap"] == "reference"
        assert row["layers"] == 4 and row["complete"] is True
        assert row["n"] == {"train": 40, "test": 20}[row["split"]]
        assert Path(row["path"]).is_dir() and row["dataset"].startswith("wds:")
    table = run("ls", "--cache", cli_root)
    assert table.exit_code == 0 and "train" in table.stdout and "yes" in table.stdout
    empty = run("ls", "--cache", cli_root / "none", "--json")
    assert empty.exit_code == 0 and json.loads(empty.stdout) == []


def test_info_json_has_the_whole_fingerprint(cli_root):
    path = cache_dirs(cli_root)["train"]
    result = run("info", path, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    g = zarr.open_group(str(path), mode="r")
    assert data["fingerprint"] == g.attrs["fingerprint"]
    assert data["layer_names"] == ["block0", "block1", "block2", "final"]
    assert data["shard_size"] == 16 and data["n"] == 40
    fp = data["fingerprint"]
    assert fp["model"]["preprocess"]["input_size"] == [3, 32, 32]
    assert fp["model"]["model_kwargs"] == TIMM_TINY_KW
    assert fp["dataset"]["identity"]["sha256"]
    text = run("info", path)
    assert text.exit_code == 0 and "block0" in text.stdout
    assert_user_error(run("info", cli_root / "nope", "--json"), "no featcache cache")


def test_export_hdf5_through_the_cli(cli_root, tmp_path):
    path = cache_dirs(cli_root)["test"]
    out = tmp_path / "x.h5"
    result = run("export", path, "--format", "hdf5", "--out", out)
    assert result.exit_code == 0, result.output
    g = zarr.open_group(str(path), mode="r")
    with h5py.File(out, "r") as h5:
        for name in ("cls", "ap", "last_tokens", "labels", "valid"):
            np.testing.assert_array_equal(h5[name][...], g[name][...])
        assert json.loads(h5.attrs["fingerprint"]) == g.attrs["fingerprint"]
        assert json.loads(h5.attrs["layer_names"]) == g.attrs["layer_names"]
        assert bool(h5.attrs["complete"]) is True
    assert_user_error(run("export", path, "--out", out), "exists", "--overwrite")
    assert_user_error(run("export", path, "--format", "npz", "--out", tmp_path / "y"),
                      "unknown export format")


def test_models_and_datasets_listings():
    models = run("models", "--json")
    assert models.exit_code == 0
    names = {r["name"] for r in json.loads(models.stdout)}
    assert {"clip-vit-b16", "dinov2-vit-b14", "vit-l16", "mae-vit-b16"} <= names
    table = run("models")
    assert table.exit_code == 0 and all(name in table.stdout for name in names)
    datasets = run("datasets", "--json")
    assert datasets.exit_code == 0
    rows = json.loads(datasets.stdout)
    names = {r["name"] for r in rows}
    assert {"fer2013", "cifar10", "svhn", "digits", "wds:PATH"} <= names
    assert {r["name"]: r["n_classes"] for r in rows if r["name"] in ("cifar10", "svhn")} == {
        "cifar10": 10, "svhn": 10}
    table = run("datasets")
    assert table.exit_code == 0 and all(name in table.stdout for name in names)


def test_clip_through_the_cli(wds_path, tmp_path):
    result = run("extract", "--model", CLIP_TINY, "--weights", "random",
                 *model_args(CLIP_TINY_KW), "--dataset", f"wds:{wds_path}", "--split", "test",
                 "--cache", tmp_path, "--workers", 0, "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    g = zarr.open_group(row["path"], mode="r")
    assert g.attrs["layer_dims"] == [32, 32, 16] and g["cls"].shape == (20, 3, 32)


@pytest.mark.parametrize("args,fragments", [
    (["--model", "clip-vit-b61"], ["unknown model", "clip-vit-b16"]),
    (["--model", "timm:vit_tiny_patch16_22", "--weights", "random"],
     ["vit_tiny_patch16_224"]),
    ([*TINY, "--dataset", "cifar11"], ["unknown dataset", "cifar10"]),
    ([*TINY, "--dataset", "wds:/nonexistent/data"], ["/nonexistent/data", "does not exist"]),
    ([*TINY, "--dataset", "fer2013", "--no-download"], ["fer2013", "train/*.tar"]),
    (["--model", TIMM_TINY, "--weights", "/nonexistent/w.pt"], ["/nonexistent/w.pt"]),
    (["--model", TIMM_TINY, "--weights", "random:x"], ["random:SEED"]),
    ([*TINY, "--tap", "middle"], ["unknown tap", "reference, residual"]),
    ([*TINY, "--model-arg", "depth"], ["bad --model-arg", "KEY=VALUE"]),
    ([*TINY, "--model-arg", "bogus=1"], ["does not accept --model-arg", "bogus"]),
    ([*TINY, "--split", "val"], ["no split 'val'", "available splits: test, train"]),
    ([*TINY, "--dtype", "fp8"], ["bad --dtype"]),
    ([*TINY, "--device", "cuda:0"] if not __import__("torch").cuda.is_available()
     else [*TINY, "--device", "tpu"], ["--device"]),
    ([*TINY, "--batch-size", "0"], ["--batch-size"]),
    ([*TINY, "--model-arg", "depth=-1"], ["does not accept --model-arg", "depth=-1"]),
    ([*TINY, "--model-arg", "patch_size=0"], ["does not accept --model-arg"]),
    ([*TINY, "--model-arg", "depth=0"], ["no transformer blocks"]),
    (["--model", TIMM_TINY, "--weights", "random:99999999999999999999999"],
     ["random:SEED", "2**63"]),
    (["--model", TIMM_TINY, "--weights", "/tmp"], ["is a folder"]),
])
def test_bad_inputs_are_one_clear_line(wds_path, tmp_path, args, fragments):
    dataset = [] if "--dataset" in args else ["--dataset", f"wds:{wds_path}"]
    result = run("extract", *args, *dataset, "--cache", tmp_path, "--data-root",
                 tmp_path / "data", "--workers", 0)
    assert_user_error(result, *fragments)
    assert not list(tmp_path.rglob("zarr.json"))  # nothing half-made


def test_corrupt_image_names_split_and_key_and_skip_bad_records_it(tmp_path):
    from fakedata import make_imagefolder

    data = make_imagefolder(tmp_path / "folder", {"train": 9, "test": 3}, image_size=32,
                            corrupt={"train": [4]})
    bad_key = data.splits["train"].keys[4]
    args = ["extract", *TINY, "--dataset", f"imagefolder:{data.root}", "--cache",
            tmp_path / "c", "--workers", 0, "--batch-size", 4, "--shard-size", 4]
    assert_user_error(run(*args), bad_key, "split 'train'", "--skip-bad")
    result = run(*args, "--skip-bad", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["split"]: r for r in json.loads(result.stdout)}
    assert rows["train"]["skipped"] == 1 and rows["test"]["skipped"] == 0
    g = zarr.open_group(rows["train"]["path"], mode="r")
    assert g["valid"][...].tolist() == [i != 4 for i in range(9)]
    assert not g["cls"][4].any() and g["cls"][5].any()
    assert g.attrs["n_skipped"] == 1
    assert g.attrs["skipped"] == [{"index": 4, "key": bad_key}]
    text = run(*args, "--skip-bad")  # complete now; the summary still says what was skipped
    assert text.exit_code == 0 and "already complete" in text.stdout


def test_fingerprint_mismatch_through_the_cli(cli_root, wds_path):
    path = cache_dirs(cli_root)["train"]
    before = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    kwargs = {**TIMM_TINY_KW, "depth": 2}
    result = run("extract", "--model", TIMM_TINY, "--weights", "random", *model_args(kwargs),
                 "--dataset", f"wds:{wds_path}", "--split", "train", "--cache", cli_root,
                 "--workers", 0, "--all-tokens")
    assert_user_error(result, "model.model_kwargs.depth: 3 → 2", "--overwrite", "untouched")
    assert {p: p.read_bytes() for p in path.rglob("*") if p.is_file()} == before
