"""`--protocol paper` does what the authors' code does; `clean` does not.

Their behaviour, as read in `lciernik/attentive-layer-fusion`: the validation part is a
subset of the training feature dataset, whose transform adds Gaussian jitter (std 0.05,
p 0.5), so validation scores see jittered features; all-tokens features (N, T, D) are
L2-normalised with `normalize(dim=1)`, across the tokens per channel; CLS/AP features
(N, D) per vector. The validation size is sklearn's for a float test_size: ceil(0.2 N).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from probecache import SynthSpec, make_pair

from featcache.errors import FeatcacheError
from featcache.probing.run import ProbeOptions, feature_normalisation, probe
from featcache.probing.selection import fit_and_select, stratified_split
from featcache.probing.tokens.features import FeatureSource, load_source
from featcache.probing.train import TrainConfig
from featcache.records.store import read_run

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SPEC = SynthSpec(n_blocks=3, dim=16, n_classes=3, n_train=150, n_test=60, all_tokens=5,
                 token_signal=(2, 2.0), signal={("block1", "ap"): 2.0}, seed=3)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("protocol")
    train, test = make_pair(root, SPEC)
    return root, train, test


def test_all_tokens_are_normalised_per_channel_under_the_paper_protocol(pair):
    _, train, _ = pair
    raw = torch.from_numpy(np.asarray(train.group["last_tokens"][:], np.float32))
    theirs = F.normalize(raw, dim=1, p=2)  # the authors' call on (N, T, D)
    src = load_source(train, [("final", "all")], torch.device("cpu"),
                      normalise=feature_normalisation("attentive", "paper"))
    torch.testing.assert_close(src.to_tensor(), theirs, rtol=1e-6, atol=1e-6)
    clean = load_source(train, [("final", "all")], torch.device("cpu"),
                        normalise=feature_normalisation("attentive", "clean"))
    torch.testing.assert_close(clean.to_tensor(), F.normalize(raw, dim=2), rtol=1e-6,
                               atol=1e-6)
    # CLS/AP tokens: per vector under both protocols (their (N, D) features, dim=1)
    assert feature_normalisation("alf", "paper") == "token"
    assert feature_normalisation("linear", "paper") == "token"


def test_channel_normalisation_needs_tokens():
    with pytest.raises(ValueError, match="normalise"):
        FeatureSource(torch.ones(4, 3), normalise="channel")


def test_validation_size_is_sklearns_ceil():
    y = np.repeat(np.arange(3), 41)  # 123 samples: 0.2 · 123 = 24.6
    _, val = stratified_split(y, 0.2, 0)
    assert len(val) == math.ceil(0.2 * 123) == 25


def _select(x, y, protocol: str, cfg: TrainConfig):
    opts = ProbeOptions(protocol=protocol)
    return fit_and_select(x, y, 3, "linear", cfg, opts, 0, None)


def test_paper_protocol_scores_validation_on_jittered_features():
    """A jitter far above the signal spoils the paper protocol's validation scores (on the
    jittered half of the samples); the clean protocol's stay perfect."""
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    x = F.one_hot(y, 3).float() * 5.0 + 0.01 * torch.randn(300, 3, generator=gen)
    x = torch.cat([x, torch.zeros(300, 5)], 1)
    cfg = TrainConfig(epochs=3, min_total_steps=100, lrs=(1e-1,), wds=(1e-4,), seed=0)
    loud = replace(cfg, jitter_std=3.0)  # noise of norm ~8.5 against a signal of norm 5
    clean = _select(x, y, "clean", loud)
    paper = _select(x, y, "paper", loud)
    for k in ("weight", "bias"):  # the same training: only the scoring differs
        torch.testing.assert_close(clean.final.export(0)[k], paper.final.export(0)[k])
    assert clean.val_metrics["balanced_top1"] == 100.0
    assert paper.val_metrics["balanced_top1"] < 95.0
    # p = 0: no jitter anywhere, the protocols agree exactly
    quiet = replace(cfg, jitter_p=0.0)
    a = _select(x, y, "paper", quiet).val_metrics
    b = _select(x, y, "clean", quiet).val_metrics
    assert a == b


def test_protocol_is_recorded_and_checked(pair, tmp_path):
    root, _, _ = pair
    (r,) = probe(ProbeOptions(method="attentive", cache=root, runs=tmp_path, grid="quick",
                              epochs=2, min_steps=10))
    record = read_run(r.path)
    assert record["protocol"] == "paper" and record["normalisation"] == "channel"
    with pytest.raises(FeatcacheError, match="unknown protocol 'exact'"):
        probe(ProbeOptions(method="linear", cache=root, protocol="exact"))
