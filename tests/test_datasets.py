"""Dataset adapters, on data the tests write themselves (no network)."""

from __future__ import annotations

import hashlib
import json
import pickle
import tarfile
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
import torch
from fakedata import (
    make_cifar,
    make_fer_csv,
    make_imagefolder,
    make_pcam,
    make_stl10,
    make_svhn,
    make_wds,
)
from PIL import Image

from featcache.catalogue import paper_datasets
from featcache.errors import FeatcacheError
from featcache.sources import (
    DatasetInfo,
    ImageDataset,
    default_data_root,
    list_datasets,
    open_dataset,
    parse_splits,
    tvfiles,
    webdataset,
)
from featcache.sources.webdataset import INDEX_SUFFIX


def pixels(img: Image.Image) -> np.ndarray:
    assert isinstance(img, Image.Image)
    assert img.mode == "RGB"
    return np.asarray(img)


def check_split(dset: ImageDataset, expected, gray: bool = False) -> None:
    """Length, labels, keys and (lossless) pixels equal what the builder wrote."""
    assert len(dset) == len(expected.labels)
    assert dset.labels.dtype == np.int64
    np.testing.assert_array_equal(dset.labels, expected.labels)
    assert [dset.key(i) for i in range(len(dset))] == expected.keys
    for i in range(len(dset)):
        want = expected.images[i]
        if gray:
            want = np.repeat(want[..., None], 3, axis=2)
        np.testing.assert_array_equal(pixels(dset.load(i)), want)
    img, label = dset[len(dset) - 1]
    assert isinstance(label, int) and label == expected.labels[-1]


def roundtrip(dset: ImageDataset) -> ImageDataset:
    clone = pickle.loads(pickle.dumps(dset))
    assert clone.identity == dset.identity
    np.testing.assert_array_equal(pixels(clone.load(0)), pixels(dset.load(0)))
    return clone


# ------------------------------------------------------------------------- small helpers


