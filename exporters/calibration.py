"""Streaming calibration with bounded memory, for every method.

ONNX Runtime's Entropy/Percentile calibrators keep every activation of every sample until the end (measured
here: 2.2 GB for ResNet18, 4.2 GB for MobileNetV2 at 64 samples) and need equal batch sizes. Here the model is
augmented once (every float activation becomes an output), samples are fed in chunks sized to a memory budget,
and each chunk is folded into per-tensor statistics (running min/max and a fixed-size histogram whose range
grows by powers of two) before the next one runs. Ranges are handed to ORT's quantizer as a calibration cache.
"""
from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from edgec.core.errors import DataError, OptionError
from edgec.core.feeds import (FeedLayout, InputSpec, as_feed, batch_len, conform, onnx_input_specs, primary,
                              rechunk_feeds, slice_feed)
from edgec.core.memory import available_mb as _available, rss_mb
from edgec.exporters.compare import run_on_data

METHODS = ("minmax", "entropy", "percentile", "auto", "mse")
Progress = Callable[[int, int, str], None]  # (done, total, status)


# ---------------------------------------------------------------- input stream and its guard

def stream_samples(calibration: Iterable, limit: int | None, specs: Sequence[InputSpec] | None = None):
    """Yield dict feeds {input name: array} from a re-iterable of batches (dicts, or arrays for a single-input
    model), checked against the model's inputs and converted to their dtypes batch by batch, stopping after
    `limit` samples. Integer and bool inputs (ids, masks) are fed as they are: only floats get ranges."""
    names = [s.name for s in specs] if specs else None
    layout = FeedLayout.of(specs) if specs else None
    seen = 0
    for batch in calibration:
        if names is None:
            feed = {k: np.asarray(v) for k, v in batch.items()} if isinstance(batch, Mapping) else \
                {"input": np.asarray(batch, dtype=np.float32)}
        else:
            feed = conform(as_feed(batch, names), specs, "calibration data")
        if any(v.ndim == 0 for v in feed.values()):
            raise DataError("calibration yields scalars; yield arrays of shape (batch, *input_shape)")
        n = batch_len(feed, layout)
        if limit is not None and seen + n > limit:
            feed, n = slice_feed(feed, 0, limit - seen, layout), limit - seen
        if n:
            seen += n
            yield feed
        if limit is not None and seen >= limit:
            return


# log10|x| histogram bins for underflow_fractions: 1/20 decade from 1e-30 to 1e30
_DECADES = np.linspace(-30, 30, 1201)


class _Underflow:
    """Per float graph input: the share of its nonzero values that one 8-bit scale over the input's range rounds
    to zero, from a log-magnitude histogram kept during the calibration pass. A power spectrum fed raw spans
    decades (Resemblyzer's mels: 85 %); a speech waveform measured 11 %, images and log-mels under 2 %."""

    def __init__(self):
        self.hist, self.span = {}, {}

    def update(self, name: str, x: np.ndarray) -> None:
        x = x[np.isfinite(x)]
        if not x.size:
            return
        lo, hi = self.span.get(name, (math.inf, -math.inf))
        self.span[name] = (min(lo, float(x.min())), max(hi, float(x.max())))
        nz = np.abs(x[x != 0].astype(np.float64, copy=False))
        h = np.histogram(np.log10(nz), _DECADES)[0] if nz.size else np.zeros(len(_DECADES) - 1, np.int64)
        self.hist[name] = self.hist.get(name, 0) + h

    def result(self) -> dict[str, float]:
        out = {}
        for name, h in self.hist.items():
            lo, hi = self.span[name]
            total = int(h.sum())
            if total and hi > lo:   # whole bins under half a step
                out[name] = int(h[_DECADES[1:] <= math.log10((hi - lo) / 255 / 2)].sum()) / total
        return out


def rechunk(batches: Iterable[dict], size: int, layout: FeedLayout | None = None):
    """Regroup feeds (or plain arrays) of any sizes into chunks of at most `size` samples (no more than one
    chunk in memory)."""
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        return
    if isinstance(first, Mapping):
        yield from rechunk_feeds(itertools.chain([first], batches), size, layout)
    else:
        for chunk in rechunk_feeds(({"": b} for b in itertools.chain([first], batches)), size):
            yield chunk[""]


