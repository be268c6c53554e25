"""The dataset contract: every image source becomes one map-style `ImageDataset`.

Why one small interface: extraction must know the labels, the size and a content identity
of a split *before* it decodes a single image (to size the Zarr cache and fingerprint it),
and DataLoader workers (fork or spawn) need datasets that pickle cheaply. So every adapter
keeps only paths, offsets and labels; file handles and big arrays are opened lazily per
process and dropped on pickling.
"""

from __future__ import annotations

import hashlib
import json
import operator
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data
from PIL import Image, UnidentifiedImageError

from featcache.errors import FeatcacheError

IMAGE_EXTENSIONS = frozenset(
    {"webp", "jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm"}
)
_SPLIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


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
    and a [0, 1] float TIFF black): 16-bit images by the format's range, 255/65535 (a dark
    one stays dark: never by the values found); 32-bit integers of formats that declare
    no range by the smallest of 8/16/32-bit ranges that holds the image; floats in [0, 1]
    by 255, in [0, 255] as they are, anything else from its own min..max."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(img), _format_top(img)),
                               mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def _format_top(img: Image.Image) -> int | None:
    """The largest value an image's format can hold, where it says (16-bit modes; PNG,
    whose integers have at most 16 bits, even when PIL opens them as 32-bit "I")."""
    if img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG"):
        return 65535
    return None


def _to_uint8(values: np.ndarray, top: int | None = None) -> np.ndarray:
    if values.dtype.kind in "iu":
        found = int(values.max(initial=0))
        scale = top or next(r for r in (255, 65535, 2**32 - 1) if found <= r)
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


def check_split_name(split: str) -> str:
    if not isinstance(split, str) or not _SPLIT_RE.match(split) or ".." in split:
        raise FeatcacheError(f"invalid split name {split!r} (letters, digits, '_', '-', '.', '+')")
    return split


def first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


class ExternalDataset(ImageDataset):
    """A plugin's dataset as featcache needs it. The plugin's object needs only
    `class_names`, `__len__` and `__getitem__(i) -> (image, label)` (a PIL image or an
    HxW[x3] uint8 array); `labels` (all of them, up front) saves a pass over the data, and
    `identity` (a JSON-able dict saying what the data are) its content hash. Without an
    identity featcache derives one from the source, its argument, the split, the class
    names and the labels: changed pixels under the same labels then go unnoticed, which
    the identity's `derived: true` says."""

    def __init__(self, data: Any, source: str, arg: str, split: str) -> None:
        self.data = data
        self.name = f"{source}:{arg}"
        self.split = split
        try:
            self.class_names = [str(c) for c in data.class_names]
            n = len(data)
        except (AttributeError, TypeError) as exc:
            raise FeatcacheError(f"dataset source {source!r} returned {type(data).__name__}, "
                                 "which lacks class_names or __len__") from exc
        given = getattr(data, "labels", None)
        labels = ([int(data[i][1]) for i in range(n)] if given is None
                  else [int(v) for v in np.asarray(given).reshape(-1)])
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.labels) != n:
            raise FeatcacheError(f"{self.name}: {len(self.labels)} labels for {n} samples")
        bad = np.flatnonzero((self.labels < 0) | (self.labels >= len(self.class_names)))
        if bad.size:
            raise FeatcacheError(f"{self.name}: sample {int(bad[0])} has label "
                                 f"{int(self.labels[bad[0]])}, not one of its "
                                 f"{len(self.class_names)} classes")
        identity = getattr(data, "identity", None)
        if isinstance(identity, dict):
            self._set_identity(source, self.name, [json.dumps(identity, sort_keys=True,
                                                              default=str)], given=True)
        else:
            self._set_identity(source, self.name, [source, arg], derived=True)

    def key(self, i: int) -> str:
        return f"{self.split}/{i}"

    def _read(self, i: int) -> Image.Image:
        image = self.data[i][0]
        return image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