def test_default_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("FEATCACHE_DATA", str(tmp_path / "d"))
    assert default_data_root() == tmp_path / "d"
    monkeypatch.delenv("FEATCACHE_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_root() == tmp_path / "xdg" / "featcache" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_data_root() == Path.home() / ".cache" / "featcache" / "data"


def test_parse_splits():
    assert parse_splits("train,test") == ["train", "test"]
    assert parse_splits(" train , test,train,") == ["train", "test"]
    assert parse_splits("val") == ["val"]
    for bad in ("", " , ", "../x", "a/b"):
        with pytest.raises(FeatcacheError):
            parse_splits(bad)


def test_list_datasets_covers_the_paper():
    rows = {r.name: r for r in list_datasets()}
    assert all(isinstance(r, DatasetInfo) for r in rows.values())
    paper = [r for r in rows.values() if r.paper]
    assert [r.name for r in paper] == list(paper_datasets())
    assert len(paper) == 20
    assert rows["fer2013"].n_classes == 7 and rows["fer2013"].domain == "Structured"
    assert rows["fer2013"].source == "hf:clip-benchmark/wds_fer2013"
    assert rows["cifar10"].source == "hf:clip-benchmark/wds_vtab-cifar10"
    assert rows["imagenet1k"].n_classes == 1000
    assert rows["svhn"].display_name == "SVHN"
    assert rows["digits"].source == "sklearn" and not rows["digits"].paper
    assert "torchvision:pcam" in rows and "wds:PATH" in rows


def test_unknown_names_suggest_close_matches(tmp_path):
    with pytest.raises(FeatcacheError, match=r"'fer2013'.*featcache datasets"):
        open_dataset("fer213", "train", data_root=tmp_path, download=False)
    with pytest.raises(FeatcacheError, match=r"torchvision:cifar10"):
        open_dataset("torchvision:cifar11", "train", data_root=tmp_path, download=False)
    with pytest.raises(FeatcacheError, match="featcache datasets"):
        open_dataset("zzzzqqq", "train", data_root=tmp_path)
    with pytest.raises(FeatcacheError, match="does not exist"):
        open_dataset(f"wds:{tmp_path / 'nope'}", "train")
    with pytest.raises(FeatcacheError, match="invalid split"):
        open_dataset("digits", "../train")


# ------------------------------------------------------------------------- digits


def test_digits_split_and_pixels():
    from sklearn.datasets import load_digits

    train = open_dataset("digits", "train")
    test = open_dataset("digits", "test")
    assert (len(train), len(test)) == (1347, 450)
    assert train.name == "digits" and train.class_names == [str(c) for c in range(10)]
    # stratified: each class's share is the same in both splits (to within one image)
    counts_train, counts_test = np.bincount(train.labels), np.bincount(test.labels)
    np.testing.assert_allclose(counts_test / counts_train, 450 / 1347, atol=0.03)
    bunch = load_digits()
    originals = {int(k.split("/")[1]) for k in map(train.key, range(len(train)))}
    assert originals.isdisjoint(int(test.key(i).split("/")[1]) for i in range(len(test)))
    j = int(train.key(5).split("/")[1])
    img = train.load(5)
    assert img.size == (8, 8)
    want = np.rint(bunch.images[j] * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(pixels(img)[..., 0], want)
    assert train.labels[5] == bunch.target[j]
    again = open_dataset("digits", "train")
    assert again.identity == train.identity and again.identity["n"] == 1347
    assert test.identity["sha256"] != train.identity["sha256"]
    json.dumps(train.identity)
    roundtrip(train)
    with pytest.raises(FeatcacheError, match="available splits: train, test"):
        open_dataset("digits", "val")
    with pytest.raises(IndexError):
        train.load(len(train))


# ------------------------------------------------------------------------- webdataset tars


def test_wds_reads_labels_keys_pixels(tmp_path):
    fake = make_wds(tmp_path / "w", splits={"train": 11, "test": 5}, n_classes=3, shards=3)
    train = open_dataset(f"wds:{tmp_path / 'w'}", "train")
    assert train.name == f"wds:{(tmp_path / 'w').resolve()}"
    assert train.split == "train"
    assert train.class_names == fake.class_names
    check_split(train, fake.splits["train"])
    assert train.key(0) == "train/0.tar:s0000000"
    test = open_dataset(f"wds:{tmp_path / 'w'}", "test")
    check_split(test, fake.splits["test"])
    ident = train.identity
    assert ident["source"] == "wds" and ident["n"] == 11 and ident["n_classes"] == 3
    json.dumps(ident)
    clone = roundtrip(train)
    assert clone.key(4) == train.key(4)


def test_wds_shards_sorted_numerically_and_index_cached(tmp_path, monkeypatch):
    fake = make_wds(tmp_path, splits={"train": 24}, shards=12)
    first = open_dataset(f"wds:{tmp_path}", "train")
    check_split(first, fake.splits["train"])  # 10.tar and 11.tar come after 2.tar
    assert (tmp_path / "train" / f"0.tar{INDEX_SUFFIX}").is_file()

    def no_rescan(path):
        raise AssertionError(f"{path} was indexed again")

    monkeypatch.setattr(webdataset, "_index_tar", no_rescan)
    second = open_dataset(f"wds:{tmp_path}", "train")
    assert second.identity == first.identity
    np.testing.assert_array_equal(second.labels, first.labels)


def test_wds_identity_changes_with_content(tmp_path):
    make_wds(tmp_path / "a", splits={"train": 6}, seed=1)
    make_wds(tmp_path / "b", splits={"train": 6}, seed=1)
    make_wds(tmp_path / "c", splits={"train": 6}, seed=2)
    ident = {k: open_dataset(f"wds:{tmp_path / k}", "train").identity for k in "abc"}
    assert ident["a"]["sha256"] == ident["b"]["sha256"]  # a copy elsewhere: same content
    assert ident["a"]["location"] != ident["b"]["location"]
    assert ident["a"]["sha256"] != ident["c"]["sha256"]


def test_wds_webp_and_jpg(tmp_path):
    fake = make_wds(tmp_path / "webp", splits={"train": 4}, ext="webp", shards=1)
    check_split(open_dataset(f"wds:{tmp_path / 'webp'}", "train"), fake.splits["train"])
    fake = make_wds(tmp_path / "jpg", splits={"train": 4}, ext="jpg", shards=1, image_size=32)
    dset = open_dataset(f"wds:{tmp_path / 'jpg'}", "train")
    np.testing.assert_array_equal(dset.labels, fake.splits["train"].labels)
    diff = np.abs(pixels(dset.load(2)).astype(int) - fake.splits["train"].images[2])
    assert diff.mean() < 8


def test_wds_without_classnames_agrees_across_splits(tmp_path):
    make_wds(tmp_path, splits={"train": 3, "test": 9}, n_classes=5, classnames=False)
    train = open_dataset(f"wds:{tmp_path}", "train")  # train alone only sees labels 0..2
    assert train.labels.max() < 3
    assert train.class_names == ["0", "1", "2", "3", "4"]


def test_wds_corrupt_image_names_split_and_key(tmp_path):
    make_wds(tmp_path, splits={"train": 6}, shards=2, corrupt={"train": [4]})
    dset = open_dataset(f"wds:{tmp_path}", "train")
    assert dset.labels.shape == (6,)  # labels come without decoding anything
    dset.load(3)
    with pytest.raises(FeatcacheError, match=r"train/1\.tar:s0000004.*split 'train'"):
        dset.load(4)
    with pytest.raises(FeatcacheError, match="s0000004"):
        dset[4]


def test_wds_errors(tmp_path):
    make_wds(tmp_path / "w", splits={"train": 4, "test": 2})
    with pytest.raises(FeatcacheError, match="available splits: test, train"):
        open_dataset(f"wds:{tmp_path / 'w'}", "val")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FeatcacheError, match=r"expected .*empty/train/0\.tar"):
        open_dataset(f"wds:{tmp_path / 'empty'}", "train")
    make_wds(tmp_path / "partial", splits={"train": 4}, shards=2)
    (tmp_path / "partial" / "train" / "1.tar").unlink()
    with pytest.raises(FeatcacheError, match=r"names 2 shards .* 1 are missing \(1\.tar\)"):
        open_dataset(f"wds:{tmp_path / 'partial'}", "train")
    # CLIP_benchmark's rule: exactly the shards nshards.txt names, whatever else lies there
    make_wds(tmp_path / "extra", splits={"train": 6}, shards=2)
    (tmp_path / "extra" / "train" / "nshards.txt").write_text("1\n")
    assert len(open_dataset(f"wds:{tmp_path / 'extra'}", "train")) == 3
    # a label outside classnames.txt
    make_wds(tmp_path / "lab", splits={"train": 4}, n_classes=3, shards=1)
    (tmp_path / "lab" / "classnames.txt").write_text("a\nb\n")
    with pytest.raises(FeatcacheError, match="lists 2 classes"):
        open_dataset(f"wds:{tmp_path / 'lab'}", "train")
    # an image without a label
    (tmp_path / "nolabel" / "train").mkdir(parents=True)
    with tarfile.open(tmp_path / "nolabel" / "train" / "0.tar", "w") as tf:
        tf.add(tmp_path / "w" / "classnames.txt", arcname="x1.png")
    with pytest.raises(FeatcacheError, match=r"'x1' has an image but no \.cls"):
        open_dataset(f"wds:{tmp_path / 'nolabel'}", "train")


# ------------------------------------------------------------------------- hub datasets


def test_hub_dataset_already_on_disk_loads_offline(tmp_path):
    fake = make_wds(tmp_path / "fer2013", splits={"train": 7, "test": 3}, n_classes=7)
    dset = open_dataset("fer2013", "train", data_root=tmp_path, download=False)
    assert dset.name == "fer2013"
    check_split(dset, fake.splits["train"])
    assert dset.identity["source"] == "hf"
    assert dset.identity["repo_id"] == "clip-benchmark/wds_fer2013"
    assert dset.root == tmp_path / "fer2013"
    # the identity names the origin, not the local data root: a moved root keeps caches valid
    make_wds(tmp_path / "elsewhere" / "fer2013", splits={"train": 7, "test": 3}, n_classes=7)
    moved = open_dataset("fer2013", "train", data_root=tmp_path / "elsewhere", download=False)
    assert moved.identity == dset.identity
    # other spellings of the same dataset resolve to the canonical short name
    make_wds(tmp_path / "cifar10", splits={"test": 3}, n_classes=10)
    for alias in ("wds/vtab/cifar10", "vtab/cifar10", "clip-benchmark/wds_vtab-cifar10",
                  "CIFAR10"):
        assert open_dataset(alias, "test", data_root=tmp_path, download=False).name == "cifar10"
    roundtrip(dset)


def test_hf_prefix_uses_its_own_folder(tmp_path):
    fake = make_wds(tmp_path / "hf" / "someone" / "wds_thing", splits={"test": 4})
    dset = open_dataset("hf:someone/wds_thing", "test", data_root=tmp_path, download=False)
    assert dset.name == "hf:someone/wds_thing"
    assert dset.identity["repo_id"] == "someone/wds_thing"
    check_split(dset, fake.splits["test"])
    with pytest.raises(FeatcacheError, match="OWNER/REPO"):
        open_dataset("hf:justaname", "test", data_root=tmp_path, download=False)


def test_hub_dataset_missing_without_download(tmp_path):
    with pytest.raises(FeatcacheError) as err:
        open_dataset("svhn", "train", data_root=tmp_path, download=False)
    msg = str(err.value)
    assert str(tmp_path / "svhn" / "train") in msg
    assert "wds:PATH" in msg and "clip-benchmark/wds_vtab-svhn" in msg
    make_wds(tmp_path / "svhn", splits={"test": 2}, n_classes=10)
    with pytest.raises(FeatcacheError, match=r"present: test"):
        open_dataset("svhn", "train", data_root=tmp_path, download=False)


REVISION = "0123456789abcdef0123456789abcdef01234567"


def fake_dataset_info(files: list[str]):
    def info(self, repo_id, **kw):
        return SimpleNamespace(sha=REVISION, siblings=[SimpleNamespace(rfilename=f)
                                                       for f in files])
    return info


def test_hub_download_fetches_only_the_split(tmp_path, monkeypatch, hub_online):
    calls = []

    def fake_snapshot(repo_id, repo_type=None, allow_patterns=None, local_dir=None,
                      revision=None, **kw):
        calls.append((repo_id, repo_type, sorted(allow_patterns), Path(local_dir), revision))
        make_wds(Path(local_dir), splits={"train": 5}, n_classes=10, shards=1)
        return local_dir

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", fake_dataset_info(
        ["classnames.txt", "train/0.tar", "train/nshards.txt", "test/0.tar", "README.md"]))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    dset = open_dataset("stl10", "train", data_root=tmp_path)
    assert len(dset) == 5
    assert calls == [("clip-benchmark/wds_stl10", "dataset", ["classnames.txt", "train/*"],
                      tmp_path / "stl10", REVISION)]
    # the commit it came from is part of the data's identity (so of a cache's fingerprint)
    assert dset.identity["revision"] == REVISION
    open_dataset("stl10", "train", data_root=tmp_path)  # already there: no second download
    assert len(calls) == 1
    with pytest.raises(FeatcacheError, match="available splits: test, train"):
        open_dataset("stl10", "validation", data_root=tmp_path)
    # an interrupted download (a shard missing) is resumed rather than reported forever
    (tmp_path / "stl10" / "train" / "nshards.txt").write_text("2\n")
    with pytest.raises(FeatcacheError, match="looks incomplete"):
        open_dataset("stl10", "train", data_root=tmp_path, download=False)
    open_dataset("stl10", "train", data_root=tmp_path)
    assert len(calls) == 2


