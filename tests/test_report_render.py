"""Open report.html in a real browser (headless Chromium) when one is installed.

Checks what a file-level test cannot: the page renders without a server, and every
embedded figure decodes in the browser (naturalWidth > 0).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from featcache.reporting.build import build_report

try:
    from tests.runrecords import write_realistic_set
except ImportError:  # tests/ is on sys.path, not the repository root
    from runrecords import write_realistic_set

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "",
                             shutil.which("chromium-browser") or "") if p and Path(p).exists()),
                None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (apt-get install chromium) — the "
    "browser rendering check of report.html is skipped")

_CHECK = ("<script>window.addEventListener('load',function(){var s='';"
          "for(var i=0;i<document.images.length;i++){var im=document.images[i];"
          "s+=(im.complete&&im.naturalWidth>0)?'1':'0';}"
          "document.body.setAttribute('data-imgcheck','n'+s);});</script>")


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)


@pytest.fixture(scope="module")
def report_html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("render")
    write_realistic_set(base / "runs")
    return build_report(base / "runs", base / "out", formats=("html",), cka=False)["html"]


def test_screenshot_is_not_blank(report_html: Path, tmp_path: Path) -> None:
    from PIL import Image

    shot = tmp_path / "shot.png"
    proc = _chromium(tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,2000",
                     report_html.as_uri())
    assert shot.is_file(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2000, 1200)
    assert pixels.std() > 10  # text, tables and figures, not one flat colour
    assert (pixels < 100).mean() > 0.005  # some dark ink (text) on the page


def test_every_image_decodes_in_the_browser(report_html: Path, tmp_path: Path) -> None:
    probe = tmp_path / "probe.html"
    probe.write_text(report_html.read_text().replace("</body>", _CHECK + "</body>"))
    proc = _chromium(tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom",
                     probe.as_uri())
    match = re.search(r'data-imgcheck="n([01]*)"', proc.stdout)
    assert match, proc.stderr[-2000:]
    flags = match.group(1)
    # Every <img> of the page (the figures the realistic set gives, at least six) decodes.
    count = report_html.read_text().count("<img ")
    assert count >= 6 and len(flags) == count and set(flags) == {"1"}, (count, flags)


def test_terminal_table_shows_each_columns_variant():
    """`[grid=quick]` in a column name is text, not rich markup (it vanished, and four
    different runs all read `linear`)."""
    import io

    from rich.console import Console

    from featcache.reporting.pages import summary_table

    cols = ["linear [grid=quick]", "linear [grid=quick, shots=5]"]
    rows = [{"model_dir": "m", "display": "d", "cells": {
        c: {"mean": 50.0, "std": None, "n": 1, "gain": None, "paper": None} for c in cols}}]
    console = Console(width=200, file=io.StringIO(), record=True)
    console.print(summary_table(rows))
    text = console.export_text()
    # A label wraps at its commas (one setting a line), never inside a setting.
    assert "[grid=quick]" in text and "[grid=quick," in text and "shots=5]" in text
