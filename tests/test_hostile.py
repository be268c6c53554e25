"""A hostile pass, round two (issue 18): each case here failed before its fix.

Runs whose files are not what they wrote, CKA from a replaced cache, 16-bit images,
outputs onto a command's own inputs, symlinked folders, Ctrl-C while workers start, the
umask, torchrun ranks that die, unclear lines, `-gb` units, the exported model's batch
bound, and 80-column tables. Every refusal: exit 2, one `error:` line, no traceback.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cliutil import assert_user_error, run
from conftest import TIMM_TINY, TIMM_TINY_KW, one_thread

from featcache.errors import FeatcacheError

pytestmark = pytest.mark.usefixtures("torch_one_thread")

QUICK = dict(grid="quick", epochs=1, min_steps=5, threads=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A tiny random ViT over digits, a linear and an ALF probe on it."""
    from featcache.extracting.run import extract
    from featcache.probing.run import probe

    root = tmp_path_factory.mktemp("hostile")
    with one_thread():
        extract(model=TIMM_TINY, model_arg=dict(TIMM_TINY_KW), weights="random:3",
                dataset="digits", cache=root, batch_size=64, workers=0)
        runs = {m: probe(method=m, cache=root, **QUICK)[0].path for m in ("linear", "alf")}
    return {"root": root, **runs}


@pytest.fixture
def copy(trained, tmp_path) -> dict[str, Path]:
    """A private copy of the trained root (its runs may be damaged by the test)."""
    root = tmp_path / "root"
    shutil.copytree(trained["root"], root)
    return {"root": root, **{m: root / trained[m].relative_to(trained["root"])
                             for m in ("linear", "alf")}}


def edit_record(run_dir: Path, change) -> None:
    file = run_dir / "record.json"
    record = json.loads(file.read_text())
    change(record)
    file.write_text(json.dumps(record))


def listed(root: Path) -> tuple[list[dict], list[str]]:
    from featcache.records.listing import runs

    problems: list[str] = []
    return runs(cache=root, problems=problems), problems


# -- runs whose files are not what they wrote ------------------------------------------------

def test_a_deleted_predictions_file_is_damage_not_an_old_run(copy, tmp_path):
    """Deleting predictions.safetensors and editing the record's metric: `runs` and the
    report showed the edited number, with a false note ('made before per-sample
    predictions were kept')."""
    from featcache.reporting.build import report

    run_dir = copy["linear"]
    (run_dir / "predictions.safetensors").unlink()
    edit_record(run_dir, lambda r: r["metrics"].update(balanced_top1=99.0))
    rows, problems = listed(copy["root"])
    assert [r["method"] for r in rows] == ["alf"]
    assert any("predictions.safetensors but the file is missing" in p for p in problems)
    data = report(cache=copy["root"], out=tmp_path / "r", format="", cka=False)
    notes = "\n".join(data.notes)
    assert "the file is missing" in notes and "made before per-sample" not in notes
    assert all(c is None or c["mean"] != 99.0 for c in data.rows[0]["cells"].values())
    assert_user_error(run("predict", run_dir, "--dataset", "digits"), "missing", "--force")


def test_a_deleted_head_is_damage(copy):
    (copy["alf"] / "head.safetensors").unlink()
    rows, problems = listed(copy["root"])
    assert [r["method"] for r in rows] == ["linear"]
    assert any("head.safetensors but the file is missing" in p for p in problems)


@pytest.mark.parametrize("key", ["top1", "top5", "balanced_top5"])
def test_every_test_metric_is_recomputed(copy, tmp_path, key):
    """Only balanced_top1 was checked: an edited top1 landed in `runs` and results.csv."""
    from featcache.reporting.build import report

    edit_record(copy["linear"], lambda r: r["metrics"].update({key: 12.5}))
    rows, problems = listed(copy["root"])
    assert [r["method"] for r in rows] == ["alf"]
    assert any("its record says 12.5000" in p for p in problems)
    data = report(cache=copy["root"], out=tmp_path / "r", format="csv", cka=False)
    text = (tmp_path / "r" / "results.csv").read_text()
    assert "12.5" not in text and "linear" not in {r["method"] for r in data.records}


