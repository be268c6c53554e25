"""Extending featcache without forking it: a plugin package, installed for real (pip,
into a folder on the path) and found through its `featcache.plugins` entry point, adds a
model, a dataset source, a probe method and a report figure; the CLI then uses all four."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PLUGIN = '''
"""A featcache plugin: a named model, a synthetic dataset source, a method, a figure."""
import numpy as np
from PIL import Image

import featcache

featcache.register_model("my-vit", "timm:vit_tiny_patch16_224",
                         description="my favourite backbone", img_size=32, patch_size=8,
                         depth=2, embed_dim=48, num_heads=3)


class RampImages:
    """N images per class: class 0 dark ramps, class 1 light ones (no labels, no identity
    given: featcache derives them)."""

    class_names = ["dark", "light"]

    def __init__(self, n: int, split: str) -> None:
        self.n, self.offset = n, 0 if split == "train" else 7

    def __len__(self) -> int:
        return 2 * self.n

    def __getitem__(self, i: int):
        label = i % 2
        ramp = np.linspace(0, 1, 32)[None, :] * (60 + 8 * ((i + self.offset) % 5))
        pixels = (ramp + (150 if label else 20)).clip(0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(pixels, 32, axis=0)), label


@featcache.register_dataset_source("ramp", help="ramp:N — N synthetic images per class")
def ramp(arg, split, data_root):
    return RampImages(int(arg), split)


featcache.register_method(featcache.Method(
    "lastpair", head="linear", default_layers="middle+last", tokens="cls+ap",
    description="CLS and AP of the middle and last layers, concatenated", show_layers="never"))


@featcache.register_figure("plugin_bars", title="Plugin figure", question="Drawn?")
def bars(data):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3, 2))
    fig.add_subplot().bar(range(len(data.records)), [1] * len(data.records))
    return fig
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The plugin, pip-installed into a folder (as `pip install my_plugin` would)."""
    root = tmp_path_factory.mktemp("plugin")
    pkg = root / "src"
    (pkg / "my_plugin").mkdir(parents=True)
    (pkg / "my_plugin" / "__init__.py").write_text(PLUGIN)
    (pkg / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "my_plugin"
        version = "0.1"

        [project.entry-points."featcache.plugins"]
        my_plugin = "my_plugin"

        [tool.setuptools]
        packages = ["my_plugin"]
        '''))
    target = root / "site"
    run = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                          "--no-build-isolation", "--target", str(target), str(pkg)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert list(target.glob("my_plugin-0.1.dist-info/entry_points.txt"))
    return target


def featcache(site: Path, *args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get(
        "PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "featcache", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_plugin_extends_every_registry(site, tmp_path):
    models = featcache(site, "models", "--json")
    assert models.returncode == 0, models.stderr
    mine = {m["name"]: m for m in json.loads(models.stdout)}["my-vit"]
    assert mine["description"] == "my favourite backbone" and mine["extension"]
    data = featcache(site, "datasets", "--json")
    assert any(r["name"] == "ramp:ARG" and "synthetic" in r["description"]
               for r in json.loads(data.stdout))
    cache = tmp_path / "cache"
    extract = featcache(site, "extract", "--model", "my-vit", "--weights", "random",
                        "--dataset", "ramp:20", "--cache", cache, "--json")
    assert extract.returncode == 0, extract.stderr
    train = next(r for r in json.loads(extract.stdout) if r["split"] == "train")
    assert train["n"] == 40 and "ramp-20" in train["path"]
    info = json.loads(featcache(site, "info", train["path"], "--json").stdout)
    identity = info["fingerprint"]["dataset"]["identity"]
    assert identity["derived"] is True and identity["source"] == "ramp"
    assert info["class_names"] == ["dark", "light"]
    probe = featcache(site, "probe", "--method", "lastpair", "--cache", cache, "--grid",
                      "quick", "--epochs", 1, "--min-steps", 5, "--json")
    assert probe.returncode == 0, probe.stderr
    (run,) = json.loads(probe.stdout)
    assert run["status"] == "trained" and run["layer_set"] == "middle+last"
    record = json.loads((Path(run["path"]) / "record.json").read_text())
    assert record["tokens"] == ["block1.cls", "block1.ap", "final.cls", "final.ap"]
    report = featcache(site, "report", "--cache", cache, "--out", tmp_path / "out",
                       "--no-cka")
    assert report.returncode == 0, report.stderr
    assert "lastpair" in report.stdout
    assert (tmp_path / "out" / "figures" / "plugin_bars.png").is_file()


def test_a_broken_plugin_is_a_warning_not_a_failure(tmp_path):
    site = tmp_path / "site"
    (site / "broken").mkdir(parents=True)
    (site / "broken" / "__init__.py").write_text("raise RuntimeError('boom')\n")
    dist = site / "broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[featcache.plugins]\nbroken = broken\n")
    result = featcache(site, "models")
    assert result.returncode == 0, result.stderr
    assert "plugin 'broken'" in result.stderr and "boom" in result.stderr
    assert "clip-vit-b16" in result.stdout
