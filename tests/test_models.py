"""Backbones: the tapped tokens equal an independent computation of the same tap.

"Independent" means not through featcache's hooks: the libraries' own
`forward_intermediates` for the residual tap, the blocks run by hand for the reference
tap (each block's pre-MLP LayerNorm output), and the models' own forward for the final
layer. Both what `Backbone.tokens` returns and what the cache stores are checked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    CLIP_TINY,
    CLIP_TINY_KW,
    TIMM_REG,
    TIMM_REG_KW,
    TIMM_TINY,
    TIMM_TINY_KW,
)

from featcache.backbones import create_backbone, resolve_model
from featcache.cache.store import model_dir_name, open_cache
from featcache.errors import FeatcacheError
from featcache.extracting.run import ExtractOptions, extract
from featcache.sources import open_dataset

pytestmark = pytest.mark.usefixtures("torch_one_thread")

MODELS = {"timm": (TIMM_TINY, TIMM_TINY_KW), "timm-reg4": (TIMM_REG, TIMM_REG_KW),
          "open_clip": (CLIP_TINY, CLIP_TINY_KW)}
N_PATCHES = (32 // 8) ** 2  # every tiny model: 32 px images, 8 px patches


def independent_tokens(backbone, x: torch.Tensor, tap: str) -> dict[str, torch.Tensor]:
    """cls, ap: (B, layers, width) lists per layer; last: (B, T, D) - without the hooks."""
    cls: list[torch.Tensor] = []
    ap: list[torch.Tensor] = []
    with torch.no_grad():
        if backbone.spec.backend == "timm":
            m = backbone.model
            if tap == "residual":
                _, inter = m.forward_intermediates(x, output_fmt="NLC",
                                                   return_prefix_tokens=True)
                for spatial, prefix in inter:
                    cls.append(prefix[:, 0])
                    ap.append(spatial.mean(1))
            else:
                h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
                for blk in m.blocks:
                    t = blk.norm2(h + blk.ls1(blk.attn(blk.norm1(h))))
                    cls.append(t[:, 0])
                    ap.append(t[:, -N_PATCHES:].mean(1))  # the grid's tokens: no prefix tokens
                    h = blk(h)
            final = m.forward_features(x)
            cls.append(final[:, 0])
            ap.append(final[:, -N_PATCHES:].mean(1))
            last = final
        else:
            v = backbone.model
            if tap == "residual":
                out = v.forward_intermediates(x, output_fmt="NLC", output_extra_tokens=True)
                for spatial, prefix in zip(out["image_intermediates"],
                                           out["image_intermediates_prefix"], strict=True):
                    cls.append(prefix[:, 0])
                    ap.append(spatial.mean(1))
            else:
                h = v._embeds(x)
                for blk in v.transformer.resblocks:
                    y = blk.ln_1(h)
                    attn = blk.attn(y, y, y, need_weights=False)[0]
                    t = blk.ln_2(h + blk.ls_1(attn))
                    cls.append(t[:, 0])
                    ap.append(t[:, -N_PATCHES:].mean(1))
                    h = blk(h)
            v.output_tokens = True  # the model's own forward: pooled CLS and ln_post tokens
            try:
                pooled, tokens = v(x)
            finally:
                v.output_tokens = False
            cls.append(pooled)  # ln_post(x)[:, 0] @ proj
            ap.append(tokens.mean(1) @ v.proj)
            last = torch.cat([pooled[:, None], tokens @ v.proj], 1)
    dim = max(c.shape[-1] for c in cls)
    pad = lambda t: torch.nn.functional.pad(t, (0, dim - t.shape[-1]))  # noqa: E731
    return {"cls": torch.stack([pad(c) for c in cls], 1),
            "ap": torch.stack([pad(a) for a in ap], 1), "last": last}


def assert_fp16_of(stored: np.ndarray, ref: torch.Tensor) -> None:
    """`stored` (float16) is `ref` rounded to float16: within one fp16 ulp (2^-10 relative)."""
    assert stored.dtype == np.float16
    want = ref.numpy().astype(np.float32)
    got = stored.astype(np.float32)
    assert got.shape == want.shape
    err = np.abs(got - want)
    bound = 2.0 ** -10 * np.abs(want) + 1e-5
    assert (err <= bound).all(), f"max excess {float((err - bound).max())}"


@pytest.fixture(scope="module")
def backbones():
    built = {}

    def get(key: str, tap: str):
        if (key, tap) not in built:
            name, kwargs = MODELS[key]
            built[key, tap] = create_backbone(name, "random", tap, kwargs)
        return built[key, tap]

    return get


@pytest.mark.parametrize("tap", ["reference", "residual"])
@pytest.mark.parametrize("key", list(MODELS))
def test_tokens_equal_independent_computation(backbones, key, tap):
    backbone = backbones(key, tap)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    got = backbone.tokens(x, all_tokens=True)
    want = independent_tokens(backbone, x, tap)
    n_layers = backbone.n_blocks + 1
    assert got["cls"].shape == got["ap"].shape == (5, n_layers, backbone.dim)
    for kind in ("cls", "ap", "last"):
        torch.testing.assert_close(got[kind], want[kind], rtol=1e-5, atol=1e-5)
    assert got["last"].shape == (5, backbone.n_tokens, backbone.layer_dims[-1])


def test_register_tokens_are_not_averaged(backbones):
    backbone = backbones("timm-reg4", "residual")
    assert backbone.n_prefix == 5  # CLS + 4 registers
    assert backbone.n_tokens == 5 + N_PATCHES
    assert backbone.describe()["n_prefix_tokens"] == 5
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    got = backbone.tokens(x, all_tokens=True)
    final = got["last"]
    torch.testing.assert_close(got["ap"][:, -1], final[:, 5:].mean(1))
    # the test has teeth: averaging the registers in (or CLS) gives something else
    assert not torch.allclose(got["ap"][:, -1], final[:, 1:].mean(1), atol=1e-3)


def test_clip_final_layer_is_projected_and_zero_padded(backbones):
    backbone = backbones("open_clip", "reference")
    assert backbone.layer_names == ["block0", "block1", "final"]
    assert backbone.layer_dims == [32, 32, 16]
    assert backbone.dim == 32
    out = backbone.tokens(torch.randn(3, 3, 32, 32))
    assert torch.count_nonzero(out["cls"][:, -1, 16:]) == 0
    assert torch.count_nonzero(out["ap"][:, -1, 16:]) == 0
    assert torch.count_nonzero(out["cls"][:, -1, :16]) > 0


def test_avg_pooled_timm_model_uses_its_fc_norm():
    """Models pooled by `avg` keep `norm` as Identity and normalise after pooling (fc_norm):
    the final AP equals the model's own pooled, normed output."""
    kwargs = {**TIMM_TINY_KW, "global_pool": "avg"}
    backbone = create_backbone(TIMM_TINY, "random", "residual", kwargs)
    m = backbone.model
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = m.forward_head(m.forward_features(x), pre_logits=True)
    torch.testing.assert_close(backbone.tokens(x)["ap"][:, -1], pooled, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tap", ["reference", "residual"])
@pytest.mark.parametrize("key", list(MODELS))
def test_cache_stores_independent_tokens(backbones, wds_path, tmp_path, key, tap):
    """What lands on disk (fp16) is the independent computation on the same images, rounded."""
    name, kwargs = MODELS[key]
    opts = ExtractOptions(model=name, dataset=f"wds:{wds_path}", split=("test",),
                          weights="random", tap=tap, model_arg=kwargs,
                          cache=tmp_path, batch_size=8, shard_size=16, workers=0,
                          all_tokens=True)
    (result,) = extract(opts)
    cache = open_cache(result.path)
    backbone = backbones(key, tap)
    data = open_dataset(f"wds:{wds_path}", "test")
    x = torch.stack([backbone.transform(data.load(i)) for i in range(len(data))])
    want = independent_tokens(backbone, x, tap)
    assert_fp16_of(cache.read("cls"), want["cls"])
    assert_fp16_of(cache.read("ap"), want["ap"])
    assert_fp16_of(cache.read("last_tokens"), want["last"])
    np.testing.assert_array_equal(cache.labels(), data.labels)
    assert cache.layer_dims == backbone.layer_dims
    if key == "open_clip":
        assert not cache.read("cls")[:, -1, 16:].any()


def test_preprocessing_is_the_models_own_and_recorded(backbones):
    timm_pp = backbones("timm", "reference").preprocess
    assert timm_pp["input_size"] == [3, 32, 32]
    assert timm_pp["mean"] == [0.5, 0.5, 0.5]  # vit_tiny's own normalisation
    reg_pp = backbones("timm-reg4", "reference").preprocess
    assert reg_pp["mean"] == pytest.approx([0.485, 0.456, 0.406])  # DINOv2's (ImageNet)
    clip = backbones("open_clip", "reference")
    assert clip.preprocess["size"] == [32, 32]
    assert clip.preprocess["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    desc = clip.describe()
    for key in ("model", "weights", "tap", "preprocess", "layer_names", "layer_dims",
                "model_kwargs", "n_tokens"):
        assert key in desc


def test_random_weights_are_seeded_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = create_backbone(TIMM_TINY, "random:7", "reference", TIMM_TINY_KW)
    after = torch.rand(3)
    torch.testing.assert_close(before, after)
    b = create_backbone(TIMM_TINY, "random:7", "reference", TIMM_TINY_KW)
    c = create_backbone(TIMM_TINY, "random:8", "reference", TIMM_TINY_KW)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(a.tokens(x)["cls"], b.tokens(x)["cls"])
    assert not torch.equal(a.tokens(x)["cls"], c.tokens(x)["cls"])
    assert a.weights_id == "random:7"


def test_local_checkpoint_file(tmp_path):
    source = create_backbone(TIMM_TINY, "random:3", "reference", TIMM_TINY_KW)
    path = tmp_path / "tiny.pt"
    torch.save(source.model.state_dict(), path)
    loaded = create_backbone(TIMM_TINY, str(path), "reference", TIMM_TINY_KW)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.tokens(x)["ap"], source.tokens(x)["ap"])
    assert loaded.weights_id.startswith("file:sha256:")
    assert "@file-" in model_dir_name(TIMM_TINY, "reference", loaded.weights_id)
    from safetensors.torch import save_file

    st = tmp_path / "tiny.safetensors"
    save_file(source.model.state_dict(), str(st))
    again = create_backbone(TIMM_TINY, str(st), "reference", TIMM_TINY_KW)
    assert torch.equal(again.tokens(x)["ap"], source.tokens(x)["ap"])
    with pytest.raises(FeatcacheError, match="does not fit"):
        create_backbone(TIMM_TINY, str(path), "reference", {**TIMM_TINY_KW, "depth": 4})
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(FeatcacheError, match="not a readable checkpoint"):
        create_backbone(TIMM_TINY, str(junk), "reference", TIMM_TINY_KW)


@pytest.mark.parametrize("name,expected", [
    ("clip-vit-b61", "clip-vit-b16"),
    ("dinov2-vit-s41", "dinov2-vit-s14"),
    ("timm:vit_tiny_patch16_22", "vit_tiny_patch16_224"),
    ("open_clip:ViT-B-33", "ViT-B-32"),
])
def test_unknown_model_names_suggest_close_ones(name, expected):
    with pytest.raises(FeatcacheError, match=expected):
        resolve_model(name)


def test_registry_names_resolve():
    for name in ("clip-vit-b32", "clip-vit-b16", "clip-vit-l14", "dinov2-vit-s14",
                 "dinov2-vit-b14", "dinov2-vit-l14", "vit-s16", "vit-b16", "vit-l16",
                 "mae-vit-b16", "mae-vit-l16"):
        spec = resolve_model(name)
        assert spec.backend in ("timm", "open_clip")
    assert resolve_model("mae-vit-b16").probe_token == "ap"
    assert resolve_model("vit-b16").arch == "vit_base_patch16_224.augreg2_in21k_ft_in1k"


def test_bad_model_kwargs_and_taps_are_clear_errors():
    with pytest.raises(FeatcacheError, match="does not accept --model-arg"):
        create_backbone(TIMM_TINY, "random", "reference", {**TIMM_TINY_KW, "bogus": 1})
    with pytest.raises(FeatcacheError, match="unknown tap"):
        create_backbone(TIMM_TINY, "random", "middle", TIMM_TINY_KW)
    with pytest.raises(FeatcacheError, match="not a plain ViT"):
        create_backbone("timm:resnet18", "random")
    with pytest.raises(FeatcacheError, match="no such file"):
        create_backbone(TIMM_TINY, str(Path("/nonexistent/w.pt")))


def test_a_dropped_backbone_is_freed_without_waiting_for_gc():
    import gc
    import weakref

    backbone = create_backbone(TIMM_TINY, "random", "reference", TIMM_TINY_KW)
    backbone.tokens(torch.randn(1, 3, 32, 32))
    model = weakref.ref(backbone.model)
    gc.disable()
    try:
        del backbone
        assert model() is None  # no reference cycle through the hooks
    finally:
        gc.enable()


def test_a_forward_outside_tokens_keeps_nothing(backbones):
    """The hooks record only inside `tokens()`: calling the model itself (a user's own
    forward, a benchmark's floor) must not pile up activations."""
    backbone = backbones("timm", "residual")
    with torch.no_grad():
        for _ in range(3):
            backbone.model.forward_features(torch.randn(2, 3, 32, 32))
    assert backbone._taps is None
    assert backbone.tokens(torch.randn(2, 3, 32, 32))["cls"].shape == (2, 4, 48)


# ---------------------------------------------------------------- the authors' preprocessing


def test_dinov2_and_mae_use_the_authors_transform():
    """thingsvision's default, which the authors' extraction applies to DINOv2 and MAE:
    computed here by hand with PIL on a 300x500 image (shorter side to 256, bilinear;
    centre 224x224; ImageNet mean/std)."""
    from PIL import Image

    from featcache.backbones.preprocess import THINGSVISION

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    resized = np.asarray(image.resize((426, 256), Image.BILINEAR), dtype=np.float32) / 255
    crop = resized[16:240, 101:325]
    expected = (crop - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    for name in ("dinov2-vit-s14", "mae-vit-b16"):
        backbone = create_backbone(name, "random", model_kwargs={"depth": 1})
        assert backbone.preprocess == THINGSVISION
        assert backbone.describe()["preprocess"]["recipe"] == "thingsvision-default"
        out = backbone.transform(image).permute(1, 2, 0).numpy()
        np.testing.assert_allclose(out, expected, atol=1e-5)
    # the supervised ViTs and CLIP keep their own (which is what the authors used for them)
    assert resolve_model("vit-b16").preprocess is None
    assert resolve_model("clip-vit-b16").preprocess is None


def test_dinov2_position_embeddings_are_interpolated_like_its_hub_model():
    """DINOv2's torch-hub model interpolates its 37x37 (518 px) grid at run time: bicubic,
    scale factor (16 + 0.1) / 37, no antialias. featcache does the same once."""
    import timm
    import torch.nn.functional as F

    backbone = create_backbone("dinov2-vit-s14", "random:0", model_kwargs={"depth": 1})
    ours = backbone.model.pos_embed.detach()
    assert ours.shape == (1, 257, 384)
    assert backbone.n_tokens == 257 and backbone.model.patch_embed.img_size == (224, 224)
    with torch.random.fork_rng():  # the same random draw, at the native 518 px
        torch.manual_seed(0)
        again = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0,
                                  depth=1)
    same_draw = again.pos_embed.detach()[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    hub = F.interpolate(same_draw, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic",
                        antialias=False).permute(0, 2, 3, 1).reshape(1, 256, -1)
    torch.testing.assert_close(ours[:, 1:], hub)
    torch.testing.assert_close(ours[:, :1], again.pos_embed.detach()[:, :1])
    # timm's own resampling (exact size, antialias) is different: the choice matters
    from timm.layers import resample_abs_pos_embed

    timm_way = resample_abs_pos_embed(again.pos_embed.detach(), (16, 16), (37, 37))
    assert not torch.allclose(timm_way, ours)
    assert "bicubic" in backbone.describe()["pos_embed"]
    x = torch.randn(1, 3, 224, 224)
    assert backbone.tokens(x)["cls"].shape == (1, 2, 384)
