"""Beyond the class token: the backbones people probe in 2026, on tiny random models that
timm and open_clip build themselves (2 blocks, width 48).

Per family: the tokens featcache taps equal an independent computation (each block's
pre-MLP norm run by hand, timm's `forward_intermediates`, the model's own
pooling `forward_head` / the open_clip tower's forward); the cache holds exactly the
token kinds the model has; extract → probe (linear, alf, layers) → report runs on digits.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from probecache import SynthSpec, make_pair

from featcache.backbones import create_backbone
from featcache.errors import FeatcacheError
from featcache.extracting.run import extract
from featcache.probing.run import probe
from featcache.records.store import read_run
from featcache.reporting.build import report

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)
OPEN_CLIP_TIMM = dict(  # an open_clip tower around a timm trunk, projected (as PE-Core)
    embed_dim=16, vision_cfg=dict(timm_model_name="vit_tiny_patch16_224", timm_pool="map",
                                  timm_proj=None, image_size=32),
    text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1))

# family: (model name, overrides, token kinds, the model's own embedding)
FAMILIES = {
    "siglip (no CLS, MAP pool)": ("timm:vit_base_patch16_siglip_224", TINY, ["ap", "pool"],
                                  "pool"),
    "aimv2 (no CLS, average)": ("timm:aimv2_large_patch14_224", TINY, ["ap"], "ap"),
    "dinov3 (CLS + registers, RoPE)": ("timm:vit_small_patch16_dinov3", TINY, ["cls", "ap"],
                                       "ap"),
    "pe-core (CLS, attention pool)": ("timm:vit_pe_core_base_patch16_224", TINY,
                                      ["cls", "ap", "pool"], "pool"),
    "eva02 (CLS, average, fc_norm)": ("timm:eva02_base_patch14_224", TINY, ["cls", "ap"], "ap"),
    "beit (CLS, relative position, average)": ("timm:beit_base_patch16_224", TINY,
                                               ["cls", "ap"], "ap"),
    "deit3 (CLS, layer scale)": ("timm:deit3_small_patch16_224", TINY, ["cls", "ap"], "cls"),
    "open_clip timm tower (projected pool)": ("open_clip:ViT-B-16-SigLIP2", OPEN_CLIP_TIMM,
                                              ["cls", "ap", "pool"], "pool"),
}


@pytest.fixture(scope="module")
def backbones():
    built = {}

    def get(family: str, tap: str = "reference"):
        if (family, tap) not in built:
            name, kwargs, _, _ = FAMILIES[family]
            built[(family, tap)] = create_backbone(name, "random:1", tap, dict(kwargs))
        return built[(family, tap)]

    return get


def _images(backbone, n: int = 3) -> torch.Tensor:
    return torch.randn(n, *backbone.input_size, generator=torch.Generator().manual_seed(0))


def by_hand(trunk, x: torch.Tensor) -> list[torch.Tensor]:
    """Each block's pre-MLP norm output, computed here: the block's input (and the keyword
    arguments the model passes it: RoPE, relative position bias, masks) is caught on its
    way in, then norm2(h + layer scale · attn(norm1(h))) is run by hand (not a hook on
    the module featcache hooks)."""
    import inspect

    calls: list[tuple[torch.nn.Module, torch.Tensor, dict]] = []

    def catch(block, args, kwargs):
        names = list(inspect.signature(block.forward).parameters)[1:]
        calls.append((block, args[0], {**dict(zip(names, args[1:], strict=False)), **kwargs}))

    handles = [b.register_forward_pre_hook(catch, with_kwargs=True) for b in trunk.blocks]
    try:
        trunk.forward_features(x)
    finally:
        for h in handles:
            h.remove()
    outs = []
    for block, h, kwargs in calls:
        a = block.attn(block.norm1(h), **kwargs)
        if getattr(block, "ls1", None) is not None:
            a = block.ls1(a)
        elif getattr(block, "gamma_1", None) is not None:
            a = block.gamma_1 * a
        outs.append(block.norm2(h + a))
    assert len(outs) == len(trunk.blocks)
    return outs


def independent(backbone, x: torch.Tensor, tap: str) -> dict[str, torch.Tensor]:
    """CLS, AP per layer and the pooled embedding, without featcache's hooks."""
    tower = backbone.model
    trunk = getattr(tower, "trunk", tower)  # an open_clip TimmModel wraps a timm trunk
    prefix, has_cls = backbone.n_prefix, backbone.has_cls
    outs: list[torch.Tensor] = []
    with torch.no_grad():
        if tap == "reference":
            outs = by_hand(trunk, x)
            feats = trunk.forward_features(x)
        else:
            feats = trunk.forward_features(x)
            _, inter = trunk.forward_intermediates(x, output_fmt="NLC", norm=False,
                                                   return_prefix_tokens=True)
            # timm returns (patches, prefix) pairs only when the model has prefix tokens
            outs = [torch.cat([o[1], o[0]], 1) if isinstance(o, tuple) else o for o in inter]
        post = trunk.fc_norm if isinstance(getattr(trunk, "norm", None), torch.nn.Identity) \
            else torch.nn.Identity()
        layers = [*outs, feats]
        ap = [o[:, prefix:].mean(1) for o in outs] + [post(feats[:, prefix:].mean(1))]
        out = {"ap": torch.stack(ap, 1)}
        if has_cls:
            out["cls"] = torch.stack([o[:, 0] for o in outs] + [post(feats[:, 0])], 1)
        own = tower(x) if tower is not trunk else trunk.forward_head(feats, pre_logits=True)
        out["own"] = own  # the model's own image embedding
        assert len(layers) == backbone.n_blocks + 1
    return out