def test_hub_unreachable_is_a_clear_error(tmp_path, monkeypatch, hub_online):
    def offline(self, *a, **kw):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", offline)
    with pytest.raises(FeatcacheError) as err:
        open_dataset("dtd", "test", data_root=tmp_path)
    msg = str(err.value)
    assert "no network" in msg and str(tmp_path / "dtd") in msg and "wds:PATH" in msg


# ------------------------------------------------------------------------- image folders


def test_imagefolder(tmp_path):
    fake = make_imagefolder(tmp_path, splits={"train": 9, "test": 6},
                            class_names=["dog", "cat", "ant"])
    train = open_dataset(f"imagefolder:{tmp_path}", "train")
    assert train.class_names == ["ant", "cat", "dog"]
    check_split(train, fake.splits["train"])
    assert train.key(0) == "train/ant/0000.png"
    check_split(open_dataset(f"imagefolder:{tmp_path}", "test"), fake.splits["test"])
    assert train.identity["source"] == "imagefolder"
    roundtrip(train)
    (tmp_path / "train" / "notes.txt").write_text("ignored: not in a class folder")
    (tmp_path / "train" / "ant" / "readme.md").write_text("ignored: not an image")
    assert len(open_dataset(f"imagefolder:{tmp_path}", "train")) == 9


