"""Webdataset tar shards: local (`wds:PATH`) and the CLIP-benchmark datasets on the hub
(the paper's 20, `hf:OWNER/REPO` for any repo in that layout).

Layout: `root/classnames.txt`, `root/<split>/0.tar, 1.tar, …` (+ `nshards.txt`), each
sample a `<key>.<image ext>` and a `<key>.cls` member. Only headers and the tiny `.cls`
members are read to index a shard (the index is kept beside it); images are read by
offset when loaded.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from featcache import atomic
from featcache.errors import FeatcacheError
from featcache.sources.base import IMAGE_EXTENSIONS, ImageDataset, first_line

HUB_ORG = "clip-benchmark"
LABEL_EXTENSION = "cls"
INDEX_SUFFIX = ".featcache-index.json"
_INDEX_FORMAT = "featcache-tar-index/1"


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


def read_classnames(path: Path) -> list[str] | None:
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

        names = read_classnames(self.root / "classnames.txt")
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


def open_hub(name: str, repo_id: str, local_dir: Path, split: str,
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
                                 f"{first_line(exc)}). {how}.") from None
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
                                 f"failed ({type(exc).__name__}: {first_line(exc)}). "
                                 f"{how}.") from None
    if revision:
        _write_json_atomic(local_dir / HUB_RECORD, {"repo_id": repo_id, "revision": revision})


def _write_json_atomic(path: Path, obj: Any) -> None:
    try:
        atomic.write_text(path, json.dumps(obj))
    except OSError as exc:
        raise FeatcacheError(f"cannot write {path}: {exc.strerror or exc}; is the data root "
                             "writable?") from None


