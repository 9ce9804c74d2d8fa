"""Model inputs as the model declares them, and batches of them as dict feeds `{input_name: np.ndarray}`.

The one shared data interface of edgec (torch-free, numpy only): a batch of model inputs is a dict from input
name to array, any dtype (float32, int64 ids/masks, bool), any rank, the batch on each input's batch axis
(0 unless declared otherwise: an LSTM state (2, N, H) carries it on axis 1). A plain array is accepted only as
the one input of a single-input model, and `as_feed` is the one place that turns it into a dict.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

from edgec.core.errors import DataError

BATCH = "batch"   # the name of the dynamic batch axis in exported models
# ONNX Runtime's input type strings -> numpy dtypes
ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


@dataclass
class InputSpec:
    """One model input. `shape` holds ints for fixed axes and names (str) for dynamic ones ("batch", "time");
    None where the model does not say (eager forward signatures): the data then decides."""
    name: str
    dtype: str | None = None          # numpy dtype name ("float32", "int64", "bool"); None: from the data
    shape: list | None = None
    batch_axis: int = 0
    optional: bool = False            # has a default in the model's signature: fed only when the data has it
    source: str = ""                  # where the entry came from: "signature", "torchscript", "export", "file"...

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape or []) if isinstance(d, str)}

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FeedLayout:
    """Input names in the model's order and the batch axis of each (what slicing and concatenating need)."""
    names: list[str]
    batch_axes: dict[str, int] = field(default_factory=dict)

    def axis(self, name: str) -> int:
        return self.batch_axes.get(name, 0)

    @classmethod
    def of(cls, specs: Sequence[InputSpec]) -> "FeedLayout":
        return cls([s.name for s in specs], {s.name: s.batch_axis for s in specs})

    @classmethod
    def of_onnx(cls, inputs) -> "FeedLayout":
        """From ORT's `session.get_inputs()` (or onnx ValueInfos): the batch axis is the one named "batch",
        else 0."""
        names, axes = [], {}
        for i in inputs:
            dims = list(i.shape) if hasattr(i, "shape") else [
                d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            names.append(i.name)
            axes[i.name] = dims.index(BATCH) if BATCH in dims else 0
        return cls(names, axes)


def as_feed(x, names: Sequence[str]) -> dict[str, np.ndarray]:
    """A batch as a dict feed. A dict passes through (every key must name an input); a plain array (or torch
    tensor) is the one input of a single-input model."""
    names = list(names)
    if isinstance(x, Mapping):
        if len(x) == 1 and len(names) == 1 and next(iter(x)) not in names:   # `x` of a single-input model
            return {names[0]: np.asarray(next(iter(x.values())))}
        unknown = [k for k in x if k not in names]
        if unknown:
            raise DataError(f"the data names {', '.join(map(repr, unknown))}, which the model does not take; "
                            f"its inputs are {', '.join(names)}")
        return {k: np.asarray(v) for k, v in x.items()}
    if len(names) != 1:
        raise DataError(f"got one array for a model with {len(names)} inputs ({', '.join(names)}); "
                        f"give a dict (or an .npz) with one array per input name")
    return {names[0]: np.asarray(x)}


def batch_len(feed: Mapping[str, np.ndarray], layout: FeedLayout | None = None) -> int:
    """Samples in a feed (all inputs must agree)."""
    sizes = {k: int(np.shape(v)[layout.axis(k) if layout else 0]) if np.ndim(v) else 1 for k, v in feed.items()}
    if len(set(sizes.values())) > 1:
        raise DataError(f"the inputs of one batch have different batch sizes {sizes}; give every input the "
                        "same number of samples")
    return next(iter(sizes.values()), 0)


def slice_feed(feed: Mapping[str, np.ndarray], start: int, stop: int, layout: FeedLayout | None = None) -> dict:
    out = {}
    for k, v in feed.items():
        axis = layout.axis(k) if layout else 0
        index = [slice(None)] * np.ndim(v)
        index[axis] = slice(start, stop)
        out[k] = v[tuple(index)]
    return out


def concat_feeds(parts: Sequence[Mapping[str, np.ndarray]], layout: FeedLayout | None = None) -> dict:
    if len(parts) == 1:
        return dict(parts[0])
    return {k: np.concatenate([p[k] for p in parts], axis=layout.axis(k) if layout else 0) for k in parts[0]}


def _stackable(a: Mapping, b: Mapping, layout: FeedLayout | None) -> bool:
    """Same inputs with the same non-batch dims (a dynamic time axis may differ from batch to batch)."""
    if a.keys() != b.keys():
        return False
    for k in a:
        axis = layout.axis(k) if layout else 0
        sa, sb = list(np.shape(a[k])), list(np.shape(b[k]))
        if len(sa) != len(sb) or sa[:axis] + sa[axis + 1:] != sb[:axis] + sb[axis + 1:]:
            return False
    return True


def rechunk_feeds(feeds: Iterable[Mapping[str, np.ndarray]], size: int,
                  layout: FeedLayout | None = None) -> Iterator[dict]:
    """Regroup feeds of any batch sizes into chunks of at most `size` samples (at most one chunk in memory);
    batches whose non-batch dims differ (varying sequence lengths) are never joined."""
    pending: list[dict] = []
    count = 0
    for feed in feeds:
        if pending and not _stackable(pending[0], feed, layout):
            yield concat_feeds(pending, layout)
            pending, count = [], 0
        n, start = batch_len(feed, layout), 0
        while start < n:
            take = min(size - count, n - start)
            pending.append(slice_feed(feed, start, start + take, layout))
            count += take
            start += take
            if count == size:
                yield concat_feeds(pending, layout)
                pending, count = [], 0
    if pending:
        yield concat_feeds(pending, layout)


def feed_batches(x, names: Sequence[str], batch_size: int, layout: FeedLayout | None = None) -> Iterator[dict]:
    """Batches of a whole-set feed (dict of arrays, or one array for a single-input model)."""
    feed = as_feed(x, names) if not isinstance(x, Mapping) else x
    n = batch_len(feed, layout)
    for start in range(0, n, batch_size):
        yield {k: np.ascontiguousarray(v) for k, v in slice_feed(feed, start, start + batch_size, layout).items()}


def describe_feed(feed: Mapping[str, np.ndarray]) -> dict:
    return {k: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype)} for k, v in feed.items()}