def ort_reader(calibration: Iterable, onnx_path, limit: int | None = None):
    """An onnxruntime CalibrationDataReader over the same data (plain ORT `quantize_static` baselines): one
    sample at a time as a dict feed for every input, ids and masks included."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    specs = onnx_input_specs(graph.input, [i.name for i in graph.initializer])
    layout = FeedLayout.of(specs)

    class FeedReader(CalibrationDataReader):
        def __init__(self):
            self.rewind()

        def rewind(self):
            self.samples = (slice_feed(f, i, i + 1, layout) for f in stream_samples(calibration, limit, specs)
                            for i in range(batch_len(f, layout)))

        def get_next(self):
            return next(self.samples, None)

    return FeedReader()


@dataclass
class SampleCheck:
    samples: int
    neighbour_correlation: float   # real images: high; i.i.d. noise: ~0
    std: float
    problems: list[str] = field(default_factory=list)


def check_samples(head: np.ndarray, total: int | None, *, min_samples: int = 32) -> SampleCheck:
    """Cheap guard against calibrating on random or too few samples (the ranges would not fit real inputs)."""
    x = head.reshape(len(head), -1, head.shape[-1]) if head.ndim >= 3 else head.reshape(len(head), 1, -1)
    a, b = x[..., :-1].ravel().astype(np.float64), x[..., 1:].ravel().astype(np.float64)
    corr = float(np.corrcoef(a, b)[0, 1]) if a.size > 2 and a.std() > 0 and b.std() > 0 else 0.0
    chk = SampleCheck(total if total is not None else len(head), round(corr, 4),
                      float(head.std(dtype=np.float64)))   # float32 squares overflow past 1e19
    if total is not None and total < min_samples:
        chk.problems.append(f"only {total} calibration samples (at least {min_samples} wanted)")
    if chk.std == 0:
        chk.problems.append("calibration samples are constant")
    elif head.ndim >= 3 and head.shape[-1] > 2 and abs(corr) < 0.1:
        chk.problems.append(f"calibration samples look like random noise (neighbouring values correlate "
                            f"{corr:.2f}; real images > 0.5)")
    return chk


# ---------------------------------------------------------------- per-tensor statistics

HISTOGRAM_VALUES = 1 << 16   # at most this many values histogrammed per tensor and chunk (subsampled)
HISTOGRAM_PER_SAMPLE = 1 << 13   # and this many per sample of the chunk: 2M per tensor for 256 samples


class TensorStats:
    """Running min/max and a symmetric histogram over [-T, T] with a fixed bin count.

    When a chunk exceeds T, T doubles (as often as needed) and the old histogram is merged pairwise, so the
    memory stays `bins` counters per tensor whatever the data, and no activation is kept."""

    def __init__(self, bins: int, histogram: bool):
        assert bins & (bins - 1) == 0, "bins must be a power of two (exact merging when the range doubles)"
        self.bins, self.lo, self.hi, self.count = bins, math.inf, -math.inf, 0
        self.hist = np.zeros(bins, dtype=np.int64) if histogram else None
        self.T = 0.0
        self.zeros = 0.0           # share of exact zeros (ReLU outputs): quantized without error
        self._rng = np.random.default_rng(0)

    def update(self, arr: np.ndarray) -> None:
        if arr.size == 0:
            return
        lo, hi = float(arr.min()), float(arr.max())
        self.lo, self.hi, self.count = min(self.lo, lo), max(self.hi, hi), self.count + arr.size
        if self.hist is None:
            return
        amax = max(abs(lo), abs(hi))
        if not math.isfinite(amax):   # an infinite (attention mask) value: no histogram; ranges are minmax's
            self.hist = None
            return
        if self.T == 0.0:
            self.T = amax if amax > 0 else 1e-12
        elif amax > self.T:
            self._grow(int(math.ceil(math.log2(amax / self.T))))
        flat = arr.reshape(-1)
        wanted = min(HISTOGRAM_VALUES, HISTOGRAM_PER_SAMPLE * (arr.shape[0] if arr.ndim else 1))
        if flat.size > wanted:   # a random subsample: the range stays exact (min/max above)
            # not a strided one: a stride aliases with the layout (NCHW rows), and on the demo ResNet18 it
            # never saw the stem's values above 1.3 of 5.6, so MSE ranges clipped them (cosine 0.9998 -> 0.875)
            flat = flat[self._rng.integers(0, flat.size, wanted)]
        # np.histogram's binning, by bincount (4x faster here: calibration histograms every tensor per chunk)
        idx = ((flat.astype(np.float64) + self.T) * (self.bins / (2 * self.T))).astype(np.int64)
        h = np.bincount(np.clip(idx, 0, self.bins - 1, out=idx), minlength=self.bins)
        weight = arr.size / flat.size
        self.zeros += float(np.count_nonzero(flat == 0)) * weight
        self.hist += np.rint(h * weight).astype(np.int64)

    def _grow(self, k: int) -> None:
        f, n, half = 2 ** k, self.bins, self.bins // 2
        new = np.zeros_like(self.hist)
        if f <= n:
            merged = self.hist.reshape(n // f, f).sum(1)
            new[half - n // (2 * f): half + n // (2 * f)] = merged
        else:  # the old range shrinks below one bin: keep the sign of the mass
            new[half - 1], new[half] = self.hist[:half].sum(), self.hist[half:].sum()
        self.hist, self.T = new, self.T * f

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(-self.T, self.T, self.bins + 1)

    # ---- range choices from the statistics

    def minmax(self) -> tuple[float, float]:
        return self.lo, self.hi

    def percentile(self, pct: float) -> tuple[float, float]:
        cdf = np.cumsum(self.hist) / max(1, self.hist.sum())
        cut = (100.0 - pct) / 200.0
        e = self.edges
        lo = e[min(np.searchsorted(cdf, cut), self.bins - 1)]
        hi = e[min(np.searchsorted(cdf, 1.0 - cut) + 1, self.bins)]
        return max(self.lo, float(lo)), min(self.hi, float(hi))

    def entropy(self, levels: int = 256, max_candidates: int = 256) -> tuple[float, float]:
        """KL-divergence threshold search (TensorRT's method, as in ORT's HistogramCollector), vectorised.

        Non-negative tensors (after ReLU: uint8 activations) search [0, t] with all `levels` over the positive
        side; others search symmetric windows [-t, t]. ORT's version spreads 128 levels over [-t, t] for both,
        which models a post-ReLU tensor with 64 levels and so clips far too much."""
        hist, n = self.hist.astype(np.float64), self.bins
        zero = n // 2
        if hist.sum() == 0:
            return self.minmax()
        e = self.edges
        if self.lo >= 0:
            windows = [(zero, zero + j) for j in _candidates(levels, zero, max_candidates)]
        else:
            windows = [(zero - i, zero + i) for i in _candidates(max(1, levels // 2), zero, max_candidates)]
        if not windows:
            return self.minmax()
        csum = np.concatenate([[0.0], np.cumsum(hist)])
        best, best_w = math.inf, windows[-1]
        for s, t in windows:
            div = _window_kl(hist[s:t], csum[s], csum[n] - csum[t], levels)
            if div < best:
                best, best_w = div, (s, t)
        return max(self.lo, float(e[best_w[0]])), min(self.hi, float(e[best_w[1]]))


def _candidates(smallest: int, largest: int, k: int) -> np.ndarray:
    if largest < smallest:
        return np.array([], dtype=int)
    return np.unique(np.linspace(smallest, largest, min(k, largest - smallest + 1)).astype(int))


def _window_kl(sliced: np.ndarray, left: float, right: float, levels: int) -> float:
    """KL(p || q): p = the window with outliers folded into its end bins, q = the window at `levels` levels."""
    p = sliced.copy()
    p[0] += left
    p[-1] += right
    levels = min(levels, p.size)
    m = p.size // levels
    body = m * levels
    nz = (p[:body] != 0).reshape(levels, m)
    counts = nz.sum(1)
    per = np.divide(sliced[:body].reshape(levels, m).sum(1), counts, out=np.zeros(levels), where=counts > 0)
    q = np.zeros_like(p)
    q[:body] = (nz * per[:, None]).ravel()
    q[body:] = sliced[body:]
    return _kl(p, q)


def _kl(p: np.ndarray, q: np.ndarray, eps: float = 1e-4) -> float:
    p, q = _smooth(p, eps), _smooth(q, eps)
    if p is None or q is None:
        return math.inf
    return float((p * np.log(p / q)).sum())


def _smooth(p: np.ndarray, eps: float):
    """Give empty bins a little mass taken from the others, on raw counts (as ORT/MXNet do): then every
    non-empty bin (a count >= 1) stays positive. None when that is impossible."""
    zeros = p == 0
    nz = int((~zeros).sum())
    if nz == 0:
        return None
    eps1 = eps * zeros.sum() / nz
    if eps1 >= 1.0:
        return None
    p = p.astype(np.float64) + eps * zeros - eps1 * (~zeros)
    return p / p.sum()


def mse_range(stats: TensorStats, qmin: int, qmax: int, symmetric: bool, steps: int = 64) -> tuple[float, float]:
    """The clipping range with the least expected quantization error of this tensor (clipping error of the
    mass outside + rounding error s^2/12 of the non-zero mass inside; exact zeros cost nothing), searched
    over `steps` x `steps` candidate (lo, hi) pairs shrunk from the observed min/max; TensorRT and NNCF
    choose ranges this way. Vectorised with cumulative sums: O(bins + steps^2) per tensor."""
    lo0, hi0 = min(stats.lo, 0.0), max(stats.hi, 0.0)
    if stats.hist is None or stats.hist.sum() == 0 or hi0 <= lo0 or not math.isfinite(hi0 - lo0):
        return stats.minmax()
    # searched on values scaled to [-1, 1]: the same argmin, and no overflow in c^2 for the -3.4e38 a
    # transformer's additive attention mask holds
    unit = max(-lo0, hi0)
    lo0, hi0 = lo0 / unit, hi0 / unit
    e = stats.edges / unit
    c = (e[:-1] + e[1:]) / 2
    h = stats.hist.astype(np.float64)
    total = h.sum()
    zeros = min(stats.zeros, total)
    cum0, cum1, cum2 = (np.concatenate([[0.0], np.cumsum(h * c ** k)]) for k in (0, 1, 2))
    shrink = np.geomspace(1.0, 1e-3, steps)
    his = hi0 * shrink if hi0 > 0 else np.zeros(1)
    los = lo0 * shrink if lo0 < 0 else np.zeros(1)
    if symmetric:
        m = max(-lo0, hi0) * shrink
        los, his = -m, m
    L, H = (los[:, None], his[None, :]) if not symmetric else (los[:, None], his[:, None])
    il = np.searchsorted(c, L)            # bins below il are clipped to L
    ih = np.searchsorted(c, H, side="right")   # bins from ih on are clipped to H
    below = cum2[il] - 2 * L * cum1[il] + L * L * cum0[il]
    above = (cum2[-1] - cum2[ih]) - 2 * H * (cum1[-1] - cum1[ih]) + H * H * (cum0[-1] - cum0[ih])
    inside = np.maximum(cum0[ih] - cum0[il] - zeros, 0.0)
    s = np.maximum(H - L, 1e-12) / (qmax - qmin)
    err = below + above + inside * s * s / 12
    i, j = np.unravel_index(int(np.argmin(err)), err.shape)
    lo, hi = float(np.broadcast_to(L, err.shape)[i, j]) * unit, float(np.broadcast_to(H, err.shape)[i, j]) * unit
    return max(stats.lo, lo) if stats.lo < 0 else stats.lo, min(stats.hi, hi)


def quant_mse(stats: TensorStats, lo: float, hi: float, qmin: int, qmax: int, symmetric: bool) -> float:
    """Expected squared error of quantizing the histogrammed values with range [lo, hi]: clipping error of the
    mass outside, plus the uniform rounding error s^2/12 of the mass inside."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        hi = max(abs(lo), abs(hi))
        lo = -hi
    s = (hi - lo) / (qmax - qmin) if hi > lo else 1e-12
    e = stats.edges
    c = (e[:-1] + e[1:]) / 2
    h = stats.hist.astype(np.float64)
    clip = np.clip(c, lo, hi)
    inside = (c >= lo) & (c <= hi)
    return float((h * (c - clip) ** 2).sum() + h[inside].sum() * s * s / 12) / max(1.0, h.sum())


