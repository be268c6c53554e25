"""The README's Python block, pasted as a user would, on an offline stand-in model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

# Offline there are no hub weights or datasets: the same calls on a small random ViT with
# 13 layers (so layer 12 exists) and sklearn's digits, with a short grid.
OFFLINE = {
    'model="dinov2-vit-b14"': 'model="timm:vit_tiny_patch16_224", weights="random", '
                              'model_arg={"img_size": 32, "patch_size": 8, "depth": 12, '
                              '"embed_dim": 48, "num_heads": 3}',
    'dataset="eurosat"': 'dataset="digits"',
    'method="alf"': 'method="alf", grid="quick", epochs=1, min_steps=10',
}


def readme_block(heading: str, language: str) -> str:
    """The first ``language`` code block under the README's ``## heading``."""
    text = README.read_text()
    section = text[text.index(f"## {heading}"):]
    match = re.search(rf"```{language}\n(.*?)```", section, re.S)
    assert match, f"README has no {language} block under {heading!r}"
    return match.group(1)


@pytest.mark.slow
def test_readme_python_block_runs_as_pasted(tmp_path):
    code = readme_block("From Python", "python")
    for old, new in OFFLINE.items():
        assert old in code, f"the README block no longer says {old}"
        code = code.replace(old, new)
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    first, last = run.stdout.strip().splitlines()[-2:]
    value = float(first)
    (record,) = (tmp_path / "cache" / "runs").rglob("record.json")  # the number printed is
    assert json.loads(record.read_text())["metrics"]["balanced_top1"] == value  # the record's
    assert last.startswith(f"{value} {{'item': 0, 'label'")  # predict: the record's score
    assert (tmp_path / "report" / "report.html").is_file()
    assert (tmp_path / "report" / "results.csv").is_file()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_readme_benchmark_block_runs_as_pasted(tmp_path):
    """The suite section's shell block, pasted into bash with featcache on the PATH."""
    import json
    import os

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    run = subprocess.run(["bash", "-euo", "pipefail", "-c",
                          readme_block("A benchmark in one command", "bash")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    status = json.loads(run.stdout[run.stdout.index('{\n  "suite"'):])
    assert [u["state"] for u in status["units"]] == ["done"] * 3
    assert (tmp_path / "suite-report" / "report.html").is_file()
    records = list((tmp_path / "suite-cache" / "runs").rglob("record.json"))
    assert len(records) == 2  # 2 methods × 1 seed
