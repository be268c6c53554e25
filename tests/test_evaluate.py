"""`featcache evaluate`: a run's probe on another cache of its backbone. On its own test
cache it gives the record's test metrics exactly; on a class subset, the metrics of the
run's stored logits restricted to the subset, computed here by hand."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from probecache import SynthSpec, make_pair

from featcache.cache.store import Layout, cache_path, create_cache, open_cache

pytestmark = pytest.mark.usefixtures("torch_one_thread")
SPEC = SynthSpec(n_classes=7, n_train=210, n_test=140, dim=16, n_blocks=3,
                 signal={("final", "cls"): 0.8, ("block1", "ap"): 0.8})


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    import featcache

    root = tmp_path_factory.mktemp("shift")
    make_pair(root, SPEC)
    out = {}
    quick = {"grid": "quick", "epochs": 2, "min_steps": 4, "lrs": "0.01", "wds": "0.0001"}
    for method, extra in (("linear", quick), ("knn", {}), ("knn-layers", {}),
                          ("alf", {**quick, "dropouts": "0", "layers": "middle+last"})):
        out[method] = featcache.probe(method=method, cache=root, **extra)[0].path
    return root, out


def subset_cache(root: Path, test_path: Path, dataset: str, picks: list[str],
                 names: list[str] | None = None, **model_changes) -> Path:
    """The test cache's rows of the classes ``picks`` (in that label order, renamed to
    ``names``), as another dataset's cache of the same backbone (or of a changed one)."""
    src = open_cache(test_path)
    old = src.class_names
    names = names or picks
    labels = src.labels()
    rows = np.flatnonzero(np.isin(labels, [old.index(n) for n in picks]))
    y = np.asarray([picks.index(old[c]) for c in labels[rows]], dtype=np.int64)
    fp = copy.deepcopy(src.fingerprint)
    fp["dataset"].update(name=dataset, n=len(rows), class_names=list(names))
    fp["model"].update(model_changes)
    layout = Layout(len(rows), len(src.layer_names), src.dim, 32, None, None, has_cls=True)
    path = cache_path(root, test_path.parent.parent.name, dataset, "test")
    cache = create_cache(path, fp, layout, y, list(names), src.layer_names,
                         [src.dim] * len(src.layer_names), {"probe_token": "cls"})
    arrays = {k: np.asarray(src.group[k])[rows] for k in ("cls", "ap")}
    arrays["labels"], arrays["valid"] = y, np.ones(len(rows), dtype=bool)
    for shard in range(layout.n_shards):
        part = layout.rows(shard)
        cache.write_shard(shard, {k: v[part] for k, v in arrays.items()})
    cache.finalize({})
    return path


@pytest.mark.parametrize("method", ["linear", "knn", "knn-layers", "alf"])
def test_own_test_cache_gives_the_record_exactly(runs, method) -> None:
    import featcache

    _, paths = runs
    record = json.loads((paths[method] / "record.json").read_text())
    out = featcache.evaluate(paths[method], dataset="synth")
    assert out["metrics"] == record["metrics"]  # exactly: same logits, same metric code
    assert out["n"] == record["n_test"] and out["classes"] == SPEC.n_classes
    kept = json.loads(Path(out["file"]).read_text())
    assert kept["metrics"] == record["metrics"] and Path(out["file"]).parent.name == "shift"
    again = json.loads((paths[method] / "record.json").read_text())
    assert again == record  # the record stays as written


def _by_hand(logits: np.ndarray, y: np.ndarray) -> dict[str, float]:
    pred = logits.argmax(1)
    per = [np.mean(pred[y == c] == c) for c in np.unique(y)]
    return {"top1": 100 * float(np.mean(pred == y)), "balanced_top1": 100 * float(np.mean(per))}


@pytest.mark.parametrize("method", ["linear", "knn"])
def test_a_class_subset_scores_the_restricted_stored_logits(runs, method) -> None:
    """Three of the seven classes, in another order: the metrics are the stored test
    logits' of those rows, restricted to those classes' columns."""
    import featcache
    from featcache.records.predictions import load_predictions

    root, paths = runs
    record = json.loads((paths[method] / "record.json").read_text())
    names = ["class5", "class1", "class3"]
    path = subset_cache(root, Path(record["caches"]["test"]), f"synth-sub-{method}", names)
    out = featcache.evaluate(paths[method], dataset=f"synth-sub-{method}")
    stored = load_predictions(paths[method])
    keep = np.isin(stored.label, [1, 3, 5])
    cols = [5, 1, 3]
    y = np.asarray([cols.index(c) for c in stored.label[keep]])
    want = _by_hand(stored.logits[keep][:, cols], y)
    assert out["metrics"]["top1"] == pytest.approx(want["top1"], abs=1e-9)
    assert out["metrics"]["balanced_top1"] == pytest.approx(want["balanced_top1"], abs=1e-9)
    assert out["metrics"]["top5"] is None  # three classes: a top-5 says nothing
    assert out["n"] == int(keep.sum()) and out["training_classes_scored"] == 3
    assert out["test_cache"] == str(path)
    # the restriction matters: the unrestricted argmax differs on some rows
    assert (stored.logits[keep].argmax(1) != np.asarray(cols)[stored.logits[keep][:, cols]
                                                            .argmax(1)]).any()