# ---------------------------------------------------------------- the calibrator

@dataclass
class CalibrationResult:
    ranges: dict                   # tensor name -> (lo, hi)
    method: str
    samples: int
    chunk_size: int
    tensors: int
    bytes_per_sample: int
    estimated_peak_mb: float
    peak_rss_mb: float
    seconds: float
    chosen: dict = field(default_factory=dict)   # auto: how many tensors each candidate won
    sample_check: SampleCheck | None = None
    channel_means: dict = field(default_factory=dict)  # tensor -> (per-channel mean over axis 1, spatial shape)
    bounded: int = 0               # tensors calibrated on values clamped to what their readers can see
    underflow: dict = field(default_factory=dict)   # float input -> share of its values one 8-bit scale zeroes

    def summary(self) -> dict:
        return {"method": self.method, "samples": self.samples, "chunk_size": self.chunk_size,
                "tensors": self.tensors, "activation_bytes_per_sample": self.bytes_per_sample,
                "estimated_peak_mb": round(self.estimated_peak_mb, 1), "peak_rss_mb": round(self.peak_rss_mb, 1),
                "seconds": round(self.seconds, 2), "auto_choices": self.chosen, "saturation_bounded": self.bounded,
                "sample_check": None if self.sample_check is None else vars(self.sample_check)}


