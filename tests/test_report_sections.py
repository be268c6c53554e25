"""The report's page is one model rendered twice, and the report leaves records as read."""

from __future__ import annotations

import copy
import html
import re

import pytest

from featcache.records.store import list_runs
from featcache.reporting.build import prepare_report
from featcache.reporting.pages import to_html, to_markdown
from featcache.reporting.sections import Heading, Table, sections
from featcache.reporting.summary import columns_of

try:
    from tests.runrecords import write_realistic_set
except ImportError:  # run from inside tests/
    from runrecords import write_realistic_set


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    write_realistic_set(root)
    return prepare_report(root, cka=False, resamples=0)


def test_the_report_adds_nothing_to_the_records(data):
    """What the report derives (columns, values, best layers) lives beside the records:
    they stay as `list_runs` reads them (figures and plugins get them as written)."""
    fresh = list_runs(data.runs_root)
    assert data.records == fresh
    assert not [k for rec in data.records for k in rec if k.startswith("_")]
    assert {run.column for run in data.runs} == set(columns_of(data.rows)) >= {"linear",
                                                                               "alf:all"}
    assert [run.record for run in data.runs] == data.records


def test_markdown_and_html_walk_the_same_sections(data):
    blocks = sections(data)
    md, page = to_markdown(data), to_html(data)
    headings = [b for b in blocks if isinstance(b, Heading)]
    md_headings = [(len(m.group(1)), m.group(2))
                   for m in re.finditer(r"^(#+) (.+)$", md, re.M)]
    html_headings = [(int(m.group(1)), html.unescape(m.group(2)))
                     for m in re.finditer(r"<h(\d)>(.*?)</h\d>", page)]
    assert md_headings == html_headings == [(h.level, h.text) for h in headings]
    tables = [b for b in blocks if isinstance(b, Table)]
    assert len(tables) >= 3
    md_rows = sum(1 for line in md.splitlines() if line.startswith("| "))
    assert md_rows == sum(len(t.rows) + 1 for t in tables)  # + the header row
    assert page.count("<tr>") == md_rows


def test_a_section_added_to_the_model_shows_in_both_pages(data, monkeypatch):
    from featcache.reporting import pages
    from featcache.reporting import sections as model

    def with_extra(data, figures=()):
        return [*model.sections(data, figures), Heading(2, "An extra section")]

    monkeypatch.setattr(pages, "sections", with_extra)
    assert "## An extra section" in pages.to_markdown(data)
    assert "<h2>An extra section</h2>" in pages.to_html(data)


def test_records_are_not_changed_by_summarising_them(data):
    from featcache.reporting.summary import summarize

    records = copy.deepcopy(data.records)
    summarize(records)
    assert records == data.records