def test_imagefolder_errors(tmp_path):
    make_imagefolder(tmp_path, splits={"train": 4, "test": 4}, n_classes=2,
                     corrupt={"test": [1]})
    (tmp_path / "test" / "zebra").mkdir()
    with pytest.raises(FeatcacheError, match="train lacks: zebra"):
        open_dataset(f"imagefolder:{tmp_path}", "test")
    (tmp_path / "test" / "zebra").rmdir()
    dset = open_dataset(f"imagefolder:{tmp_path}", "test")
    with pytest.raises(FeatcacheError, match=r"test/class_0/0001\.png.*split 'test'"):
        dset.load(1)
    with pytest.raises(FeatcacheError, match="available splits: test, train"):
        open_dataset(f"imagefolder:{tmp_path}", "val")


def test_imagefolder_without_train_uses_union(tmp_path):
    make_imagefolder(tmp_path / "a", splits={"val": 2}, class_names=["x", "y"])
    make_imagefolder(tmp_path / "a", splits={"test": 3}, class_names=["x", "y", "z"])
    assert open_dataset(f"imagefolder:{tmp_path / 'a'}", "val").class_names == ["x", "y", "z"]


# ------------------------------------------------------------------------- FER2013 CSV


def test_fer_csv_splits(tmp_path):
    fake = make_fer_csv(tmp_path / "fer2013.csv", counts={"Training": 9, "PublicTest": 4,
                                                          "PrivateTest": 3})
    for split in ("train", "test", "publictest", "privatetest"):
        dset = open_dataset(f"fer2013csv:{tmp_path / 'fer2013.csv'}", split)
        check_split(dset, fake.splits[split], gray=True)
        # the hub's classes and label ids, so CSV runs compare with hub runs and the paper
        assert dset.class_names == ["angry", "disgusted", "fearful", "happy", "neutral", "sad",
                                    "surprised"]
    assert len(open_dataset(f"fer2013csv:{tmp_path}", "test")) == 7  # a folder works too
    roundtrip(dset)
    with pytest.raises(FeatcacheError, match="available splits: train, test"):
        open_dataset(f"fer2013csv:{tmp_path}", "val")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FeatcacheError, match=r"not found; looked for .*empty/fer2013\.csv"):
        open_dataset(f"fer2013csv:{tmp_path / 'empty'}", "train")