def test_runs_show_metrics_computed_from_predictions(trained):
    """What `runs` shows is what the predictions give (computed here independently)."""
    from safetensors.numpy import load_file

    rows, _ = listed(trained["root"])
    for row in rows:
        pred = load_file(str(Path(row["path"]) / "predictions.safetensors"))
        hit = pred["pred"] == pred["label"]
        assert row["top1"] == pytest.approx(100 * hit.mean(), abs=1e-9)
        per_class = [hit[pred["label"] == c].mean() for c in np.unique(pred["label"])]
        assert row["balanced_top1"] == pytest.approx(100 * np.mean(per_class), abs=1e-9)


@pytest.mark.parametrize("edit, fragment", [
    (lambda r: r.update(method="concat"), "'method' is 'concat'"),
    (lambda r: r.update(layer_set="last"), "'layer_set' is 'last'"),
    (lambda r: r["settings"]["recipe"].update(epochs=40), "hash to"),
    (lambda r: r.update(seed=3), "'seed' is 3"),
    (lambda r: r.update(model="vit-b16"), "'model' is 'vit-b16'"),
    (lambda r: r["fingerprints"]["test"]["dataset"].update(n=5), "test cache's fingerprint"),
])
def test_an_edited_identity_is_refused(copy, tmp_path, edit, fragment):
    """Editing `method` made the report invent a column; any edit of what a run is must
    be caught by recomputing its settings id and matching its record against it."""
    from featcache.reporting.build import report

    edit_record(copy["alf"], edit)
    rows, problems = listed(copy["root"])
    assert [r["method"] for r in rows] == ["linear"]
    assert any(fragment in p and "changed after the run" in p for p in problems), problems
    data = report(cache=copy["root"], out=tmp_path / "r", format="", cka=False)
    assert [c.split()[0] for c in data.rows[0]["cells"]] == ["linear"]
    line = assert_user_error(run("predict", copy["alf"], "--dataset", "digits"), fragment)
    assert "the images, the backbone or the device" not in line


# -- CKA from a replaced cache ------------------------------------------------------------------

@pytest.mark.slow
def test_cka_of_a_replaced_cache_is_not_paired_with_old_runs(tmp_path):
    """After `extract --overwrite` with other settings, the report paired the old run's
    accuracy by depth with the new cache's CKA (another number of layers)."""
    from featcache.extracting.run import extract
    from featcache.probing.run import probe
    from featcache.reporting.build import report

    root = tmp_path / "root"
    common = dict(model=TIMM_TINY, weights="random:3", dataset="digits", cache=root,
                  batch_size=128, workers=0)
    extract(model_arg=dict(TIMM_TINY_KW), **common)
    (done,) = probe(method="layers", cache=root, **QUICK)
    n_layers = len(json.loads((done.path / "record.json").read_text())["fingerprints"]
                   ["test"]["model"]["layer_names"])
    extract(model_arg={**TIMM_TINY_KW, "depth": 2}, overwrite=True, **common)
    data = report(cache=root, out=tmp_path / "r", format="csv", cka=True)
    assert all(len(v["layers"]) == n_layers for v in data.cka.values())
    assert not data.cka, data.cka
    notes = "\n".join(data.notes)
    assert "was replaced since its runs" in notes
    assert "trained on caches replaced since" in notes
    import csv

    rows = list(csv.DictReader((tmp_path / "r" / "results.csv").open()))
    assert [r["caches_replaced"] for r in rows] == ["test,train"]
    store = json.loads((tmp_path / "r" / "cka.json").read_text()) \
        if (tmp_path / "r" / "cka.json").exists() else {}
    assert not store


# -- 16-bit images ----------------------------------------------------------------------------

