"""Real ONNX Runtime sessions, batched inference and agreement metrics between two sets of outputs.

Shared by the export check (ORT vs torch) and the quantization check (INT8 vs FP32).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

from edgec.core.errors import DataError, ort_cause
from edgec.core.feeds import (BATCH, ORT_DTYPES, FeedLayout, as_feed, batch_len, feed_batches, onnx_input_specs,
                              slice_feed)


def ort_session(path, *, optimize: bool = True, threads: int | None = None):
    """A CPU session: graph optimizations on (that is how the model will run, fused INT8 kernels included)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 4   # fatal only: errors come back as exceptions (one line)
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(Path(path)), so, providers=["CPUExecutionProvider"])


def onnx_inputs(path) -> list:
    """The InputSpecs an ONNX file declares (a clean ModelError when ORT cannot load it)."""
    from edgec.core.errors import ModelError, ort_load_error
    try:
        sess = ort_session(path)
    except Exception as e:  # noqa: BLE001 - ORT raises its own pybind types
        raise ort_load_error(path, e) from None
    if not sess.get_outputs() or not sess.get_inputs():
        what = "no outputs" if not sess.get_outputs() else "no inputs (a constant)"
        raise ModelError(f"{path} declares {what}, so there is nothing to calibrate or compare; export the model "
                         "with its real inputs and outputs")
    return onnx_input_specs(sess.get_inputs())


BATCH_BYTES = 8 * 2 ** 20   # inputs per evaluation batch: ORT's arena keeps the activations of the largest batch


