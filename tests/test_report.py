"""The report from synthetic run records: numbers, files, figures, paper numbers, errors."""

from __future__ import annotations

import base64
import csv
import io
import json
import statistics
from collections import defaultdict
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from featcache.errors import FeatcacheError
from featcache.reporting.build import build_report, prepare_report
from featcache.reporting.pages import summary_table
from featcache.reporting.summary import load_records, summarize

try:
    from tests.runrecords import MISSING, write_realistic_set, write_record
except ImportError:  # tests/ is on sys.path, not the repository root
    from runrecords import MISSING, write_realistic_set, write_record

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def expected_cells(runs_root: Path) -> dict[tuple[str, str, str], tuple[float, float]]:
    """(model, dataset, column) -> (mean, sample std) straight from the JSON files."""
    values: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for path in runs_root.rglob("record.json"):
        rec = json.loads(path.read_text())
        if rec["method"] == "layers":
            best = max(rec["per_layer"], key=lambda e: e["val_balanced_top1"])
            value = best["balanced_top1"]
            assert value == rec["metrics"]["balanced_top1"]
            col = "layers"
        else:
            value = rec["metrics"]["balanced_top1"]
            col = "linear" if rec["method"] == "linear" else f"{rec['method']}:{rec['layer_set']}"
        values[(rec["model"], rec["dataset"], col)].append(value)
    return {k: (statistics.mean(v), statistics.stdev(v)) for k, v in values.items()}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Path]]:
    base = tmp_path_factory.mktemp("report")
    runs = base / "runs"
    write_realistic_set(runs)
    out = base / "out"
    return runs, out, build_report(runs, out, cka=False)


def test_table_numbers_match_records(built: tuple[Path, Path, dict]) -> None:
    runs, _, _ = built
    expected = expected_cells(runs)
    rows = summarize(load_records(runs))
    assert len(rows) == 6
    seen = 0
    for row in rows:
        lin_mean = expected[(row["model"], row["dataset"], "linear")][0]
        for col, cell in row["cells"].items():
            key = (row["model"], row["dataset"], col)
            if key not in expected:
                assert cell is None and col in row["missing"]
                continue
            mean, std = expected[key]
            assert cell["n"] == 2
            assert cell["mean"] == pytest.approx(mean, abs=1e-9)
            assert cell["std"] == pytest.approx(std, abs=1e-9)
            assert cell["gain"] == pytest.approx(mean - lin_mean, abs=1e-9)
            seen += 1
    assert seen == len(expected) == 23
    missing = [r for r in rows if r["missing"]]
    assert [(r["model"], r["dataset"], r["missing"]) for r in missing] == [
        (MISSING[0], MISSING[1], ["alf:all"])]


def test_results_csv_has_one_row_per_run(built: tuple[Path, Path, dict]) -> None:
    runs, _, written = built
    records = {str(p.parent): json.loads(p.read_text()) for p in runs.rglob("record.json")}
    with open(written["csv"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(records) == 46
    for row in rows:
        rec = records[row["path"]]
        assert float(row["test_balanced_top1"]) == pytest.approx(rec["metrics"]["balanced_top1"])
        assert float(row["test_top1"]) == pytest.approx(rec["metrics"]["top1"])
        assert float(row["val_balanced_top1"]) == pytest.approx(
            rec["val_metrics"]["balanced_top1"])
        assert float(row["selected_lr"]) == rec["selected"]["lr"]
        if rec["method"] == "layers":
            assert row["selected_layer"] == rec["selected"]["layer"]
            assert row["best_layer"].split(".")[0] == rec["selected"]["layer"]
        else:
            assert float(row["selected_dropout"]) == rec["selected"]["dropout"]
        assert (row["model"], row["dataset"], row["method"], int(row["seed"])) == (
            rec["model"], rec["dataset"], rec["method"], rec["seed"])


def test_markdown_lists_pairs_and_marks_missing(built: tuple[Path, Path, dict]) -> None:
    _, _, written = built
    md = written["md"].read_text()
    for model in ("clip-vit-b16", "tiny-vit"):
        for display in ("FER2013", "SVHN", "digits"):
            assert any(line.startswith(f"| {model} | {display} |") for line in md.splitlines())
    missing_line = next(line for line in md.splitlines()
                        if line.startswith("| tiny-vit | digits |"))
    assert "—" in missing_line
    assert "alf:all not run for 1 of 6 model/dataset pairs: tiny-vit/digits" in md
    for name in ("gain_overview", "gain_heatmap", "alf_attention", "depth_clip-vit-b16",
                 "depth_tiny-vit", "critical_difference_clip-vit-b16",
                 "critical_difference_tiny-vit", "paper_comparison"):
        assert f"figures/{name}.png" in md
        assert (written["figures"] / f"{name}.png").read_bytes().startswith(PNG_MAGIC)


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "data", "poster", "action"):
                self.refs.append((tag, name, value or ""))


def test_html_is_self_contained(built: tuple[Path, Path, dict]) -> None:
    _, _, written = built
    text = written["html"].read_text()
    parser = _Refs()
    parser.feed(text)
    assert parser.refs, "expected embedded figures"
    assert all(v.startswith("data:") for _, _, v in parser.refs), parser.refs
    assert "link" not in parser.tags and "script" not in parser.tags
    assert "url(" not in text and "@import" not in text
    imgs = [v for tag, name, v in parser.refs if tag == "img" and name == "src"]
    assert len(imgs) == 8  # 6, and a critical-difference diagram per model
    for src in imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1], validate=True).startswith(PNG_MAGIC)
    assert parser.tags.count("figure") == 8


