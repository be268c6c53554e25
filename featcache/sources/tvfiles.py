"""torchvision's on-disk files (`torchvision:NAME`), read by featcache itself, and VTAB's
splits of CIFAR-10/100 and SVHN rebuilt from them (`torchvision:vtab-NAME`)."""

from __future__ import annotations

import difflib
import hashlib
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from featcache.errors import FeatcacheError
from featcache.sources.base import ArrayDataset, ImageDataset
from featcache.sources.webdataset import read_classnames

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

PCAM_CLASSES = ["lymph node", "lymph node containing metastatic tumor tissue"]


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
            names = read_classnames(names_file) or [str(c) for c in range(10)]
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


def open_torchvision(tv_name: str, split: str, data_root: Path, download: bool) -> ImageDataset:
    if tv_name not in TORCHVISION_DATASETS:
        close = difflib.get_close_matches(tv_name, list(TORCHVISION_DATASETS), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(f'torchvision:{c}' for c in close)}?" if close \
            else "."
        raise FeatcacheError(f"unknown torchvision dataset 'torchvision:{tv_name}'{hint} Run "
                             "`featcache datasets` to list them.")
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


