"""scikit-learn's bundled 8x8 handwritten digits (`digits`): the offline default."""

from __future__ import annotations

import numpy as np

from featcache.errors import FeatcacheError
from featcache.sources.base import ArrayDataset

DIGITS_SPLITS = ("train", "test")


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