def test_a_dark_16_bit_image_stays_dark(tmp_path):
    """A 16-bit PNG (mode I;16) whose values stop at 254 was read as 8-bit: as bright as
    the same picture at full 16-bit range. The format's range scales it, not its values."""
    from PIL import Image

    from featcache.serving.inference import ImageFiles

    ramp = (np.arange(64).reshape(8, 8) * 4 + 2).astype(np.uint16)  # 2 .. 254
    Image.fromarray(ramp).save(tmp_path / "dark.png")
    Image.fromarray(ramp * 257).save(tmp_path / "bright.png")
    assert Image.open(tmp_path / "dark.png").mode == "I;16"
    files = ImageFiles([tmp_path / "dark.png", tmp_path / "bright.png"], ["a"])
    dark, bright = (np.asarray(files.load(i)) for i in range(2))
    assert dark.shape == bright.shape == (8, 8, 3)
    values = ramp.astype(np.float64)
    np.testing.assert_array_equal(bright[..., 0], np.rint(values * 257 * 255 / 65535))
    np.testing.assert_array_equal(dark[..., 0], np.rint(values * 255 / 65535))
    assert dark.max() <= 1 < 250 <= bright.max()


# -- outputs onto a command's own inputs ----------------------------------------------------

def cache_split(root: Path, split: str = "test") -> Path:
    (path,) = [p.parent for p in root.rglob("zarr.json") if p.parent.name == split
               and (p.parent / "cls").is_dir()]
    return path


def test_export_never_writes_over_the_cache_it_exports(copy):
    """`export C --out C/zarr.json --overwrite` destroyed the cache; so did --out onto a
    shard file."""
    cache = cache_split(copy["root"])
    shard = next(p for p in sorted((cache / "cls").rglob("*")) if p.is_file()
                 and p.name != "zarr.json")
    for target in (cache / "zarr.json", shard):
        before = target.read_bytes()
        assert_user_error(run("export", cache, "--out", target, "--overwrite"),
                          "one of this command's inputs", "write elsewhere")
        assert target.read_bytes() == before
    assert run("verify", cache).exit_code == 0


def test_predict_and_export_model_refuse_their_inputs(copy, tmp_path):
    from PIL import Image

    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32), "red").save(image)
    before = image.read_bytes()
    assert_user_error(run("predict", copy["linear"], image, "--csv", image, "--overwrite"),
                      "one of this command's inputs")
    assert image.read_bytes() == before
    ckpt = tmp_path / "w.pt2"
    ckpt.write_bytes(b"weights")
    assert_user_error(run("export-model", copy["linear"], "--out", ckpt, "--weights", ckpt,
                          "--overwrite"), "one of this command's inputs")
    assert ckpt.read_bytes() == b"weights"


def test_export_model_of_a_missing_run_names_the_run(tmp_path):
    """It said the folder of --out does not exist, though no --out was given."""
    line = assert_user_error(run("export-model", tmp_path / "nonexistent" / "run"),
                             "is not a run folder")
    assert "--out" not in line


# -- predict's inputs ---------------------------------------------------------------------------

def photos(tmp_path: Path) -> Path:
    """photos/{a.png, sub/b.png, elsewhere -> ../outside (c.png), loop -> photos}."""
    from PIL import Image

    folder, outside = tmp_path / "photos", tmp_path / "outside"
    (folder / "sub").mkdir(parents=True)
    outside.mkdir()
    for i, where in enumerate((folder / "a.png", folder / "sub" / "b.png",
                               outside / "c.png")):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(where)
    (folder / "elsewhere").symlink_to(outside, target_is_directory=True)
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    return folder


def test_symlinked_folders_are_followed_and_loops_guarded(tmp_path):
    """`predict FOLDER` skipped symlinked subfolders without a word."""
    from featcache.serving.inference import collect_images

    found = collect_images([photos(tmp_path)])
    assert sorted(p.name for p in found) == ["a.png", "b.png", "c.png"]


def test_a_glob_of_folders_predicts_their_images(trained, tmp_path):
    """A quoted glob that matched only folders said 'no files match'."""
    from featcache.serving.inference import collect_images

    photos(tmp_path)
    found = collect_images([str(tmp_path / "pho*")])
    assert sorted(p.name for p in found) == ["a.png", "b.png", "c.png"]
    (tmp_path / "empty1").mkdir()
    with pytest.raises(FeatcacheError, match="matches 1 folder.* hold no image files"):
        collect_images([str(tmp_path / "empty*")])
    done = run("predict", trained["linear"], str(tmp_path / "pho*"), "--json")
    assert done.exit_code == 0, done.output
    assert len(json.loads(done.stdout)) == 3