def test_fer_csv_bad_row(tmp_path):
    fake = make_fer_csv(tmp_path / "fer2013.csv", counts={"Training": 4}, corrupt_rows=[2])
    dset = open_dataset(f"fer2013csv:{tmp_path}", "train")
    assert len(dset) == 4
    with pytest.raises(FeatcacheError, match="train/fer2013.csv:4.*2304"):
        dset.load(2)
    assert fake.splits["train"].keys[2] == "train/fer2013.csv:4"


# ------------------------------------------------------------------------- torchvision files

BUILDERS = {
    "cifar10": lambda root: make_cifar(root, "cifar10", n_train=11, n_test=4),
    "cifar100": lambda root: make_cifar(root, "cifar100", n_train=6, n_test=3),
    "svhn": lambda root: make_svhn(root, {"train": 6, "test": 3}),
    "stl10": lambda root: make_stl10(root, {"train": 5, "test": 3}),
    "pcam": lambda root: make_pcam(root, {"train": 6, "val": 2, "test": 3}),
}


@pytest.mark.parametrize("tv_name", list(BUILDERS))
def test_torchvision_files_offline(tmp_path, tv_name):
    with pytest.raises(FeatcacheError, match=str(tmp_path / "torchvision")):
        open_dataset(f"torchvision:{tv_name}", "train", data_root=tmp_path, download=False)
    fake = BUILDERS[tv_name](tmp_path / "torchvision")
    for split in fake.splits:
        # download=True must not try the network when the files are there
        dset = open_dataset(f"torchvision:{tv_name}", split, data_root=tmp_path, download=True)
        assert dset.name == f"torchvision:{tv_name}"
        assert dset.class_names == fake.class_names
        check_split(dset, fake.splits[split])
    roundtrip(dset)
    with pytest.raises(FeatcacheError, match="available splits"):
        open_dataset(f"torchvision:{tv_name}", "nosuch", data_root=tmp_path)


