"""benchmarks/peers.py: featcache beside thingsvision and CLIP_benchmark.

The script's smallest mode runs when the peers' environments exist (`make bench-peers`
builds them in .peers/ once; that needs the package registry and minutes, so the test
does not build them). The environments' stamps are checked here without them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "peers.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

from peers import FP16_UNIT, MODULES, PeerEnv, peer_envs  # noqa: E402


def missing_envs() -> list[str]:
    return [name for name, env in peer_envs().items() if not env.ready()]


def test_an_environment_is_reused_only_for_what_it_was_built_for(tmp_path: Path) -> None:
    env = PeerEnv("peer", ["somepeer==1.0"], "somepeer", share_main=False, root=tmp_path)
    assert not env.ready()  # nothing built
    env.python.parent.mkdir(parents=True)
    env.python.write_text("")
    env.stamp.write_text(json.dumps(env.wanted()))
    assert env.ready()
    newer = PeerEnv("peer", ["somepeer==2.0"], "somepeer", share_main=False, root=tmp_path)
    assert not newer.ready()  # another pin: rebuilt, never silently reused
    env.stamp.write_text("{not json")
    assert not env.ready()


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about 4 minutes on 2 idle cores; far more on a shared machine
@pytest.mark.skipif(bool(missing_envs()),
                    reason=f"the peers' environments are not built ({', '.join(missing_envs())} "
                           "missing in .peers/; `make bench-peers` builds them, which needs the "
                           "package registry and minutes)")
def test_quick_mode_tokens_equal_thingsvisions_and_the_probes_agree(tmp_path: Path) -> None:
    out = tmp_path / "peers.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=1500, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    fig = json.loads(out.read_text())
    tokens = fig["tokens"]
    assert tokens["labels_agree"]
    assert len(tokens["layers"]) == 2 * len(MODULES)
    errors = [r["max_rel_error"] for r in tokens["layers"]]
    # every layer within fp16 rounding of an independent computation ...
    assert max(errors) <= 1.01 * FP16_UNIT and tokens["within_fp16"]
    # ... and rounded at all (a comparison of the cache with itself would give 0)
    assert min(errors) > FP16_UNIT / 100
    rows = fig["extraction"]["rows"]
    assert set(rows) == {"bare", "featcache", "thingsvision", "thingsvision-one-pass",
                         "bare-torch2.0"}
    assert all(r["img_s"] > 0 and r["peak_rss_mib"] > 100 for r in rows.values())
    assert rows["featcache"]["disk_bytes"] > 0 and rows["thingsvision"]["disk_bytes"] > 0
    probes = fig["probe"]["rows"]
    assert set(probes) == {"CLIP_benchmark", "featcache", "sklearn"}
    accuracies = [r["balanced_top1"] for r in probes.values()]
    assert min(accuracies) > 30  # 10 classes: chance is 10
    assert max(accuracies) - min(accuracies) < 15  # 120 test images: a few points of noise
    assert "PEERS" in done.stdout and "CLIP_benchmark" in done.stdout
