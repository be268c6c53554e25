"""Using a trained probe: predict on images, export a deployable model.

Acceptance: on the run's own test split, predicting from the images (backbone rebuilt
from the fingerprint, taps, float16 rounding, normalisation, head) gives the record's
test logits bit for bit, hence its metrics exactly, for every method. The exported
`torch.export` file loads with torch alone and agrees with `predict` within float
tolerance. The backbone's identity is checked: other weights are one clear line.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cliutil import assert_user_error, run
from conftest import TIMM_TINY, TIMM_TINY_KW, one_thread

from featcache.errors import FeatcacheError
from featcache.extracting.run import extract
from featcache.probing.run import probe
from featcache.records.predictions import load_predictions
from featcache.records.store import read_run
from featcache.serving.inference import load_trained, predict, rebuild_backbone

pytestmark = pytest.mark.usefixtures("torch_one_thread")

METHODS = ("linear", "concat", "alf", "layers", "attentive")
QUICK = dict(grid="quick", epochs=1, min_steps=5, threads=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A tiny random ViT over digits (every token kept), every method probed once."""
    root = tmp_path_factory.mktemp("predict")
    with one_thread():
        extract(model=TIMM_TINY, model_arg=dict(TIMM_TINY_KW), weights="random:3",
                dataset="digits", cache=root, batch_size=64, workers=0, all_tokens=True)
        runs = {m: probe(method=m, cache=root, **QUICK)[0].path for m in METHODS}
        # stacked products in the grid: the refit (one config per layer) must still be
        # the products predict runs
        runs["layers-g2"] = probe(method="layers", cache=root, group_size=2, **QUICK)[0].path
    return {"root": root, **runs}


@pytest.mark.slow
@pytest.mark.parametrize("method", [*METHODS, "layers-g2"])
def test_predict_on_the_test_split_reproduces_the_record(trained, method):
    result = predict(trained[method], dataset="digits", split="test", batch_size=64,
                     workers=0, device="cpu")
    record = read_run(trained[method])
    stored = load_predictions(trained[method])
    np.testing.assert_array_equal(result.index, stored.index)
    assert torch.equal(result.logits, torch.from_numpy(stored.logits))  # bit for bit
    assert result.metrics == {k: record["metrics"][k] for k in result.metrics}
    assert result.reproduces_record is True and result.agreement == 1.0
    row = result.rows[0]
    assert set(row) == {"item", "label", "pred", "prob", "top_k"}
    names = record["per_class"]["class_names"]
    assert row["item"] == 0 and row["pred"] == names[int(stored.pred[0])]
    assert row["label"] == names[int(stored.label[0])]
    assert row["top_k"][0] == [row["pred"], row["prob"]] and len(row["top_k"]) == 5
    probs = result.logits[0].softmax(0)
    assert row["prob"] == pytest.approx(float(probs.max()))