def test_paper_numbers_beside_users(built: tuple[Path, Path, dict]) -> None:
    runs, _, written = built
    rows = summarize(load_records(runs))
    fer = next(r for r in rows if r["model"] == "clip-vit-b16" and r["dataset"] == "fer2013")
    assert fer["cells"]["linear"]["paper"] == pytest.approx(64.13665414)
    assert fer["cells"]["alf:all"]["paper"] == pytest.approx(71.88822627)
    assert fer["cells"]["concat:all"]["paper"] == pytest.approx(68.07166338)
    assert fer["cells"]["layers"]["paper"] is None
    other = next(r for r in rows if r["model"] == "tiny-vit" and r["dataset"] == "fer2013")
    assert all(c["paper"] is None for c in other["cells"].values() if c)
    md = written["md"].read_text()
    mean = fer["cells"]["alf:all"]["mean"]
    assert f"| clip-vit-b16 | FER2013 | alf:all | {mean:.2f} ± " in md
    assert "| 71.89 |" in md
    assert "paper 71.89" in written["html"].read_text()


def test_paper_layout_has_the_papers_ten_columns(built: tuple[Path, Path, dict]) -> None:
    """paper_layout.csv: the header of the paper's own per-dataset CSV (read here from the
    shipped file), the user's mean in each column a run fills, the paper's number beside."""
    from featcache.catalogue import data_text

    runs, _, written = built
    paper_csv = list(csv.reader(io.StringIO(data_text(
        "paper_results", "perf_table_OpenCLIP_ViT-B-16_openai_v2.csv"))))
    experiments = next(r for r in paper_csv if r[0] == "Experiment")[1:]
    fer_paper = dict(zip(experiments, next(r for r in paper_csv if r[0] == "FER2013")[1:],
                         strict=True))
    assert len(experiments) == 10
    with open(written["paper_layout"], newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [k for k in table[0] if k in experiments] == experiments  # the paper's order
    cells = expected_cells(runs)
    fer = next(r for r in table if r["model"] == "clip-vit-b16" and r["dataset"] == "fer2013")
    ours = {"CLS last layer": "linear",
            "CLS+AP layers from all blocks (linear)": "concat:all",
            "CLS+AP layers from all blocks (attentive)": "alf:all"}
    for exp in experiments:
        assert float(fer[f"{exp} paper"]) == pytest.approx(float(fer_paper[exp]))
        if exp in ours:
            mean, std = cells[("clip-vit-b16", "fer2013", ours[exp])]
            assert float(fer[exp]) == pytest.approx(mean) and fer[f"{exp} seeds"] == "2"
            assert float(fer[f"{exp} std"]) == pytest.approx(std)
        else:
            assert fer[exp] == "" and fer[f"{exp} seeds"] == ""  # not run: empty, not 0
    tiny = next(r for r in table if r["model"] == "tiny-vit")
    assert all(tiny[f"{e} paper"] == "" for e in experiments)
    md = written["md"].read_text()
    assert "### In the paper's layout" in md and "| " + " | ".join(experiments) + " |" in md


def test_terminal_table_renders(built: tuple[Path, Path, dict]) -> None:
    from rich.console import Console

    runs, _, _ = built
    console = Console(record=True, width=160)
    console.print(summary_table(summarize(load_records(runs))))
    out = console.export_text()
    assert "clip-vit-b16" in out and "FER2013" in out and "alf:all" in out
    assert "paper 64.14" in out and "—" in out


def test_empty_or_absent_root_is_one_clear_error(tmp_path: Path) -> None:
    for root in (tmp_path / "absent", tmp_path):
        with pytest.raises(FeatcacheError) as info:
            build_report(root, tmp_path / "out")
        message = str(info.value)
        assert str(root) in message and "featcache probe" in message and "\n" not in message


def test_bad_and_sparse_records_are_tolerated(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_record(runs, seed=0)
    half = runs / "clip-vit-b16" / "fer2013" / ".linear-last-seed2.tmp-99"  # being written
    half.mkdir(parents=True)
    (half / "record.json").write_text("{")
    bad = runs / "clip-vit-b16" / "fer2013" / "linear-last-seed1"
    bad.mkdir(parents=True)
    (bad / "record.json").write_text("{ not json")
    sparse = runs / "m" / "ds" / "alf-all-seed0"
    sparse.mkdir(parents=True)
    (sparse / "record.json").write_text(json.dumps({"metrics": {"balanced_top1": 50.0}}))
    problems: list[str] = []
    records = load_records(runs, problems)
    assert len(records) == 2
    assert any("unreadable" in p and "linear-last-seed1" in p for p in problems)
    assert not any(".tmp-" in p for p in problems)
    sparse_rec = next(r for r in records if r["model"] == "m")
    assert (sparse_rec["dataset"], sparse_rec["method"], sparse_rec["layer_set"],
            sparse_rec["seed"]) == ("ds", "alf", "all", 0)
    data = prepare_report(runs, tmp_path / "out", cka=False)
    assert any("unreadable" in n for n in data.notes)
    row = next(r for r in data.rows if r["model"] == "m")
    # a record that names no protocol predates them: validation was scored on clean features
    old = "alf:all [protocol=clean]"
    assert row["cells"][old]["std"] is None and row["cells"]["linear"] is None
    written = build_report(runs, tmp_path / "out", formats="md,csv", cka=False)
    assert set(written) >= {"md", "csv"} and "html" not in written


def test_duplicate_seed_uses_newest(tmp_path: Path) -> None:
    write_record(tmp_path / "a", seed=0, metrics={"balanced_top1": 60.0})
    write_record(tmp_path / "b", seed=0, metrics={"balanced_top1": 61.0},
                 created="2027-01-01T00:00:00Z")  # the same run made again, later
    records = load_records(tmp_path / "b") + load_records(tmp_path / "a")
    notes: list[str] = []
    rows = summarize(records, notes)
    assert rows[0]["cells"]["linear"]["n"] == 1
    assert rows[0]["cells"]["linear"]["mean"] == 61.0
    assert any("run twice" in n for n in notes)


def test_summarize_accepts_plain_dicts() -> None:
    raw = [{"model": "m", "dataset": "d", "method": "linear", "seed": s, "protocol": "paper",
            "metrics": {"balanced_top1": v}} for s, v in ((0, 50.0), (1, 52.0))]
    cell = summarize(raw)[0]["cells"]["linear"]
    assert (cell["n"], cell["mean"]) == (2, 51.0)
    assert cell["std"] == pytest.approx(statistics.stdev([50.0, 52.0]))
    # a per-layer record without validation scores or metrics: best test layer, said so
    layers = {"model": "m", "dataset": "d", "method": "layers", "protocol": "paper",
              "per_layer": [
        {"layer": "block3", "token": "ap", "balanced_top1": 40.0},
        {"layer": "block9", "token": "cls", "balanced_top1": 45.0}]}
    cell = summarize([layers])[0]["cells"]["layers"]
    assert cell["mean"] == 45.0 and cell["best_layer"] == "block9.cls (test-picked)"


class _FakeCache:
    n = 300
    layer_names = ["block0", "block1", "final"]
    layer_dims = [4, 4, 4]

    def read(self, kind: str, layers: list[int] | None = None,
             rows: slice | None = None) -> np.ndarray:
        rng = np.random.default_rng(0 if kind == "cls" else 1)
        base = rng.normal(size=(self.n, 4))
        arr = np.stack([rng.normal(size=(self.n, 4)), base + 0.5 * rng.normal(size=(self.n, 4)),
                        base], axis=1).astype(np.float16)
        return arr[rows or slice(None)]


def test_cka_is_computed_when_asked_and_then_reused(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    write_realistic_set(runs)
    opened: list[str] = []

    def opener(path: str) -> _FakeCache:
        opened.append(path)
        return _FakeCache()

    data = prepare_report(runs, out, cka=True, open_cache=opener)
    assert len(opened) == 6 and len(data.cka) == 6
    sim = data.cka[("clip-vit-b16", "fer2013")]
    assert sim["layers"] == _FakeCache.layer_names
    assert sim["cls"][-1] == pytest.approx(1.0) and sim["cls"][0] < sim["cls"][1] < 1.0
    assert (out / "cka.json").is_file()

    def refuse(path: str) -> _FakeCache:
        raise AssertionError("CKA must come from cka.json the second time")

    again = prepare_report(runs, out, cka=False, open_cache=refuse)
    assert again.cka == data.cka
    assert prepare_report(runs, tmp_path / "other", cka=False).cka == {}


def test_hundreds_of_runs_are_each_read_once(tmp_path: Path, monkeypatch) -> None:
    """(How long it takes is measured in benchmarks/report.py, not asserted here.)"""
    runs = tmp_path / "runs"
    rng = np.random.default_rng(0)
    n = 0
    for m in range(4):
        for d in range(10):
            for method, ls in (("linear", "last"), ("concat", "all"), ("alf", "all")):
                for s in range(3):
                    write_record(runs, model=f"model{m}", dataset=f"ds{d}", method=method,
                                 layer_set=ls, seed=s,
                                 metrics={"balanced_top1": float(rng.uniform(40, 90))})
                    n += 1
    reads: list[str] = []
    real = Path.read_text

    def counted(self, *args, **kwargs):
        if runs in self.parents:
            reads.append(self.name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counted)
    opened: list[str] = []
    data = prepare_report(runs, None, cka=True, open_cache=lambda p: opened.append(p))
    assert len(data.records) == n == 360 and len(data.rows) == 40
    assert reads.count("record.json") == 360 == len(reads)  # each once, nothing else
    assert opened == []  # no `layers` runs: no cache is opened for CKA


def test_cli_report(built: tuple[Path, Path, dict], tmp_path: Path) -> None:
    from featcache.cli.main import app

    runs, _, _ = built
    runner = CliRunner()
    out = tmp_path / "rep"
    result = runner.invoke(app, ["report", "--runs", str(runs), "--out", str(out), "--no-cka"])
    assert result.exit_code == 0, result.output
    assert "FER2013" in result.output and "linear" in result.output
    assert "alf:all not run" in result.output
    assert {p.name for p in out.iterdir()} >= {"report.html", "report.md", "results.csv"}

    result = runner.invoke(app, ["report", "--cache", str(runs.parent), "--out", str(out),
                                 "--format", "csv", "--json", "--no-cka"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["n_runs"] == 46 and len(payload["rows"]) == 6
    assert "linear" in payload["columns"]

    result = runner.invoke(app, ["report", "--runs", str(tmp_path / "none"), "--out",
                                 str(out)])
    assert result.exit_code == 2
    assert "featcache probe" in result.output

    result = runner.invoke(app, ["report", "--runs", str(runs), "--format", "pdf"])
    assert result.exit_code == 2 and "unknown report format" in result.output


def test_cache_root_given_as_runs_root(tmp_path: Path) -> None:
    write_record(tmp_path / "runs")
    data = prepare_report(tmp_path, None, cka=False)
    assert len(data.records) == 1 and data.runs_root == tmp_path / "runs"
    assert any("read the runs under" in n for n in data.notes)
