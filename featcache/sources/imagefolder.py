"""Image folders: `imagefolder:PATH` reads `PATH/<split>/<class>/<image>`."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from featcache.errors import FeatcacheError, warn
from featcache.sources.base import IMAGE_EXTENSIONS, ImageDataset


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
            flat = [s for s in splits if any(
                f.is_file() and f.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
                for f in (self.root / s).iterdir())]
            if flat and len(flat) == len(splits):  # PATH/<class>/<images>: no split level
                raise FeatcacheError(
                    f"{name}: {self.root} holds class folders ({', '.join(flat[:5])}) "
                    f"directly; featcache expects {self.root}/<split>/<class>/<images>: "
                    f"move them under {split_dir}")
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


