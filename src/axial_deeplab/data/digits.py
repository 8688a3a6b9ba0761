"""The 1,797 8x8 handwritten digits of the synthetic dataset and the digits demo, shipped with
the package (``digits.npz``, 45 kB) so neither needs scikit-learn.

They are the array that ``sklearn.datasets.load_digits`` returns (same rows, same order, pixel
counts 0..16; a test checks the copy against scikit-learn when it is installed): the test set
of the UCI "Optical Recognition of Handwritten Digits" data (E. Alpaydin and C. Kaynak, 1998;
https://archive.ics.uci.edu/dataset/80, CC BY 4.0).
"""

from __future__ import annotations

import functools
import io
from importlib import resources
from typing import Tuple

import numpy as np

__all__ = ["load_digits"]


@functools.lru_cache(maxsize=1)
def load_digits() -> Tuple[np.ndarray, np.ndarray]:
    """``(images (1797, 8, 8) uint8 in 0..16, labels (1797,) uint8)``; read-only arrays."""
    raw = resources.files("axial_deeplab.data").joinpath("digits.npz").read_bytes()
    with np.load(io.BytesIO(raw)) as f:
        images, labels = f["images"], f["target"]
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels
