"""k-NN (DINOv2's protocol) against a brute-force numpy k-NN, ties included; the methods
`knn` and `knn-layers` end to end on synthetic caches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from probecache import SynthSpec, expected_tokens, make_pair

from featcache.probing.knn import KS, TEMPERATURE, nearest, vote
from featcache.probing.tokens.features import FeatureSource

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def brute_neighbours(q: np.ndarray, bank: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """All similarities in float64; order by (similarity desc, bank row asc): the rule."""
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    bn = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    sims = qn.astype(np.float64) @ bn.astype(np.float64).T
    rows = np.broadcast_to(np.arange(len(bank)), sims.shape)
    order = np.lexsort((rows, -sims), axis=1)[:, :k]
    return np.take_along_axis(sims, order, 1), order


def brute_votes(sims: np.ndarray, idx: np.ndarray, labels: np.ndarray, n_classes: int,
                k: int) -> np.ndarray:
    w = np.exp((sims[:, :k] - sims[:, :1]) / TEMPERATURE)
    votes = np.zeros((len(sims), n_classes))
    for j in range(k):
        np.add.at(votes, (np.arange(len(sims)), labels[idx[:, j]]), w[:, j])
    return votes / w.sum(1, keepdims=True)


def _source(x: np.ndarray) -> FeatureSource:
    return FeatureSource(torch.from_numpy(x.astype(np.float16))[:, None])


@pytest.mark.parametrize("block_elements", [50, 700, 1 << 22])
def test_neighbours_equal_brute_force_with_many_ties(block_elements: int) -> None:
    """±1 vectors of 16 dimensions: their cosines are multiples of 1/16, exact in float32,
    so most neighbours tie; every block size gives the brute force's neighbours, in its
    order, with its similarities."""
    rng = np.random.default_rng(0)
    bank = rng.choice([-1.0, 1.0], size=(260, 16))
    bank[100:130] = bank[:30]  # duplicated rows: equal similarities, rows 0-29 first
    q = rng.choice([-1.0, 1.0], size=(45, 16))
    sims, idx = nearest(_source(q), _source(bank), 20, block_elements=block_elements)
    want_s, want_i = brute_neighbours(q, bank, 20)
    np.testing.assert_array_equal(idx[0].numpy(), want_i)
    np.testing.assert_array_equal(sims[0].numpy(), want_s.astype(np.float32))
    assert (np.diff(want_s, axis=1) == 0).mean() > 0.3  # the case is the hard one


def test_neighbours_per_token_on_continuous_features() -> None:
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(500, 3, 24)).astype(np.float16)  # as a cache stores them
    q = rng.normal(size=(70, 3, 24)).astype(np.float16)
    sims, idx = nearest(FeatureSource(torch.from_numpy(q)), FeatureSource(
        torch.from_numpy(bank)), 10, block_elements=999)
    for t in range(3):
        want_s, want_i = brute_neighbours(q[:, t].astype(np.float64),
                                          bank[:, t].astype(np.float64), 10)
        np.testing.assert_array_equal(idx[t].numpy(), want_i)
        np.testing.assert_allclose(sims[t].numpy(), want_s, atol=1e-6)


def test_votes_equal_brute_force_and_ties_go_to_the_lower_class() -> None:
    rng = np.random.default_rng(2)
    bank = rng.choice([-1.0, 1.0], size=(300, 16))
    labels = rng.integers(0, 5, size=300)
    q = rng.choice([-1.0, 1.0], size=(200, 16))
    sims, idx = nearest(_source(q), _source(bank), 20)
    want_s, want_i = brute_neighbours(q, bank, 20)
    tied = 0
    for k in (1, 10, 20):
        got = vote(sims[0], idx[0], torch.as_tensor(labels), 5, k).numpy()
        want = brute_votes(want_s, want_i, labels, 5, k)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        top = np.sort(want, 1)
        exact = top[:, -1] == top[:, -2]  # equal neighbour similarities: equal votes
        clear = top[:, -1] - top[:, -2] > 1e-5
        assert (got.argmax(1)[clear | exact] == want.argmax(1)[clear | exact]).all()
        tied += int(exact.sum())
    assert tied > 0  # vote ties happened and went to the lower class


def test_k_larger_than_the_bank_takes_the_whole_bank() -> None:
    bank = np.eye(4)
    sims, idx = nearest(_source(np.ones((2, 4))), _source(bank), 200)
    assert idx.shape == (1, 2, 4) and sorted(idx[0, 0].tolist()) == [0, 1, 2, 3]


# -- the methods --------------------------------------------------------------------------

def _record(result) -> dict:
    return json.loads((result.path / "record.json").read_text())


def test_knn_run_equals_a_brute_force_protocol(tmp_path) -> None:
    """k chosen on the validation split, the test voted by the whole training split: the
    record's k, metrics and stored predictions equal an independent numpy run of it."""
    import featcache
    from featcache.probing.selection import stratified_split
    from featcache.records.predictions import load_predictions

    spec = SynthSpec(n_classes=6, n_train=300, n_test=90, dim=16,
                     signal={("final", "cls"): 0.9})
    train, test = make_pair(tmp_path, spec)
    result = featcache.probe(method="knn", cache=tmp_path)[0]
    rec = _record(result)
    x_tr = expected_tokens(train, ["final.cls"])[:, 0]
    x_te = expected_tokens(test, ["final.cls"])[:, 0]
    y_tr, y_te = train.labels(), test.labels()
    tr, va = stratified_split(y_tr, 0.2, 0)
    s, i = brute_neighbours(x_tr[va], x_tr[tr], max(KS))
    scores = []
    for k in KS:
        pred = brute_votes(s, i, y_tr[tr], 6, k).argmax(1)
        scores.append(np.mean([np.mean(pred[y_tr[va] == c] == c)
                               for c in np.unique(y_tr[va])]))
    k = KS[int(np.argmax(scores))]
    assert rec["selected"] == {"k": k}
    s, i = brute_neighbours(x_te, x_tr, k)
    pred = brute_votes(s, i, y_tr, 6, k).argmax(1)
    stored = load_predictions(result.path)
    np.testing.assert_array_equal(stored.pred, pred)
    balanced = 100 * np.mean([np.mean(pred[y_te == c] == c) for c in np.unique(y_te)])
    assert rec["metrics"]["balanced_top1"] == pytest.approx(balanced, abs=1e-9)
    assert 30 < balanced < 100  # neither chance nor trivial: the vote decided it
    assert [row["k"] for row in rec["grid"]] == list(KS)