def test_json_and_csv_on_stdout_is_refused(trained):
    """`--json --csv -` dropped the CSV silently."""
    assert_user_error(run("predict", trained["linear"], "--dataset", "digits", "--json",
                          "--csv", "-"), "--json and --csv -", "choose one")


# -- the umask -------------------------------------------------------------------------------

def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in root.rglob("*")
            if p.is_file() and not p.is_symlink()}


def test_every_written_file_honours_the_umask(trained, copy, tmp_path):
    """head.safetensors and predictions.safetensors were 0600 beside a 0644 record.json."""
    from PIL import Image

    mask = os.umask(0o022)
    os.umask(mask)
    written = modes(trained["root"])
    assert any(k.endswith("head.safetensors") for k in written)
    wrong = {k: oct(v) for k, v in written.items() if v != 0o666 & ~mask}
    assert not wrong, wrong
    image, out = tmp_path / "a.png", tmp_path / "out"
    Image.new("RGB", (32, 32), "red").save(image)
    out.mkdir()
    old = os.umask(0o002)  # group-writable: a shared project folder
    try:
        for args in (("predict", copy["linear"], image, "--csv", out / "p.csv"),
                     ("export", cache_split(copy["root"]), "--out", out / "test.h5"),
                     ("report", "--cache", copy["root"], "--out", out / "report", "--no-cka",
                      "--resamples", 0)):
            done = run(*args)
            assert done.exit_code == 0, done.output
    finally:
        os.umask(old)
    got = modes(out)
    assert {"p.csv", "test.h5", "report/results.csv", "report/report.html"} <= set(got)
    assert {k: oct(v) for k, v in got.items() if v != 0o664} == {}


# -- Ctrl-C during predict --workers 2 ---------------------------------------------------------

def _children() -> list[int]:
    """This process's children but multiprocessing's resource tracker, which an earlier
    test of the same session may have started and which lives until the session ends
    (the whole slow suite in one run waited for it forever, and signalled it)."""
    pid = os.getpid()
    try:
        kids = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return [c for c in kids if "resource_tracker" not in _cmdline(c)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _ctrl_c_when_workers_start(delay: float, limit: float = 120.0) -> None:
    """As a terminal's Ctrl-C: SIGINT to this process and its DataLoader workers, `delay`
    seconds after the first worker appears."""
    import signal
    import time

    deadline = time.monotonic() + limit
    while not _children() and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(delay)
    if time.monotonic() >= deadline:
        return
    for pid in (*_children(), os.getpid()):
        with __import__("contextlib").suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)


def many_images(folder: Path, n: int = 160) -> Path:
    from PIL import Image

    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            folder / f"{i:04d}.png")
    return folder


@pytest.mark.slow
# (0.5 s was too late on a quiet machine: 160 images were predicted before the signal)
@pytest.mark.parametrize("delay", [0.0, 0.003, 0.02, 0.1])
def test_ctrl_c_while_workers_start_always_stops(trained, tmp_path, delay):
    """Ctrl-C during `predict --workers 2` was swallowed 2 of 11 times while the workers
    started: the command finished, wrote its CSV and exited 0."""
    import threading
    import time

    images = many_images(tmp_path / "imgs", 400)
    out = tmp_path / "p.csv"
    while _children():  # the workers of an earlier test, still shutting down
        time.sleep(0.05)
    threading.Thread(target=_ctrl_c_when_workers_start, args=(delay,), daemon=True).start()
    done = run("predict", trained["linear"], images, "--workers", 2, "--batch-size", 4,
               "--csv", out)
    assert done.exit_code == 130, (done.exit_code, done.output)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("interrupted:") and "Traceback" not in done.output
    assert "resume" not in lines[-1]  # predict keeps nothing to resume from
    assert not out.exists()


