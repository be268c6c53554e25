"""Tokens narrower than the cache's width (CLIP's projected final layer) are read by linear
heads at their true width: padding never reaches a head, its weights stay zero, and the
init bound is the true fan-in's (issue 17 §2)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import CLIP_TINY, CLIP_TINY_KW, model_args

from featcache.probing.heads import LinearHeads
from featcache.probing.tokens.features import FeatureSource
from featcache.probing.train import TrainConfig, fit_grid

T, D, C, N = 3, 8, 3, 60
WIDTHS = (8, 8, 5)  # the last token is 5 wide, padded to 8


def _features(pad_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, T, D, generator=g)
    x[:, 2, 5:] = pad_value
    y = torch.arange(N) % C
    return x, y


def _fit(pad_value: float, flat: bool, jitter: bool = True):
    x, y = _features(pad_value)
    src = FeatureSource(x, normalise=None, widths=WIDTHS)
    cfg = TrainConfig(epochs=3, batch_size=16, min_total_steps=0, lrs=(0.1,), wds=(0.0, 0.1),
                      jitter_p=1.0 if jitter else 0.0)
    points = [{"lr": 0.1, "wd": w} for w in cfg.wds]
    inputs = None if flat else [t for t in range(T) for _ in points]
    return fit_grid(src, y, C, "linear", points * (1 if flat else T), cfg, inputs=inputs)


@pytest.mark.parametrize("flat", [True, False], ids=["concat", "per-layer"])
def test_padding_never_reaches_the_head(flat: bool) -> None:
    """Whatever the padding holds (zeros, or garbage) and with jitter on every sample, the
    trained heads are bit for bit the same, and their padding weights are exactly 0."""
    a, b = _fit(0.0, flat), _fit(7.5, flat)
    for key in ("weight", "bias"):
        assert torch.equal(getattr(a.heads, key), getattr(b.heads, key))
    w = a.heads.weight
    if flat:
        assert torch.all(w.view(w.shape[0], C, T, D)[:, :, 2, 5:] == 0)
        assert torch.any(w.view(w.shape[0], C, T, D)[:, :, 2, :5] != 0)
    else:  # configs reading token 2 keep zeros beyond its 5 channels; the others do not
        per_token = w.view(T, -1, C, D)
        assert torch.all(per_token[2, :, :, 5:] == 0)
        assert torch.all(per_token[:2, :, :, 5:] != 0)


def test_masked_head_equals_a_head_on_the_true_width_features() -> None:
    """An independent computation: a plain linear head trained on the tokens cut to their
    true widths and concatenated (as the authors' feature combiner) ends where the masked
    head ends, from the same init, to float rounding."""
    x, y = _features(0.0)
    narrow = torch.cat([x[:, t, :w] for t, w in enumerate(WIDTHS)], dim=1)
    cfg = TrainConfig(epochs=5, batch_size=16, min_total_steps=0, lrs=(0.1,), wds=(0.01,),
                      jitter_p=0.0)
    points = [{"lr": 0.1, "wd": 0.01}]
    masked = fit_grid(FeatureSource(x, normalise=None, widths=WIDTHS), y, C, "linear", points,
                      cfg)
    plain = fit_grid(FeatureSource(narrow, normalise=None), y, C, "linear", points, cfg)
    keep = torch.cat([torch.arange(t * D, t * D + w) for t, w in enumerate(WIDTHS)])
    w_masked = masked.heads.weight[0][:, keep]
    # the two inits: the same bound 1/sqrt(21), other draws; so compare the updates
    init = LinearHeads(1, T * D, C, widths=WIDTHS, generator=torch.Generator().manual_seed(0))
    init_plain = LinearHeads(1, sum(WIDTHS), C, generator=torch.Generator().manual_seed(0))
    bound = 1 / math.sqrt(sum(WIDTHS))
    assert init.weight.abs().max() <= bound and init.weight[0][:, keep].abs().max() > bound / 2
    assert init.bias.abs().max() <= bound
    # same init for both: retrain the plain head from the masked head's init
    plain_init = init.weight[0][:, keep].clone()
    torch.manual_seed(0)

    class FromInit(LinearHeads):
        def reset_parameters(self, generator=None):
            with torch.no_grad():
                self.weight.copy_(plain_init.expand_as(self.weight))
                self.bias.copy_(init.bias.expand_as(self.bias))

    from featcache.probing import heads as heads_mod

    old = heads_mod.HEADS["linear"]
    heads_mod.HEADS["linear"] = FromInit
    try:
        plain = fit_grid(FeatureSource(narrow, normalise=None), y, C, "linear", points, cfg)
    finally:
        heads_mod.HEADS["linear"] = old
    assert init_plain.weight.shape[-1] == sum(WIDTHS)
    torch.testing.assert_close(w_masked, plain.heads.weight[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(masked.heads.bias[0], plain.heads.bias[0], rtol=1e-5,
                               atol=1e-6)


def test_clip_linear_run_reads_the_projection_at_its_width(wds_path, tmp_path) -> None:
    """End to end on a tiny open_clip CLIP (projection 16 wide in a 32-wide cache): the run
    says so in its identity, and its head has no weight on the padding."""
    from cliutil import run
    from safetensors.torch import load_file

    for split in ("train", "test"):
        r = run("extract", "--model", CLIP_TINY, "--weights", "random",
                *model_args(CLIP_TINY_KW), "--dataset", f"wds:{wds_path}", "--split", split,
                "--cache", tmp_path, "--workers", 0)
        assert r.exit_code == 0, r.output
    r = run("probe", "--method", "linear", "--cache", tmp_path, "--grid", "quick",
            "--epochs", 2, "--min-steps", 4, "--json")
    assert r.exit_code == 0, r.output
    (res,) = json.loads(r.stdout)
    run_dir = Path(res["path"])
    record = json.loads((run_dir / "record.json").read_text())
    assert record["settings"]["token_widths"] == [16]
    w = load_file(str(run_dir / "head.safetensors"))["weight"]
    assert w.shape[-1] == 32 and torch.all(w[:, 16:] == 0) and torch.any(w[:, :16] != 0)
