"""Offline, asking for hub weights or data fails at once with one whole line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import featcache.hub as hub
from featcache.errors import FeatcacheError


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """No cached reachability, an empty HF cache."""
    monkeypatch.setattr(hub, "_reachability", {})
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)


def test_offline_env_is_honoured(fresh, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.offline_reason() == "HF_HUB_OFFLINE is set"


def test_unreachable_endpoint_is_seen_once(fresh, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    calls = []
    real = hub._probe
    monkeypatch.setattr(hub, "_probe", lambda url: calls.append(url) or real(url))
    assert "127.0.0.1 cannot be reached" in hub.offline_reason()
    hub.offline_reason()
    assert calls == ["http://127.0.0.1:9"]


def test_hub_mode_is_restored(fresh, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = constants.HF_HUB_OFFLINE
    with hub.hub_access() as reason:
        assert reason and constants.HF_HUB_OFFLINE is True
    assert before == constants.HF_HUB_OFFLINE


def test_hub_weights_offline_fail_fast_in_one_line(fresh, monkeypatch):
    import socket

    from featcache.backbones import create_backbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tried: list[object] = []  # fast because nothing is tried: no connection, no retry
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: tried.append(a))
    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: tried.append(a))
    with pytest.raises(FeatcacheError) as err:
        create_backbone("vit-s16")
    assert tried == []
    text = str(err.value)
    assert "\n" not in text and "out of reach (HF_HUB_OFFLINE is set)" in text
    assert "--weights random" in text


@pytest.mark.slow
def test_cli_without_network_is_quick_and_quiet(tmp_path):
    """The real thing: a fresh process, an endpoint nobody answers, no offline flag."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"),
           "FEATCACHE_CACHE": str(tmp_path / "cache")}
    env.pop("HF_HUB_OFFLINE", None)
    # every connection the process tries, counted (quick because it tries one, once)
    counting = (
        "import atexit, socket, sys\n"
        "tries = []\n"
        "real = socket.socket.connect\n"
        "def connect(self, address):\n"
        "    tries.append(address)\n"
        "    return real(self, address)\n"
        "socket.socket.connect = connect\n"
        f"atexit.register(lambda: open({str(tmp_path / 'tries')!r}, 'w').write(repr(tries)))\n"
        "from featcache.cli.main import app\n"
        "sys.argv[0] = 'featcache'\n"
        "app()\n")
    run = subprocess.run([sys.executable, "-c", counting, "extract", "--model", "vit-s16",
                          "--dataset", "digits"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert "out of reach" in lines[0] and "cannot be reached" in lines[0]
    assert "Traceback" not in run.stderr and "Retrying" not in run.stderr
    assert (tmp_path / "tries").read_text() == "[('127.0.0.1', 9)]"  # one look, no retry


def test_hub_data_offline_fail_fast_in_one_line(fresh, monkeypatch, tmp_path):
    from featcache.sources import open_dataset

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FeatcacheError) as err:
        open_dataset("fer2013", "train", data_root=tmp_path / "data")
    text = str(err.value)
    assert "\n" not in text and "out of reach (HF_HUB_OFFLINE is set)" in text
    assert "wds:PATH" in text
