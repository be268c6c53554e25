"""Kaggle's FER2013 CSV (`fer2013csv:PATH`), relabelled in the hub's class order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from featcache.errors import FeatcacheError
from featcache.sources.base import ImageDataset

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


def find_fer_csv(path: Path) -> Path:
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
        self.path = self.root = find_fer_csv(Path(path))
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