def test_an_interrupt_a_library_swallows_still_stops(trained, tmp_path, monkeypatch):
    """A SIGINT whose KeyboardInterrupt some code on its way catches (as happened while
    workers started) must still stop the command before it writes anything."""
    import signal
    import time

    import featcache.serving.inference as inference

    real = inference._rows

    def swallowing(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "_rows", swallowing)
    image = many_images(tmp_path / "imgs", 2)
    out = tmp_path / "p.csv"
    done = run("predict", trained["linear"], image, "--csv", out)
    assert done.exit_code == 130, (done.exit_code, done.output)
    assert not out.exists()


# -- torchrun ----------------------------------------------------------------------------------

def test_predict_under_torchrun_says_why_on_every_rank(trained, monkeypatch):
    """Under torchrun, `predict` on rank 1 exited 2 with no message."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    for args in (("predict", trained["linear"], "--dataset", "digits"),
                 ("export-model", trained["linear"])):
        assert_user_error(run(*args), "runs in one process", "rank 1 of 2", "without torchrun")


@pytest.mark.slow
def test_kill_9_of_rank_0_is_one_line_on_rank_1(tmp_path):
    """`kill -9` of rank 0 made rank 1 print a gloo traceback ('Connection reset by
    peer'); it must say, in one line, that rank 0 died."""
    import subprocess
    import sys

    from probecache import SynthSpec, make_pair
    from test_distributed import PROBE_SPEC

    root = tmp_path / "cache"
    make_pair(root, SynthSpec(**PROBE_SPEC))
    script = (
        "import os, signal, sys\n"
        "from featcache.probing import train\n"
        "real = train.fit_grid\n"
        "def dying(*a, **k):\n"
        "    if os.environ['RANK'] == '0':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(*a, **k)\n"
        "train.fit_grid = dying\n"
        "from featcache.cli.main import app\n"
        "sys.argv[0] = 'featcache'\n"
        "app()\n")
    (tmp_path / "rank_script.py").write_text(script)
    # torchrun's agent SIGTERMs the survivors once it sees rank 0 gone: polling every 20 s
    # leaves rank 1 the time to meet the dead rank in its next collective (gloo says so at
    # once), as it does on a cluster where the agent polls a busy node late
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "--monitor-interval", "20", str(tmp_path / "rank_script.py"), "probe",
           "--method", "linear", "--cache", str(root), "--runs", str(tmp_path / "runs"),
           "--grid", "quick", "--epochs", "1", "--min-steps", "5", "--memory-gb", "1e-6"]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True,
                          capture_output=True, timeout=400, cwd=Path(__file__).parents[1])
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and "rank 0 died" in errors[0], done.stderr[-3000:]
    # no traceback of the ranks (torchrun's launcher prints its own, of itself)
    assert "Connection reset" not in done.stderr and "gloo" not in done.stderr
    assert not [line for line in done.stderr.splitlines()
                if line.strip().startswith("File ") and "/featcache/" in line]


# -- unclear lines ---------------------------------------------------------------------------

def test_every_gb_option_says_gib():
    """`--max-host-memory-gb 0.0005` printed 524.3 KiB: the options take GiB; say so."""
    import typer
    from featcache.cli.main import app

    group = typer.main.get_command(app)
    seen = []
    for name, command in group.commands.items():
        for param in command.params:
            if any(opt.endswith("-gb") for opt in getattr(param, "opts", [])):
                seen.append((name, param.opts[0]))
                assert "GiB" in (param.help or ""), (name, param.opts, param.help)
    assert ("probe", "--max-host-memory-gb") in seen


def test_runs_on_a_run_folder_or_a_runs_root_as_cache_names_the_right_root(trained):
    """`runs` on a run folder said 'no runs; train some with featcache probe'."""
    runs_root = trained["root"] / "runs"
    for args in (("--runs", trained["linear"]), ("--runs", trained["linear"].parent),
                 ("--runs", trained["linear"].parent.parent), ("--cache", runs_root)):
        line = assert_user_error(run("runs", *args), f"give --runs {runs_root}")
        assert "train some" not in line
    assert_user_error(run("report", "--runs", trained["linear"], "--out", trained["root"] /
                          "no-report"), "one run's folder", f"give --runs {runs_root}")


