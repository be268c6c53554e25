"""Dataset sources: every name a user can give becomes one map-style `ImageDataset`.

Names accepted by `open_dataset` (see `featcache datasets`):

- the paper's 20 short names (`fer2013`, `cifar10`, `svhn`, …; other spellings too): the
  CLIP-benchmark webdatasets `clip-benchmark/wds_<x>` on the Hugging Face hub, downloaded
  once into `<data_root>/<name>/`; `hf:OWNER/REPO` does the same for any repo in that
  layout;
- `wds:PATH`: local tar shards in the hub layout (`PATH/classnames.txt`, `PATH/<split>/N.tar`);
- `imagefolder:PATH`: `PATH/<split>/<class>/<image>`;
- `fer2013csv:PATH`: Kaggle's `fer2013.csv` (or a folder holding it);
- `torchvision:NAME`: torchvision's files under `<data_root>/torchvision/`, including
  `vtab-cifar10/-cifar100/-svhn`, VTAB's splits as the paper;
- `digits`: scikit-learn's bundled 8x8 handwritten digits, the offline default;
- `PREFIX:ARG` of any source a plugin registers (`register_dataset_source`).

Each source lives in its own module; names are parsed here, in one place.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from featcache.errors import FeatcacheError
from featcache.registry import DATASETS, SOURCES, resolve
from featcache.sources.base import ExternalDataset, ImageDataset, check_split_name

__all__ = ["DatasetInfo", "ImageDataset", "SourceSpec", "dataset_dir_name", "datasets",
           "default_data_root", "list_datasets", "open_dataset", "parse_dataset_name",
           "parse_splits", "register_dataset_source", "short_name"]


@dataclass(frozen=True)
class SourceSpec:
    """A prefix source (`PREFIX:ARG`): how to open one split of it, and what ARG means."""

    name: str
    open: Callable[..., ImageDataset] | str  # (arg, split, data_root, download) → dataset
    help: str
    arg: str = "PATH"  # how ARG is shown in `featcache datasets`
    local_path: bool = False  # ARG is a local path (made absolute; cache folders hash it)
    listing: str = "local"  # the "source" column of `featcache datasets`


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


@dataclass(frozen=True)
class NamedDataset:
    """A dataset known by a bare name (the paper's 20, digits)."""

    info: DatasetInfo
    open: Callable[[str, Path, bool], ImageDataset] | str  # (split, data_root, download)


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
        check_split_name(split)
        if split not in out:
            out.append(split)
    if not out:
        raise FeatcacheError(f"no split named in {text!r}; give e.g. 'train,test'")
    return out


# --------------------------------------------------------------------------- names


def parse_dataset_name(name: str) -> tuple[SourceSpec | None, str]:
    """`PREFIX:ARG` of a registered source → (its spec, ARG); anything else → (None, name)."""
    text = str(name).strip()
    prefix, sep, rest = text.partition(":")
    if sep:
        spec = SOURCES.find(prefix.lower())
        if spec is not None:
            return spec, rest
    return None, text


def dataset_dir_name(name: str) -> str:
    """`fer2013` for registry names; `wds-<folder>-<8 hex of the full path>` for local
    data (`wds:PATH`, `imagefolder:PATH`, ...), short and still unique per location."""
    from featcache.text import slug

    spec, rest = parse_dataset_name(name)
    if spec is not None and spec.local_path:
        digest = hashlib.sha256(rest.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        # within the 255 bytes a file name may have (with room for `.NAME.tmp-PID`
        # siblings); the digest keeps a cut name unique, and names that fit are unchanged
        room = 255 - 24 - len(spec.name) - len(digest) - 2
        folder = Path(rest).name.encode("utf-8", "surrogateescape")[:room].decode(
            "utf-8", "ignore")
        return slug(f"{spec.name}-{folder or 'root'}-{digest}")
    return slug(name.replace(":", "-").replace("/", "-"))


def short_name(name: str) -> str:
    """A dataset name for progress bars: local paths by their last folder."""
    spec, rest = parse_dataset_name(name)
    if spec is not None and spec.local_path:
        return f"{spec.name}:{Path(rest).name}"
    return name


def _alias_map() -> dict[str, str]:
    out: dict[str, str] = {}
    for name, entry in DATASETS.items():
        out.setdefault(name.lower(), name)
        for alias in getattr(entry, "aliases", ()):
            out.setdefault(alias.lower(), name)
    return out


def open_dataset(name: str, split: str, data_root: Path | None = None,
                 download: bool = True) -> ImageDataset:
    """Open one split of a dataset by name (see the module docstring for the forms).

    Hub and torchvision datasets are fetched into `data_root` (default `default_data_root()`)
    when missing and `download` is true; otherwise a missing dataset is a FeatcacheError that
    names the paths looked in and how to get the files.
    """
    check_split_name(split)
    root = Path(data_root).expanduser() if data_root is not None else default_data_root()
    spec, rest = parse_dataset_name(name)
    if spec is not None:
        if not rest:
            raise FeatcacheError(f"{name!r}: give a {spec.arg.lower()} after '{spec.name}:'")
        if spec.local_path:
            path = Path(rest).expanduser().resolve()
            if not path.exists():
                raise FeatcacheError(f"{spec.name}:{rest}: {path} does not exist")
            rest = str(path)
        return resolve(spec.open)(rest, split, root, download)
    aliases = _alias_map()
    lowered = rest.lower()
    key = aliases.get(lowered) or aliases.get(lowered.replace("-", "_"))
    if key is None:
        import difflib

        choices = sorted({*aliases, *(f"{s}:" for s in SOURCES.names())})
        close = difflib.get_close_matches(lowered, choices, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
        raise FeatcacheError(f"unknown dataset {name!r}{hint} Run `featcache datasets` to list "
                             "them (local data: wds:PATH, imagefolder:PATH, fer2013csv:PATH).")
    return resolve(DATASETS.get(key).open)(split, root, download)


# --------------------------------------------------------------------------- registration


def register_dataset_source(name: str, help: str = "", arg: str = "ARG",
                            local_path: bool = False, replace_existing: bool = False
                            ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: `@register_dataset_source("ramp", help="ramp:N — N images per class")`
    on `def ramp(arg, split, data_root)` returning anything with `class_names`, `__len__`
    and `__getitem__(i) -> (PIL.Image, int label)` (or an `ImageDataset`). Then
    `--dataset ramp:20` works everywhere; see `ExternalDataset` for identities."""
    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        def opener(rest: str, split: str, data_root: Path, download: bool) -> ImageDataset:
            data = func(rest, split, data_root)
            if isinstance(data, ImageDataset):
                return data
            return ExternalDataset(data, name, rest, split)

        SOURCES.add(name, SourceSpec(name, opener, help or f"{name}:{arg}", arg, local_path,
                                     listing="plugin"), replace=replace_existing)
        return func

    if not name or ":" in name or name != name.lower():
        raise FeatcacheError(f"a dataset source name is lower case without ':', got {name!r}")
    return decorate


def list_datasets() -> list[DatasetInfo]:
    """Every name `open_dataset` knows, paper datasets first; prefix forms as templates."""
    from featcache.sources.tvfiles import TORCHVISION_DATASETS

    rows = [entry.info for _, entry in DATASETS.items()]
    for tv_name, (splits, n_classes, text) in TORCHVISION_DATASETS.items():
        rows.append(DatasetInfo(f"torchvision:{tv_name}", "torchvision",
                                f"{text}; splits {', '.join(splits)}", n_classes, None, False))
    for _, spec in SOURCES.items():
        if spec.name != "torchvision":
            rows.append(DatasetInfo(f"{spec.name}:{spec.arg}", spec.listing, spec.help, None,
                                    None, False))
    return rows


def datasets() -> list[dict[str, Any]]:
    """`featcache datasets`: every name `open_dataset` knows, as rows."""
    return [asdict(d) for d in list_datasets()]


# --------------------------------------------------------------------------- built-ins


def _open_wds(rest: str, split: str, root: Path, download: bool) -> ImageDataset:
    from featcache.sources.webdataset import WebDataset

    return WebDataset(Path(rest), split, name=f"wds:{rest}", source="wds")


def _open_imagefolder(rest: str, split: str, root: Path, download: bool) -> ImageDataset:
    from featcache.sources.imagefolder import ImageFolderDataset

    return ImageFolderDataset(Path(rest), split, name=f"imagefolder:{rest}")


def _open_fer_csv(rest: str, split: str, root: Path, download: bool) -> ImageDataset:
    from featcache.sources.fer2013csv import FerCsvDataset, find_fer_csv

    csv_path = find_fer_csv(Path(rest))
    return FerCsvDataset(csv_path, split, name=f"fer2013csv:{csv_path}")


def _open_tv(rest: str, split: str, root: Path, download: bool) -> ImageDataset:
    from featcache.sources.tvfiles import open_torchvision

    return open_torchvision(rest.lower(), split, root, download)


def _open_hf(rest: str, split: str, root: Path, download: bool) -> ImageDataset:
    from featcache.sources.webdataset import HUB_ORG, open_hub

    repo_id = rest.strip("/")
    if repo_id.count("/") != 1:
        raise FeatcacheError(f"'hf:{rest}': expected hf:OWNER/REPO, e.g. hf:{HUB_ORG}/wds_mnist")
    owner, repo = repo_id.split("/")
    return open_hub(f"hf:{repo_id}", repo_id, root / "hf" / owner / repo, split, download)


def _open_digits(split: str, root: Path, download: bool) -> ImageDataset:
    from featcache.sources.digits import DigitsDataset

    return DigitsDataset(split)


@dataclass(frozen=True)
class _PaperOpener:
    """Opens one of the paper's hub datasets (picklable, unlike a closure)."""

    name: str
    repo_id: str

    def __call__(self, split: str, root: Path, download: bool) -> ImageDataset:
        from featcache.sources.webdataset import open_hub

        return open_hub(self.name, self.repo_id, root / self.name, split, download)


@dataclass(frozen=True)
class _PaperEntry(NamedDataset):
    aliases: tuple[str, ...] = ()


def _register_builtins() -> None:
    from featcache.catalogue import paper_datasets

    for spec in (
        SourceSpec("wds", _open_wds, "local tar shards: PATH/classnames.txt, PATH/<split>/"
                   "0.tar, 1.tar, ...", local_path=True),
        SourceSpec("imagefolder", _open_imagefolder,
                   "PATH/<split>/<class>/<image>; classes from the train split", local_path=True),
        SourceSpec("fer2013csv", _open_fer_csv, "Kaggle's fer2013.csv with the hub's class order "
                   "(as the paper); splits train, test (=public+private), publictest, "
                   "privatetest", local_path=True),
        SourceSpec("torchvision", _open_tv, "torchvision's files", "NAME", listing="torchvision"),
        SourceSpec("hf", _open_hf, "any hub dataset repo in the CLIP-benchmark webdataset "
                   "layout", "OWNER/REPO", listing="hf"),
    ):
        SOURCES.add(spec.name, spec)
    for d in paper_datasets().values():
        info = DatasetInfo(d.name, f"hf:{d.hub}", f"{d.display}: CLIP-benchmark webdataset, "
                           "downloaded on first use", d.classes, d.domain, True, d.display,
                           d.train_size)
        DATASETS.add(d.name, _PaperEntry(info, _PaperOpener(d.name, d.hub), d.aliases))
    from featcache.catalogue import shift_datasets

    for s in shift_datasets().values():  # test sets only: `featcache evaluate` scores them
        info = DatasetInfo(s.name, f"hf:{s.hub}", f"{s.display}: {s.of} under shift, test "
                           "split only (CLIP-benchmark webdataset)", s.classes,
                           "Shift (ImageNet)", False, s.display, None)
        DATASETS.add(s.name, _PaperEntry(info, _PaperOpener(s.name, s.hub), s.aliases))
    DATASETS.add("digits", NamedDataset(DatasetInfo(
        "digits", "sklearn", "scikit-learn's bundled 8x8 handwritten digits (1797 images, "
        "offline); stratified 75/25 train/test split", 10, None, False, "Digits", 1347),
        _open_digits))


_register_builtins()
