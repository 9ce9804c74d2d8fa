"""Data for calibration, training and evaluation, validated against the model's inputs before any work starts.

Specs (see README "Data"):
- `builtin:digits[:train|:test|:all]` — the embedded real default (UCI handwritten digits, 8x8 upsampled).
- `file.npz` — one array per model input, keyed by the input's name (a single-input model may use `x`), any
  dtype the model takes (float, int64 ids/masks, bool), any rank; optional labels: `y` for the label output
  (`--label-output`, or the only output), `y:OUTPUT` for a named output (several allowed): class ids (N,),
  0/1 multilabel (N,K), regression targets (N,) or (N,K) floats. Images
  (N,C,H,W), (N,H,W,C) or uint8 (N,H,W) are scaled to float and laid out NCHW as before.
- `folder/` — one subfolder per class holding images (`--image-size`, `--mean`, `--std`).
- `file.py:function` — a data hook: runs that Python function (user code, named by the user on the command
  line) and takes the iterable of dict batches `{input_name: array}` it returns (optional key `y`).

Nothing holds the whole set: npz members are memory-mapped (stored ones) and converted per batch, image
folders are decoded batch by batch, so calibration and evaluation stream. A batch is a dict feed
(edgec.core.feeds); labels stay separate (`Dataset.y`).
"""
from __future__ import annotations

import math
import mmap
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from edgec.core.errors import DataError, OptionError
from edgec.core.feeds import FeedLayout, InputSpec, kind_of

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_KEY = "x"          # the array of a single-input model in an npz, whatever the input's name
LABEL_KEY = "y"
LABEL_PREFIX = "y:"        # `y:OUTPUT`: the labels of the output named OUTPUT
# compressed npz members are decompressed whole (a deflate stream has no random access); above this they are
# refused with the fix (np.savez, which stores members uncompressed and lets them be memory-mapped)
COMPRESSED_LIMIT_BYTES = 256 * 2 ** 20
MAX_NPZ_ARRAYS = 256   # inputs and label sets of one .npz
HOOK_RE = re.compile(r"^(?P<file>.+\.py):(?P<func>[A-Za-z_]\w*)$")


# ---------------------------------------------------------------- columns: one model input, read per batch

class Column:
    """One input's samples. Reading returns a fresh array in the model's layout and dtype, for the rows asked
    only: the source (memory map, image files) is never converted whole."""

    batch_axis = 0
    __iter__ = None   # not a sequence of samples: read batches with read()/[start:stop]

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, rows) -> np.ndarray:   # rows: a slice or an int index array
        raise NotImplementedError

    def subset(self, indices) -> "Column":
        return Subset(self, np.asarray(indices, dtype=np.int64))

    def __getitem__(self, item) -> np.ndarray:   # what single-input code (training, pruning) slices
        return self.read(item)

    def __array__(self, dtype=None, copy=None):
        """The whole column as one array (np.asarray(ds.x)): small data only, everything else reads batches."""
        x = self.read(slice(0, len(self)))
        return x if dtype is None else x.astype(dtype, copy=False)

    @property
    def dtype(self) -> np.dtype:
        return self.read(slice(0, 1)).dtype

    @property
    def sample_shape(self) -> tuple:
        shape = list(self.read(slice(0, 1)).shape)
        del shape[self.batch_axis]
        return tuple(shape)

    def shape_at(self, rows: slice) -> tuple:
        """The sample shape of these rows (differs only for ragged data)."""
        return self.sample_shape


class Subset(Column):
    def __init__(self, base: Column, indices: np.ndarray):
        self.base, self.indices, self.batch_axis = base, indices, base.batch_axis

    def __len__(self):
        return len(self.indices)

    def read(self, rows):
        return self.base.read(self.indices[rows] if isinstance(rows, slice) else self.indices[np.asarray(rows)])

    def subset(self, indices):
        return Subset(self.base, self.indices[np.asarray(indices, dtype=np.int64)])

    @property
    def dtype(self):
        return self.base.dtype

    @property
    def sample_shape(self):
        return self.base.sample_shape

    def shape_at(self, rows):
        return self.base.shape_at(self.indices[rows])