def test_knn_layers_finds_the_planted_layer(tmp_path) -> None:
    import featcache

    make_pair(tmp_path, SynthSpec(n_blocks=6, n_classes=5, n_train=300, n_test=100,
                                  signal={("block3", "ap"): 1.2}))
    result = featcache.probe(method="knn-layers", cache=tmp_path)[0]
    rec = _record(result)
    assert rec["selected"]["layer"] == "block3" and rec["selected"]["token"] == "ap"
    assert rec["selected"]["k"] in KS
    curve = {(e["layer"], e["token"]): e["balanced_top1"] for e in rec["per_layer"]}
    assert len(curve) == 14  # 7 layers × (CLS, AP)
    best = max(curve, key=curve.get)
    assert best == ("block3", "ap")
    others = [v for key, v in curve.items() if key != best]
    assert curve[best] > 60 > max(others)


def test_knn_identity_ignores_training_options(tmp_path) -> None:
    """A grid or epochs option does not change a k-NN: the same run, found finished."""
    import featcache

    make_pair(tmp_path, SynthSpec(n_train=80, n_test=30))
    first = featcache.probe(method="knn", cache=tmp_path)[0]
    again = featcache.probe(method="knn", cache=tmp_path, grid="quick", epochs=3)[0]
    assert again.status == "skipped" and again.path == first.path
    rows = featcache.runs(cache=tmp_path)
    assert [r["method"] for r in rows] == ["knn"] and rows[0]["variant"] in ("", None)


@pytest.mark.slow
def test_predict_and_export_treat_a_knn_run_like_any(tmp_path) -> None:
    """`predict` on the run's own test split: the record's vote shares bit for bit (the
    training tokens read back from its train cache); `export-model` is one line."""
    from cliutil import assert_user_error, run
    from conftest import TIMM_TINY, TIMM_TINY_KW

    import featcache
    from featcache.records.predictions import load_predictions

    featcache.extract(model=TIMM_TINY, model_arg=dict(TIMM_TINY_KW), weights="random:3",
                      dataset="digits", cache=tmp_path, batch_size=64, workers=0)
    for method in ("knn", "knn-layers"):
        path = featcache.probe(method=method, cache=tmp_path)[0].path
        result = featcache.predict(path, dataset="digits", split="test", workers=0,
                                   device="cpu")
        stored = load_predictions(path)
        np.testing.assert_array_equal(result.index, stored.index)
        assert torch.equal(result.logits, torch.from_numpy(stored.logits))
        assert result.reproduces_record is True and result.agreement == 1.0
    assert_user_error(run("export-model", path), "a k-NN run has no head to export")


def test_knn_reads_one_token_and_says_so_for_layer_sets(tmp_path) -> None:
    import featcache
    from featcache.errors import FeatcacheError

    make_pair(tmp_path, SynthSpec(n_train=60, n_test=20))
    with pytest.raises(FeatcacheError, match="--layers does not apply"):
        featcache.probe(method="knn", cache=tmp_path, layers="middle+last")


def test_knn_beyond_host_memory_names_a_way_out_that_works(tmp_path) -> None:
    """k-NN cannot stream and loads every sample before --shots picks: the line must not
    send the user to either (it did: "fewer samples (--shots), or let featcache stream
    them")."""
    from cliutil import assert_user_error, run

    make_pair(tmp_path, SynthSpec(n_blocks=2, n_classes=3, n_train=60, n_test=20))
    line = assert_user_error(run("probe", "--method", "knn-layers", "--cache", tmp_path,
                                 "--max-host-memory-gb", "1e-7"),
                             "k-NN holds every sample's tokens in memory", "--layers",
                             "--max-host-memory-gb")
    assert "stream" not in line and "--shots" not in line