def test_tfds_order_matches_published_cifar10_ids():
    """TFDS's CIFAR-10 train ids as other projects print them (`train_16399`,
    `train_01680`, ...) and its first test id (`test_09933`), against our recipe."""
    from featcache.sources.tvfiles import tfds_order, vtab_rows

    assert tfds_order(50000, "train")[:12].tolist() == [
        16399, 1680, 47917, 17307, 27051, 48736, 26263, 1456, 19135, 31598, 12970, 4223]
    assert tfds_order(10000, "test")[0] == 9933
    # VTAB's sizes (the paper's dataset_info.json): 45,000 and 65,931
    assert len(vtab_rows(50000, "train")) == 45000 and len(vtab_rows(50000, "val")) == 5000
    assert len(vtab_rows(73257, "train")) == 65931
    assert sorted(vtab_rows(50000, "trainval").tolist()) == list(range(50000))


def md5_order(n: int, split: str) -> np.ndarray:
    """TFDS's stored order, written here from its description (not featcache's function):
    rows by the MD5 of split name + row key, ascending (pinned for CIFAR-10 above)."""
    digest = [hashlib.md5(f"{split}{i}".encode()).digest() for i in range(n)]
    return np.argsort(np.array(digest, dtype="S16"), kind="stable")


@pytest.mark.parametrize("tv_name", ["cifar10", "svhn"])
def test_vtab_variant_is_the_tfds_ordered_subset(tmp_path, tv_name):
    tfds_order = md5_order
    fake = BUILDERS[tv_name](tmp_path / "torchvision")
    full = fake.splits["train"]
    n = len(full.labels)
    order = tfds_order(n, "train")
    cut = 90 * n // 100
    for split, rows in (("train", order[:cut]), ("val", order[cut:]), ("trainval", order)):
        dset = open_dataset(f"torchvision:vtab-{tv_name}", split, data_root=tmp_path,
                            download=False)
        assert dset.name == f"torchvision:vtab-{tv_name}"
        np.testing.assert_array_equal(dset.labels, full.labels[rows])
        for i, row in enumerate(rows):
            np.testing.assert_array_equal(pixels(dset.load(i)), full.images[row])
            assert dset.key(i) == f"{split}/{row}"
    test = open_dataset(f"torchvision:vtab-{tv_name}", "test", data_root=tmp_path)
    np.testing.assert_array_equal(
        test.labels, fake.splits["test"].labels[tfds_order(len(test), "test")])
    roundtrip(dset)
    # which is which, said plainly
    rows_by_name = {r.name: r for r in list_datasets()}
    assert "not the paper's" in rows_by_name[f"torchvision:{tv_name}"].description
    assert "as the paper" in rows_by_name[f"torchvision:vtab-{tv_name}"].description