def onnx_input_specs(inputs, initializers: Sequence[str] = ()) -> list[InputSpec]:
    """InputSpecs from ORT's `session.get_inputs()` or an onnx graph's inputs (initializers left out)."""
    specs = []
    skip = set(initializers)
    for i in inputs:
        if i.name in skip:
            continue
        if hasattr(i, "type") and isinstance(i.type, str):          # onnxruntime NodeArg
            dims, dtype = list(i.shape), ORT_DTYPES.get(i.type)
        else:                                                       # onnx ValueInfoProto
            t = i.type.tensor_type
            dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in t.shape.dim]
            dtype = _ONNX_ELEM.get(t.elem_type)
        dims = [d if isinstance(d, int) and d > 0 else (d if isinstance(d, str) and d else "?") for d in dims]
        axis = dims.index(BATCH) if BATCH in dims else 0
        specs.append(InputSpec(i.name, np.dtype(dtype).name if dtype is not None else None, dims, axis,
                               False, "onnx"))
    return specs


# onnx.TensorProto element types (numbers fixed by the ONNX standard) -> numpy
_ONNX_ELEM = {1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64, 9: np.bool_,
              10: np.float16, 11: np.float64}


def kind_of(dtype) -> str:
    """'float', 'int' or 'bool': what may be converted into what (within a kind only)."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return "bool"
    if np.issubdtype(dtype, np.floating):
        return "float"
    if np.issubdtype(dtype, np.integer):
        return "int"
    return dtype.name


def conform(feed: Mapping[str, np.ndarray], specs: Sequence[InputSpec], where: str = "the data") -> dict:
    """Check a feed against the model's inputs (names, dtype kind, rank, fixed dims, finite floats) and convert
    each array to the input's dtype; returns the converted feed. One-line DataErrors naming the input."""
    by_name = {s.name: s for s in specs}
    out = {}
    for name, value in feed.items():
        spec = by_name.get(name)
        a = np.asarray(value)
        if a.ndim == 0:
            raise DataError(f"{where} gives a scalar for input '{name}'; give arrays of shape (batch, ...)")
        if spec is None:
            raise DataError(f"{where} names {name!r}, which the model does not take; its inputs are "
                            f"{', '.join(by_name)}")
        if spec.dtype is not None:
            want = np.dtype(spec.dtype)
            if kind_of(want) != kind_of(a.dtype):
                raise DataError(f"{where}: input '{name}' has dtype {a.dtype}, the model takes {want}; give "
                                f"{want} data")
            a = a.astype(want, copy=False)
        if spec.shape:
            if len(spec.shape) != a.ndim:
                raise DataError(f"{where}: input '{name}' has shape {a.shape} (rank {a.ndim}), the model takes "
                                f"rank {len(spec.shape)} ({','.join(map(str, spec.shape))}); reshape the data")
            for axis, (d, g) in enumerate(zip(spec.shape, a.shape)):
                if axis != spec.batch_axis and isinstance(d, int) and d != g:
                    raise DataError(f"{where}: input '{name}' has shape {a.shape}, the model expects "
                                    f"({','.join(map(str, spec.shape))}) (axis {axis}); resize the data or fix "
                                    "--input-shape")
        if kind_of(a.dtype) == "float" and not np.isfinite(a).all():
            raise DataError(f"{where}: input '{name}' contains NaN or Inf; clean the data first")
        out[name] = np.ascontiguousarray(a)
    missing = [s.name for s in specs if s.name not in out and not s.optional]
    if missing:
        raise DataError(f"{where} has no values for input(s) {', '.join(map(repr, missing))}; the model takes "
                        f"{', '.join(by_name)}: give one array per input name")
    return out


def primary(feed: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The input that says most about the data (images, audio): the first float one, else the first."""
    for v in feed.values():
        if kind_of(np.asarray(v).dtype) == "float":
            return np.asarray(v)
    return next(iter(feed.values()), None)