def test_predict_on_files_folders_and_globs_names_the_unreadable(trained, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
            folder / "sub" / f"p{i}.png")
    Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(tmp_path / "g.jpg")
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("not an image either, and not an image file")
    result = run("predict", trained["alf"], folder, tmp_path / "*.jpg", "--top-k", 3,
                 "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [Path(r["item"]).name for r in rows] == ["p0.png", "p1.png", "p2.png", "g.jpg"]
    assert all(len(r["top_k"]) == 3 and r["label"] is None for r in rows)
    assert "broken.jpg" in result.stderr and "not predicted" in result.stderr
    # the same rows as CSV: item, label, pred, prob, top2, prob2, top3, prob3
    as_csv = run("predict", trained["alf"], folder, tmp_path / "*.jpg", "--top-k", 3,
                 "--csv", "-")
    table = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert list(table[0]) == ["item", "label", "pred", "prob", "top2", "prob2", "top3",
                              "prob3"]
    for row, js in zip(table, rows, strict=True):
        assert row["pred"] == js["pred"] and float(row["prob"]) == js["prob"]
        assert [row["top2"], float(row["prob3"])] == [js["top_k"][1][0], js["top_k"][2][1]]
    assert_user_error(run("predict", trained["alf"], tmp_path / "nothing.png"),
                      "no such file or folder")
    assert_user_error(run("predict", trained["alf"], folder / "broken.jpg"),
                      "none of the 1 images could be read", "broken.jpg")
    assert_user_error(run("predict", trained["alf"]), "nothing to predict")
    assert_user_error(run("predict", tmp_path, "--dataset", "digits"), "not a run folder")


def test_predict_refuses_a_backbone_it_cannot_get_again(tmp_path, monkeypatch):
    """A run on a local checkpoint needs that file: none, or another, is one line."""
    from featcache.backbones import create_backbone

    ckpt, other = tmp_path / "w.pt", tmp_path / "other.pt"
    torch.save(create_backbone(TIMM_TINY, "random:1", "reference",
                               dict(TIMM_TINY_KW)).model.state_dict(), ckpt)
    torch.save(create_backbone(TIMM_TINY, "random:2", "reference",
                               dict(TIMM_TINY_KW)).model.state_dict(), other)
    root = tmp_path / "cache"
    extract(model=TIMM_TINY, model_arg=dict(TIMM_TINY_KW), weights=str(ckpt),
            dataset="digits", cache=root, batch_size=128, workers=0)
    (result,) = probe(method="linear", cache=root, **QUICK)
    with pytest.raises(FeatcacheError, match="local checkpoint .* pass --weights PATH"):
        predict(result.path, dataset="digits")
    with pytest.raises(FeatcacheError, match="cannot get the backbone .* weights: file:sha256"):
        predict(result.path, dataset="digits", weights=str(other))
    ok = predict(result.path, dataset="digits", weights=str(ckpt), batch_size=128)
    assert ok.reproduces_record is True
    # a featcache that would build the backbone otherwise (the record is left as it was
    # written: an edited record is refused before this check): named, refused
    import featcache.backbones as backbones

    real = backbones.create_backbone

    def other_build(*args, **kwargs):
        built = real(*args, **kwargs)
        said = built.describe()
        said["preprocess"] = {**said["preprocess"], "interpolation": "nearest"}
        built.describe = lambda: said
        return built

    monkeypatch.setattr(backbones, "create_backbone", other_build)
    with pytest.raises(FeatcacheError, match="builds the backbone differently.*interpolation"):
        predict(result.path, dataset="digits", weights=str(ckpt))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["alf", "concat", "attentive", "layers"])