def auto_batch(bytes_per_sample: int, most: int = 64) -> int:
    """Samples per batch so that one batch of inputs is about BATCH_BYTES (224x224 images: 13, digits: 64)."""
    return int(max(1, min(most, BATCH_BYTES // max(1, bytes_per_sample))))


def feeds_of(session, data, batch_size: int | None) -> Iterable[dict]:
    """Dict feeds for `session` from `data`: one whole-set feed (a dict of arrays, or one array for a
    single-input model) cut into batches, a Dataset read batch by batch, or a re-iterable of batches (a list of
    dicts), streamed. `batch_size` None: sized by `auto_batch`."""
    names = [i.name for i in session.get_inputs()]
    layout = FeedLayout.of_onnx(session.get_inputs())
    if isinstance(data, (np.ndarray, Mapping)) or hasattr(data, "__array__"):
        feed = as_feed(data, names)
        n = max(1, batch_len(feed, layout))
        size = batch_size or auto_batch(sum(np.asarray(v).nbytes for v in feed.values()) // n)
        return feed_batches(feed, names, size, layout)
    if hasattr(data, "batches") and hasattr(data, "bytes_per_sample"):   # an edgec Dataset
        return (as_feed(b, names) for b in data.batches(batch_size or auto_batch(data.bytes_per_sample())))
    return (as_feed(b, names) for b in data)


def iter_onnx(session, data, batch_size: int | None = None) -> Iterator[tuple[dict, list[np.ndarray]]]:
    """(feed, outputs) batch by batch, in the data's order (the model has a dynamic batch axis; a static one is
    fed exactly that many rows at a time). `data`: a dict feed, one array (single-input models) or a
    re-iterable of dict batches (streamed)."""
    inputs = session.get_inputs()
    types = {i.name: ORT_DTYPES.get(i.type) for i in inputs}
    layout = FeedLayout.of_onnx(inputs)
    fixed = {i.name: i.shape[layout.axis(i.name)] for i in inputs
             if len(i.shape) and isinstance(i.shape[layout.axis(i.name)], int)}
    ran = False
    for feed in feeds_of(session, data, batch_size):
        n = batch_len(feed, layout)
        want = next(iter(fixed.values()), None)
        if want is not None and n != want:  # a model exported with a static batch only takes exactly that many rows
            for start in range(0, n, want):
                piece = slice_feed(feed, start, start + want, layout)
                if batch_len(piece, layout) != want:
                    raise DataError(f"the model has a fixed batch of {want} and {n} samples were given; "
                                    "export it with a dynamic batch axis or give a multiple of it")
                ran = True
                yield piece, _run(session, piece, types, layout)
        elif n:
            ran = True
            yield feed, _run(session, feed, types, layout)
    if not ran:
        raise DataError("no samples to run the model on; pass at least one sample")


def run_onnx(session, data, batch_size: int | None = None) -> list[np.ndarray]:
    """All outputs for all samples, evaluated batch by batch (iter_onnx) and joined."""
    parts = [outs for _, outs in iter_onnx(session, data, batch_size)]
    return [np.concatenate([p[i] for p in parts], axis=output_batch_axis(session, i)) for i in range(len(parts[0]))]


def _run(session, feed: dict, types: dict, layout) -> list[np.ndarray]:
    cast = {k: np.ascontiguousarray(v, dtype=types.get(k) or v.dtype) for k, v in feed.items()}
    return run_on_data(session, cast)


def run_on_data(session, feed: dict, outputs=None) -> list[np.ndarray]:
    """session.run on the user's samples. ONNX Runtime refusing their values (token ids past an embedding
    table, a shape only some samples have) is a data error that names its cause, not an internal error: the
    first samples were checked before the work started, later ones only here."""
    try:
        return session.run(outputs, feed)
    except Exception as e:  # noqa: BLE001 - ORT raises its own pybind types (InvalidArgument, Fail, ...)
        if not type(e).__module__.startswith("onnxruntime"):
            raise
        raise DataError(f"the model fails on these samples (inputs {_feed_shapes(feed)}): {ort_cause(e)}; check "
                        "that the data fits the model (e.g. token ids within its vocabulary)") from None


def _feed_shapes(feed: dict) -> str:
    return ", ".join(f"{k} {tuple(np.shape(v))} {np.asarray(v).dtype}" for k, v in feed.items())


def output_batch_axis(session, index: int) -> int:
    dims = list(session.get_outputs()[index].shape)
    return dims.index(BATCH) if BATCH in dims else 0


# values per float64 chunk of a comparison (32 MB): a whole output is never copied to float64 at once (PP-OCR
# rec's 256 x 40 x 6625 probabilities are 270 MB in float32; whole, its float64 comparisons peaked at 3.9 GB)
CHUNK_VALUES = 2 ** 22


def row_chunks(n: int, values_per_row: int) -> Iterator[slice]:
    """Slices of at most CHUNK_VALUES values (at least one row each) over n rows."""
    step = max(1, CHUNK_VALUES // max(1, values_per_row))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


class Agreement:
    """One output against its reference, streamed: fed in batches (and compared in float64 chunks of rows), it
    keeps a few numbers per sample (dot product, squared norms, squared and largest error, largest reference
    value, arg-max agreement), from which every figure of output_agreement and the noise-to-signal ratio of
    edgec.exporters.metrics.noise_ratio follow, for all samples or any subset of them."""

    FIELDS = ("dot", "rr", "gg", "noise", "max_err", "ref_max", "finite", "agree")

    def __init__(self):
        self.parts: dict[str, list] = {k: [] for k in self.FIELDS}
        self.columns: int | None = None
        self._rows: dict | None = None

    def update(self, ref, got) -> "Agreement":
        ref, got = np.asarray(ref), np.asarray(got)
        ref, got = ref.reshape(len(ref), -1), got.reshape(len(got), -1)
        if ref.shape != got.shape:
            raise DataError(f"outputs of {got.shape[1]} values per sample compared with a reference of "
                            f"{ref.shape[1]}")
        self.columns = ref.shape[1]
        for rows in row_chunks(len(ref), ref.shape[1]):
            r, g = ref[rows].astype(np.float64), got[rows].astype(np.float64)
            d = r - g
            part = {"dot": (r * g).sum(1), "rr": (r * r).sum(1), "gg": (g * g).sum(1), "noise": (d * d).sum(1),
                    "max_err": np.abs(d).max(1) if d.shape[1] else np.zeros(len(d)),
                    "ref_max": np.abs(r).max(1) if r.shape[1] else np.zeros(len(r)),
                    "finite": np.isfinite(g).all(1),
                    "agree": r.argmax(1) == g.argmax(1) if r.shape[1] > 1 else np.ones(len(r), bool)}
            for k, v in part.items():
                self.parts[k].append(v)
        self._rows = None
        return self

    def rows(self, subset=None) -> dict:
        """The per-sample numbers (all samples, or `subset`: a slice or indices)."""
        if self._rows is None:
            self._rows = {k: np.concatenate(v) if v else np.zeros(0) for k, v in self.parts.items()}
            self.parts = {k: [v] for k, v in self._rows.items()}
        return self._rows if subset is None else {k: v[subset] for k, v in self._rows.items()}

    def cosines(self, subset=None) -> np.ndarray:
        """Per-sample cosine, as output_agreement defines it (rows within float32 resolution of the output's
        scale agree whatever their cosine)."""
        r = self.rows(subset)
        return _cosine(r["dot"], r["rr"], r["gg"], r["max_err"], _tiny(r["ref_max"]))

    def pooled_cosine(self, subset=None) -> float:
        """The cosine over all samples at once (the samples as one flat vector)."""
        r = self.rows(subset)
        one = lambda k: np.array([r[k].sum()])  # noqa: E731
        return float(_cosine(one("dot"), one("rr"), one("gg"), np.array([r["max_err"].max(initial=0.0)]),
                             _tiny(r["ref_max"]))[0])

    def noise_signal(self, subset=None) -> tuple[float, float]:
        """(sum of squared errors, sum of squared reference values); noise inf where the candidate is not finite."""
        r = self.rows(subset)
        return (float(r["noise"].sum()) if r["finite"].all() else float("inf")), float(r["rr"].sum())

    def figures(self, subset=None) -> dict:
        """output_agreement's record."""
        r, cos = self.rows(subset), self.cosines(subset)
        out = {"max_abs_err": float(r["max_err"].max()), "mean_cosine": float(cos.mean()),
               "min_cosine": float(cos.min()), "ref_abs_max": float(r["ref_max"].max())}
        if (self.columns or 0) > 1:
            out["top1_agreement"] = float(r["agree"].mean())
        return out


def _tiny(ref_max: np.ndarray) -> float:
    return 1e-6 * max(1.0, float(ref_max.max()) if ref_max.size else 1.0)


def _cosine(dot, rr, gg, max_err, tiny: float) -> np.ndarray:
    # Rows equal to float32 resolution of the output's scale agree, whatever their cosine: a row near zero (a
    # saturated sigmoid: 0 in torch, 1e-39 in ORT) has a meaningless cosine. Otherwise a zero row against a
    # non-zero one does not agree.
    den = np.sqrt(rr) * np.sqrt(gg)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(max_err <= tiny, 1.0, np.where(den > 0, dot / np.maximum(den, 1e-30), 0.0))


def output_agreement(ref: np.ndarray, got: np.ndarray) -> dict:
    """Per-sample cosine of flattened outputs, max abs error, and top-1 agreement for (N, classes) logits
    (compared in float64 chunks: Agreement)."""
    return Agreement().update(ref, got).figures()


def compare_outputs(fp32_path, int8_path, samples, *, batch_size: int | None = None) -> dict:
    """Agreement of the INT8 model with the FP32 model on real samples, per output name."""
    a = ort_session(fp32_path)   # one session at a time: each keeps an arena as big as its largest batch
    names, ra = [o.name for o in a.get_outputs()], run_onnx(a, samples, batch_size)
    del a
    rb = run_onnx(ort_session(int8_path), samples, batch_size)
    return {"samples": int(len(ra[0])) if ra and np.ndim(ra[0]) else 0,
            "outputs": {n: output_agreement(x, y) for n, x, y in zip(names, ra, rb)}}


def accuracy(onnx_path, x, y: Sequence[int], batch: int | None = None, *, output: int = 0) -> float:
    """Top-1 accuracy of output `output` against integer labels."""
    y = np.asarray(y)
    logits = run_onnx(ort_session(onnx_path), x, batch)[output]
    if len(y) != len(logits):
        raise DataError(f"{len(y)} labels for {len(logits)} samples; give one label per sample")
    return float((logits.reshape(len(logits), -1).argmax(1) == y).mean())
