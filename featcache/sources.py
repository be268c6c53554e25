"""Dataset adapters: every image source becomes one map-style `ImageDataset`.

Why one small interface: extraction must know the labels, the size and a content identity of
a split *before* it decodes a single image (to size the Zarr cache and fingerprint it), and
DataLoader workers (fork or spawn) need datasets that pickle cheaply. So every adapter keeps
only paths, offsets and labels; file handles and big arrays are opened lazily per process and
dropped on pickling.

Names accepted by `open_dataset` (see `list_datasets()` / `featcache datasets`):

- the paper's 20 short names (`fer2013`, `cifar10`, `svhn`, ...): the CLIP-benchmark
  webdatasets `clip-benchmark/wds_<x>` on the Hugging Face hub, downloaded once into
  `<data_root>/<name>/`; `hf:OWNER/REPO` does the same for any repo in that layout;
- `wds:PATH`: local tar shards in the hub layout (`PATH/classnames.txt`, `PATH/<split>/N.tar`);
- `imagefolder:PATH`: `PATH/<split>/<class>/<image>`;
- `fer2013csv:PATH`: Kaggle's `fer2013.csv` (or a folder holding it);
- `torchvision:cifar10|cifar100|svhn|stl10|pcam`: torchvision's files under
  `<data_root>/torchvision/` (torchvision downloads them; featcache reads them itself);
- `digits`: scikit-learn's bundled 8x8 handwritten digits, the offline default.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import hashlib
import io
import json
import operator
import os
import pickle
import re
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data
from PIL import Image, UnidentifiedImageError

from featcache import atomic
from featcache.errors import FeatcacheError, warn

__all__ = [
    "DatasetInfo",
    "ImageDataset",
    "default_data_root",
    "list_datasets",
    "open_dataset",
    "parse_splits",
]

HUB_ORG = "clip-benchmark"

# The paper's 20 datasets in its order: short name -> (hub repo suffix, dataset_info.json key).
PAPER_DATASETS: dict[str, tuple[str, str]] = {
    "stl10": ("stl10", "wds/stl10"),
    "cifar10": ("vtab-cifar10", "wds/vtab/cifar10"),
    "caltech101": ("vtab-caltech101", "wds/vtab/caltech101"),
    "voc2007": ("voc2007", "wds/voc2007"),
    "imagenet1k": ("imagenet1k", "wds/imagenet1k"),
    "cifar100": ("vtab-cifar100", "wds/vtab/cifar100"),
    "country211": ("country211", "wds/country211"),
    "pets": ("vtab-pets", "wds/vtab/pets"),
    "flowers": ("vtab-flowers", "wds/vtab/flowers"),
    "cars": ("cars", "wds/cars"),
    "fgvc_aircraft": ("fgvc_aircraft", "wds/fgvc_aircraft"),
    "gtsrb": ("gtsrb", "wds/gtsrb"),
    "svhn": ("vtab-svhn", "wds/vtab/svhn"),
    "pcam": ("vtab-pcam", "wds/vtab/pcam"),
    "eurosat": ("vtab-eurosat", "wds/vtab/eurosat"),
    "resisc45": ("vtab-resisc45", "wds/vtab/resisc45"),
    "diabetic_retinopathy": ("vtab-diabetic_retinopathy", "wds/vtab/diabetic_retinopathy"),
    "dtd": ("vtab-dtd", "wds/vtab/dtd"),
    "fer2013": ("fer2013", "wds/fer2013"),
    "dmlab": ("vtab-dmlab", "wds/vtab/dmlab"),
}

_VTAB_SPLITS = ("train", "val", "trainval", "test")
_VTAB_TEXT = ("; VTAB's splits, as the paper: train = the first 90 % of the official train "
              "split in TFDS's order ({n}), val = the other 10 %, trainval = all, test = the "
              "official test")
TORCHVISION_DATASETS: dict[str, tuple[tuple[str, ...], int, str]] = {
    # name -> (splits, number of classes, description)
    "cifar10": (("train", "test"), 10, "CIFAR-10, the official full train split (50,000; "
                "not the paper's: see vtab-cifar10)"),
    "cifar100": (("train", "test"), 100, "CIFAR-100, fine labels, the official full train "
                 "split (50,000; not the paper's: see vtab-cifar100)"),
    "svhn": (("train", "test", "extra"), 10, "SVHN cropped digits, the official full train "
             "split (73,257; not the paper's: see vtab-svhn)"),
    "vtab-cifar10": (_VTAB_SPLITS, 10, "CIFAR-10" + _VTAB_TEXT.format(n="45,000")),
    "vtab-cifar100": (_VTAB_SPLITS, 100, "CIFAR-100" + _VTAB_TEXT.format(n="45,000")),
    "vtab-svhn": (_VTAB_SPLITS, 10, "SVHN" + _VTAB_TEXT.format(n="65,931") +
                  " (which images is exact; their order may differ, see docs/method.md)"),
    "stl10": (("train", "test"), 10, "STL-10 labelled splits (torchvision's binaries)"),
    "pcam": (("train", "val", "test"), 2, "PatchCamelyon (torchvision's HDF5 files)"),
}

# The hub's classes (`clip-benchmark/wds_fer2013`, CLIP_benchmark's class names: its
# ImageFolder's alphabetical folders), which the paper used; Kaggle's CSV numbers the same
# emotions angry, disgust, fear, happy, sad, surprise, neutral. Kaggle id -> hub id:
FER2013_CLASSES = ["angry", "disgusted", "fearful", "happy", "neutral", "sad", "surprised"]
FER2013_FROM_KAGGLE = (0, 1, 2, 3, 5, 6, 4)
# FER2013 splits. "test" = PublicTest + PrivateTest, as in torchvision's FER2013 and the
# CLIP benchmark (hence the paper); the Kaggle val/test protocol uses the two halves.
FER2013_SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("Training",),
    "test": ("PublicTest", "PrivateTest"),
    "publictest": ("PublicTest",),
    "privatetest": ("PrivateTest",),
}

PCAM_CLASSES = ["lymph node", "lymph node containing metastatic tumor tissue"]
DIGITS_SPLITS = ("train", "test")
IMAGE_EXTENSIONS = frozenset(
    {"webp", "jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm"}
)
LABEL_EXTENSION = "cls"
INDEX_SUFFIX = ".featcache-index.json"
_INDEX_FORMAT = "featcache-tar-index/1"
_PREFIXES = ("wds", "imagefolder", "fer2013csv", "torchvision", "hf")
_SPLIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


# --------------------------------------------------------------------------- public helpers


def default_data_root() -> Path:
    """Where datasets are downloaded: $FEATCACHE_DATA, else the user's cache dir (XDG)."""
    env = os.environ.get("FEATCACHE_DATA")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "featcache" / "data"


