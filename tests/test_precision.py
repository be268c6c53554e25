"""Head precision (issue 17 §4): fp32 under the paper protocol unless bf16 is asked for;
never bf16 on the CPU, whatever is asked."""

from __future__ import annotations

from pathlib import Path

import pytest
from cliutil import assert_user_error, run

from featcache.probing.run import ProbeOptions, head_amp, train_config


@pytest.mark.parametrize("protocol,precision,amp", [
    ("paper", "auto", False), ("paper", "fp32", False), ("paper", "bf16", True),
    ("clean", "auto", True), ("clean", "fp32", False), ("clean", "bf16", True)])
def test_heads_train_in_fp32_under_the_paper_protocol(protocol, precision, amp) -> None:
    opts = ProbeOptions(protocol=protocol, precision=precision)
    assert head_amp(opts) is amp
    assert train_config(opts, 0).amp is amp


def test_an_unknown_precision_is_one_line(tmp_path) -> None:
    assert_user_error(run("probe", "--cache", tmp_path, "--precision", "fp16"),
                      "--precision", "fp16", "bf16")


def test_bf16_on_the_cpu_trains_and_records_fp32(tmp_path) -> None:
    """Asked for bf16 on the CPU: a warning, fp32 training, and a record that says fp32
    (the same run as an fp32 one)."""
    import json

    from probecache import SynthSpec, make_pair

    make_pair(tmp_path, SynthSpec(n_train=120, n_test=60, signal={("final", "cls"): 2.0}))
    args = ["probe", "--method", "linear", "--cache", tmp_path, "--grid", "quick",
            "--epochs", 1, "--min-steps", 2, "--device", "cpu", "--json"]
    asked = run(*args, "--precision", "bf16")
    assert asked.exit_code == 0, asked.output
    assert "CUDA only" in asked.stderr
    (res,) = json.loads(asked.stdout)
    record = json.loads((Path(res["path"]) / "record.json").read_text())
    assert record["settings"]["precision"] == "fp32"
    again = run(*args, "--precision", "fp32")  # the same identity: done before
    assert json.loads(again.stdout)[0]["status"] == "skipped"