def available_mb() -> float:
    """What this process may still allocate: cgroup limit, ulimit, then MemAvailable (edgec.core.memory)."""
    return _available()[0]


def _float_activations(model) -> dict[str, list]:
    """Float tensors that are not weights: name -> shape (ints, or a string for symbolic dims)."""
    import onnx
    infos = {vi.name: vi for vi in [*model.graph.value_info, *model.graph.output, *model.graph.input]}
    weights = {i.name for i in model.graph.initializer}
    wanted = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    out = {}
    for node in model.graph.node:
        for name in [*node.input, *node.output]:
            vi = infos.get(name)
            if name and name not in weights and vi is not None and vi.type.HasField("tensor_type") \
                    and vi.type.tensor_type.elem_type in wanted:
                out[name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                             for d in vi.type.tensor_type.shape.dim]
    return out


def _bytes_per_sample(shapes: dict[str, list]) -> int:
    total = 0
    for dims in shapes.values():
        rest = [d for d in dims[1:] if isinstance(d, int) and d > 0]
        total += 4 * int(np.prod(rest)) if rest or len(dims) <= 1 else 4
    return total


def plan_memory(bytes_per_sample: int, memory_mb: float, avail_mb: float, current_mb: float) -> tuple[int, float]:
    """(chunk size, estimated peak MB), or a clean error when even one sample would not fit in memory.

    Every activation of a chunk is alive at once (returned as outputs), plus ORT's arena holding about as
    much again, hence 2x."""
    per_sample_mb = 2 * bytes_per_sample / 2 ** 20
    if current_mb + per_sample_mb > 0.9 * avail_mb:
        raise OptionError(f"calibration needs about {per_sample_mb:.0f} MB per sample and only {avail_mb:.0f} MB "
                          "are available; free memory, use a smaller --input-shape or quantize on a bigger machine")
    chunk = int(max(1, min(64, memory_mb // max(per_sample_mb, 1e-9))))
    return chunk, current_mb + chunk * per_sample_mb


def calibrate(model_path, calibration: Iterable, *, method: str = "minmax", num_samples: int | None = 256,
              symmetric: bool = False, qrange: tuple[int, int] = (0, 255), percentile: float = 99.999,
              bins: int = 2048, memory_mb: float = 1024, workdir, force: bool = False,
              progress: Progress | None = None, channel_means: Iterable[str] = (),
              bounds: Mapping[str, tuple[float, float]] | None = None) -> CalibrationResult:
    """Stream `calibration` through the model once and choose a range for every float activation.
    `channel_means`: tensors whose per-channel (axis 1) mean is also wanted (fast bias correction).
    `bounds`: tensor -> (lo, hi) that its readers cannot see beyond (edgec.exporters.activations): its
    statistics, so every method's range, are those of the values clamped there."""
    import onnx
    import onnxruntime as ort

    if method not in METHODS:
        raise OptionError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    started = time.perf_counter()
    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path)))
    shapes = _float_activations(model)
    specs = onnx_input_specs(model.graph.input, [i.name for i in model.graph.initializer])
    input_names = {s.name for s in specs}
    layout = FeedLayout.of(specs)
    outputs = {o.name for o in model.graph.output}
    infos = {vi.name: vi for vi in model.graph.value_info}
    for name in shapes:
        if name not in outputs and name not in input_names:
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(infos[name])  # keeps the element type (float16 models too)
            model.graph.output.append(vi)
    aug = Path(workdir) / "calibration-augmented.onnx"
    onnx.save_model(model, str(aug), save_as_external_data=model.ByteSize() > 1_800_000_000)
    del model

    per_sample = _bytes_per_sample(shapes)
    chunk, estimated = plan_memory(per_sample, memory_mb, available_mb(), rss_mb())

    so = ort.SessionOptions()
    so.log_severity_level = 4   # fatal only: errors come back as exceptions (one line)
    # No fusion: the ranges must be those of the tensors the quantizer will see.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.enable_cpu_mem_arena = False   # every activation is returned as an output: no arena to keep on top of them
    sess = ort.InferenceSession(str(aug), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    stats = {n: TensorStats(bins, histogram=method != "minmax") for n in shapes}
    bounds = {k: v for k, v in (bounds or {}).items() if k in stats and k not in outputs}
    means = _ChannelMeans(set(channel_means) & set(shapes))
    underflow = _Underflow()

    stream = stream_samples(calibration, num_samples, specs)
    first = next(stream, None)
    if first is None:
        raise DataError("the calibration data is empty; give at least one sample")
    probe = primary(first)[:256]   # the image/audio input: what the sample guard looks at
    chk = check_samples(probe, total=_count_hint(calibration, num_samples, layout))
    if chk.problems and not force:
        raise DataError(f"refusing to calibrate: {'; '.join(chk.problems)}; calibrate on real inputs "
                        "(or pass force to accept it)")

    def chained():
        yield first
        yield from stream

    total = num_samples if num_samples is not None else None
    done, peak = 0, rss_mb()
    for feed in rechunk(chained(), chunk, layout):
        for name, value in zip(names, run_on_data(sess, feed)):
            if name in stats:
                stats[name].update(np.clip(value, *bounds[name]) if name in bounds else value)
                means.update(name, value)
        for name, value in feed.items():   # float graph inputs get their range too; ids and masks never
            if name in stats:
                stats[name].update(value)
                means.update(name, value)
                underflow.update(name, value)
        peak = max(peak, rss_mb())
        done += batch_len(feed, layout)
        if progress:
            progress(done, total or done, f"calibrating ({method})")
    if done == 0:
        raise DataError("the calibration data is empty; give at least one sample")
    if chk.samples != done:  # the count was not known up front: check the real total now
        chk = check_samples(probe, total=done)
        if chk.problems and not force:
            raise DataError(f"refusing to calibrate: {'; '.join(chk.problems)}; calibrate on more real inputs "
                            "(or pass force to accept it)")
    # Graph inputs and outputs keep their full range with every method: clipping the model's own outputs
    # (logits) is what makes entropy calibration lose whole accuracy points (measured on a digits MobileNetV2:
    # 96.7% -> 91.9%), and inputs are bounded by preprocessing anyway.
    ranges, chosen = _choose(stats, method, symmetric, qrange, percentile, keep_full=outputs | input_names)
    return CalibrationResult(ranges, method, done, chunk, len(stats), per_sample, estimated, peak,
                             time.perf_counter() - started, chosen, chk, means.result(), len(bounds),
                             underflow.result())


class _ChannelMeans:
    """Running per-channel (axis 1) means of a few tensors, and their spatial shape (the last one seen)."""

    def __init__(self, names: set[str]):
        self.names, self.sums, self.counts, self.shapes = names, {}, {}, {}

    def update(self, name: str, v: np.ndarray) -> None:
        if name not in self.names or v.ndim < 2:
            return
        part = v.reshape(v.shape[0], v.shape[1], -1).mean(axis=2).astype(np.float64).sum(axis=0)
        self.sums[name] = self.sums.get(name, 0.0) + part
        self.counts[name] = self.counts.get(name, 0) + v.shape[0]
        self.shapes[name] = tuple(v.shape[2:])

    def result(self) -> dict:
        return {k: (self.sums[k] / self.counts[k], self.shapes[k]) for k in self.sums}


def _count_hint(calibration, limit, layout: FeedLayout | None = None) -> int | None:
    """How many samples there will be, if the container says so without a pass over the data."""
    if isinstance(calibration, (list, tuple)):  # a state input carries its batch on another axis: the layout's
        n = sum(batch_len(b, layout) if isinstance(b, Mapping) else len(b) for b in calibration)
    elif isinstance(calibration, np.ndarray):
        n = len(calibration)
    else:
        return None
    return n if limit is None else min(n, limit)


def _choose(stats: dict[str, TensorStats], method: str, symmetric: bool, qrange, percentile: float,
            keep_full: set[str] = frozenset()):
    ranges, chosen = {}, {}
    for name, st in stats.items():
        if st.count == 0:
            continue
        if method == "minmax" or name in keep_full or st.hist is None:   # no histogram: an infinite value
            lo, hi = st.minmax()
        elif method == "percentile":
            lo, hi = st.percentile(percentile)
        elif method == "entropy":
            lo, hi = st.entropy()
        elif method == "mse":
            lo, hi = mse_range(st, *qrange, symmetric)
        else:  # auto: the candidate with the least expected quantization error for this tensor
            cands = {"minmax": st.minmax(), "percentile": st.percentile(percentile),
                     "percentile99.99": st.percentile(99.99), "entropy": st.entropy()}
            best = min(cands, key=lambda k: quant_mse(st, *cands[k], *qrange, symmetric))
            chosen[best] = chosen.get(best, 0) + 1
            lo, hi = cands[best]
        if symmetric:
            m = max(abs(lo), abs(hi))
            lo, hi = -m, m
        ranges[name] = (float(lo), float(hi))
    return ranges, chosen


def save_ranges(ranges: dict, path) -> None:
    """Write ranges as ORT's calibration cache, which quantize_static then uses instead of calibrating."""
    from onnxruntime.quantization.calibrate import (CalibrationMethod, TensorData, TensorsData,
                                                    save_tensors_data)
    data = {k: TensorData(lowest=np.array(lo, dtype=np.float32), highest=np.array(hi, dtype=np.float32))
            for k, (lo, hi) in ranges.items()}
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), path)


def default_progress(progress: Progress | None) -> Progress | None:
    """The caller's callback, else simple stderr lines when stderr is a terminal, else nothing."""
    import sys
    if progress is not None:
        return progress
    return stderr_progress() if sys.stderr.isatty() else None


def stderr_progress(label: str = "edgec") -> Progress:
    """Default progress: one stderr line per ~10% (quiet when EDGEC_QUIET is set)."""
    import sys
    state = {"next": 0.1}

    def report(done: int, total: int, status: str) -> None:
        if os.environ.get("EDGEC_QUIET"):
            return
        if total and done / total >= state["next"] or done == total:
            state["next"] = done / max(total, 1) + 0.1
            print(f"[{label}] {status}: {done}/{total}", file=sys.stderr, flush=True)
    return report
