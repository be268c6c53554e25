"""The demo pipeline end to end on a tiny configuration: extract → probe → report.

The report's files must carry the run records' numbers, not numbers of their own.
"""

import csv
import json
from pathlib import Path

import pytest
from rich.console import Console

from featcache.offline_demo import demo as run_demo

TINY = {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 48, "num_heads": 3}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("demo")
    return run_demo(out, model_arg=TINY, epochs=2, min_steps=20,
                    console=Console(file=open(out / "log.txt", "w"), width=120))


@pytest.mark.slow
def test_demo_writes_every_report_file(demo: dict) -> None:
    written = demo["written"]
    for kind in ("html", "md", "csv"):
        assert Path(written[kind]).is_file(), kind
    html = Path(written["html"]).read_text()
    assert "<img" in html and "src=\"http" not in html


@pytest.mark.slow
def test_report_numbers_are_the_records(demo: dict) -> None:
    runs = sorted((demo["cache_root"] / "runs").rglob("record.json"))
    records = {(r["method"], r["layer_set"]): r for r in (json.loads(p.read_text()) for p in runs)}
    assert {m for m, _ in records} == {"linear", "concat", "alf", "layers"}
    with open(demo["written"]["csv"]) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(records)
    for row in rows:
        record = records[(row["method"], row["layer_set"])]
        assert float(row["test_balanced_top1"]) == pytest.approx(
            record["metrics"]["balanced_top1"], abs=1e-9)
    markdown = Path(demo["written"]["md"]).read_text()
    alf = records[("alf", "all")]["metrics"]["balanced_top1"]
    assert f"{alf:.2f}" in markdown


@pytest.mark.slow
def test_demo_cache_is_complete_and_reused(demo: dict) -> None:
    from featcache.cache.store import find_caches

    caches = find_caches(demo["cache_root"])
    assert sorted(c.split for c in caches) == ["test", "train"]
    assert all(c.complete for c in caches)
    assert sum(c.n for c in caches) == 1797  # every digit, once


def test_bad_demo_options_are_refused_before_any_work(tmp_path):
    from cliutil import assert_user_error, run

    assert_user_error(run("demo", "--out", tmp_path / "d", "--grid", "bogus"), "unknown grid")
    assert not (tmp_path / "d").exists()
    (tmp_path / "f").write_text("")
    assert_user_error(run("demo", "--out", tmp_path / "f"), "--out", "is a file")