def parse_splits(text: str) -> list[str]:
    """Turn "train,test" into ["train", "test"]; order kept, duplicates dropped, names checked."""
    out: list[str] = []
    for part in str(text).split(","):
        split = part.strip()
        if not split:
            continue
        _check_split_name(split)
        if split not in out:
            out.append(split)
    if not out:
        raise FeatcacheError(f"no split named in {text!r}; give e.g. 'train,test'")
    return out


@dataclass(frozen=True)
class DatasetInfo:
    """One row of `featcache datasets`: what a name means and where its data comes from."""

    name: str
    source: str
    description: str
    n_classes: int | None
    domain: str | None
    paper: bool
    display_name: str | None = None  # the paper's spelling, e.g. "FER2013" (for the report)
    n_train: int | None = None


def list_datasets() -> list[DatasetInfo]:
    """Every name `open_dataset` knows, paper datasets first; PATH forms shown as templates."""
    info = _dataset_info_json()
    rows: list[DatasetInfo] = []
    for short, (suffix, key) in PAPER_DATASETS.items():
        meta = info.get(key, {})
        display = meta.get("name") or short
        rows.append(
            DatasetInfo(
                name=short,
                source=f"hf:{HUB_ORG}/wds_{suffix}",
                description=f"{display}: CLIP-benchmark webdataset, downloaded on first use",
                n_classes=meta.get("nr_classes"),
                domain=meta.get("domain"),
                paper=True,
                display_name=display,
                n_train=meta.get("nr_train_samples"),
            )
        )
    rows.append(
        DatasetInfo(
            name="digits",
            source="sklearn",
            description="scikit-learn's bundled 8x8 handwritten digits (1797 images, offline); "
            "stratified 75/25 train/test split",
            n_classes=10,
            domain=None,
            paper=False,
            display_name="Digits",
            n_train=1347,
        )
    )
    for tv_name, (splits, n_classes, text) in TORCHVISION_DATASETS.items():
        rows.append(
            DatasetInfo(
                name=f"torchvision:{tv_name}",
                source="torchvision",
                description=f"{text}; splits {', '.join(splits)}",
                n_classes=n_classes,
                domain=None,
                paper=False,
            )
        )
    templates = [
        ("wds:PATH", "local tar shards: PATH/classnames.txt, PATH/<split>/0.tar, 1.tar, ..."),
        ("imagefolder:PATH", "PATH/<split>/<class>/<image>; classes from the train split"),
        ("fer2013csv:PATH", "Kaggle's fer2013.csv with the hub's class order (as the paper); "
                            "splits train, test (=public+private), "
                            "publictest, privatetest"),
        ("hf:OWNER/REPO", "any hub dataset repo in the CLIP-benchmark webdataset layout"),
    ]
    for name, text in templates:
        source = "hf" if name.startswith("hf:") else "local"
        rows.append(DatasetInfo(name, source, text, n_classes=None, domain=None, paper=False))
    return rows


def datasets() -> list[dict[str, Any]]:
    """`featcache datasets`: every name `open_dataset` knows, as rows."""
    from dataclasses import asdict

    return [asdict(d) for d in list_datasets()]


# --------------------------------------------------------------------------- the dataset type


class ImageDataset(torch.utils.data.Dataset):
    """A split of a labelled image dataset: labels up front, images decoded on demand.

    Subclasses fill `name`, `split`, `class_names`, `labels`, `identity` in `__init__` and
    implement `_read(i)` and `key(i)`. Attributes named in `_transient` are per-process caches
    (open files, big arrays) that are dropped when pickled and rebuilt lazily.

    `identity` is JSON-able: `source`, `location`, `split`, `n`, `n_classes` and `sha256`, a
    cheap content hash (file names and sizes, sample keys, labels, class names), so changed
    data changes a cache fingerprint. `location` is where the data comes from: the user's path
    for wds:/imagefolder:/fer2013csv:, but the hub URL or torchvision class for downloaded
    datasets, so moving the data root does not invalidate caches. `root` (not part of the
    identity) is the local folder or file the data is read from.
    `transform`, if set, is applied by `__getitem__` only (never by `load`).
    """

    name: str
    split: str
    class_names: list[str]
    labels: np.ndarray
    identity: dict[str, Any]
    root: Path | None = None
    transform: Callable[[Image.Image], Any] | None = None
    _transient: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(len(self.labels))

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def key(self, i: int) -> str:
        """A human id for sample i, used in messages (e.g. 'train/3.tar:s0000123')."""
        raise NotImplementedError

    def _read(self, i: int) -> Image.Image:
        raise NotImplementedError

    def load(self, i: int) -> Image.Image:
        """Decode sample i as an RGB image; any failure becomes a FeatcacheError naming it."""
        i = self._check_index(i)
        try:
            img = self._read(i)
            img.load()
            return _to_rgb(img)
        except FeatcacheError:
            raise
        except Exception as exc:
            if isinstance(exc, UnidentifiedImageError):
                reason = "not a readable image (corrupt, or a format PIL does not know)"
            else:
                reason = f"{type(exc).__name__}: {exc}"
            raise FeatcacheError(f"{self.name}: cannot read image {self.key(i)!r} (split "
                                 f"{self.split!r}, index {i}): {reason}") from exc

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img = self.load(i)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for attr in self._transient:
            state.pop(attr, None)
        return state

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, "
                f"n={len(self)}, classes={self.n_classes})")

    def _check_index(self, i: int) -> int:
        i = operator.index(i)
        if not 0 <= i < len(self.labels):
            raise IndexError(f"index {i} out of range for {self.name} {self.split} "
                             f"({len(self.labels)} samples)")
        return i

    def _set_identity(self, source: str, location: str, parts: Iterable[Any],
                      **extra: Any) -> None:
        """Hash what defines the content (plus labels and class names) into `identity`."""
        h = hashlib.sha256()
        for part in parts:
            h.update(repr(part).encode("utf-8", "surrogateescape"))
            h.update(b"\0")
        h.update(json.dumps(self.class_names).encode())
        h.update(np.ascontiguousarray(self.labels, dtype="<i8").tobytes())
        self.identity = {
            "source": source,
            "location": location,
            "split": self.split,
            "n": len(self),
            "n_classes": self.n_classes,
            **extra,
            "sha256": h.hexdigest(),
        }


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB for every model; palette transparency goes through RGBA to avoid PIL's warning.

    High bit depths are scaled, not clipped (PIL's own conversion turns a 16-bit PNG white
    and a [0, 1] float TIFF black): 16-bit integers by 255/65535; 32-bit integers by the
    smallest of 8/16/32-bit ranges that holds the image; floats in [0, 1] by 255, in
    [0, 255] as they are, anything else from its own min..max."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(img)), mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def _to_uint8(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind in "iu":
        top = int(values.max(initial=0))
        scale = next(r for r in (255, 65535, 2**32 - 1) if top <= r)
        return np.rint(values.astype(np.float64) * (255.0 / scale)).clip(0, 255).astype(np.uint8)
    values = np.nan_to_num(values.astype(np.float64))
    low, high = float(values.min(initial=0.0)), float(values.max(initial=0.0))
    if low >= 0.0 and high <= 1.0:
        out = values * 255.0
    elif low >= 0.0 and high <= 255.0:
        out = values
    else:
        out = (values - low) * (255.0 / max(high - low, 1e-12))
    return np.rint(out).clip(0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- webdataset tars


def _natural_key(text: str) -> list[Any]:
    """Sort '2.tar' before '10.tar' (shards in numeric order)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text) if t]


def _split_member(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the basename."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{head}/{stem}" if head else stem
    return key, ext.lower() if dot else ""


def _index_tar(path: Path) -> list[list[Any]]:
    """Scan one uncompressed tar: [key, data offset, size, label, ext] per sample, in order.

    Only headers and the tiny .cls members are read; images are never touched. Members of one
    sample are consecutive and share a key (webdataset's grouping).
    """
    samples: list[list[Any]] = []
    current: dict[str, Any] | None = None

    def finish(group: dict[str, Any] | None) -> None:
        if group is None or (group["image"] is None and group["label"] is None):
            return  # a sample without image or label (e.g. metadata): not ours
        if group["image"] is None:
            raise FeatcacheError(f"{path}: sample {group['key']!r} has a .cls label but no "
                                 f"image (one of {', '.join(sorted(IMAGE_EXTENSIONS))})")
        if group["label"] is None:
            raise FeatcacheError(f"{path}: sample {group['key']!r} has an image but no .cls label")
        offset, size, ext = group["image"]
        samples.append([group["key"], offset, size, group["label"], ext])

    try:
        with tarfile.open(path, mode="r:") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                key, ext = _split_member(member.name)
                if current is None or key != current["key"]:
                    finish(current)
                    current = {"key": key, "image": None, "label": None}
                if ext == LABEL_EXTENSION:
                    fobj = tf.extractfile(member)
                    raw = fobj.read() if fobj is not None else b""
                    try:
                        current["label"] = int(raw.decode("utf-8").strip())
                    except ValueError:
                        raise FeatcacheError(f"{path}: sample {key!r} has a .cls that is not an "
                                             f"integer: {raw[:40]!r}") from None
                elif ext in IMAGE_EXTENSIONS and current["image"] is None:
                    current["image"] = (member.offset_data, member.size, ext)
            finish(current)
    except (tarfile.TarError, EOFError) as exc:
        raise FeatcacheError(f"cannot index tar shard {path}: {exc} (featcache needs "
                             "uncompressed .tar shards so it can seek to each image)") from exc
    return samples


def _load_or_build_index(path: Path) -> list[list[Any]]:
    """The shard's sample index, cached next to it (rebuilt if the tar's size or mtime moved)."""
    st = path.stat()
    cache = path.with_name(path.name + INDEX_SUFFIX)
    try:
        saved = json.loads(cache.read_text())
        if (saved.get("format") == _INDEX_FORMAT and saved.get("size") == st.st_size
                and saved.get("mtime_ns") == st.st_mtime_ns):
            return saved["samples"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    samples = _index_tar(path)
    payload = {"format": _INDEX_FORMAT, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
               "samples": samples}
    with contextlib.suppress(OSError):  # a read-only dataset is simply indexed again next time
        atomic.write_text(cache, json.dumps(payload, separators=(",", ":")))
    return samples


def _tar_splits(root: Path) -> list[str]:
    """Split names under a webdataset root: subfolders that hold at least one .tar."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and any(p.glob("*.tar")))


def _read_classnames(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _nshards(split_dir: Path) -> int | None:
    """The shard count `<split>/nshards.txt` names, or None without a (readable) one."""
    try:
        return int((split_dir / "nshards.txt").read_text().strip())
    except (OSError, ValueError):
        return None


def _split_shards(split_dir: Path, name: str) -> list[Path]:
    """The shards of a split. With `nshards.txt`, exactly 0.tar … (N-1).tar, CLIP_benchmark's
    rule (any other .tar there is not part of the split); without it, every .tar in numeric
    order."""
    if not split_dir.is_dir():
        return []
    expected = _nshards(split_dir)
    if expected is None:
        return sorted((p for p in split_dir.glob("*.tar") if p.is_file()),
                      key=lambda p: _natural_key(p.name))
    shards = [split_dir / f"{k}.tar" for k in range(expected)]
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise FeatcacheError(f"{name}: {split_dir / 'nshards.txt'} names {expected} shards "
                             f"(0.tar … {expected - 1}.tar) but {len(missing)} are missing "
                             f"({', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}); "
                             "the download looks incomplete (run again online to finish it)")
    return shards


class WebDataset(ImageDataset):
    """Hub-style tar shards: `root/classnames.txt`, `root/<split>/0.tar, 1.tar, ...`.

    Order: shards in numeric order (exactly those `nshards.txt` names, when it exists),
    samples in tar order. Labels come from the `.cls` members
    read while indexing. Without classnames.txt the classes are "0".."C-1", C = 1 + the largest
    label over *all* splits present (so every split agrees).
    """

    def __init__(self, root: Path, split: str, name: str, source: str = "wds",
                 location: str | None = None, **identity_extra: Any) -> None:
        self.root = Path(root)
        self.name = name
        self.split = split
        split_dir = self.root / split
        shards = _split_shards(split_dir, name)
        if not shards:
            available = _tar_splits(self.root)
            if available:
                raise FeatcacheError(f"{name}: no split {split!r} (no {split_dir}/*.tar); "
                                     f"available splits: {', '.join(available)}")
            raise FeatcacheError(f"{name}: no tar shards under {self.root} (expected "
                                 f"{split_dir}/0.tar, ... and {self.root}/classnames.txt)")
        self.shards = [p.name for p in shards]
        keys: list[str] = []
        shard_of: list[int] = []
        offsets: list[int] = []
        sizes: list[int] = []
        labels: list[int] = []
        digest_parts: list[Any] = []
        for s, path in enumerate(shards):
            samples = _load_or_build_index(path)
            digest_parts.append((path.name, path.stat().st_size, len(samples)))
            for key, offset, size, label, _ext in samples:
                keys.append(key)
                shard_of.append(s)
                offsets.append(offset)
                sizes.append(size)
                labels.append(label)
        if not labels:
            raise FeatcacheError(f"{name}: the shards in {split_dir} hold no samples "
                                 "(expected <key>.<image ext> + <key>.cls members)")
        self.labels = np.asarray(labels, dtype=np.int64)
        self._keys = np.array([k.encode("utf-8", "surrogateescape") for k in keys], dtype=bytes)
        self._shard_of = np.asarray(shard_of, dtype=np.int32)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._sizes = np.asarray(sizes, dtype=np.int64)

        names = _read_classnames(self.root / "classnames.txt")
        if names is None:
            top = int(self.labels.max(initial=-1))
            for other in _tar_splits(self.root):
                if other != split:
                    for p in (self.root / other).glob("*.tar"):
                        top = max([top] + [int(smp[3]) for smp in _load_or_build_index(p)])
            names = [str(c) for c in range(top + 1)]
        self.class_names = names
        bad = np.flatnonzero((self.labels < 0) | (self.labels >= len(names)))
        if bad.size:
            i = int(bad[0])
            raise FeatcacheError(f"{name}: sample {self.key(i)!r} has label {self.labels[i]} "
                                 f"but {self.root / 'classnames.txt'} lists {len(names)} classes")
        digest_parts.append(self._keys.tobytes())
        self._set_identity(source, location or str(self.root), digest_parts, **identity_extra)

    def key(self, i: int) -> str:
        shard = self.shards[int(self._shard_of[i])]
        return f"{self.split}/{shard}:{self._keys[i].decode('utf-8', 'surrogateescape')}"

    def _read(self, i: int) -> Image.Image:
        path = self.root / self.split / self.shards[int(self._shard_of[i])]
        size = int(self._sizes[i])
        with open(path, "rb") as f:
            f.seek(int(self._offsets[i]))
            data = f.read(size)
        if len(data) != size:
            raise FeatcacheError(f"{self.name}: {path} is shorter than its index says (image "
                                 f"{self.key(i)!r}, split {self.split!r}); was it modified?")
        return Image.open(io.BytesIO(data))


# --------------------------------------------------------------------------- image folders


def _is_image_file(name: str) -> bool:
    return name.rpartition(".")[2].lower() in IMAGE_EXTENSIONS and not name.startswith(".")


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _walk_images(class_dir: Path, split_dir: Path, name: str) -> list[tuple[str, int]]:
    """(path relative to the split, size) of every image file under a class folder, in
    order. An unreadable folder, a broken or looping symbolic link is an error naming it:
    a silently skipped folder would leave its class short of images."""
    def refuse(exc: OSError) -> None:
        raise FeatcacheError(f"{name}: cannot read folder {exc.filename}: {exc.strerror}; fix "
                             "its permissions (or remove it)")

    found: list[tuple[str, int]] = []
    for dirpath, dirnames, filenames in os.walk(class_dir, onerror=refuse):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, split_dir)
        for fname in filenames:
            if not _is_image_file(fname):
                continue
            full = os.path.join(dirpath, fname)
            try:
                size = os.stat(full).st_size
            except OSError as exc:
                kind = ("a symbolic link that loops" if exc.errno == errno.ELOOP
                        else "a broken symbolic link" if os.path.islink(full)
                        else f"unreadable ({exc.strerror})")
                raise FeatcacheError(f"{name}: {full} is {kind}; fix or remove it") from None
            found.append((os.path.join(rel_dir, fname).replace(os.sep, "/"), size))
    found.sort()
    return found


class ImageFolderDataset(ImageDataset):
    """`root/<split>/<class>/<images>` (sub-folders inside a class are walked too).

    Classes: the sorted class folders of the `train` split, so every split shares label ids; a
    class folder in another split that train lacks is an error. Without a `train` split the
    classes are the sorted union over all splits. Order: by class, then by relative path.
    """

    def __init__(self, root: Path, split: str, name: str) -> None:
        self.root = Path(root)
        self.name = name
        self.split = split
        if not self.root.is_dir():
            raise FeatcacheError(f"{name}: folder {self.root} does not exist (expected "
                                 f"{self.root}/<split>/<class>/<image files>)")
        splits = sorted(p.name for p in self.root.iterdir()
                        if p.is_dir() and not p.name.startswith("."))
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise FeatcacheError(f"{name}: no split {split!r} (no folder {split_dir}); "
                                 f"available splits: {', '.join(splits) or 'none'}")
        class_root = self.root / "train" if (self.root / "train").is_dir() else split_dir
        if (self.root / "train").is_dir():
            classes = _class_dirs(self.root / "train")
            extra = sorted(set(_class_dirs(split_dir)) - set(classes))
            if extra:
                raise FeatcacheError(f"{name}: split {split!r} has class folders that train "
                                     f"lacks: {', '.join(extra)} (classes come from "
                                     f"{self.root / 'train'})")
        else:
            classes = sorted({c for s in splits for c in _class_dirs(self.root / s)})
        if not classes:
            raise FeatcacheError(f"{name}: no class folders in {split_dir} (expected "
                                 f"{split_dir}/<class>/<image files>)")
        if len(classes) < 2:
            raise FeatcacheError(f"{name}: one class folder ({classes[0]!r}) in {class_root}; "
                                 "a probe needs at least 2 classes")
        self.class_names = classes
        relpaths: list[str] = []
        labels: list[int] = []
        digest: list[Any] = []
        empty: list[str] = []
        for label, cls in enumerate(classes):
            class_dir = split_dir / cls
            if not class_dir.is_dir():
                continue
            found = _walk_images(class_dir, split_dir, name)
            if not found:
                empty.append(cls)
            for rel, size in found:
                relpaths.append(rel)
                labels.append(label)
                digest.append((rel, size))
        if empty and split == "train":
            more = f" (nor do {len(empty) - 1} more)" if len(empty) > 1 else ""
            raise FeatcacheError(f"{name}: class folder {split_dir / empty[0]} holds no image "
                                 f"files{more}; add images or remove the folder (an empty "
                                 "class would be a class the probe never sees)")
        if empty:
            warn(f"{name}: split {split!r} has no images of class(es) "
                 f"{', '.join(repr(c) for c in empty[:5])}; their test accuracy is not defined")
        if not relpaths:
            raise FeatcacheError(f"{name}: no image files in {split_dir}/<class>/ (extensions: "
                                 f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
        self.labels = np.asarray(labels, dtype=np.int64)
        self._relpaths = np.array([os.fsencode(r) for r in relpaths], dtype=bytes)
        self._set_identity("imagefolder", str(self.root), digest)

    def key(self, i: int) -> str:
        return f"{self.split}/{os.fsdecode(self._relpaths[i])}"

    def _read(self, i: int) -> Image.Image:
        # read the bytes first so no file handle outlives a failed decode
        path = self.root / self.split / os.fsdecode(self._relpaths[i])
        return Image.open(io.BytesIO(path.read_bytes()))


# --------------------------------------------------------------------------- FER2013 CSV


def _find_fer_csv(path: Path) -> Path:
    if path.is_file():
        return path
    candidates = [path / "fer2013.csv", path / "icml_face_data.csv",
                  path / "fer2013" / "fer2013.csv", path / "fer2013" / "icml_face_data.csv"]
    for cand in candidates:
        if cand.is_file():
            return cand
    raise FeatcacheError("FER2013 CSV not found; looked for " + ", ".join(map(str, candidates))
                         + " (Kaggle's 'challenges-in-representation-learning-facial-expression-"
                         "recognition-challenge' fer2013.csv)")


class FerCsvDataset(ImageDataset):
    """Kaggle's FER2013 CSV (columns emotion, pixels, Usage; icml_face_data.csv works too).

    Labels and class names are the hub's (angry, disgusted, fearful, happy, neutral, sad,
    surprised), not Kaggle's numbering, so a CSV run compares with hub runs and the paper.

    Splits: `train` = Training (28,709); `test` = PublicTest + PrivateTest (7,178), which is
    what torchvision's FER2013 and the CLIP benchmark (so the paper) use; `publictest` and
    `privatetest` give the halves for the Kaggle val/test protocol. Only byte offsets of the
    rows are kept; a row's 48x48 pixels are parsed when loaded.
    """

    def __init__(self, path: Path, split: str, name: str) -> None:
        if split not in FER2013_SPLITS:
            raise FeatcacheError(f"{name}: no split {split!r}; available splits: "
                                 f"{', '.join(FER2013_SPLITS)}")
        self.path = self.root = _find_fer_csv(Path(path))
        self.name = name
        self.split = split
        self.class_names = list(FER2013_CLASSES)
        wanted = {u.lower() for u in FER2013_SPLITS[split]}
        offsets: list[int] = []
        lines: list[int] = []
        labels: list[int] = []
        with open(self.path, "rb") as f:
            header = [h.strip().strip('"').lower() for h in f.readline().decode().split(",")]
            try:
                self._col_emotion = header.index("emotion")
                self._col_pixels = header.index("pixels")
                col_usage = header.index("usage")
            except ValueError:
                raise FeatcacheError(f"{self.path}: expected columns emotion, pixels, Usage; "
                                     f"found {', '.join(header)}") from None
            pos = f.tell()
            for lineno, raw in enumerate(f, start=2):
                start, pos = pos, pos + len(raw)
                if not raw.strip():
                    continue
                fields = raw.split(b",")
                if len(fields) != len(header):
                    raise FeatcacheError(f"{self.path}:{lineno}: expected {len(header)} fields, "
                                         f"found {len(fields)}")
                usage = fields[col_usage].strip().strip(b'"').decode().lower()
                if usage not in wanted:
                    continue
                try:
                    label = int(fields[self._col_emotion].strip().strip(b'"'))
                except ValueError:
                    raise FeatcacheError(f"{self.path}:{lineno}: emotion is not an integer: "
                                         f"{fields[self._col_emotion][:20]!r}") from None
                if not 0 <= label < len(FER2013_CLASSES):
                    raise FeatcacheError(f"{self.path}:{lineno}: emotion {label} is outside "
                                         f"0..{len(FER2013_CLASSES) - 1}")
                offsets.append(start)
                lines.append(lineno)
                labels.append(FER2013_FROM_KAGGLE[label])
        if not labels:
            raise FeatcacheError(f"{self.path}: no rows with Usage in "
                                 f"{', '.join(FER2013_SPLITS[split])} (split {split!r})")
        self.labels = np.asarray(labels, dtype=np.int64)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._lines = np.asarray(lines, dtype=np.int64)
        st = self.path.stat()
        self._set_identity("fer2013csv", str(self.path),
                           [(self.path.name, st.st_size), self._offsets.tobytes()])

    def key(self, i: int) -> str:
        return f"{self.split}/{self.path.name}:{int(self._lines[i])}"

    def _read(self, i: int) -> Image.Image:
        with open(self.path, "rb") as f:
            f.seek(int(self._offsets[i]))
            fields = f.readline().split(b",")
        values = np.array(fields[self._col_pixels].strip().strip(b'"').split(), dtype=np.int64)
        if values.size != 48 * 48 or values.min(initial=0) < 0 or values.max(initial=0) > 255:
            raise ValueError(f"expected 2304 pixel values in 0..255, got {values.size} values")
        return Image.fromarray(values.astype(np.uint8).reshape(48, 48), mode="L")


# --------------------------------------------------------------------------- arrays in memory


class ArrayDataset(ImageDataset):
    """Images held as a uint8 array (N, H, W) or (N, H, W, 3), possibly loaded lazily.

    Subclasses that read big files set `_images` to None and implement `_load_images()`;
    the array is then a per-process cache that pickling drops (workers reload it).
    """

    _transient = ("_images",)

    def __init__(self, name: str, split: str, class_names: list[str], labels: np.ndarray,
                 images: np.ndarray | None, keys: list[str] | None = None) -> None:
        self.name = name
        self.split = split
        self.class_names = list(class_names)
        self.labels = np.asarray(labels, dtype=np.int64)
        self._images = images
        self._keys = keys

    def _load_images(self) -> np.ndarray:
        raise NotImplementedError

    def key(self, i: int) -> str:
        return f"{self.split}/{self._keys[i] if self._keys is not None else i}"

    def _read(self, i: int) -> Image.Image:
        if getattr(self, "_images", None) is None:
            self._images = self._load_images()
        return Image.fromarray(np.ascontiguousarray(self._images[i]))


class DigitsDataset(ArrayDataset):
    """scikit-learn's 8x8 digits (values 0..16 -> 0..255), a fixed stratified 75/25 split.

    The images are tiny (115 kB in all), so they are kept and pickled with the dataset.
    """

    _transient = ()

    def __init__(self, split: str) -> None:
        if split not in DIGITS_SPLITS:
            raise FeatcacheError(f"digits: no split {split!r}; available splits: "
                                 f"{', '.join(DIGITS_SPLITS)}")
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        bunch = load_digits()
        images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        target = np.asarray(bunch.target, dtype=np.int64)
        train_idx, test_idx = train_test_split(np.arange(len(target)), test_size=0.25,
                                               stratify=target, random_state=0)
        idx = np.sort(train_idx if split == "train" else test_idx)
        super().__init__("digits", split, [str(c) for c in range(10)], target[idx], images[idx],
                         keys=[str(int(j)) for j in idx])
        self._set_identity("sklearn", "sklearn.datasets.load_digits",
                           [idx.tobytes(), self._images.tobytes()])


# --------------------------------------------------------------------------- torchvision files


def _unpickle(path: Path) -> dict[str, Any]:
    """CIFAR's python pickles (written by Python 2: latin1), keys normalised to str."""
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in entry.items()}


_CIFAR = {  # name -> (folder, {split: files}, label key, meta file, class-name key)
    "cifar10": ("cifar-10-batches-py",
                {"train": [f"data_batch_{b}" for b in range(1, 6)], "test": ["test_batch"]},
                "labels", "batches.meta", "label_names"),
    "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]},
                 "fine_labels", "meta", "fine_label_names"),
}
_SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat", "extra": "extra_32x32.mat"}
_STL10_FILES = {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin")}
_PCAM_FILES = {"train": "train", "val": "valid", "test": "test"}


def tfds_order(n: int, split: str) -> np.ndarray:
    """The order TensorFlow Datasets stores examples 0..n-1 of a split in: by the MD5 of
    the split name followed by the example's key (CIFAR's and SVHN's builders key each
    example by its position in the original files), ascending. VTAB's train split is the
    first 90 % of this order. Checked against published TFDS CIFAR-10 ids in the tests."""
    salt = split.encode()
    keys = [int(hashlib.md5(salt + str(i).encode()).hexdigest(), 16) for i in range(n)]
    return np.asarray(sorted(range(n), key=keys.__getitem__), dtype=np.int64)


def vtab_rows(n: int, split: str) -> np.ndarray:
    """Rows of the original files in a VTAB split (train/val/trainval of the official train
    split, or test of the official test split), in TFDS's order."""
    if split == "test":
        return tfds_order(n, "test")
    order = tfds_order(n, "train")
    cut = 90 * n // 100  # task_adaptation: "train[:{}]".format(90 * n // 100)
    return {"train": order[:cut], "val": order[cut:], "trainval": order}[split]


def _tv_files(tv_name: str, root: Path, split: str) -> list[Path]:
    """The files a torchvision dataset's split needs, laid out as torchvision writes them."""
    if tv_name.startswith("vtab-"):
        return _tv_files(tv_name.removeprefix("vtab-"), root,
                         "test" if split == "test" else "train")
    if tv_name in _CIFAR:
        folder, files, _, meta, _ = _CIFAR[tv_name]
        return [root / folder / f for f in [*files[split], meta]]
    if tv_name == "svhn":
        return [root / _SVHN_FILES[split]]
    if tv_name == "stl10":
        return [root / "stl10_binary" / f for f in _STL10_FILES[split]]
    if tv_name == "pcam":
        part = _PCAM_FILES[split]
        return [root / "pcam" / f"camelyonpatch_level_2_split_{part}_{xy}.h5" for xy in "xy"]
    raise KeyError(tv_name)


def _tv_download(tv_name: str, root: Path, split: str) -> None:
    """Let torchvision fetch (and md5-check) its files; featcache then reads them itself."""
    import torchvision.datasets as tvd

    if tv_name.startswith("vtab-"):
        tv_name, split = tv_name.removeprefix("vtab-"), "test" if split == "test" else "train"
    root.mkdir(parents=True, exist_ok=True)
    if tv_name == "cifar10":
        tvd.CIFAR10(str(root), train=split == "train", download=True)
    elif tv_name == "cifar100":
        tvd.CIFAR100(str(root), train=split == "train", download=True)
    elif tv_name == "svhn":
        tvd.SVHN(str(root), split=split, download=True)
    elif tv_name == "stl10":
        tvd.STL10(str(root), split=split, download=True)
    elif tv_name == "pcam":
        tvd.PCAM(str(root), split=split, download=True)


class TorchvisionDataset(ArrayDataset):
    """torchvision's on-disk files for CIFAR-10/100, SVHN, STL-10 and PCam, read directly.

    Reading the files ourselves (rather than through torchvision's classes) gets labels
    without touching pixels for STL-10 and PCam, keeps pickles small (arrays are reloaded
    per worker, HDF5 files reopened per process) and skips torchvision's md5 pass on every
    open; torchvision still does the downloading and checks md5 then.
    """

    _transient = ("_images", "_h5")

    def __init__(self, tv_name: str, root: Path, split: str) -> None:
        name = f"torchvision:{tv_name}"
        vtab = tv_name.startswith("vtab-")
        self.tv_name = tv_name.removeprefix("vtab-")
        self.root = Path(root)
        self.files = _tv_files(tv_name, self.root, split)
        file_split = ("test" if split == "test" else "train") if vtab else split
        labels, class_names, images = self._labels_and_names(file_split)
        # VTAB: a subset of the official split's rows, in TFDS's order
        self._rows = vtab_rows(len(labels), split) if vtab else None
        if self._rows is not None:
            labels = labels[self._rows]
            images = None if images is None else images[self._rows]
        super().__init__(name, split, class_names, labels, images)
        self._h5 = None
        self._set_identity("torchvision", name,
                           [(str(p.relative_to(self.root)), p.stat().st_size)
                            for p in self.files]
                           + ([self._rows.tobytes()] if self._rows is not None else []))

    def _file_row(self, i: int) -> int:
        """Sample i's row in the original files."""
        return int(self._rows[i]) if self._rows is not None else int(i)

    def _labels_and_names(self, split: str) -> tuple[np.ndarray, list[str], np.ndarray | None]:
        if self.tv_name in _CIFAR:
            _, _, label_key, _, names_key = _CIFAR[self.tv_name]
            entries = [_unpickle(p) for p in self.files[:-1]]
            labels = np.concatenate([np.asarray(e[label_key], dtype=np.int64) for e in entries])
            names = [str(n) for n in _unpickle(self.files[-1])[names_key]]
            return labels, names, self._cifar_images(entries)
        if self.tv_name == "svhn":
            from scipy.io import loadmat

            y = loadmat(str(self.files[0]), variable_names=["y"])["y"]
            return np.asarray(y, dtype=np.int64).reshape(-1) % 10, [str(c) for c in range(10)], None
        if self.tv_name == "stl10":
            labels = np.fromfile(self.files[1], dtype=np.uint8).astype(np.int64) - 1
            names_file = self.files[0].parent / "class_names.txt"
            names = _read_classnames(names_file) or [str(c) for c in range(10)]
            expected = labels.size * 3 * 96 * 96
            if self.files[0].stat().st_size != expected:
                raise FeatcacheError(f"{self.files[0]} has {self.files[0].stat().st_size} bytes; "
                                     f"{labels.size} labels need {expected}")
            return labels, names, None
        import h5py

        with h5py.File(self.files[1], "r") as f:
            labels = np.asarray(f["y"][...], dtype=np.int64).reshape(-1)
        return labels, list(PCAM_CLASSES), None

    @staticmethod
    def _cifar_images(entries: list[dict[str, Any]]) -> np.ndarray:
        data = np.concatenate([np.asarray(e["data"], dtype=np.uint8) for e in entries])
        return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)

    def _load_images(self) -> np.ndarray:
        if self.tv_name in _CIFAR:
            images = self._cifar_images([_unpickle(p) for p in self.files[:-1]])
        else:
            from scipy.io import loadmat

            x = loadmat(str(self.files[0]), variable_names=["X"])["X"]  # (32, 32, 3, N)
            images = np.transpose(x, (3, 0, 1, 2))
        return np.ascontiguousarray(images if self._rows is None else images[self._rows])

    def key(self, i: int) -> str:
        return f"{self.split}/{self._file_row(i)}"

    def _read(self, i: int) -> Image.Image:
        if self.tv_name == "stl10":
            n = 3 * 96 * 96
            with open(self.files[0], "rb") as f:
                f.seek(self._file_row(i) * n)
                raw = np.frombuffer(f.read(n), dtype=np.uint8)
            # stored channel-major and column-major: [c][x][y] -> [y][x][c]
            return Image.fromarray(np.ascontiguousarray(raw.reshape(3, 96, 96).transpose(2, 1, 0)))
        if self.tv_name == "pcam":
            h5 = getattr(self, "_h5", None)
            if h5 is None or h5[0] != os.getpid():
                import h5py

                h5 = self._h5 = (os.getpid(), h5py.File(self.files[0], "r"))
            return Image.fromarray(np.asarray(h5[1]["x"][self._file_row(i)], dtype=np.uint8))
        return super()._read(i)


