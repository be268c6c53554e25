"""Predict away from the easy case: a test split of several shards, predicted in several
batches of another size than the extraction's, with an unreadable image in the middle.
The record's logits come back bit for bit at the extraction's batch size, within float
rounding at another, and the unreadable image is named, not predicted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TIMM_TINY, TIMM_TINY_KW
from fakedata import make_wds

from featcache.extracting.run import extract
from featcache.probing.run import probe
from featcache.records.predictions import load_predictions
from featcache.serving.inference import predict

pytestmark = pytest.mark.usefixtures("torch_one_thread")

BAD = 9  # the test split's unreadable image: in its second shard, mid-batch


@pytest.fixture(scope="module")
def run_and_data(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("predict-batches")
    data = make_wds(base / "data", {"train": 40, "test": 22}, n_classes=3, shards=3,
                    image_size=32, corrupt={"test": [BAD]})
    try:
        extract(model=TIMM_TINY, model_arg=dict(TIMM_TINY_KW), weights="random:3",
                dataset=f"wds:{data.root}", cache=base / "cache", batch_size=4,
                shard_size=8, workers=0, skip_bad=True)
        (result,) = probe(method="alf", cache=base / "cache", grid="quick", epochs=1,
                          min_steps=5, threads=1)
    finally:
        torch.set_num_threads(threads)
    return result.path, f"wds:{data.root}"


@pytest.mark.parametrize("batch_size,exact", [(4, True), (3, False), (22, False)])
def test_predict_in_several_batches_and_shards(run_and_data, batch_size, exact):
    path, dataset = run_and_data
    stored = load_predictions(path)
    assert BAD not in stored.index.tolist() and len(stored.index) == 21  # the premise
    result = predict(path, dataset=dataset, split="test", batch_size=batch_size, workers=0,
                     device="cpu")
    assert len(result.unreadable) == 1 and "s0000009" in result.unreadable[0]
    np.testing.assert_array_equal(result.index, stored.index)
    want = torch.from_numpy(stored.logits)
    if exact:  # the extraction's batches: bit for bit, so the record's metrics exactly
        assert torch.equal(result.logits, want)
        assert result.reproduces_record is True and result.agreement == 1.0
    else:  # other batches round otherwise: the fp16 cache's rounding, at most
        torch.testing.assert_close(result.logits, want, rtol=2e-3, atol=2e-3)