class ArrayColumn(Column):
    """An in-memory array or a memory map, with per-batch conversion: layout, uint8 scaling, mean/std, dtype.
    For a memory map the pages read are dropped again after each batch, so the resident size stays one batch."""

    def __init__(self, raw: np.ndarray, *, batch_axis: int = 0, dtype=None, transpose: tuple | None = None,
                 scale: float | None = None, mean=None, std=None):
        self.raw, self.batch_axis, self.transpose, self.scale = raw, batch_axis, transpose, scale
        self.mean, self.std = mean, std
        self._dtype = np.dtype(dtype) if dtype is not None else _natural_dtype(raw.dtype, scale)

    def __len__(self):
        return int(self.raw.shape[self.batch_axis])

    @property
    def dtype(self):
        return self._dtype

    @dtype.setter
    def dtype(self, value):
        self._dtype = np.dtype(value)

    @property
    def sample_shape(self):
        shape = list(self.raw.shape)
        if self.transpose:
            shape = [shape[i] for i in self.transpose]
        del shape[self.batch_axis]
        return tuple(shape)

    def read(self, rows):
        if isinstance(rows, (int, np.integer)):
            rows = slice(int(rows), int(rows) + 1)
        if not isinstance(rows, slice):
            rows = np.asarray(rows)
            if rows.dtype == bool:
                rows = np.flatnonzero(rows)
        index = [slice(None)] * self.raw.ndim
        index[self.batch_axis] = rows
        x = np.array(self.raw[tuple(index)])   # a copy: the batch owns its memory
        _release(self.raw)
        if self.transpose:
            x = x.transpose(self.transpose)
        if self.scale is not None:
            x = x.astype(np.float32) * np.float32(self.scale)
        if self.mean is not None or self.std is not None:
            x = _normalize(x.astype(np.float32, copy=False), self.mean, self.std)
        return np.ascontiguousarray(x.astype(self._dtype, copy=False))


class RaggedColumn(Column):
    """Samples of varying shape (a data hook's batches with different sequence lengths), kept per sample."""

    def __init__(self, samples: list[np.ndarray], batch_axis: int = 0):
        self.samples, self.batch_axis = samples, batch_axis

    def __len__(self):
        return len(self.samples)

    def read(self, rows):
        picked = self.samples[rows] if isinstance(rows, slice) else [self.samples[int(i)] for i in np.atleast_1d(rows)]
        shapes = {p.shape for p in picked}
        if len(shapes) > 1:
            raise DataError(f"samples of shapes {sorted(shapes)[:3]} cannot form one batch; give a batch size of 1 "
                            "or pad them to one length")
        return np.concatenate(picked, axis=self.batch_axis)

    @property
    def dtype(self):
        return self.samples[0].dtype

    @property
    def sample_shape(self):
        shape = list(self.samples[0].shape)
        del shape[self.batch_axis]
        return tuple(shape)

    def shape_at(self, rows):
        picked = self.samples[rows] if isinstance(rows, slice) else [self.samples[int(i)] for i in np.atleast_1d(rows)]
        return picked[0].shape if len({p.shape for p in picked}) == 1 else None


def _natural_dtype(dtype: np.dtype, scale) -> np.dtype:
    """What a model is fed by default: floats as float32, integers as int64 (ONNX ids and masks), bool as is."""
    if scale is not None or np.issubdtype(dtype, np.floating):
        return np.dtype(np.float32)
    if np.issubdtype(dtype, np.integer):
        return np.dtype(np.int64)
    return np.dtype(dtype)


def _release(raw) -> None:
    """Drop a memory map's resident pages (the file stays in the page cache, outside this process's RSS)."""
    base = getattr(raw, "_mmap", None)
    if base is not None:
        try:
            base.madvise(mmap.MADV_DONTNEED)
        except (AttributeError, OSError, ValueError):
            pass


def _normalize(x: np.ndarray, mean, std) -> np.ndarray:
    if mean is None and std is None:
        return x
    c = x.shape[1]
    m = np.asarray(mean if mean is not None else [0.0] * c, np.float32).reshape(1, -1, *([1] * (x.ndim - 2)))
    s = np.asarray(std if std is not None else [1.0] * c, np.float32).reshape(1, -1, *([1] * (x.ndim - 2)))
    if m.shape[1] not in (1, c) or s.shape[1] not in (1, c):
        raise DataError(f"--mean/--std give {m.shape[1]}/{s.shape[1]} values for {c} channels")
    return (x - m) / s


# ---------------------------------------------------------------- the dataset

