"""The authors' batch plan under --protocol paper (issue 17 §3), checked against the rule
stated independently (a brute force over every batch size) and against the batches an
epoch is actually cut into."""

from __future__ import annotations

import json

import pytest
import torch

from featcache.catalogue import paper_datasets
from featcache.probing.tokens.features import FeatureSource
from featcache.probing.train import TrainConfig, authors_batch_size, plan_steps


def _rule(batch: int, n: int, min_batches: int = 5) -> int:
    """The rule as the issue states it, by brute force: the recipe's batch if it gives at
    least 5 batches with a last batch empty or at least half full; else the largest batch
    (above 16) giving at least max(5, n // batch) batches with such a last batch; else 1."""
    def ok(b: int) -> bool:
        return n % b == 0 or n % b >= b / 2

    if n // batch >= min_batches and ok(batch):
        return batch
    need = max(min_batches, n // batch)
    fits = [b for b in range(17, n + 1) if n // b >= need and ok(b)]
    return max(fits) if fits else 1


@pytest.mark.parametrize("n", [5000, 4000, 45000, 28709, 1020, 2040, 3060, 85, 84, 100,
                               333, 10_001, 73_257, 50_000, 3_662])
@pytest.mark.parametrize("batch", [2048, 512, 64])
def test_authors_batch_size_is_the_stated_rule(n: int, batch: int) -> None:
    assert authors_batch_size(batch, n) == _rule(batch, n)


def test_stl10_tunes_at_1000_times_4() -> None:
    """The issue's example: STL-10 (5,000 train; 1,000 validation) tunes in batches of
    1,000, four a pass, where featcache's own plan used 800 × 5."""
    cfg = TrainConfig(batch_plan="authors", plan_samples=5000)
    grid, refit = plan_steps(4000, cfg), plan_steps(5000, cfg)
    assert (grid.batch_size, grid.steps_per_epoch, grid.epochs) == (1000, 4, 250)
    assert (refit.batch_size, refit.steps_per_epoch, refit.epochs) == (1000, 5, 200)
    own = plan_steps(4000, TrainConfig())
    assert (own.batch_size, own.steps_per_epoch) == (800, 5)


def test_a_lone_last_sample_gets_one_more_in_the_batch() -> None:
    """On the tuning split, a batch that would leave one sample alone grows by one (their
    check_batch_size); the whole set keeps the sized batch."""
    cfg = TrainConfig(batch_plan="authors", plan_samples=1000, batch_size=100)
    assert plan_steps(1000, cfg).batch_size == 100
    assert plan_steps(801, cfg).batch_size == 101  # 801 % 100 == 1
    assert plan_steps(800, cfg).batch_size == 100


@pytest.mark.parametrize("whole", [12, 13, 20, 84, 85, 307, 1000])
def test_no_plan_leaves_a_batch_of_one(whole: int) -> None:
    """A batch of one through train-mode BatchNorm fails: no split of any small set
    (the refit on the whole set, a tuning split of any size below it) may end in one.
    (Found by a 12-image suite under --protocol paper: ALF's tuning split of 9 was cut
    into batches of 2, the last of 1, and the probe died with a traceback.)"""
    for batch in (2048, 17, 18):
        cfg = TrainConfig(batch_plan="authors", plan_samples=whole, batch_size=batch)
        for n in range(2, whole + 1):
            plan = plan_steps(n, cfg)
            assert n % plan.batch_size != 1, (whole, batch, n, plan.batch_size)
            assert 2 <= plan.batch_size <= n


def test_a_tiny_set_trains_alf_under_the_paper_protocol(tmp_path) -> None:
    """The suite's case end to end: 12 training images, ALF, --protocol paper."""
    from probecache import SynthSpec, make_pair

    from featcache.probing.run import probe

    make_pair(tmp_path / "cache", SynthSpec(n_blocks=2, dim=8, n_classes=2, n_train=12,
                                            n_test=6, shard_size=8, seed=3))
    (run,) = probe(method="alf", cache=tmp_path / "cache", runs=tmp_path / "runs",
                   grid="quick", epochs=1, min_steps=2, threads=1)
    assert run.status == "trained"
    steps = json.loads((run.path / "record.json").read_text())["steps"]
    assert steps["grid"]["batch_size"] >= 2 and steps["refit"]["batch_size"] >= 2


@pytest.mark.parametrize("n", [803, 1000, 37])
def test_an_epoch_is_cut_into_dataloader_batches(n: int) -> None:
    """Batches of exactly the batch size and a smaller last one (no drop_last), every
    sample once."""
    cfg = TrainConfig(batch_plan="authors", plan_samples=n, batch_size=100, min_total_steps=0)
    plan = plan_steps(n, cfg)
    src = FeatureSource(torch.arange(n, dtype=torch.float32).view(n, 1), normalise=None)
    sizes, seen = [], []
    for idx, xb in src.epoch_batches(plan.cuts, torch.Generator().manual_seed(0)):
        sizes.append(len(idx))
        seen += xb[:, 0].long().tolist()
    assert sorted(seen) == list(range(n))
    assert len(sizes) == plan.steps_per_epoch
    assert all(s == plan.batch_size for s in sizes[:-1]) and 0 < sizes[-1] <= plan.batch_size
    assert plan.as_dict()["last_batch"] == sizes[-1]


def test_the_paper_table_of_both_plans_is_in_the_docs() -> None:
    """docs/method.md's table agrees with the code for every paper dataset."""
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "method.md").read_text()
    for d in paper_datasets().values():
        n = d.train_size
        n_val = -(-n // 5)  # ceil(0.2 n)
        cfg = TrainConfig(batch_plan="authors", plan_samples=n)
        grid = plan_steps(n - n_val, cfg)
        refit = plan_steps(n, cfg)
        own = plan_steps(n - n_val, TrainConfig())
        cells = (f"| {d.display} | {n:,} | {own.batch_size} × {own.steps_per_epoch} | "
                 f"{grid.batch_size} × {grid.steps_per_epoch - 1} + "
                 f"{grid.as_dict()['last_batch']} | {refit.batch_size} × "
                 f"{refit.steps_per_epoch - 1} + {refit.as_dict()['last_batch']} |")
        assert cells in doc, cells
