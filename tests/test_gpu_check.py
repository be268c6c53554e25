"""benchmarks/gpu_check.py must work the day a GPU is at hand: its CPU form runs here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_dry_run_passes_every_check_and_writes_the_figures(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    names = {c["name"] for c in result["checks"]}
    assert {"extract timm reference", "extract timm residual", "extract open_clip reference",
            "extract open_clip residual", "fused AdamW and plain pooling",
            "grid grouping changes no config",
            "tokens placed three ways, same batches",
            "probe every method and placement",
            "predict and report", "torchrun"} <= names
    assert all(c["ok"] for c in result["checks"]) and result["failed"] == []
    probes = next(c for c in result["checks"] if c["name"].startswith("probe"))["detail"]
    assert set(probes) == {"linear", "concat", "attentive", "alf", "layers"}
    for placements in probes.values():  # on the CPU every placement is the same numbers
        assert placements["device"] == placements["host"] == placements["cpu"]
    ranks = next(c for c in result["checks"] if c["name"] == "torchrun")["detail"]
    assert ranks["ranks"] == 2 and ranks["backend"] == "gloo"
    figures = result["figures"]
    assert figures["extraction vs bare forward"]["extract_over_bare"] > 0
    assert figures["ALF paper grid, FER2013-sized"]["seconds"] > 0
    assert figures["grid at once vs one by one"]["configs"] == 8
    assert figures["k-NN blocked vs full topk, ImageNet-1k shape"]["tiny"]["same_similarities"]
    assert "passed" in done.stdout and str(out) in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the check would run")
def test_without_a_gpu_it_refuses_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "--dry-run" in done.stderr
    assert not (tmp_path / "x.json").exists()
