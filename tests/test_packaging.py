"""The installed package: `featcache.cli` (from cli/), no top-level `cli`, every package
listed, `python -m featcache` is the CLI."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.relative_to(ROOT).parent.parts) for p in
             (ROOT / "featcache").rglob("__init__.py")}
    found |= {"featcache.cli"}  # from cli/, by package-dir
    assert found == listed
    assert config["package-dir"]["featcache.cli"] == "cli"


def test_python_m_featcache_is_the_cli():
    run = subprocess.run([sys.executable, "-m", "featcache", "--help"], capture_output=True,
                         text=True, cwd="/", timeout=120)
    assert run.returncode == 0 and "extract" in run.stdout and "verify" in run.stdout


@pytest.mark.slow
def test_wheel_installs_cli_under_featcache(tmp_path):
    source = tmp_path / "src"  # a copy of the tracked files: building leaves build/ behind
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes((ROOT / name).read_bytes())
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("featcache-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "featcache/cli/main.py" in names and "featcache/__main__.py" in names
    assert not [n for n in names if n.startswith("cli/")]
    assert any(n.startswith("featcache/data/paper_results/") for n in names)