def test_exported_model_loads_with_torch_alone_and_agrees(trained, method, tmp_path):
    out = tmp_path / "probe.pt2"
    result = run("export-model", trained[method], "--out", out)
    assert result.exit_code == 0, result.output
    meta = json.loads(out.with_suffix(".json").read_text())
    probe_ = load_trained(trained[method])
    assert meta["class_names"] == probe_.class_names
    steps = [s["op"] for s in meta["preprocess_steps"]]
    assert steps == ["convert", "resize", "center_crop", "to_tensor", "normalize"]
    backbone = rebuild_backbone(probe_)
    x = torch.randn(3, *backbone.input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = probe_.logits(probe_.assemble(backbone.tokens(
            x, all_tokens=probe_.all_tokens))).softmax(1)
    torch.save(x, tmp_path / "x.pt")
    # a fresh interpreter where featcache, timm and open_clip cannot be imported
    code = (
        "import sys; sys.modules.update(featcache=None, timm=None, open_clip=None)\n"
        "import torch\n"
        f"m = torch.export.load({str(out)!r}).module()\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        f"torch.save([m(x), m(x[:1]), m(torch.cat([x, x]))], {str(tmp_path / 'y.pt')!r})\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    got, one, twice = torch.load(tmp_path / "y.pt")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # any batch size, the same outputs (within float rounding)
    torch.testing.assert_close(one, want[:1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(twice, torch.cat([want, want]), rtol=1e-4, atol=1e-5)
    assert_user_error(run("export-model", trained[method], "--out", out), "--overwrite")


def test_damaged_run_files_are_one_line_each(trained, tmp_path):
    import shutil

    from featcache.reporting.build import report

    root = tmp_path / "copy"
    shutil.copytree(trained["root"], root)
    run_dir = root / trained["alf"].relative_to(trained["root"])
    (run_dir / "predictions.safetensors").write_bytes(b"{ not safetensors")
    data = report(cache=root, out=tmp_path / "report", format="", cka=False)
    # a run whose files do not belong together lends the report no number
    assert any(n.startswith("skipped:") and "predictions.safetensors" in n and "--force" in n
               for n in data.notes)
    assert "alf" not in {r["method"] for r in data.records}
    head = run_dir / "head.safetensors"
    head.write_bytes(head.read_bytes()[:100])
    assert_user_error(run("predict", run_dir, "--dataset", "digits"), "head.safetensors",
                      "--force")


def test_a_changed_head_predictions_file_or_metric_is_refused(trained, tmp_path):
    """The record holds the sha256 of its head and predictions: a head with flipped bits
    (which still loads, and predicts confidently and wrongly), predictions copied from
    another run, or a metric edited in record.json give one line, never a number."""
    import shutil

    from featcache.reporting.build import report

    root = tmp_path / "copy"
    shutil.copytree(trained["root"], root)
    alf = root / trained["alf"].relative_to(trained["root"])
    linear = root / trained["linear"].relative_to(trained["root"])
    assert set(read_run(alf)["files"]) == {"head.safetensors", "predictions.safetensors"}
    head = alf / "head.safetensors"
    blob = bytearray(head.read_bytes())
    blob[-8:] = bytes(b ^ 0xFF for b in blob[-8:])
    head.write_bytes(bytes(blob))
    with pytest.raises(FeatcacheError, match="not the file its record was written with"):
        load_trained(alf, "cpu")
    assert_user_error(run("predict", alf, "--dataset", "digits"), "head.safetensors",
                      "--force")

    shutil.copy(linear / "predictions.safetensors", alf / "predictions.safetensors")
    with pytest.raises(FeatcacheError, match="not the file its record"):
        load_predictions(alf)
    record = json.loads((linear / "record.json").read_text())
    record["metrics"]["balanced_top1"] = 99.0
    (linear / "record.json").write_text(json.dumps(record))
    with pytest.raises(FeatcacheError, match="its record says 99.0000"):
        load_predictions(linear)
    data = report(cache=root, out=tmp_path / "report", format="", cka=False)
    notes = "\n".join(data.notes)
    assert "not the file its record" in notes and "its record says 99.0000" in notes
    # both runs are left out of the report: their numbers cannot be trusted
    assert {r["method"] for r in data.records} == set(METHODS) - {"alf", "linear"}
    cells = data.rows[0]["cells"]
    assert not [c for k, c in cells.items() if c and k.split()[0] in ("alf", "linear")]
    assert all(c is None or c["mean"] != 99.0 for c in cells.values())


def test_output_files_are_never_clobbered_by_surprise(trained, tmp_path):
    """--csv and export-model's --out: an existing file only with --overwrite; never a
    run's own file, a folder, a device or pipe, or an empty name; refused before any work."""
    import os

    run_dir, image = trained["linear"], tmp_path / "x.csv"
    image.write_text("precious")
    args = ("predict", run_dir, "--dataset", "digits")
    assert_user_error(run(*args, "--csv", image), "exists", "--overwrite")
    assert image.read_text() == "precious"
    done = run(*args, "--csv", image, "--overwrite")
    assert done.exit_code == 0, done.output
    assert image.read_text().startswith("item,label,pred")
    record = (run_dir / "record.json").read_bytes()
    assert_user_error(run(*args, "--csv", run_dir / "record.json", "--overwrite"),
                      "one of a run's own files")
    assert (run_dir / "record.json").read_bytes() == record
    assert_user_error(run(*args, "--csv", ""), "--csv needs a file name")
    assert_user_error(run(*args, "--csv", tmp_path), "is a folder")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert_user_error(run(*args, "--csv", fifo, "--overwrite"), "not a regular file")
    assert fifo.exists() and not fifo.is_file()
    assert_user_error(run("export-model", run_dir, "--out", run_dir / "record.pt2",
                          "--overwrite"), "one of a run's own files")
    assert (run_dir / "record.json").read_bytes() == record


def test_messages_name_the_real_problem(trained, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained["linear"], run_dir)
    assert_user_error(run("predict", run_dir, "/dev/null"), "neither a file nor a folder")
    (run_dir / "record.json").write_text("{}")
    assert_user_error(run("predict", run_dir, "/dev/null"), "names no method", "--force")
