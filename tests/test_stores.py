"""A cache root featcache cannot serve (a URL) is refused in one line by every command that
takes one, and never taken as a relative path (a folder named `s3:` in the working
directory, which the user would believe is a bucket)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cliutil import assert_user_error, run
from conftest import TIMM_TINY, TIMM_TINY_KW, model_args

from featcache.cache.stores import local_path, resolve_root, url_scheme
from featcache.errors import FeatcacheError

URL = "hdfs://namenode/featcache"  # a scheme no fsspec backend here serves


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def nothing_written(where: Path) -> None:
    assert list(where.iterdir()) == [], list(where.iterdir())


@pytest.mark.parametrize("args", [
    ["ls", "--cache", URL],
    ["verify", "--cache", URL],
    ["verify", f"{URL}/m/d/train"],
    ["info", f"{URL}/m/d/train"],
    ["export", f"{URL}/m/d/train"],
    ["runs", "--cache", URL],
    ["report", "--cache", URL, "--out", "rep"],
    ["probe", "--cache", URL],
    ["probe", "--runs", URL],
    ["extract", "--model", TIMM_TINY, "--weights", "random", *model_args(TIMM_TINY_KW),
     "--dataset", "digits", "--cache", URL],
])
def test_a_url_is_one_line_everywhere_and_no_folder_appears(in_tmp, args):
    line = assert_user_error(run(*args), "hdfs://namenode/featcache")
    assert "cannot serve" in line or "--runs" in line
    nothing_written(in_tmp)


def test_the_environment_root_is_checked_too(in_tmp, monkeypatch):
    monkeypatch.setenv("FEATCACHE_CACHE", URL)
    assert_user_error(run("ls"), "$FEATCACHE_CACHE", "hdfs://")
    nothing_written(in_tmp)


@pytest.mark.parametrize("value, scheme", [
    ("s3://bucket/c", "s3"), (Path("s3://bucket/c"), "s3"), ("gs://b", "gs"),
    ("file:///tmp/x", "file"), ("/tmp/s3:/x", None), ("cache", None), ("./s3:/b", None),
    ("C:/x", None)])
def test_url_scheme_survives_pathlib_folding(value, scheme):
    assert url_scheme(value) == scheme


def test_local_roots_pass_and_a_local_colon_folder_is_reachable(in_tmp):
    assert resolve_root("./s3:/bucket") == in_tmp / "s3:/bucket"
    assert resolve_root(resolve_root("./s3:/bucket")) == in_tmp / "s3:/bucket"
    assert local_path("~/x") == Path.home() / "x"
    with pytest.raises(FeatcacheError, match=r"gs://b/c.*cannot serve"):
        resolve_root(Path("gs://b/c"))
