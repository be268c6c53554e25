"""Out of core: tokens streamed from the cache when they do not fit host memory.

- an epoch visits every sample exactly once, in the planned number of batches, each
  batch holding exactly the tokens of the positions it names;
- evaluation batches equal the in-memory ones bit for bit;
- planted signal: a streamed ALF run finds the planted layer with the in-memory run's
  accuracy within noise; the run says it streamed, and is a run of its own.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from probecache import SynthSpec, make_pair

from featcache.errors import FeatcacheError
from featcache.probing.pairs import find_pairs, token_list
from featcache.probing.run import probe
from featcache.probing.tokens.features import load_source
from featcache.probing.tokens.streaming import StreamedSource
from featcache.records.store import read_run

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SPEC = SynthSpec(n_blocks=4, dim=32, n_classes=4, n_train=800, n_test=300, shard_size=32,
                 signal={("block2", "ap"): 1.5}, seed=4)
ROW = 8 * 32 * 2  # ALF over 4 layers: 8 tokens × 32 × float16
BUDGET = 14 * 32 * ROW  # bytes: a third of it holds 4 shards of 32 samples


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("stream")
    make_pair(path, SPEC)
    return path


def sources(root):
    train, _ = find_pairs(root)[0]
    tokens = token_list("alf", "all", train)
    memory = load_source(train, tokens, torch.device("cpu"))
    streamed = load_source(train, tokens, torch.device("cpu"), host_budget_bytes=BUDGET,
                           stream=StreamedSource)
    return memory, streamed


def test_an_epoch_visits_every_sample_once_with_its_own_tokens(root):
    memory, streamed = sources(root)
    assert streamed.placement == "stream" and streamed.buffer_shards == 4
    keep = np.flatnonzero(np.arange(SPEC.n_train) % 5 != 0)  # a subset, as the split makes
    memory, streamed = memory.subset(keep), streamed.subset(keep)
    gen = torch.Generator().manual_seed(0)
    seen = []
    for positions, xb in streamed.epoch_batches(7, gen):
        torch.testing.assert_close(xb, memory.gather(positions), rtol=0, atol=0)
        seen.append(positions)
    sizes = [len(p) for p in seen]
    assert len(seen) == 7 and max(sizes) - min(sizes) <= 1
    order = torch.cat(seen)
    assert sorted(order.tolist()) == list(range(len(keep)))  # a permutation: each once
    # shuffled by buffers: a batch draws from a few shards only, not from all of them
    shards = keep[seen[0].numpy()] // SPEC.shard_size
    assert len(np.unique(shards)) <= 2 * streamed.buffer_shards < SPEC.n_train // 32
    again = torch.cat([p for p, _ in streamed.epoch_batches(7, torch.Generator()
                                                            .manual_seed(0))])
    assert torch.equal(order, again)  # seeded


def test_evaluation_batches_equal_the_in_memory_ones(root):
    memory, streamed = sources(root)
    keep = np.flatnonzero(np.arange(SPEC.n_train) % 3 != 1)
    for (s1, a), (s2, b) in zip(memory.subset(keep).batches(100),
                                streamed.subset(keep).batches(100), strict=True):
        assert s1 == s2 and torch.equal(a, b)


@pytest.mark.slow
def test_planted_signal_streamed_matches_in_memory(root, tmp_path):
    quick = dict(cache=root, grid="quick", threads=1)
    (memory,) = probe(method="alf", runs=tmp_path / "a", **quick)
    (streamed,) = probe(method="alf", runs=tmp_path / "b", max_host_memory_gb=BUDGET / 2**30,
                        **quick)
    rec = read_run(streamed.path)
    assert rec["config"]["feature_placement"] == "stream"
    assert rec["settings"]["stream_buffer_shards"] == 4
    assert streamed.path.name != memory.path.name  # another run: other numbers
    assert memory.metrics["balanced_top1"] >= 95 and streamed.metrics["balanced_top1"] >= 95
    assert abs(memory.metrics["balanced_top1"] - streamed.metrics["balanced_top1"]) <= 3
    weights = rec["attention"]["mean"]
    assert rec["attention"]["tokens"][int(np.argmax(weights))] == "block2.ap"


def test_a_budget_below_three_shards_is_one_line(root):
    train, _ = find_pairs(root)[0]
    with pytest.raises(FeatcacheError, match="raise --max-host-memory-gb"):
        load_source(train, token_list("alf", "all", train), torch.device("cpu"),
                    host_budget_bytes=32 * ROW, stream=StreamedSource)


def test_the_identity_says_streamed_only_when_load_source_streams(root):
    """On a GPU, tokens that fit its feature budget go there whatever the host budget:
    the run's identity (`stream_buffer`) must not call that run streamed."""
    from featcache.probing.run import ProbeOptions, stream_buffer

    train, _ = find_pairs(root)[0]
    names = [f"{layer}.{kind}" for layer, kind in token_list("alf", "all", train)]
    gb = BUDGET / 2**30
    on_cpu = stream_buffer(train, names, ProbeOptions(max_host_memory_gb=gb),
                           torch.device("cpu"))
    assert on_cpu == 4  # as load_source above: buffers of 4 shards
    fits_gpu = ProbeOptions(max_host_memory_gb=gb, feature_memory_gb=1.0)
    assert stream_buffer(train, names, fits_gpu, torch.device("cuda")) is None
    forced = ProbeOptions(max_host_memory_gb=gb, feature_memory_gb=0.0)
    assert stream_buffer(train, names, forced, torch.device("cuda")) == 4
