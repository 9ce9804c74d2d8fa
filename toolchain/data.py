"""Data for calibration, training and evaluation, validated before any work starts.

Specs (see README "Data"):
- `builtin:digits[:train|:test|:all]` — the embedded real default (UCI handwritten digits, 8x8 upsampled).
- `file.npz` — array `x` (N,C,H,W or N,H,W,C; float or uint8) and optional integer labels `y`.
- `folder/` — one subfolder per class holding images (`--image-size`, `--mean`, `--std`).

Arrays are NCHW float32. Image folders are decoded lazily, batch by batch, so calibration and
evaluation never need every sample in memory at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from edgec.core.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Dataset:
    x: Sequence            # np.ndarray (N,C,H,W) float32, or a lazy sequence that slices to one
    y: np.ndarray | None   # int64 labels or None
    source: str
    preprocess: dict = field(default_factory=dict)
    classes: list[str] | None = None

    def __len__(self) -> int:
        return len(self.x)

    @property
    def sample_shape(self) -> tuple:
        return tuple(self.x[0:1].shape[1:])

    @property
    def labelled(self) -> bool:
        return self.y is not None

    def __iter__(self) -> Iterator[np.ndarray]:
        """Batches of 64 samples: what calibration streams, never the whole set at once."""
        return self.batches(64)

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        n = len(self) if limit is None else min(limit, len(self))
        for start in range(0, n, batch_size):
            yield np.asarray(self.x[start:min(start + batch_size, n)], dtype=np.float32)

    def take(self, indices) -> "Dataset":
        indices = np.asarray(indices)
        x = self.x[indices] if isinstance(self.x, np.ndarray) else self.x.subset(indices)
        y = None if self.y is None else self.y[indices]
        return Dataset(x, y, self.source, dict(self.preprocess), self.classes)

    def head(self, n: int) -> np.ndarray:
        return np.asarray(self.x[0:min(n, len(self))], dtype=np.float32)

    def describe(self) -> dict:
        return {"source": self.source, "samples": len(self), "sample_shape": list(self.sample_shape),
                "labelled": self.labelled, "preprocess": self.preprocess}

    def validate(self, input_shape: Sequence[int] | None = None, num_classes: int | None = None) -> None:
        """Cheap checks on everything in arrays; lazily-decoded folders are checked as they are read."""
        if len(self) == 0:
            raise DataError(f"{self.source} has no samples")
        if input_shape is not None:
            want = tuple(int(d) for d in input_shape[1:])
            got = self.sample_shape
            if len(want) != len(got) or any(w > 0 and w != g for w, g in zip(want, got)):
                what = "channels" if len(want) == len(got) and want[0] != got[0] else "shape"
                raise DataError(f"{self.source}: samples have {what} {got}, the model expects {want}; "
                                "fix --input-shape or resize/convert the data (--image-size)")
        if isinstance(self.x, np.ndarray):
            _check_finite(self.x, self.source)
        if self.y is not None:
            if len(self.y) != len(self):
                raise DataError(f"{self.source}: {len(self.y)} labels for {len(self)} samples")
            if num_classes is not None and (self.y.min() < 0 or self.y.max() >= num_classes):
                raise DataError(f"{self.source}: labels span {int(self.y.min())}..{int(self.y.max())} but the "
                                f"model has {num_classes} outputs; relabel to 0..{num_classes - 1} or check --arch")


def _check_finite(x: np.ndarray, source: str) -> None:
    for start in range(0, len(x), 1024):  # in chunks: no full-size temporary for big arrays
        chunk = x[start:start + 1024]
        if not np.isfinite(chunk).all():
            bad = start + int(np.argwhere(~np.isfinite(chunk).reshape(len(chunk), -1).all(axis=1))[0][0])
            raise DataError(f"{source}: sample {bad} contains NaN or Inf; clean the data first")


# ---------------------------------------------------------------- loaders

def load_data(spec: str, *, image_size: int | None = None, mean: Sequence[float] | None = None,
              std: Sequence[float] | None = None) -> Dataset:
    if spec.startswith("builtin:"):
        return load_builtin(spec)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"data {spec} not found; pass builtin:digits, a .npz file or an image folder")
    if path.is_dir():
        return load_image_folder(path, image_size=image_size, mean=mean, std=std)
    if path.suffix == ".npz":
        return load_npz(path, mean=mean, std=std)
    raise DataError(f"data {spec}: unsupported kind {path.suffix or '(no suffix)'}; "
                    "use a .npz file (x, optional y) or a folder with one subfolder per class")


def load_builtin(spec: str) -> Dataset:
    from edgec.models import digits
    name, _, split = spec[len("builtin:"):].partition(":")
    if name != "digits":
        raise DataError(f"unknown built-in data {spec!r}; available: builtin:digits[:train|:test|:all]")
    if split not in ("", "train", "test", "all"):
        raise DataError(f"builtin:digits has splits train, test, all, not {split!r}")
    x, y = digits.load(split or "train")
    return Dataset(x, y, f"builtin:digits:{split or 'train'}", digits.PREPROCESS.copy(), digits.CLASSES)


def _normalize(x: np.ndarray, mean, std) -> np.ndarray:
    if mean is None and std is None:
        return x
    c = x.shape[1]
    m = np.asarray(mean if mean is not None else [0.0] * c, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std if std is not None else [1.0] * c, np.float32).reshape(1, -1, 1, 1)
    if m.shape[1] not in (1, c) or s.shape[1] not in (1, c):
        raise DataError(f"--mean/--std give {m.shape[1]}/{s.shape[1]} values for {c} channels")
    return (x - m) / s


def load_npz(path: Path, *, mean=None, std=None) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f.files:
                raise DataError(f"{path} has arrays {f.files}, no 'x'; save with np.savez(path, x=..., y=...)")
            x, y = f["x"], (f["y"] if "y" in f.files else None)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - numpy raises several types for a broken archive
        raise DataError(f"{path} is not a readable .npz file ({type(e).__name__}: {e})") from None
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(f"{path}: x has shape {x.shape}; expected (N,C,H,W) images or (N,H,W)")
    preprocess = {"layout": "NCHW"}
    if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)
        preprocess["layout"] = "NHWC->NCHW"
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
        preprocess["scale"] = "uint8/255"
    elif not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{path}: x has dtype {x.dtype}; expected float or uint8")
    x = np.ascontiguousarray(_normalize(x.astype(np.float32, copy=False), mean, std))
    if mean is not None or std is not None:
        preprocess.update(mean=list(mean or []), std=list(std or []))
    if y is not None:
        if not np.issubdtype(y.dtype, np.integer):
            if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
                y = y.astype(np.int64)
            else:
                raise DataError(f"{path}: y has dtype {y.dtype}; expected integer class labels")
        y = y.reshape(-1).astype(np.int64)
    ds = Dataset(x, y, str(path), preprocess)
    ds.validate()
    return ds


class LazyImages:
    """Image files decoded on access; slicing returns a float32 NCHW array."""

    def __init__(self, files: list[Path], image_size: int, mean, std, source: str):
        self.files, self.image_size, self.mean, self.std, self.source = files, image_size, mean, std, source

    def __len__(self):
        return len(self.files)

    def subset(self, indices) -> "LazyImages":
        return LazyImages([self.files[i] for i in indices], self.image_size, self.mean, self.std, self.source)

    def __getitem__(self, item):
        files = self.files[item] if isinstance(item, slice) else [self.files[i] for i in np.atleast_1d(item)]
        x = np.stack([self._read(f) for f in files]) if files else \
            np.zeros((0, 3, self.image_size, self.image_size), np.float32)
        x = _normalize(x, self.mean, self.std)
        _check_finite(x, self.source)
        return x

    def _read(self, file: Path) -> np.ndarray:
        import warnings

        from PIL import Image, UnidentifiedImageError
        try:
            with warnings.catch_warnings():  # over PIL's pixel limit: refused, not decoded into gigabytes
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im = Image.open(file)
            with im:
                im = im.convert("RGB")
                # resize the short side, then centre-crop: the usual eval transform
                w, h = im.size
                scale = self.image_size / min(w, h)
                im = im.resize((max(self.image_size, round(w * scale)), max(self.image_size, round(h * scale))),
                               Image.BILINEAR)
                w, h = im.size
                left, top = (w - self.image_size) // 2, (h - self.image_size) // 2
                im = im.crop((left, top, left + self.image_size, top + self.image_size))
                return np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{file} is not a readable image ({e}); remove it or fix it") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise DataError(f"{file} has more pixels than PIL decodes safely ({Image.MAX_IMAGE_PIXELS:,}); "
                            "resize it or remove it from the image folder") from None


def load_image_folder(path: Path, *, image_size=None, mean=None, std=None) -> Dataset:
    classes = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{path} has no class subfolders; put images in {path}/<class>/*.jpg")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(f for f in (path / name).rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        odd = [f for f in found if not f.is_file()]  # a FIFO or device named x.jpg would block the read forever
        if odd:
            raise DataError(f"{odd[0]} is not a regular file; remove it from the image folder")
        files += found
        labels += [label] * len(found)
    if not files:
        raise DataError(f"{path}: the class folders {classes[:5]} hold no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    empty = [c for c in classes if c not in {files[i].relative_to(path).parts[0] for i in range(len(files))}]
    if empty:
        raise DataError(f"{path}: class folder(s) {empty[:5]} hold no images; remove them or add images")
    image_size = image_size or 224
    mean = IMAGENET_MEAN if mean is None else mean
    std = IMAGENET_STD if std is None else std
    preprocess = {"layout": "NCHW", "resize_short_side": image_size, "center_crop": image_size,
                  "scale": "uint8/255", "mean": list(mean), "std": list(std), "color": "RGB"}
    return Dataset(LazyImages(files, image_size, mean, std, str(path)), np.asarray(labels, np.int64),
                   str(path), preprocess, classes)


def split(ds: Dataset, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Deterministic (stratified when labelled) split into (rest, held_out)."""
    rng = np.random.default_rng(seed)
    n = len(ds)
    if ds.y is None:
        order = rng.permutation(n)
        k = max(1, math.floor(n * fraction))
        return ds.take(np.sort(order[k:])), ds.take(np.sort(order[:k]))
    held = []
    for label in np.unique(ds.y):
        idx = rng.permutation(np.flatnonzero(ds.y == label))
        held += list(idx[:max(1, math.floor(len(idx) * fraction))])
    held = np.sort(np.asarray(held))
    rest = np.setdiff1d(np.arange(n), held)
    return ds.take(rest), ds.take(held)
