"""Extending featcache without forking it: a plugin package, installed for real (pip,
into a folder on the path) and found through its `featcache.plugins` entry point, adds a
model, a model family (a backend), a dataset source, a probe method and a report figure;
the CLI then uses all five."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PLUGIN = '''
"""A featcache plugin: a named model, a model family, a synthetic dataset source, a
method, a figure."""
import numpy as np
import torch
from PIL import Image
from torch import nn

import featcache
from featcache.backbones.base import Backbone, Geometry

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


class ToyNet(nn.Module):
    """A residual stack of MLP blocks over 8-pixel patches and a class token."""

    def __init__(self, depth: int = 2, width: int = 12) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, width, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, width))
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width),
                                                  nn.GELU()) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1)
        for block in self.blocks:
            t = t + block(t)
        return self.norm(t)


def to_tensor(image):
    pixels = np.asarray(image.convert("RGB").resize((16, 16)), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1)


class ToyBackbone(Backbone):
    """`toy:net`: the tapped layers are the blocks' outputs (before the residual add)."""

    backend = "toy"

    @classmethod
    def split_name(cls, rest, full):
        return rest, None

    @classmethod
    def build(cls, spec, kind, value):
        torch.manual_seed(value if kind == "random" else 0)
        return ToyNet(**spec.kwargs), f"random:{value}"

    @classmethod
    def make_transform(cls, spec, model):
        return to_tensor, {"size": 16}

    def setup(self):
        for block in self.model.blocks:
            self.tap_module(block)
        width = self.model.norm.normalized_shape[0]
        return Geometry(n_blocks=len(self.model.blocks), width=width, final_dim=width,
                        n_prefix=1, n_tokens=5, input_size=(3, 16, 16))

    def run(self, images):
        return self.model(images)


featcache.register_backend("toy", ToyBackbone)


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


@pytest.mark.slow
def test_a_plugin_backend_extracts_its_models_tokens(site, tmp_path):
    """The fifth kind: a model family (register_backend), its tokens against the model."""
    toy = featcache(site, "extract", "--model", "toy:net", "--model-arg", "depth=3",
                    "--weights", "random:4", "--dataset", "ramp:3", "--split", "train",
                    "--cache", tmp_path / "toy", "--json")
    assert toy.returncode == 0, toy.stderr
    (row,) = json.loads(toy.stdout)
    check_toy_tokens(site, Path(row["path"]))


def check_toy_tokens(site: Path, path: Path) -> None:
    """The cache holds each block's output (CLS, patch mean) and the normed final tokens,
    computed here by running the plugin's model block by block."""
    import torch

    from featcache.cache.store import open_cache

    sys.path.insert(0, str(site))
    try:
        import my_plugin
    finally:
        sys.path.remove(str(site))
    torch.manual_seed(4)
    net = my_plugin.ToyNet(depth=3).eval()
    images = my_plugin.RampImages(3, "train")
    x = torch.stack([my_plugin.to_tensor(images[i][0]) for i in range(len(images))])
    with torch.no_grad():
        t = net.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([net.cls.expand(len(t), -1, -1), t], 1)
        layers = []
        for block in net.blocks:
            out = block(t)
            layers.append(out)
            t = t + out
        layers.append(net.norm(t))
    want_cls = torch.stack([o[:, 0] for o in layers], 1).numpy()
    want_ap = torch.stack([o[:, 1:].mean(1) for o in layers], 1).numpy()
    cache = open_cache(path)
    assert cache.layer_names == ["block0", "block1", "block2", "final"]
    assert cache.labels().tolist() == [images[i][1] for i in range(len(images))]
    for kind, want in (("cls", want_cls), ("ap", want_ap)):
        got = cache.read(kind).astype("float32")
        assert abs(got - want).max() <= 2e-3 * max(1.0, abs(want).max()), kind  # fp16


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
