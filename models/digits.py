"""The embedded real data set: UCI Optical Recognition of Handwritten Digits (the copy shipped by
scikit-learn as `digits.csv.gz`: 1,797 8x8 images, 0..16 grey levels, 10 classes).

Source: https://archive.ics.uci.edu/dataset/80 (E. Alpaydin, C. Kaynak, 1998), licence CC BY 4.0.
Images are upsampled bilinearly to 32x32 and repeated to 3 channels, so stock torchvision
architectures (ResNet18, MobileNetV2) take them unchanged. The train/test split is fixed and stratified.
"""
from __future__ import annotations

import functools
import gzip
from importlib import resources

import numpy as np

SIZE = 32
CLASSES = [str(i) for i in range(10)]
MEAN, STD = 0.3, 0.4   # of the 0..1-scaled pixels, rounded; fixed so every split shares them
PREPROCESS = {"source_pixels": "8x8 0..16", "resize": f"bilinear {SIZE}x{SIZE}", "channels": "grey x3",
              "scale": "1/16", "mean": [MEAN] * 3, "std": [STD] * 3, "layout": "NCHW"}
TEST_FRACTION = 0.3


def _interp_matrix(src: int, dst: int) -> np.ndarray:
    """Bilinear resampling matrix (dst x src), align_corners=False like torch/PIL."""
    pos = (np.arange(dst) + 0.5) * src / dst - 0.5
    pos = np.clip(pos, 0, src - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, src - 1)
    w = pos - lo
    m = np.zeros((dst, src), np.float32)
    m[np.arange(dst), lo] += 1 - w
    m[np.arange(dst), hi] += w
    return m


@functools.lru_cache(maxsize=1)
def _all() -> tuple[np.ndarray, np.ndarray]:
    raw = resources.files("edgec.models").joinpath("data/digits.csv.gz").read_bytes()
    table = np.loadtxt(gzip.decompress(raw).decode().splitlines(), delimiter=",", dtype=np.float32)
    pixels, labels = table[:, :64].reshape(-1, 8, 8) / 16.0, table[:, 64].astype(np.int64)
    a = _interp_matrix(8, SIZE)
    up = np.einsum("ij,njk,lk->nil", a, pixels, a)
    x = np.repeat(((up - MEAN) / STD)[:, None], 3, axis=1).astype(np.float32)
    return x, labels


@functools.lru_cache(maxsize=1)
def _test_indices() -> np.ndarray:
    _, y = _all()
    rng = np.random.default_rng(2024)
    held = [rng.permutation(np.flatnonzero(y == c))[: round((y == c).sum() * TEST_FRACTION)] for c in range(10)]
    return np.sort(np.concatenate(held))


def load(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    x, y = _all()
    if split == "all":
        return x, y
    test = np.zeros(len(y), bool)
    test[_test_indices()] = True
    keep = test if split == "test" else ~test
    return x[keep], y[keep]