def test_verify_of_a_cache_root_points_to_cache_option(trained):
    assert_user_error(run("verify", trained["root"]), "is a cache root",
                      f"featcache verify --cache {trained['root']}")


def test_predict_after_a_record_edit_names_the_record(copy):
    """It blamed 'the images, the backbone or the device'."""
    edit_record(copy["linear"], lambda r: r["metrics"].update(top1=1.0))
    line = assert_user_error(run("predict", copy["linear"], "--dataset", "digits"),
                             "its record says 1.0000", "changed after the run")
    assert "the images, the backbone or the device" not in line


# -- 80-column tables -------------------------------------------------------------------------

@pytest.fixture
def narrow(monkeypatch):
    """The CLI's consoles at a terminal's width (80 unless the test says otherwise)."""
    from featcache.cli import common

    def at(width: int) -> None:
        for console in (common.console, common.err_console):
            monkeypatch.setattr(console, "_width", width)

    at(80)
    return at


def assert_whole(output: str, words: set[str], width: int) -> None:
    lines = output.splitlines()
    assert max(len(line) for line in lines) <= width, output
    found = {w for line in lines for w in line.replace("│", " ").replace("┃", " ").split()}
    assert words <= found, (words - found, output)


def test_runs_and_probe_tables_are_readable_at_80_columns(trained, narrow):
    """At 80 columns `runs` broke words inside cells ('digi ts', 'grid =qui ck')."""
    done = run("runs", "--cache", trained["root"])
    assert done.exit_code == 0, done.output
    assert_whole(done.stdout, {"vit_tiny_patch16_224", "digits", "linear", "alf",
                               "grid=quick,", "min_steps=5", "balanced", "top-1"}, 80)
    narrow(140)  # a wider terminal shows more: top-1 and the settings id
    wide = run("runs", "--cache", trained["root"])
    ident = json.loads((trained["linear"] / "record.json").read_text())["settings_id"]
    assert_whole(wide.stdout, {"timm:vit_tiny_patch16_224", ident, "top-1"}, 140)
    narrow(80)
    again = run("probe", "--method", "linear", "--cache", trained["root"], "--grid", "quick",
                "--epochs", 1, "--min-steps", 5, "--threads", 1)
    assert again.exit_code == 0, again.output
    assert_whole(again.stdout, {"vit_tiny_patch16_224", "digits", "balanced"}, 80)


def test_report_table_is_readable_at_80_columns(tmp_path, narrow):
    """At 80 columns the report's table folded 'line ar' and cut the last columns; now its
    method columns come in as many tables as fit, every number whole."""
    from runrecords import write_realistic_set

    write_realistic_set(tmp_path / "runs")
    done = run("report", "--runs", tmp_path / "runs", "--format", "", "--no-cka",
               "--resamples", 0)
    assert done.exit_code == 0, done.output
    words = {"clip-vit-b16", "tiny-vit", "linear", "concat:all", "alf:all", "layers",
             "FER2013", "SVHN", "digits"}
    assert_whole(done.stdout, words, 80)
    assert "part 2 of 2" in done.stdout
    narrow(200)
    wide = run("report", "--runs", tmp_path / "runs", "--format", "", "--no-cka",
               "--resamples", 0)
    assert_whole(wide.stdout, words, 200)
    assert "part" not in wide.stdout


# -- the exported model's batch ---------------------------------------------------------------

@pytest.mark.slow
def test_exported_model_takes_batches_beyond_4096(trained, tmp_path):
    """The README said 'any batch size'; the file took 1 to 4,096."""
    from featcache.serving.deployment import export_model

    path = export_model(trained["linear"], tmp_path / "m.pt2")
    assert json.loads(path.with_suffix(".json").read_text())["input"]["batch"] == [1, None]
    module = torch.export.load(str(path)).module()
    x = torch.randn(4097, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        many, one = module(x), module(x[-1:])
    assert many.shape == (4097, 10)
    torch.testing.assert_close(many[-1:], one, atol=1e-5, rtol=1e-5)