@dataclass
class Dataset:
    columns: dict            # input name -> Column (or a plain array); the model's names once bound
    y: np.ndarray | None     # labels of the label output (`y`): int64 class ids (N,), float (N,)/(N,K), or None
    source: str
    preprocess: dict = field(default_factory=dict)
    classes: list[str] | None = None
    specs: list | None = None   # the model's InputSpecs, once bound
    named: dict = field(default_factory=dict)   # output name -> its labels (`y:OUTPUT` keys)

    def __post_init__(self):
        self.columns = {k: v if isinstance(v, Column) else ArrayColumn(np.asarray(v)) for k, v in self.columns.items()}

    @property
    def labels(self) -> dict | None:
        """Every label set, {"" (plain y, the label output): array, output name: array}; None when unlabelled
        (what edgec.exporters.metrics takes)."""
        out = ({"": self.y} if self.y is not None else {}) | self.named
        return out or None

    def for_output(self, output: str | None) -> "Dataset":
        """The same samples with the labels of `output` (a `y:OUTPUT` set) as the plain labels (what accuracy and
        the best epoch are scored on); the other `y:OUTPUT` sets stay, for training's loss on each of those
        outputs. Unchanged when that output has no named labels."""
        if output is None or output not in self.named:
            return self
        return Dataset(self.columns, self.named[output], self.source, self.preprocess, self.classes, self.specs,
                       {k: v for k, v in self.named.items() if k != output})

    @property
    def class_ids(self) -> bool:
        """The plain labels are class ids (N,): what training's cross-entropy and accuracy take."""
        return self.y is not None and self.y.ndim == 1 and self.y.dtype.kind in "iu"

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    @property
    def names(self) -> list[str]:
        return list(self.columns)

    @property
    def layout(self) -> FeedLayout:
        return FeedLayout(self.names, {k: c.batch_axis for k, c in self.columns.items()})

    @property
    def x(self) -> Column:
        """The one input of a single-input model (what training and pruning slice)."""
        if len(self.columns) != 1:
            raise DataError(f"{self.source} feeds {len(self.columns)} inputs ({', '.join(self.columns)}); this "
                            "step takes single-input models only")
        return next(iter(self.columns.values()))

    @property
    def sample_shape(self) -> tuple:
        """The single input's sample shape (images: (C,H,W))."""
        return self.x.sample_shape

    @property
    def labelled(self) -> bool:
        return self.y is not None or bool(self.named)

    @property
    def rereadable(self) -> bool:
        """Reading the data again is cheap (arrays, memory maps), unlike decoding an image folder again."""
        return all(isinstance(_base(c), (ArrayColumn, RaggedColumn)) for c in self.columns.values())

    def __iter__(self) -> Iterator[dict]:
        """Batches of 64 samples: what calibration streams, never the whole set at once."""
        return self.batches(64)

    def _runs(self, n: int) -> list[tuple[int, int]]:
        """[start, stop) ranges whose samples share one shape (one range unless a column is ragged)."""
        ragged = [c for c in self.columns.values() if isinstance(_base(c), RaggedColumn)]
        if not ragged:
            return [(0, n)]
        keys = [tuple(tuple(c.shape_at(slice(i, i + 1))) for c in ragged) for i in range(n)]
        runs, start = [], 0
        for i in range(1, n + 1):
            if i == n or keys[i] != keys[start]:
                runs.append((start, i))
                start = i
        return runs

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[dict]:
        """Dict feeds {input name: array} of at most `batch_size` samples, converted batch by batch."""
        n = len(self) if limit is None else min(limit, len(self))
        for lo, hi in self._runs(n):
            for start in range(lo, hi, batch_size):
                yield self.read(slice(start, min(start + batch_size, hi)))

    def read(self, rows) -> dict:
        return {k: c.read(rows) for k, c in self.columns.items()}

    def arrays(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        """Batches of the single input as plain arrays (training and pruning of single-input models)."""
        column = self.x
        n = len(self) if limit is None else min(limit, len(self))
        for start in range(0, n, batch_size):
            yield column.read(slice(start, min(start + batch_size, n)))

    def take(self, indices) -> "Dataset":
        indices = np.asarray(indices, dtype=np.int64)
        y = None if self.y is None else self.y[indices]
        return Dataset({k: c.subset(indices) for k, c in self.columns.items()}, y, self.source,
                       dict(self.preprocess), self.classes, self.specs, {k: v[indices] for k, v in self.named.items()})

    def head(self, n: int) -> dict:
        """The first n samples as one feed (n small: an example, the export check)."""
        return self.read(slice(0, min(n, self._runs(len(self))[0][1])))

    def describe(self) -> dict:
        inputs = {k: {"sample_shape": list(c.sample_shape), "dtype": str(c.dtype),
                      **({"batch_axis": c.batch_axis} if c.batch_axis else {})} for k, c in self.columns.items()}
        out = {"source": self.source, "samples": len(self), "inputs": inputs, "labelled": self.labelled,
               "preprocess": self.preprocess}
        if len(self.columns) == 1:
            out["sample_shape"] = list(self.x.sample_shape)
        return out

    def bytes_per_sample(self) -> int:
        return sum(int(np.prod(c.sample_shape or (1,))) * c.dtype.itemsize for c in self.columns.values())

    # ---- validation

    def bind(self, specs: Sequence[InputSpec], num_classes: int | None = None) -> "Dataset":
        """Key the data by the model's input names and check names, dtypes, ranks, fixed dims and values;
        fills in what the model did not declare (dtype, shape) from the data. Returns self."""
        specs = list(specs)
        names = [s.name for s in specs]
        columns = dict(self.columns)
        if len(specs) == 1 and names[0] not in columns and len(columns) == 1:
            columns = {names[0]: next(iter(columns.values()))}   # `x` (or any one array) feeds the one input
        unknown = [k for k in columns if k not in names]
        if unknown:
            raise DataError(f"{self.source} has array(s) {', '.join(map(repr, unknown))} that match no input of "
                            f"the model; its inputs are {', '.join(names)} (rename the arrays, labels go in 'y')")
        missing = [s.name for s in specs if s.name not in columns and not s.optional]
        if missing:
            raise DataError(f"{self.source} has no array for input(s) {', '.join(map(repr, missing))}; the model "
                            f"takes {', '.join(names)}: save one array per input name (np.savez(f, "
                            + ", ".join(f"{n}=..." for n in names) + "))")
        specs = _infer_batch_axes(specs, columns)
        bound = []
        for spec in specs:
            if spec.name not in columns:
                continue
            if _model_layout(spec, columns[spec.name]):
                pre = self.preprocess.get(spec.name) if isinstance(self.preprocess.get(spec.name), dict) \
                    else self.preprocess
                if pre.get("layout") == "NHWC->NCHW":
                    pre["layout"] = "as saved (the model takes channels last)"
            bound.append(_bind_column(spec, columns[spec.name], self.source))
        self.columns = {s.name: columns[s.name] for s in specs if s.name in columns}
        self.specs = bound
        self.validate(num_classes=num_classes)
        return self

    def validate(self, input_shape: Sequence[int] | None = None, num_classes: int | None = None) -> None:
        """Cheap checks on everything in arrays; lazily-decoded folders are checked as they are read.
        `input_shape`: a single-input model's shape (batch first; <= 0 for a free axis)."""
        if len(self) == 0:
            raise DataError(f"{self.source} has no samples")
        sizes = {k: len(c) for k, c in self.columns.items()}
        if len(set(sizes.values())) > 1:
            raise DataError(f"{self.source}: the inputs have different sample counts {sizes}; give every input "
                            "the same number of samples")
        if input_shape is not None:
            name = self.names[0]
            shape = [d if d > 0 else f"dim{i}" for i, d in enumerate(input_shape)]
            _bind_column(InputSpec(name, None, ["batch", *shape[1:]]), self.x, self.source)
        for name, column in self.columns.items():
            base = _base(column)
            if isinstance(base, ArrayColumn) and np.issubdtype(base.raw.dtype, np.floating):
                _check_finite(base.raw, f"{self.source}: input '{name}'" if len(self.columns) > 1 else self.source,
                              base.batch_axis)
        for key, labels in (self.labels or {}).items():
            if len(labels) != len(self):
                name = LABEL_PREFIX + key if key else LABEL_KEY
                raise DataError(f"{self.source}: {len(labels)} labels for {len(self)} samples ({name!r}); give one "
                                "label row per sample, in the inputs' order")
        if self.class_ids:
            if num_classes is not None and (self.y.min() < 0 or self.y.max() >= num_classes):
                raise DataError(f"{self.source}: labels span {int(self.y.min())}..{int(self.y.max())} but the "
                                f"model has {num_classes} outputs; relabel to 0..{num_classes - 1} or check --arch")


def check_memory(model_bytes: int, output_bytes_per_sample: int, calib: Dataset, evaluation: Dataset | None,
                 *, batch: int = 64, scored: int = 512) -> float:
    """What a build holds at its peak beyond the data's memory maps, checked against the real limit
    (edgec.core.memory): the model about four times (torch, the FP32 and INT8 files, their sessions), the
    outputs of both models over the eval set, a few batches in flight, and the fallback's scored samples when
    they cannot be re-read cheaply. Returns the estimate in MB; raises DataError with the fix."""
    from edgec.core.memory import check_fits
    data = evaluation if evaluation is not None else calib
    per_sample = max(data.bytes_per_sample(), calib.bytes_per_sample())
    need = (4 * model_bytes + 3 * len(data) * output_bytes_per_sample + 4 * batch * per_sample
            + (0 if calib.rereadable else min(scored, len(calib)) * per_sample)) / 2 ** 20
    check_fits(need, f"this build ({len(calib)} calibration / {len(data)} evaluation samples of "
                     f"{per_sample / 2 ** 20:.1f} MB)",
               "use fewer --samples, a smaller --eval-data or a smaller input shape, or free memory")
    return need


def _base(column: Column) -> Column:
    return column.base if isinstance(column, Subset) else column


def _model_layout(spec: InputSpec, column: Column) -> bool:
    """Undo the NHWC->NCHW guess for an array the model takes as saved: openWakeWord's embedding model reads
    (N, 76, 32, 1) mel windows, which looked like channels-last images. True when undone."""
    base = _base(column)
    if not (isinstance(base, ArrayColumn) and base.transpose == (0, 3, 1, 2) and spec.shape is not None
            and len(spec.shape) == 4 and spec.batch_axis == 0):
        return False

    def fits(sample):
        return all(not isinstance(d, int) or d <= 0 or d == g for d, g in zip(spec.shape[1:], sample))
    saved = base.raw.shape[1:]
    if fits(saved) and not fits([saved[i - 1] for i in base.transpose[1:]]):
        base.transpose = None
        return True
    return False


def _bind_column(spec: InputSpec, column: Column, source: str) -> InputSpec:
    """Check one column against one input spec; returns the spec completed from the data."""
    base = _base(column)
    if spec.batch_axis != column.batch_axis:
        if isinstance(base, ArrayColumn) and not isinstance(column, Subset):
            base.batch_axis = spec.batch_axis
        column.batch_axis = spec.batch_axis
    where = f"{source}: input '{spec.name}'"
    got_dtype = column.dtype
    if spec.dtype is not None:
        want = np.dtype(spec.dtype)
        if kind_of(want) != kind_of(got_dtype):
            if isinstance(base, ArrayColumn) and base.scale is None:
                got_dtype = base.raw.dtype   # name the dtype as saved in the file
            raise DataError(f"{where} has dtype {got_dtype}, the model takes {want}; save the array as {want} "
                            f"(e.g. {spec.name}=a.astype(np.{want.name}))")
        if isinstance(base, ArrayColumn):
            base.dtype = want   # converted per batch
    sample = list(column.sample_shape)
    if spec.shape is not None:
        want_rank = len(spec.shape)
        if want_rank != len(sample) + 1:
            raise DataError(f"{where} has samples of shape {tuple(sample)} (rank {len(sample) + 1} with the batch), "
                            f"the model takes rank {want_rank} {_fmt(spec.shape)}; reshape the array or fix "
                            f"--input-shape {spec.name}=...")
        declared = [d for i, d in enumerate(spec.shape) if i != spec.batch_axis]
        for axis, (d, g) in enumerate(zip(declared, sample)):
            if isinstance(d, int) and d > 0 and d != g:
                what = "channels" if axis == 0 and len(sample) == 3 else "shape"
                raise DataError(f"{source}: samples have {what} {tuple(sample)}, the model expects "
                                f"{tuple(declared)}; fix --input-shape or resize/convert the data (--image-size)")
        shape = list(spec.shape)
    else:
        shape = list(sample)
        shape.insert(spec.batch_axis, "batch")
    shape[spec.batch_axis] = "batch"
    return InputSpec(spec.name, spec.dtype or column.dtype.name, shape, spec.batch_axis, spec.optional,
                     spec.source or "data")


def _infer_batch_axes(specs: list[InputSpec], columns: dict) -> list[InputSpec]:
    """A state that carries the batch elsewhere ((2, N, H) next to (N, T) audio): when an input's first axis
    disagrees with the others' sample count and exactly one of its axes matches, that axis is its batch."""
    counts = [len(columns[s.name]) for s in specs if s.name in columns and s.batch_axis == 0 and s.shape is None]
    n = max(set(counts), key=counts.count) if counts else None
    out = []
    for s in specs:
        c = columns.get(s.name)
        base = _base(c) if c is not None else None
        if (n is not None and isinstance(base, ArrayColumn) and s.shape is None and s.batch_axis == 0
                and len(c) != n and not isinstance(c, Subset)):
            axes = [i for i, d in enumerate(base.raw.shape) if d == n]
            if len(axes) == 1:
                s = InputSpec(s.name, s.dtype, None, axes[0], s.optional, s.source)
                base.batch_axis = axes[0]
        out.append(s)
    return out


def _fmt(shape) -> str:
    return "(" + ",".join(str(d) for d in shape) + ")"


def _check_finite(x: np.ndarray, source: str, batch_axis: int = 0) -> None:
    n = x.shape[batch_axis] if x.ndim else 1
    step = max(1, (64 * 2 ** 20) // max(1, x[0:1].nbytes if batch_axis == 0 else x.nbytes // max(1, n)))
    for start in range(0, n, step):  # in chunks: no full-size temporary for big arrays, pages released
        chunk = np.take(x, range(start, min(start + step, n)), axis=batch_axis) if batch_axis else x[start:start + step]
        ok = np.isfinite(chunk)
        _release(x)
        if not ok.all():
            per = np.moveaxis(ok, batch_axis, 0).reshape(ok.shape[batch_axis], -1).all(axis=1)
            bad = start + int(np.flatnonzero(~per)[0])
            raise DataError(f"{source}: sample {bad} contains NaN or Inf; clean the data first")


# ---------------------------------------------------------------- loaders

def load_data(spec: str, *, image_size: int | None = None, mean: Sequence[float] | None = None,
              std: Sequence[float] | None = None) -> Dataset:
    if std is not None and not all(np.isfinite(v) and v > 0 for v in std):   # x / 0 made every sample Inf
        raise OptionError(f"--std {','.join(map(str, std))}: every value must be a positive number (the spread "
                          "each channel is divided by), e.g. 0.229,0.224,0.225")
    if spec.startswith("builtin:"):
        return load_builtin(spec)
    hook = HOOK_RE.match(spec)
    if hook:
        return load_hook(Path(hook["file"]), hook["func"])
    path = Path(spec)
    if not path.exists():
        raise DataError(f"data {spec} not found; pass builtin:digits, a .npz file, an image folder or file.py:function")
    if path.is_dir():
        return load_image_folder(path, image_size=image_size, mean=mean, std=std)
    if path.suffix == ".npz":
        return load_npz(path, mean=mean, std=std)
    raise DataError(f"data {spec}: unsupported kind {path.suffix or '(no suffix)'}; use a .npz file (one array "
                    "per input, optional y), a folder with one subfolder per class, or file.py:function")


def load_builtin(spec: str) -> Dataset:
    from edgec.models import digits
    name, _, split_name = spec[len("builtin:"):].partition(":")
    if name != "digits":
        raise DataError(f"unknown built-in data {spec!r}; available: builtin:digits[:train|:test|:all]")
    if split_name not in ("", "train", "test", "all"):
        raise DataError(f"builtin:digits has splits train, test, all, not {split_name!r}")
    x, y = digits.load(split_name or "train")
    return Dataset({DEFAULT_KEY: x}, y, f"builtin:digits:{split_name or 'train'}", digits.PREPROCESS.copy(),
                   digits.CLASSES)


def npz_members(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz without reading it: stored members are memory-mapped at their data offset inside
    the zip (np.load ignores mmap_mode for .npz); small compressed ones are decompressed, big ones refused."""
    out = {}
    with open(path, "rb") as raw, zipfile.ZipFile(raw) as zf:
        members = zf.infolist()
        if len(members) > MAX_NPZ_ARRAYS:   # each stored array keeps a memory map (a file descriptor) open
            raise DataError(f"{path} holds {len(members):,} arrays; give one array per model input (and its labels), "
                            f"at most {MAX_NPZ_ARRAYS}")
        for info in members:
            if not info.filename.endswith(".npy"):
                raise DataError(f"{path} holds {info.filename!r}, which is not a numpy array (.npy); an .npz from "
                                "np.savez holds arrays only: save it again")
            name = info.filename[:-4]
            with zf.open(info) as member:
                version = np.lib.format.read_magic(member)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(member)
                header_len = member.tell()
            if dtype.hasobject:
                raise DataError(f"{path}: array {name!r} holds Python objects (pickles are never loaded); save "
                                "numeric arrays")
            nbytes = math.prod(shape) * dtype.itemsize   # Python ints: a declared 2**62 x 2**62 does not wrap
            if min(shape, default=0) < 0 or nbytes > info.file_size - header_len:   # the zip's own size of the member, read before any data
                raise DataError(f"{path}: array {name!r} declares shape {shape} {dtype} ({nbytes / 1e6:,.0f} MB) "
                                f"but holds {max(0, info.file_size - header_len):,} bytes; the file is truncated "
                                "or corrupt: save it again")
            if info.compress_type == zipfile.ZIP_STORED:
                raw.seek(info.header_offset)
                local = raw.read(30)
                if local[:4] != b"PK\x03\x04":
                    raise DataError(f"{path}: member {info.filename} has a broken zip header; save the file again")
                offset = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + \
                    int.from_bytes(local[28:30], "little") + header_len
                if nbytes == 0:
                    out[name] = np.zeros(shape, dtype)
                else:
                    out[name] = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                                          order="F" if fortran else "C")
            elif nbytes > COMPRESSED_LIMIT_BYTES:
                raise DataError(f"{path}: array {name!r} is compressed ({nbytes / 2 ** 20:.0f} MB unpacked) and "
                                "would be decompressed whole; save it with np.savez instead of np.savez_compressed "
                                "so that it can be memory-mapped")
            else:
                with zf.open(info) as member:
                    out[name] = np.lib.format.read_array(member, allow_pickle=False)
    return out


def load_npz(path: Path, *, mean=None, std=None) -> Dataset:
    try:
        arrays = npz_members(path)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - zipfile/numpy raise several types for a broken archive
        raise DataError(f"{path} is not a readable .npz file ({type(e).__name__}: {e})") from None
    y = arrays.pop(LABEL_KEY, None)
    named = {k[len(LABEL_PREFIX):]: arrays.pop(k) for k in list(arrays) if k.startswith(LABEL_PREFIX)}
    if not arrays:
        labels = ([LABEL_KEY] if y is not None else []) + [LABEL_PREFIX + k for k in named]
        held = f"only labels ({', '.join(labels)})" if labels else "no arrays"
        raise DataError(f"{path} has {held}, no inputs; save with np.savez(path, x=..., y=...) or one array per "
                        "input name")
    columns, preprocess = {}, {}
    for name, a in arrays.items():
        if a.ndim == 0:
            raise DataError(f"{path}: array {name!r} is a scalar; give (N, ...) with one row per sample")
        columns[name], pre = _column(a, mean, std)
        if pre:
            preprocess[name] = pre
    if len(columns) == 1:
        preprocess = next(iter(preprocess.values()), {})
    y = None if y is None else label_array(y, LABEL_KEY, str(path))
    named = {k: label_array(v, LABEL_PREFIX + k, str(path)) for k, v in named.items()}
    ds = Dataset(columns, y, str(path), preprocess, named=named)
    if len({len(c) for c in columns.values()}) == 1:
        ds.validate()
    # else: an input carries the batch on another axis (a recurrent state); checked when bound to the model
    return ds


def label_array(a, key: str, source: str) -> np.ndarray:
    """One label set as edgec scores it: class ids (N,) int64 (integer-valued floats too), or float32 targets
    (N,) / (N,K) (regression, 0/1 multilabel); NaN/Inf and odd ranks refused with the fix."""
    a = np.asarray(a)
    where = f"{source}: labels {key!r}"
    if a.dtype.hasobject or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise DataError(f"{where} have dtype {a.dtype}; save numbers: class ids (N,), 0/1 (N,K) or float targets")
    if a.ndim == 0 or a.ndim > 2:
        raise DataError(f"{where} have shape {a.shape}; give (N,) class ids or targets, or (N,K) rows "
                        "(reshape to (N, -1))")
    if a.dtype == bool:
        a = a.astype(np.int64 if a.ndim == 1 else np.float32)
    if np.issubdtype(a.dtype, np.floating):
        bad = ~np.isfinite(a)
        if bad.any():
            row = int(np.flatnonzero(bad.reshape(len(a), -1).any(axis=1))[0])
            raise DataError(f"{where}: sample {row} has a NaN or Inf label; drop those samples or give them a value")
        if a.ndim == 1 and np.all(np.mod(a, 1) == 0):
            return a.astype(np.int64)   # class ids saved as floats
        return a.astype(np.float32)
    return a.astype(np.int64) if a.ndim == 1 else a.astype(np.float32)


def _column(a: np.ndarray, mean, std) -> tuple[ArrayColumn, dict]:
    """Images become NCHW float (uint8 scaled to 0..1, optional mean/std); anything else is fed as it is."""
    pre: dict = {}
    transpose, scale = None, None
    image = a.ndim == 4 or (a.ndim == 3 and a.dtype == np.uint8)
    if a.ndim == 3 and a.dtype == np.uint8:   # (N,H,W) greyscale
        a = a[:, None]
    if a.ndim == 4:
        pre["layout"] = "NCHW"
        if a.shape[-1] in (1, 3, 4) and a.shape[1] not in (1, 3, 4):
            transpose = (0, 3, 1, 2)
            pre["layout"] = "NHWC->NCHW"
    if a.dtype == np.uint8 and image:
        scale = 1 / 255.0
        pre["scale"] = "uint8/255"
    elif (mean is not None or std is not None) and not np.issubdtype(a.dtype, np.floating):
        raise DataError(f"--mean/--std apply to float or uint8 images, not to a {a.dtype} array")
    if mean is not None or std is not None:
        if not image:
            raise DataError("--mean/--std apply to image arrays (N,C,H,W); normalize other data before saving it")
        pre.update(mean=list(mean or []), std=list(std or []))
    return ArrayColumn(a, transpose=transpose, scale=scale, mean=mean, std=std), pre


def _hook_limit_bytes() -> float:
    """What a data hook may hand over: half the memory available now, at most 8 GB (held in memory)."""
    from edgec.core.memory import available_mb
    return min(8e9, available_mb()[0] * 2 ** 20 / 2)


def load_hook(path: Path, func: str) -> Dataset:
    """Run `func()` from the Python file `path` (user code: the user named it on the command line) and collect
    the dict batches it returns; held in memory (big data: save an .npz instead)."""
    import importlib.util
    import sys
    if not path.is_file():
        raise DataError(f"data hook {path} not found; pass file.py:function")
    mod_spec = importlib.util.spec_from_file_location(f"edgec_data_hook_{path.stem}", path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
        fn = getattr(module, func, None)
        if not callable(fn):
            raise DataError(f"{path} has no function {func!r}; define def {func}(): return [{{'input': array}}, ...]")
        batches = fn()
        per_key: dict[str, list] = {}
        labels: dict[str, list] = {}
        held, limit = 0, _hook_limit_bytes()
        for i, batch in enumerate(batches):
            if held > limit:   # an endless generator would fill the memory: stop while the error can be printed
                raise DataError(f"data hook {path}:{func} has yielded {held / 1e9:.1f} GB in {i} batches and is "
                                "not done (an endless generator?); return a finite list of batches, or save the "
                                "data as an .npz (memory-mapped)")
            if not isinstance(batch, dict):
                raise DataError(f"data hook {path}:{func} yields a {type(batch).__name__} (batch {i}); yield dicts "
                                "{input_name: array} (optional 'y' labels)")
            keys = {k for k in batch if k != LABEL_KEY and not k.startswith(LABEL_PREFIX)}
            if not per_key:
                per_key = {k: [] for k in keys}
            if keys != set(per_key):
                raise DataError(f"data hook {path}:{func}: batch {i} has keys {sorted(batch)}, batch 0 had "
                                f"{sorted(per_key)}; give every batch the same inputs")
            for k in per_key:
                a = np.asarray(batch[k])
                if a.ndim == 0 or a.dtype.hasobject:
                    raise DataError(f"data hook {path}:{func}: input {k!r} of batch {i} is not a numeric array "
                                    "with a batch axis")
                per_key[k].append(a)
                held += a.nbytes
            for k in batch:
                if k == LABEL_KEY or k.startswith(LABEL_PREFIX):
                    labels.setdefault(k, []).append(np.asarray(batch[k]))
    except DataError:
        raise
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's code: its error, not ours (sys.exit in it
        # ended edgec with that code and no message)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"data hook {path}:{func} failed: {type(e).__name__}: {first[:200]}") from None
    finally:
        sys.modules.pop(mod_spec.name, None)
    if not per_key or not any(per_key.values()):
        raise DataError(f"data hook {path}:{func} returned no batches")
    columns = {}
    for k, parts in per_key.items():
        if len({p.shape[1:] for p in parts}) == 1:
            columns[k] = ArrayColumn(np.concatenate(parts))
        else:   # a dynamic axis (sequence length) varies from batch to batch: keep samples apart
            columns[k] = RaggedColumn([p[i:i + 1] for p in parts for i in range(len(p))])
    source = f"{path}:{func}"
    sets = {k: label_array(np.concatenate(v), k, source) for k, v in labels.items()}
    y = sets.pop(LABEL_KEY, None)
    ds = Dataset(columns, y, source, {"hook": source}, named={k[len(LABEL_PREFIX):]: v for k, v in sets.items()})
    ds.validate()
    return ds


def varying_axes(ds: Dataset) -> dict[str, list[int]]:
    """Per input, the sample axes whose size differs between samples (to export as dynamic)."""
    out = {}
    for k, c in ds.columns.items():
        base = _base(c)
        if isinstance(base, RaggedColumn):
            shapes = np.array([s.shape for s in base.samples])
            axes = [i for i in range(shapes.shape[1]) if i != base.batch_axis and len(set(shapes[:, i])) > 1]
            if axes:
                out[k] = axes
    return out


class LazyImages(Column):
    """Image files decoded on access; slicing returns a float32 NCHW array."""

    def __init__(self, files: list[Path], image_size: int, mean, std, source: str):
        self.files, self.image_size, self.mean, self.std, self.source = files, image_size, mean, std, source

    def __len__(self):
        return len(self.files)

    @property
    def dtype(self):
        return np.dtype(np.float32)

    @property
    def sample_shape(self):
        return (3, self.image_size, self.image_size)

    def subset(self, indices) -> "LazyImages":
        return LazyImages([self.files[i] for i in indices], self.image_size, self.mean, self.std, self.source)

    def read(self, item):
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
    return Dataset({DEFAULT_KEY: LazyImages(files, image_size, mean, std, str(path))}, np.asarray(labels, np.int64),
                   str(path), preprocess, classes)


def split(ds: Dataset, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Deterministic (stratified when labelled) split into (rest, held_out)."""
    rng = np.random.default_rng(seed)
    n = len(ds)
    if not ds.class_ids:   # unlabelled, or targets that are not classes: a plain random split
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
