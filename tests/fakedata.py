"""Small, deterministic fake datasets written to disk, for tests that must run offline.

Every image carries its class in its pixels (a class colour plus a class-dependent stripe
pattern, plus seeded noise), so a probe trained on features of these images can learn the
labels. Each builder returns what a reader should find: labels, keys and pixels in order.
"""

from __future__ import annotations

import colorsys
import io
import pickle
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

FER_USAGES = ("Training", "PublicTest", "PrivateTest")
# Kaggle's emotion ids 0..6 and the hub's class list (CLIP_benchmark's `en_classnames.json`).
FER_KAGGLE_NAMES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
FER_HUB_NAMES = ("angry", "disgusted", "fearful", "happy", "neutral", "sad", "surprised")


@dataclass
class FakeSplit:
    """What a reader of one split should return, in reading order."""

    labels: np.ndarray
    images: list[np.ndarray]  # HxWx3 uint8 (HxW for grayscale sources), as written
    keys: list[str]  # what ImageDataset.key(i) should return


@dataclass
class FakeData:
    root: Path
    class_names: list[str]
    splits: dict[str, FakeSplit] = field(default_factory=dict)


def class_image(label: int, n_classes: int, size: int, rng: np.random.Generator,
                noise: int = 24) -> np.ndarray:
    """An HxWx3 uint8 image whose colour and stripes depend on the label, plus noise."""
    r, g, b = colorsys.hsv_to_rgb((label % max(n_classes, 1)) / max(n_classes, 1), 0.75, 0.85)
    base = np.array([r, g, b]) * 255.0
    yy, xx = np.mgrid[0:size, 0:size]
    period = 2 + label % 4
    coord = xx if label % 2 == 0 else yy
    stripes = ((coord // period) % 2)[..., None] * 40.0 - 20.0
    img = base[None, None, :] + stripes + rng.normal(0.0, noise / 2, size=(size, size, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def balanced_labels(n: int, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """n labels covering every class as evenly as possible, in a seeded random order."""
    return rng.permutation(np.arange(n) % n_classes).astype(np.int64)


def encode(img: np.ndarray, ext: str) -> bytes:
    """Encode an array as an image file; png and webp are lossless, jpg is not."""
    buf = io.BytesIO()
    pil = Image.fromarray(img)
    ext = ext.lower()
    if ext == "png":
        pil.save(buf, format="PNG")
    elif ext == "webp":
        pil.save(buf, format="WEBP", lossless=True)
    elif ext in ("jpg", "jpeg"):
        pil.save(buf, format="JPEG", quality=95)
    else:
        pil.save(buf, format=ext.upper())
    return buf.getvalue()


CORRUPT_BYTES = b"\x89PNG\r\n\x1a\n this is not really an image"


def _corrupt_set(corrupt: Mapping[str, Iterable[int]] | None, split: str) -> set[int]:
    return set(corrupt.get(split, ())) if corrupt else set()


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tf.addfile(info, io.BytesIO(data))


def make_wds(root: Path, splits: Mapping[str, int] | None = None, n_classes: int = 3,
             shards: int = 2, image_size: int = 16, ext: str = "png",
             corrupt: Mapping[str, Iterable[int]] | None = None, classnames: bool = True,
             nshards_file: bool = True, seed: int = 0) -> FakeData:
    """CLIP-benchmark-style webdataset: root/classnames.txt, root/<split>/<k>.tar (+nshards.txt).

    Each tar holds `<key>.<ext>` and `<key>.cls` per sample, keys `s0000000`, ...; samples are
    spread over `shards` tars in order. `corrupt={"train": [3]}` writes junk bytes for that
    sample's image (indices in reading order).
    """
    root = Path(root)
    splits = dict(splits or {"train": 12, "test": 6})
    rng = np.random.default_rng(seed)
    names = [f"class {c}" for c in range(n_classes)]
    root.mkdir(parents=True, exist_ok=True)
    if classnames:
        (root / "classnames.txt").write_text("".join(f"{n}\n" for n in names))
    data = FakeData(root, names if classnames else [str(c) for c in range(n_classes)])
    for split, n in splits.items():
        split_dir = root / split
        split_dir.mkdir(parents=True, exist_ok=True)
        labels = balanced_labels(n, n_classes, rng)
        images = [class_image(int(y), n_classes, image_size, rng) for y in labels]
        bad = _corrupt_set(corrupt, split)
        keys: list[str] = []
        chunks = np.array_split(np.arange(n), shards)
        for s, chunk in enumerate(chunks):
            with tarfile.open(split_dir / f"{s}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
                for i in chunk:
                    key = f"s{i:07d}"
                    payload = CORRUPT_BYTES if i in bad else encode(images[i], ext)
                    # members in sorted extension order, as webdataset's TarWriter writes them
                    _add_member(tf, f"{key}.cls", f"{int(labels[i])}".encode())
                    _add_member(tf, f"{key}.{ext}", payload)
                    keys.append(f"{split}/{s}.tar:{key}")
        if nshards_file:
            (split_dir / "nshards.txt").write_text(f"{shards}\n")
        data.splits[split] = FakeSplit(labels, images, keys)
    return data


def make_imagefolder(root: Path, splits: Mapping[str, int] | None = None, n_classes: int = 3,
                     image_size: int = 16, ext: str = "png",
                     class_names: list[str] | None = None,
                     corrupt: Mapping[str, Iterable[int]] | None = None,
                     seed: int = 0) -> FakeData:
    """root/<split>/<class>/<0000>.<ext>; returned in reading order (class, then file name).

    `corrupt` indices refer to that reading order.
    """
    root = Path(root)
    splits = dict(splits or {"train": 12, "test": 6})
    rng = np.random.default_rng(seed)
    names = sorted(class_names or [f"class_{c}" for c in range(n_classes)])
    data = FakeData(root, names)
    for split, n in splits.items():
        labels = np.sort(balanced_labels(n, len(names), rng))
        images = [class_image(int(y), len(names), image_size, rng) for y in labels]
        bad = _corrupt_set(corrupt, split)
        keys: list[str] = []
        for c, cls in enumerate(names):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            idx = np.flatnonzero(labels == c)
            for j, i in enumerate(idx):
                rel = f"{cls}/{j:04d}.{ext}"
                payload = CORRUPT_BYTES if i in bad else encode(images[i], ext)
                (root / split / rel).write_bytes(payload)
                keys.append(f"{split}/{rel}")
        data.splits[split] = FakeSplit(labels, images, keys)
    return data


def make_fer_csv(path: Path, counts: Mapping[str, int] | None = None, seed: int = 0,
                 corrupt_rows: Iterable[int] = (), shuffle: bool = True) -> FakeData:
    """Kaggle-style fer2013.csv (emotion,pixels,Usage) with 48x48 grayscale faces-to-be.

    `counts` maps Usage (Training/PublicTest/PrivateTest) to a row count; rows are interleaved
    when `shuffle`. Returned splits follow featcache's names: train, test (public+private),
    publictest, privatetest, in file order; keys are `<split>/<file name>:<line number>`.
    `corrupt_rows` (0-based data rows) get too few pixel values.
    """
    path = Path(path)
    counts = dict(counts or {"Training": 14, "PublicTest": 7, "PrivateTest": 7})
    rng = np.random.default_rng(seed)
    usages = [u for u in FER_USAGES for _ in range(counts.get(u, 0))]
    if shuffle:
        usages = [usages[i] for i in rng.permutation(len(usages))]
    labels = balanced_labels(len(usages), 7, rng)
    bad = set(corrupt_rows)
    rows = ["emotion,pixels,Usage"]
    per_usage: dict[str, list[tuple[int, np.ndarray, int]]] = {u: [] for u in FER_USAGES}
    for r, (usage, y) in enumerate(zip(usages, labels, strict=True)):
        gray = class_image(int(y), 7, 48, rng)[..., 1]
        values = gray.reshape(-1)[: 100 if r in bad else None]
        rows.append(f"{int(y)},{' '.join(map(str, values.tolist()))},{usage}")
        per_usage[usage].append((int(y), gray, r + 2))  # line 1 is the header
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")
    data = FakeData(path, list(FER_HUB_NAMES))
    to_hub = [next(i for i, h in enumerate(FER_HUB_NAMES) if h.startswith(k[:5]))
              for k in FER_KAGGLE_NAMES]
    groups = {"train": ("Training",), "test": ("PublicTest", "PrivateTest"),
              "publictest": ("PublicTest",), "privatetest": ("PrivateTest",)}
    for split, wanted in groups.items():
        items = sorted((it for u in wanted for it in per_usage[u]), key=lambda it: it[2])
        data.splits[split] = FakeSplit(
            np.array([to_hub[it[0]] for it in items], dtype=np.int64),
            [it[1] for it in items],
            [f"{split}/{path.name}:{it[2]}" for it in items],
        )
    return data


# ---------------------------------------------------------------- torchvision on-disk formats


def _split_images(n: int, n_classes: int, size: int, rng: np.random.Generator,
                  ) -> tuple[np.ndarray, np.ndarray]:
    labels = balanced_labels(n, n_classes, rng)
    images = np.stack([class_image(int(y), n_classes, size, rng) for y in labels])
    return labels, images


def _fake(root: Path, names: list[str], split: str, labels: np.ndarray,
          images: np.ndarray, data: FakeData | None) -> FakeData:
    data = data or FakeData(root, names)
    keys = [f"{split}/{i}" for i in range(len(labels))]
    data.splits[split] = FakeSplit(labels, list(images), keys)
    return data


def make_cifar(root: Path, kind: str = "cifar10", n_train: int = 10, n_test: int = 6,
               seed: int = 0) -> FakeData:
    """torchvision's CIFAR python pickles under root (= featcache's `<data_root>/torchvision`).

    CIFAR-10 train is spread over data_batch_1..5 (n_train may be any size >= 0).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    n_classes = 10 if kind == "cifar10" else 100
    names = [f"{kind}_class_{c}" for c in range(n_classes)]
    if kind == "cifar10":
        folder = root / "cifar-10-batches-py"
        files = {"train": [f"data_batch_{b}" for b in range(1, 6)], "test": ["test_batch"]}
        label_key, meta_name, names_key = "labels", "batches.meta", "label_names"
    else:
        folder = root / "cifar-100-python"
        files = {"train": ["train"], "test": ["test"]}
        label_key, meta_name, names_key = "fine_labels", "meta", "fine_label_names"
    folder.mkdir(parents=True, exist_ok=True)
    data: FakeData | None = None
    for split, n in (("train", n_train), ("test", n_test)):
        labels, images = _split_images(n, n_classes, 32, rng)
        flat = images.transpose(0, 3, 1, 2).reshape(n, -1)
        for fname, idx in zip(files[split], np.array_split(np.arange(n), len(files[split])),
                              strict=True):
            entry = {"batch_label": fname, label_key: labels[idx].tolist(), "data": flat[idx]}
            with open(folder / fname, "wb") as f:
                pickle.dump(entry, f, protocol=2)
        data = _fake(root, names, split, labels, images, data)
    with open(folder / meta_name, "wb") as f:
        pickle.dump({names_key: names}, f, protocol=2)
    assert data is not None
    return data


def make_svhn(root: Path, splits: Mapping[str, int] | None = None, seed: int = 0) -> FakeData:
    """torchvision's SVHN .mat files (X: 32x32x3xN, y: Nx1 with 10 meaning digit 0)."""
    from scipy.io import savemat

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data: FakeData | None = None
    for split, n in dict(splits or {"train": 10, "test": 6}).items():
        labels, images = _split_images(n, 10, 32, rng)
        y = np.where(labels == 0, 10, labels).astype(np.uint8).reshape(-1, 1)
        savemat(str(root / f"{split}_32x32.mat"), {"X": images.transpose(1, 2, 3, 0), "y": y})
        data = _fake(root, [str(c) for c in range(10)], split, labels, images, data)
    assert data is not None
    return data


def make_stl10(root: Path, splits: Mapping[str, int] | None = None, seed: int = 0) -> FakeData:
    """torchvision's STL-10 binaries: <split>_X.bin (column-major 3x96x96), labels 1..10."""
    root = Path(root)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    data: FakeData | None = None
    for split, n in dict(splits or {"train": 10, "test": 6}).items():
        labels, images = _split_images(n, 10, 96, rng)
        # HWC -> stored [c][x][y]
        images.transpose(0, 3, 2, 1).astype(np.uint8).tofile(folder / f"{split}_X.bin")
        (labels + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")
        data = _fake(root, names, split, labels, images, data)
    assert data is not None
    return data


def make_pcam(root: Path, splits: Mapping[str, int] | None = None, seed: int = 0) -> FakeData:
    """torchvision's PCam HDF5 files under root/pcam (x: Nx96x96x3, y: Nx1x1x1)."""
    import h5py

    root = Path(root)
    folder = root / "pcam"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = ["lymph node", "lymph node containing metastatic tumor tissue"]
    part = {"train": "train", "val": "valid", "test": "test"}
    data: FakeData | None = None
    for split, n in dict(splits or {"train": 8, "test": 4}).items():
        labels, images = _split_images(n, 2, 96, rng)
        base = folder / f"camelyonpatch_level_2_split_{part[split]}"
        with h5py.File(f"{base}_x.h5", "w") as f:
            f.create_dataset("x", data=images)
        with h5py.File(f"{base}_y.h5", "w") as f:
            f.create_dataset("y", data=labels.astype(np.uint8).reshape(-1, 1, 1, 1))
        data = _fake(root, names, split, labels, images, data)
    assert data is not None
    return data
