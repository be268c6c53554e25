"""Shared test set-up: nothing is written outside pytest's temporary folders, and the tiny
random backbones and fake datasets the extraction tests use are built once per session."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest

# Tiny architectures, built by timm / open_clip themselves with random weights.
TIMM_TINY = "timm:vit_tiny_patch16_224"
TIMM_TINY_KW: dict[str, Any] = dict(img_size=32, patch_size=8, depth=3, embed_dim=48,
                                    num_heads=3)
TIMM_REG = "timm:vit_small_patch14_reg4_dinov2"  # 1 CLS + 4 register tokens, LayerScale
TIMM_REG_KW: dict[str, Any] = dict(img_size=32, patch_size=8, depth=3, embed_dim=48,
                                   num_heads=3)
CLIP_TINY = "open_clip:ViT-B-32"
CLIP_TINY_KW: dict[str, Any] = dict(
    embed_dim=16,  # the projection: narrower than the tower's width (32), as in real CLIPs
    vision_cfg=dict(image_size=32, layers=2, width=32, patch_size=8, head_width=16),
    text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1),
)


def model_args(kwargs: dict[str, Any]) -> list[str]:
    """The CLI form of model kwargs: --model-arg KEY=JSON ..."""
    out: list[str] = []
    for key, value in kwargs.items():
        out += ["--model-arg", f"{key}={json.dumps(value)}"]
    return out


@pytest.fixture(autouse=True, scope="session")
def _private_roots(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Default cache and data roots point into pytest's temp dir, never ~/.cache."""
    mp = pytest.MonkeyPatch()
    base = tmp_path_factory.mktemp("featcache-home")
    mp.setenv("FEATCACHE_CACHE", str(base / "cache"))
    mp.setenv("FEATCACHE_DATA", str(base / "data"))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def wds_data(tmp_path_factory: pytest.TempPathFactory):
    """A hub-style webdataset: 40 train / 20 test images of 32 px in 3 tars per split."""
    from fakedata import make_wds

    return make_wds(tmp_path_factory.mktemp("wds") / "data", {"train": 40, "test": 20},
                    n_classes=3, shards=3, image_size=32)


@pytest.fixture(scope="session")
def wds_path(wds_data) -> Path:
    return Path(wds_data.root)


@pytest.fixture
def torch_one_thread():
    """One intra-op thread for tiny models: faster, and immune to a busy machine (OpenMP
    threads of tiny ops slow down tenfold when the cores are oversubscribed)."""
    with one_thread():
        yield


@contextlib.contextmanager
def one_thread():
    """torch on one intra-op thread inside, the thread count as it was after."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture
def copy(clean: Path, tmp_path: Path) -> Path:
    """A fresh copy of the module's ``clean`` cache root, for a test to damage."""
    import shutil

    root = tmp_path / "cache"
    shutil.copytree(clean, root)
    return root


@pytest.fixture
def hub_online(monkeypatch):
    """Pretend the hub answers (its calls are mocked by the test): featcache's quick
    reachability look would otherwise see this offline machine and refuse at once."""
    import featcache.hub

    monkeypatch.setattr(featcache.hub, "offline_reason", lambda: None)