def test_class_names_that_differ_need_a_map(runs, tmp_path) -> None:
    import featcache
    from featcache.errors import FeatcacheError

    root, paths = runs
    record = json.loads((paths["linear"] / "record.json").read_text())
    path = subset_cache(root, Path(record["caches"]["test"]), "synth-renamed",
                        ["class5", "class1", "class3"], ["CLASS5", "kitten", "class3"])
    with pytest.raises(FeatcacheError, match="test class 'kitten' maps to nothing"):
        featcache.evaluate(paths["linear"], test_cache=path)
    cmap = tmp_path / "map.json"
    cmap.write_text(json.dumps({"kitten": "class1"}))
    out = featcache.evaluate(paths["linear"], test_cache=path, class_map=cmap)
    assert out["classes"] == 3 and out["class_map"] == str(cmap)
    cmap.write_text(json.dumps({"kitten": "puppy"}))
    with pytest.raises(FeatcacheError, match="sends it to 'puppy'"):
        featcache.evaluate(paths["linear"], test_cache=path, class_map=cmap)
    # a list: the best logit of its training classes
    cmap.write_text(json.dumps({"kitten": ["class1", "class2"]}))
    assert featcache.evaluate(paths["linear"], test_cache=path, class_map=cmap)["n"] > 0


def test_another_backbone_is_one_line(runs) -> None:
    import featcache
    from featcache.errors import FeatcacheError

    root, paths = runs
    record = json.loads((paths["linear"] / "record.json").read_text())
    path = subset_cache(root / "other", Path(record["caches"]["test"]), "synth-other",
                        ["class1", "class2"], weights="random:7")
    with pytest.raises(FeatcacheError, match=r"another backbone than the run \(weights: "):
        featcache.evaluate(paths["linear"], test_cache=path)


def test_cli_json_and_a_missing_cache(runs) -> None:
    from cliutil import assert_user_error, run

    _, paths = runs
    record = json.loads((paths["knn"] / "record.json").read_text())
    res = run("evaluate", paths["knn"], "--dataset", "synth", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["metrics"] == record["metrics"] and out["n"] == record["n_test"]
    assert_user_error(run("evaluate", paths["knn"], "--dataset", "imagenet-r"),
                      "featcache extract --model synth-vit --dataset imagenet-r --split test")


def test_the_catalogue_knows_the_robustness_sets() -> None:
    from featcache.catalogue import shift_datasets
    from featcache.registry import DATASETS

    sets = shift_datasets()
    assert set(sets) == {"imagenetv2", "imagenet_sketch", "imagenet-r", "imagenet-a",
                         "objectnet"}
    for name in ("imagenet-r", "imagenet-a"):
        keeps = sets[name].keeps
        assert len(keeps) == 200 == len(set(keeps)) and all(0 <= i < 1000 for i in keeps)
        assert keeps == sorted(keeps) and name in DATASETS
    assert sets["imagenet-r"].keeps != sets["imagenet-a"].keeps
    assert sets["imagenet-r"].keeps[:6] == [1, 2, 4, 6, 8, 9]  # the published list


def test_the_report_shows_results_under_shift(runs, tmp_path) -> None:
    import featcache

    root, paths = runs
    featcache.evaluate(paths["knn"], dataset="synth")
    data = featcache.report(cache=root, out=tmp_path / "rep", format="md", resamples=0,
                            cka=False)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Under shift" in md
    table = data.as_json()["under_shift"]
    assert "synth (test)" in table["columns"]
    row = next(r for r in table["rows"] if r["path"] == str(paths["knn"]))
    assert row["cells"]["synth (test)"]["balanced_top1"] == row["own_test"]
    assert any(line.startswith("| synth-vit | synth | knn | 0 |") for line in md.splitlines())
