"""Streaming where it is hardest (docs/scaling.md): class-sorted shards, so that a buffer
of a few shards holds one or two classes, and a signal weak enough that the shuffle
matters (without it, the streamed run loses about 10 points here: 82.6 against 92.3).
The streamed ALF run still lands within 3 points of the in-memory one."""

from __future__ import annotations

import numpy as np
import pytest
from probecache import SynthSpec, make_pair

from featcache.probing.run import probe
from featcache.records.store import read_run

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SPEC = SynthSpec(n_blocks=4, dim=32, n_classes=4, n_train=800, n_test=300, shard_size=32,
                 signal={("block2", "ap"): 0.5}, seed=4, class_sorted=True)
BUDGET = 14 * 32 * (8 * 32 * 2)  # bytes: a third of it holds 4 shards of ALF's tokens


@pytest.mark.slow
def test_class_sorted_shards_streamed_match_in_memory(tmp_path):
    train, _ = make_pair(tmp_path / "cache", SPEC)
    labels = train.labels()
    per_shard = [len(np.unique(labels[k * 32:(k + 1) * 32])) for k in range(25)]
    assert max(per_shard) <= 2  # the premise: shards are (nearly) single-class
    quick = dict(cache=tmp_path / "cache", grid="quick", threads=1)
    (memory,) = probe(method="alf", runs=tmp_path / "a", **quick)
    (streamed,) = probe(method="alf", runs=tmp_path / "b", max_host_memory_gb=BUDGET / 2**30,
                        **quick)
    assert read_run(streamed.path)["settings"]["stream_buffer_shards"] == 4
    assert 85 <= memory.metrics["balanced_top1"] < 97  # weak: not every run gets it all
    assert abs(memory.metrics["balanced_top1"] - streamed.metrics["balanced_top1"]) <= 3
