"""Run records: atomic writes, recovery after a kill, listing, strict JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from featcache.errors import FeatcacheError
from featcache.records.store import (
    RECORD_FORMAT,
    default_runs_root,
    is_finished,
    list_runs,
    read_run,
    recover,
    run_dir,
    run_name,
    summary_row,
    write_run,
)


def record(**extra) -> dict:
    return {"model": "m", "dataset": "d", "method": "linear", "layer_set": "last", "seed": 0,
            "metrics": {"balanced_top1": 50.0, "top1": 51.0}, "selected": {"lr": 0.1},
            **extra}


def dead_pid() -> int:
    """A pid that is certainly not running: a child that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_names_and_paths(tmp_path):
    assert default_runs_root(tmp_path) == tmp_path / "runs"
    assert run_name("concat", "3,7,-1", 2) == "concat-3_7_-1-seed2"
    assert run_name("alf", "middle+last", 0) == "alf-middle+last-seed0"
    assert run_dir(tmp_path, "clip", "fer", "alf", "all", 1) == tmp_path / "clip/fer/alf-all-seed1"


def test_write_read_list_and_strict_json(tmp_path):
    path = run_dir(tmp_path, "m", "d", "linear", "last", 0)
    write_run(path, record(curves={"train_loss": [1.0, float("nan"), float("inf")]},
                           where=tmp_path), {"weight": torch.ones(2, 3)})
    assert is_finished(path)
    text = (path / "record.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    rec = read_run(path)
    assert rec["format"] == RECORD_FORMAT and rec["curves"]["train_loss"] == [1.0, None, None]
    assert rec["where"] == str(tmp_path) and rec["path"] == str(path)
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(path / "head.safetensors"))["weight"], torch.ones(2, 3))
    (rows,) = [summary_row(r) for r in list_runs(tmp_path)]
    assert rows["balanced_top1"] == 50.0 and rows["method"] == "linear"
    assert list_runs(tmp_path / "missing") == []
    (path / "record.json").write_text("{broken")
    with pytest.raises(FeatcacheError, match="cannot read run record"):
        read_run(path)
    assert list_runs(tmp_path) == []  # unreadable records are skipped, not fatal


def test_rewrite_replaces_whole_record(tmp_path):
    path = run_dir(tmp_path, "m", "d", "linear", "last", 0)
    write_run(path, record(), {"weight": torch.ones(1)})
    write_run(path, record(metrics={"balanced_top1": 70.0}))  # no tensors this time
    assert read_run(path)["metrics"] == {"balanced_top1": 70.0}
    assert not (path / "head.safetensors").exists()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_kill_during_write_leaves_only_a_hidden_temporary(tmp_path):
    """A process killed mid-write (here: os._exit inside the tensor save) leaves no
    record.json at the record's path; listing ignores the temporary; the next write
    removes it (its process is gone) and succeeds."""
    path = run_dir(tmp_path, "m", "d", "linear", "last", 0)
    code = (
        "import os, sys, torch, safetensors.torch as st\n"
        "from featcache.records.store import write_run\n"
        "st.save_file = lambda *a, **k: os._exit(9)\n"
        f"write_run({str(path)!r}, {{'model': 'm'}}, {{'w': torch.ones(1)}})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 9, proc.stderr
    assert not path.exists()
    (left,) = list(path.parent.iterdir())
    # record.json comes last, after the files whose digests it holds
    assert left.name.startswith(f".{path.name}.tmp-") and not (left / "record.json").exists()
    assert list_runs(tmp_path) == []
    assert not is_finished(path)  # and the dead writer's temporary is cleared away
    assert list(path.parent.iterdir()) == []
    write_run(path, record())
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_recover_puts_back_a_record_moved_aside(tmp_path):
    """Killed between moving the old record aside and renaming the new one in: the old,
    complete record comes back; a live process's temporaries are left alone."""
    path = run_dir(tmp_path, "m", "d", "linear", "last", 0)
    write_run(path, record())
    aside = path.with_name(f".{path.name}.old-{dead_pid()}")
    os.replace(path, aside)
    half = path.with_name(f".{path.name}.tmp-{dead_pid()}")
    half.mkdir()
    busy = path.with_name(f".{path.name}.tmp-1")  # pid 1 is alive
    busy.mkdir()
    assert is_finished(path)  # recovery runs first
    assert read_run(path)["metrics"]["balanced_top1"] == 50.0
    assert not aside.exists() and not half.exists() and busy.exists()
    recover(tmp_path / "nowhere" / "x")  # a missing folder is fine
    assert json.loads((path / "record.json").read_text())["model"] == "m"


def test_runs_json_is_strict_and_damaged_metrics_are_skipped(tmp_path):
    from cliutil import assert_user_error, run

    nan = run_dir(tmp_path, "m", "d", "linear", "last", 0)
    write_run(nan, record(metrics={"balanced_top1": 50.0, "top1": float("nan")}))
    word = run_dir(tmp_path, "m", "d", "linear", "last", 1)
    write_run(word, record(seed=1))
    text = json.loads((word / "record.json").read_text())
    text["metrics"]["top1"] = "high"
    (word / "record.json").write_text(json.dumps(text))
    done = run("runs", "--runs", tmp_path, "--json")
    assert done.exit_code == 0, done.output
    (row,) = json.loads(done.stdout)  # strict JSON: NaN is null; "high" is no number
    assert row["seed"] == 0 and "NaN" not in done.stdout
    assert "metric 'top1' is not a number" in done.stderr
    (tmp_path / "file").write_text("")
    assert_user_error(run("runs", "--cache", tmp_path / "file"), "is a file")


def test_report_out_that_is_a_file_is_one_line(tmp_path):
    from cliutil import assert_user_error, run

    write_run(run_dir(tmp_path / "runs", "m", "d", "linear", "last", 0), record())
    (tmp_path / "f").write_text("keep")
    assert_user_error(run("report", "--runs", tmp_path / "runs", "--out", tmp_path / "f"),
                      "is a file", "give a folder")
    assert (tmp_path / "f").read_text() == "keep"