# --------------------------------------------------------------------------- name resolution


def _check_split_name(split: str) -> str:
    if not isinstance(split, str) or not _SPLIT_RE.match(split) or ".." in split:
        raise FeatcacheError(f"invalid split name {split!r} (letters, digits, '_', '-', '.', '+')")
    return split


def _aliases() -> dict[str, str]:
    """Other spellings of the paper's names (reference keys, hub repo names) -> short name."""
    out: dict[str, str] = {}
    for short, (suffix, key) in PAPER_DATASETS.items():
        for alias in (short, short.replace("_", "-"), key, key.removeprefix("wds/"),
                      f"wds_{suffix}", suffix, f"{HUB_ORG}/wds_{suffix}"):
            out.setdefault(alias.lower(), short)
    out.update({"imagenet": "imagenet1k", "imagenet-1k": "imagenet1k", "aircraft": "fgvc_aircraft",
                "stanford_cars": "cars", "oxford_pets": "pets", "flowers102": "flowers"})
    return out


def _unknown(name: str, choices: Iterable[str], what: str = "dataset") -> FeatcacheError:
    close = difflib.get_close_matches(name.lower(), sorted(set(choices)), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
    return FeatcacheError(f"unknown {what} {name!r}{hint} Run `featcache datasets` to list them "
                          "(local data: wds:PATH, imagefolder:PATH, fer2013csv:PATH).")


def _local_path(prefix: str, rest: str) -> Path:
    path = Path(rest).expanduser().resolve()
    if not path.exists():
        raise FeatcacheError(f"{prefix}:{rest}: {path} does not exist")
    return path


def open_dataset(name: str, split: str, data_root: Path | None = None,
                 download: bool = True) -> ImageDataset:
    """Open one split of a dataset by name (see the module docstring for the forms).

    Hub and torchvision datasets are fetched into `data_root` (default `default_data_root()`)
    when missing and `download` is true; otherwise a missing dataset is a FeatcacheError that
    names the paths looked in and how to get the files.
    """
    _check_split_name(split)
    root = Path(data_root).expanduser() if data_root is not None else default_data_root()
    text = str(name).strip()
    prefix, sep, rest = text.partition(":")
    prefix = prefix.lower()
    if sep and prefix in _PREFIXES:
        if not rest:
            raise FeatcacheError(f"{text!r}: give a {'repo id' if prefix == 'hf' else 'path'} "
                                 f"after '{prefix}:'")
        if prefix == "wds":
            path = _local_path(prefix, rest)
            return WebDataset(path, split, name=f"wds:{path}", source="wds")
        if prefix == "imagefolder":
            path = _local_path(prefix, rest)
            return ImageFolderDataset(path, split, name=f"imagefolder:{path}")
        if prefix == "fer2013csv":
            path = _local_path(prefix, rest)
            csv_path = _find_fer_csv(path)
            return FerCsvDataset(csv_path, split, name=f"fer2013csv:{csv_path}")
        if prefix == "torchvision":
            return _open_torchvision(rest.lower(), split, root, download)
        repo_id = rest.strip("/")
        if repo_id.count("/") != 1:
            raise FeatcacheError(f"{text!r}: expected hf:OWNER/REPO, e.g. hf:{HUB_ORG}/wds_mnist")
        owner, repo = repo_id.split("/")
        return _open_hub(f"hf:{repo_id}", repo_id, root / "hf" / owner / repo, split, download)
    lowered = text.lower()
    if lowered == "digits":
        return DigitsDataset(split)
    aliases = _aliases()
    lowered = lowered if lowered in aliases else lowered.replace("-", "_")
    if lowered in aliases:
        short = aliases[lowered]
        repo_id = f"{HUB_ORG}/wds_{PAPER_DATASETS[short][0]}"
        return _open_hub(short, repo_id, root / short, split, download)
    choices = [*PAPER_DATASETS, "digits", *aliases, *(f"torchvision:{t}" for t in
                                                      TORCHVISION_DATASETS)]
    raise _unknown(text, choices)


def _open_torchvision(tv_name: str, split: str, data_root: Path, download: bool) -> ImageDataset:
    if tv_name not in TORCHVISION_DATASETS:
        raise _unknown(f"torchvision:{tv_name}", [f"torchvision:{t}" for t in TORCHVISION_DATASETS],
                       "torchvision dataset")
    splits = TORCHVISION_DATASETS[tv_name][0]
    if split not in splits:
        raise FeatcacheError(f"torchvision:{tv_name}: no split {split!r}; available splits: "
                             f"{', '.join(splits)}")
    root = data_root / "torchvision"
    missing = [p for p in _tv_files(tv_name, root, split) if not p.is_file()]
    if missing:
        where = ", ".join(str(p) for p in missing)
        if not download:
            raise FeatcacheError(f"torchvision:{tv_name} {split} is not downloaded: missing "
                                 f"{where}. Run once online with downloads on, or put "
                                 "torchvision's files there.")
        try:
            _tv_download(tv_name, root, split)
        except Exception as exc:
            raise FeatcacheError(f"could not download torchvision:{tv_name} into {root} "
                                 f"({type(exc).__name__}: {exc}); expected {where}. Run online, "
                                 "or put torchvision's files there.") from exc
    try:
        return TorchvisionDataset(tv_name, root, split)
    except FeatcacheError:
        raise
    except Exception as exc:
        raise FeatcacheError(f"cannot read torchvision:{tv_name} {split} from {root}: "
                             f"{type(exc).__name__}: {exc}") from exc


def _open_hub(name: str, repo_id: str, local_dir: Path, split: str,
              download: bool) -> ImageDataset:
    """A CLIP-benchmark webdataset: the local copy if its split is there, else download it."""
    split_dir = local_dir / split
    if not _hub_split_complete(local_dir, split) and (download or not any(split_dir.glob("*.tar"))):
        how = (f"Run once online with downloads on, or copy classnames.txt and {split}/*.tar "
               f"from https://huggingface.co/datasets/{repo_id} into {local_dir}, "
               "or pass wds:PATH")
        if not download:
            present = _tar_splits(local_dir)
            have = f" (present: {', '.join(present)})" if present else ""
            raise FeatcacheError(f"{name} split {split!r} is not downloaded: no {split_dir}/*.tar"
                                 f"{have} and downloads are off. {how}.")
        _hub_download(name, repo_id, local_dir, split, how)
    return WebDataset(local_dir, split, name=name, source="hf",
                      location=f"https://huggingface.co/datasets/{repo_id}", repo_id=repo_id,
                      revision=hub_revision(local_dir))


HUB_RECORD = ".featcache-hub.json"


def hub_revision(local_dir: Path) -> str | None:
    """The hub commit a local copy was downloaded at: featcache's own record of it, else
    the one huggingface_hub keeps beside a local-dir download; None when neither says."""
    try:
        return str(json.loads((local_dir / HUB_RECORD).read_text())["revision"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    meta = local_dir / ".cache" / "huggingface" / "download" / "classnames.txt.metadata"
    try:
        first = meta.read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        return None
    return first if re.fullmatch(r"[0-9a-f]{40}", first) else None


def _hub_split_complete(local_dir: Path, split: str) -> bool:
    """Is an earlier download of this split whole (classnames.txt, all shards nshards.txt names)?"""
    split_dir = local_dir / split
    if not (local_dir / "classnames.txt").is_file():
        return False
    expected = _nshards(split_dir)
    if expected is None:  # no (readable) shard count: trust what is there
        return any(split_dir.glob("*.tar"))
    return expected > 0 and all((split_dir / f"{k}.tar").is_file() for k in range(expected))


def _hub_download(name: str, repo_id: str, local_dir: Path, split: str, how: str) -> None:
    """Fetch only this split and classnames.txt of the hub repo into local_dir."""
    import huggingface_hub

    from featcache.hub import hub_access

    with hub_access() as offline:
        if offline is not None:
            raise FeatcacheError(f"{name}: {local_dir / split}/*.tar is missing and the hub is "
                                 f"out of reach ({offline}). {how}.")
        try:
            info = huggingface_hub.HfApi().dataset_info(repo_id)
            files = [f.rfilename for f in info.siblings or []]
        except Exception as exc:
            raise FeatcacheError(f"{name}: {local_dir / split}/*.tar is missing and the hub "
                                 f"could not be reached for {repo_id} ({type(exc).__name__}: "
                                 f"{_first_line(exc)}). {how}.") from None
        splits = sorted({f.split("/")[0] for f in files if "/" in f and f.endswith(".tar")})
        if split not in splits:
            raise FeatcacheError(f"{name}: no split {split!r} in {repo_id}; available splits: "
                                 f"{', '.join(splits) or 'none'}")
        revision = hub_revision(local_dir) or info.sha  # one revision for every split
        try:
            huggingface_hub.snapshot_download(
                repo_id,
                repo_type="dataset",
                revision=revision,
                allow_patterns=[f"{split}/*", "classnames.txt"],
                local_dir=str(local_dir),
            )
        except Exception as exc:
            raise FeatcacheError(f"{name}: downloading {split}/ of {repo_id} into {local_dir} "
                                 f"failed ({type(exc).__name__}: {_first_line(exc)}). "
                                 f"{how}.") from None
    if revision:
        _write_json_atomic(local_dir / HUB_RECORD, {"repo_id": repo_id, "revision": revision})


def _write_json_atomic(path: Path, obj: Any) -> None:
    try:
        atomic.write_text(path, json.dumps(obj))
    except OSError as exc:
        raise FeatcacheError(f"cannot write {path}: {exc.strerror or exc}; is the data root "
                             "writable?") from None


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def _dataset_info_json() -> dict[str, Any]:
    """Display names, domains and class counts shipped with the package (from the reference)."""
    try:
        return json.loads((Path(__file__).parent / "data" / "dataset_info.json").read_text())
    except (OSError, ValueError):
        return {}
