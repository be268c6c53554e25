"""`featcache probe` and `featcache runs` through the CLI: JSON output, and every bad input
as one `error:` line with exit code 2, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cliutil import assert_user_error, run
from probecache import SynthSpec, make_pair, make_split

pytestmark = pytest.mark.usefixtures("torch_one_thread")

FAST = ["--grid", "quick", "--epochs", "2", "--min-steps", "10"]




@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli-probe")
    make_pair(root, SynthSpec(n_train=120, n_test=60, signal={("block2", "ap"): 2.0}))
    return root


def test_probe_json_then_runs_json(root):
    result = run("probe", "--method", "alf", "--cache", root, "--seeds", "0,1", *FAST,
                 "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["method"], r["seed"], r["status"]) for r in rows] == [("alf", 0, "trained"),
                                                                     ("alf", 1, "trained")]
    assert all(0 <= r["balanced_top1"] <= 100 and r["selected"]["lr"] > 0 for r in rows)
    again = json.loads(run("probe", "--method", "alf", "--cache", root, "--seeds", "0,1",
                           *FAST, "--json").stdout)
    assert [r["status"] for r in again] == ["skipped", "skipped"]
    listed = run("runs", "--cache", root, "--json")
    assert listed.exit_code == 0, listed.output
    runs = json.loads(listed.stdout)
    assert sorted((r["method"], r["seed"]) for r in runs) == [("alf", 0), ("alf", 1)]
    for r in runs:
        assert r["model"] == "synth-vit" and r["dataset"] == "synth" and r["layer_set"] == "all"
        assert r["balanced_top1"] == next(x["balanced_top1"] for x in rows
                                          if x["seed"] == r["seed"])
        assert Path(r["path"], "record.json").is_file()
        assert set(r["metrics"]) == {"top1", "top5", "balanced_top1", "balanced_top5"}
        assert 0 <= r["val_balanced_top1"] <= 100
    table = run("runs", "--cache", root)
    assert table.exit_code == 0 and "alf" in table.stdout


def test_probe_table_output(root, tmp_path):
    result = run("probe", "--method", "linear", "--cache", root, "--runs", tmp_path, *FAST)
    assert result.exit_code == 0, result.output
    assert "probe --method linear: test accuracy" in result.stdout
    assert len(list(tmp_path.rglob("record.json"))) == 1
    assert "no runs under" in run("runs", "--runs", tmp_path / "none").stdout


@pytest.mark.parametrize("args, fragments", [
    (["--method", "mlp"], ["unknown method 'mlp'"]),
    (["--layers", "sideways"], ["unknown layer set 'sideways'"]),
    (["--method", "attentive"], ["--all-tokens"]),
    (["--seeds", "a,b"], ["bad --seeds 'a,b'"]),
    (["--seeds", ","], ["bad --seeds"]),
    (["--lrs", "1e-3,fast"], ["bad --lrs '1e-3,fast'"]),
    (["--lrs", "-0.1"], ["--lrs values must be positive"]),
    (["--wds", "nan"], ["bad --wds"]),
    (["--token", "mean"], ["bad --token 'mean'"]),
    (["--grid", "huge"], ["unknown grid 'huge'"]),
    (["--device", "tpu"], ["bad --device 'tpu'"]),
    (["--batch-size", "1"], ["--batch-size must be at least 2"]),
    (["--method", "concat", "--layers", "0,0"], ["names block0 twice"]),
    (["--max-host-memory-gb", "inf"], ["--max-host-memory-gb must be a finite"]),
    (["--memory-gb", "inf"], ["--memory-gb must be a finite"]),
    (["--feature-memory-gb", "nan"], ["--feature-memory-gb must be a finite"]),
    (["--feature-memory-gb", "-1"], ["--feature-memory-gb must be a finite", "≥ 0"]),
    (["--max-host-memory-gb", "0"], ["--max-host-memory-gb must be a finite", "positive"]),
])
def test_bad_options(root, tmp_path, args, fragments):
    assert_user_error(run("probe", "--cache", root, "--runs", tmp_path, *args), *fragments)
    assert not any(tmp_path.rglob("record.json"))


def test_bad_caches(tmp_path):
    assert_user_error(run("probe", "--cache", tmp_path / "nothing"), "no caches under")
    spec = SynthSpec(n_train=70, n_test=70, shard_size=32)
    make_split(tmp_path, spec, "train", spec.n_train)
    make_split(tmp_path, spec, "test", spec.n_test, complete=False)
    assert_user_error(run("probe", "--cache", tmp_path), "incomplete")
    make_split(tmp_path, spec, "test", spec.n_test, weights="random:7")
    assert_user_error(run("probe", "--cache", tmp_path), "different settings",
                      "model.weights")
    assert_user_error(run("probe", "--cache", tmp_path, "--dataset", "fer2013"),
                      "no cache of dataset 'fer2013'")


@pytest.mark.parametrize("args, fragments", [
    (["probe", "--max-host-memory-gb", "abc"], ["'--max-host-memory-gb'", "probe --help"]),
    (["probe", "--nope"], ["No such option: --nope"]),
    (["report", "--resamples", "abc"], ["'--resamples'"]),
    (["models", "foo"], ["unexpected extra argument"]),
    (["info"], ["Missing argument"]),
])
def test_mistyped_options_are_one_line(args, fragments):
    """click's own usage errors follow the rule too: one `error:` line, exit 2."""
    assert_user_error(run(*args), *fragments)


def test_closed_stdout_is_refused(tmp_path):
    """`featcache ls >&-`: results would vanish; one line instead."""
    import shlex
    import subprocess
    import sys

    line = f"{shlex.quote(sys.executable)} -m featcache ls --cache {shlex.quote(str(tmp_path))}"
    done = subprocess.run(["bash", "-c", line + " >&-"], stderr=subprocess.PIPE, text=True,
                          timeout=120)
    assert done.returncode == 2 and "standard output is closed" in done.stderr


def test_one_choice_of_layers_is_one_run(root, tmp_path):
    """`-1` and `last` pick the same layer: one run (the second finds it finished), under
    the set's name; `0,1` and `0, 1` likewise."""
    import json

    def probe_json(layers: str) -> dict:
        done = run("probe", "--method", "concat", "--layers", layers, "--cache", root,
                   "--runs", tmp_path, *FAST, "--json")
        assert done.exit_code == 0, done.output
        (row,) = json.loads(done.stdout)
        return row

    first, second = probe_json("last"), probe_json("-1")
    assert second["status"] == "skipped" and second["path"] == first["path"]
    a, b = probe_json("0,1"), probe_json(" 0, 1")
    assert b["status"] == "skipped" and a["path"] == b["path"]
    assert a["layer_set"] == "block0,block1"