def test_torchvision_download_failure_is_clear(tmp_path, monkeypatch):
    def broken(tv_name, root, split):
        raise OSError("network unreachable")

    monkeypatch.setattr(tvfiles, "_tv_download", broken)
    with pytest.raises(FeatcacheError, match=r"could not download torchvision:cifar10.*unreach"):
        open_dataset("torchvision:cifar10", "train", data_root=tmp_path)


# ------------------------------------------------------------------------- DataLoader workers


@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_dataloader_workers(tmp_path, context):
    fake = make_wds(tmp_path, splits={"train": 8}, shards=2)
    dset = open_dataset(f"wds:{tmp_path}", "train")
    dset.transform = np.asarray  # picklable by reference; default_collate stacks the arrays
    # one spawned worker is enough to prove the dataset crosses a fresh interpreter
    loader = torch.utils.data.DataLoader(dset, batch_size=4,
                                         num_workers=2 if context == "fork" else 1,
                                         multiprocessing_context=context)
    batches = list(loader)
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    np.testing.assert_array_equal(labels.numpy(), fake.splits["train"].labels)
    np.testing.assert_array_equal(images.numpy(), np.stack(fake.splits["train"].images))


def test_a_long_local_dataset_name_still_makes_a_cache_folder(tmp_path):
    """A 240-character folder name is legal; the cache folder's name (which adds the
    source and a digest) must stay within 255 bytes, and stay unique."""
    from fakedata import make_imagefolder

    from featcache.sources import dataset_dir_name

    data = tmp_path / ("d" * 240)
    make_imagefolder(data, {"train": 6})
    other = dataset_dir_name(f"imagefolder:{tmp_path / ('d' * 239 + 'e')}")
    name = dataset_dir_name(f"imagefolder:{data}")
    assert len(name.encode()) <= 231 and name != other
    assert dataset_dir_name("imagefolder:/data/pets").startswith("imagefolder-pets-")
    from cliutil import run
    from conftest import TIMM_TINY, TIMM_TINY_KW, model_args

    done = run("extract", "--model", TIMM_TINY, "--weights", "random",
               *model_args(TIMM_TINY_KW), "--dataset", f"imagefolder:{data}", "--split",
               "train", "--cache", tmp_path / "c", "--workers", 0)
    assert done.exit_code == 0, done.output


def test_class_folders_without_a_split_level_are_explained(tmp_path):
    from fakedata import make_imagefolder

    from featcache.errors import FeatcacheError
    from featcache.sources import open_dataset

    make_imagefolder(tmp_path / "data", {"train": 6})
    flat = tmp_path / "flat"
    (tmp_path / "data" / "train").rename(flat)  # flat/<class>/<images>
    with pytest.raises(FeatcacheError, match=r"holds class folders .* directly.*<split>/<class>"):
        open_dataset(f"imagefolder:{flat}", "train")