@pytest.mark.parametrize("tap", ["reference", "residual"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_tokens_equal_an_independent_computation(backbones, family, tap):
    _, _, kinds, embedding = FAMILIES[family]
    backbone = backbones(family, tap)
    assert backbone.token_kinds == kinds and backbone.geometry.embedding == embedding
    x = _images(backbone)
    got = backbone.tokens(x)
    want = independent(backbone, x, tap)
    assert set(got) == set(kinds)
    for kind in ("ap", "cls"):
        if kind in kinds:
            torch.testing.assert_close(got[kind], want[kind], rtol=1e-5, atol=1e-5)
    # the model's own embedding: a token of its own, or the final CLS / AP it equals
    if embedding == "pool":
        torch.testing.assert_close(got["pool"][:, 0], want["own"], rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got[embedding][:, -1], want["own"], rtol=1e-5, atol=1e-5)


def test_hierarchical_backbones_are_refused_with_the_reason():
    with pytest.raises(FeatcacheError, match="Hierarchical backbones .* not supported"):
        create_backbone("timm:swin_tiny_patch4_window7_224", "random", "reference",
                        dict(depths=(1, 1, 1, 1), embed_dim=24, num_heads=(1, 1, 1, 1)))
    with pytest.raises(FeatcacheError, match="NaFlexVit .* fixed-grid `patch_embed`"):
        create_backbone("timm:naflexvit_base_patch16_gap", "random", "reference",
                        dict(depth=1, embed_dim=48, num_heads=3))


# ------------------------------------------------------------------ the cache and probes


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_extract_probe_report_on_digits(family, tmp_path):
    name, kwargs, kinds, embedding = FAMILIES[family]
    root = tmp_path / "cache"
    train, _ = extract(model=name, model_arg=dict(kwargs), weights="random:1",
                       dataset="digits", cache=root, batch_size=64, shard_size=512)
    from featcache.cache.store import open_cache

    cache = open_cache(train.path)
    assert cache.token_kinds == kinds and ("cls" in cache.group) == ("cls" in kinds)
    assert ("pool" in cache.group) == ("pool" in kinds)
    quick = dict(cache=root, grid="quick", epochs=1, min_steps=5, threads=1)
    (lin,) = probe(method="linear", **quick)
    (alf,) = probe(method="alf", **quick)
    (layers,) = probe(method="layers", **quick)
    assert read_run(lin.path)["tokens"] == [f"final.{embedding}"]
    alf_tokens = read_run(alf.path)["tokens"]
    layer_kinds = [k for k in ("cls", "ap") if k in kinds]
    expected = [f"{layer}.{k}" for layer in cache.layer_names[1:] for k in layer_kinds]
    assert alf_tokens == expected + (["final.pool"] if "pool" in kinds else [])
    per_layer = read_run(layers.path)["per_layer"]
    assert [e["layer"] for e in per_layer] == cache.layer_names
    # the model's own token at every layer; a pool (final only) falls back to CLS, else AP
    inner = embedding if embedding != "pool" else "cls" if "cls" in kinds else "ap"
    assert [e["token"] for e in per_layer[:-1]] == [inner] * (len(per_layer) - 1)
    assert per_layer[-1]["token"] == embedding
    data = report(cache=root, out=tmp_path / "report", format="html,csv")
    assert (tmp_path / "report" / "report.html").is_file()
    (row,) = data.rows
    columns = {cell.split(" [")[0] for cell in row["cells"]}  # "[epochs=1, ...]" variants
    assert {"linear", "alf:all", "layers"} <= columns
    attention = read_run(alf.path)["attention"]["tokens"]
    assert not any(t.endswith(".cls") for t in attention) or "cls" in kinds  # absent: absent


@pytest.mark.slow
def test_planted_signal_in_an_intermediate_ap_without_cls(tmp_path):
    """A no-CLS layout (AP per layer and a pool): ALF finds the one intermediate AP that
    carries the class, while the model's own embedding (the pool) carries none."""
    spec = SynthSpec(n_blocks=4, dim=32, n_classes=4, n_train=400, n_test=200, seed=2,
                     signal={("block2", "ap"): 1.5}, token_kinds=("ap", "pool"))
    make_pair(tmp_path / "cache", spec)
    quick = dict(cache=tmp_path / "cache", grid="quick", threads=1)
    (alf,) = probe(method="alf", **quick)
    (lin,) = probe(method="linear", **quick)
    rec = read_run(alf.path)
    assert rec["tokens"][-1] == "final.pool" and not any(".cls" in t for t in rec["tokens"])
    assert alf.metrics["balanced_top1"] >= 95.0
    assert lin.metrics["balanced_top1"] < 45.0 and read_run(lin.path)["tokens"] == [
        "final.pool"]
    weights = rec["attention"]["mean"]
    assert rec["attention"]["tokens"][int(np.argmax(weights))] == "block2.ap"


# ------------------------------------------------------------------ the registry


def test_extension_entries_are_real_tags_with_the_token_kinds_they_say():
    """Every extension entry: its tag is in timm's or open_clip's own table (offline), and
    a tiny random model of its architecture has the token kinds the catalogue claims."""
    import open_clip
    import timm

    from featcache.backbones import models, resolve_model

    timm_tags = set(timm.list_pretrained())
    clip_tags = set(open_clip.list_pretrained())
    rows = [r for r in models() if r["extension"]]
    assert {r["name"] for r in rows} >= {
        "dinov3-vit-s16", "dinov3-vit-b16", "dinov3-vit-l16", "siglip2-vit-b16",
        "siglip2-so400m14", "aimv2-vit-l14", "pe-core-b16", "pe-core-l14", "eva02-vit-b14"}
    for row in rows:
        spec = resolve_model(row["name"])
        if spec.backend == "timm":
            assert spec.arch in timm_tags, spec.arch
            arch = spec.arch.split(".")[0]
        else:
            assert (spec.arch, spec.pretrained) in clip_tags, spec.arch
            arch = open_clip.get_model_config(spec.arch)["vision_cfg"]["timm_model_name"]
        built = create_backbone(f"timm:{arch}", "random", "reference", dict(TINY))
        kinds = list(spec.token_kinds)
        if spec.backend == "open_clip":  # the open_clip tower adds its own pool
            kinds = [k for k in kinds if k != "pool"]
            assert "pool" in spec.token_kinds
        else:
            assert built.token_kinds == kinds, row["name"]
        assert [k for k in built.token_kinds if k != "pool"] == [k for k in kinds
                                                                 if k != "pool"], row["name"]


def test_models_json_lists_token_kinds():
    from cliutil import run

    result = run("models", "--json")
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["clip-vit-b16"]["token_kinds"] == ["cls", "ap"] and rows["clip-vit-b16"]["paper"]
    assert rows["siglip2-vit-b16"]["token_kinds"] == ["ap", "pool"]
    assert rows["siglip2-vit-b16"]["extension"] and not rows["siglip2-vit-b16"]["paper"]
