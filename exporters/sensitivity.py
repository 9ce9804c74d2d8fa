"""Sensitivity analysis and accuracy-aware fallback: keep the fewest, most sensitive nodes in FP32.

Sensitivity of a node = how much the INT8 model's output error (the worst noise-to-signal ratio over its
outputs, 10^(-SQNR/10), on real samples) shrinks when only that node is left in FP32. It is measured without
quantizing again: the all-INT8 QDQ graph is quantized once, and each candidate is that graph with one node's
weight, bias (and, where no other quantized node keeps them, its input's and output's Q/DQ pairs) put back in
FP32, one ORT session per node on `rank_samples` of the scored samples (a node the edit cannot express, such as
a dynamically quantized MatMul, is quantized again instead). Fallback: exclude nodes in that order, one more at a
time, each step quantized for real by ORT, until the checked figures are within budget (edgec.exporters.metrics:
accuracy with labels; without labels agreement with FP32, and with `min_cosine` also every output's mean cosine
to FP32) and every output's SQNR reaches the gate's --min-sqnr (a failure on SQNR alone searches too); stop at the
time box and always keep the best model found (passing first, then the better figure, then the lower output
error). The chosen model is written by the real quantizer and measured again.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgec.core.errors import OptionError
from edgec.exporters.calibration import Progress, default_progress
from edgec.exporters.compare import Agreement, iter_onnx, ort_session
from edgec.exporters.quantize import (COMPUTE_OPS, Prepared, QuantInfo, QuantOptions, prepare,
                                      write_quantized)


@dataclass
class FallbackOptions:
    # points (1.0 = one percentage point) of the gate's task figures; None: not a target (the cosine alone)
    max_accuracy_drop: float | None = 1.0
    time_budget_s: float = 300.0
    max_excluded_share: float = 0.10       # never keep more than this share of Conv/MatMul/Gemm nodes in FP32
    batch_size: int | None = None        # None: about 8 MB of inputs per batch (compare.auto_batch; ORT arenas)
    # A node whose FP32 fallback would leave less than this share of Conv/MatMul/Gemm weights in INT8 is passed
    # over (issue #6's bar is 90%): EfficientNet-Lite0's classifier alone holds 28% of its weights.
    min_int8_weight_share: float = 0.90
    checks: object = None                  # edgec.exporters.metrics.CheckOptions: outputs, tasks, label output
    num_classes: int | None = None         # the data's class count where known (task detection)
    # Without labels, agreement with FP32 is the budget: the fallback runs until the mean cosine of the INT8
    # outputs to FP32 reaches this (each output; a one-value-per-sample output is judged over all samples), the
    # gate's agreement figures within max_accuracy_drop too. None = those figures alone, as with labels.
    min_cosine: float | None = None
    # the samples (of the scored ones, spread over them) that rank the nodes: a ranking needs fewer than a verdict
    rank_samples: int = 64

    def validate(self) -> None:
        if self.max_accuracy_drop is not None and not self.max_accuracy_drop >= 0:
            raise OptionError(f"--max-accuracy-drop must be >= 0 points, got {self.max_accuracy_drop}")
        if self.time_budget_s <= 0:
            raise OptionError(f"the sensitivity time budget must be positive, got {self.time_budget_s}")
        if not 0 <= self.max_excluded_share <= 1:
            raise OptionError(f"max_excluded_share must be within [0, 1], got {self.max_excluded_share}")
        if not 0 <= self.min_int8_weight_share <= 1:
            raise OptionError(f"min_int8_weight_share must be within [0, 1], got {self.min_int8_weight_share}")
        if self.min_cosine is not None and not 0 < self.min_cosine <= 1:
            raise OptionError(f"--min-cosine must be within (0, 1], got {self.min_cosine}")
        if self.rank_samples < 1:
            raise OptionError(f"rank_samples must be at least 1, got {self.rank_samples}")


@dataclass
class NodeSensitivity:
    node: str
    op_type: str
    error_when_excluded: float             # worst noise/signal ratio over the outputs, only this node in FP32
    error_reduction: float                 # baseline error - error_when_excluded (higher = more sensitive)
    measured_by: str = "qdq_edit"          # qdq_edit: the INT8 graph edited | requantized: ORT's quantizer again


@dataclass
class FallbackReport:
    metric: str                            # the budget's figure, e.g. "accuracy" | "top1_agreement" | "cosine"
    fp32_score: float
    int8_score: float                      # all nodes INT8
    final_score: float                     # the written model, measured again
    drop_points: float                     # fp32 - final, in points
    budget_points: float
    within_budget: bool
    excluded: list[dict]                   # node, op_type, error figures, score after adding it
    ranking: list[dict] = field(default_factory=list)   # the most sensitive nodes measured
    nodes_measured: int = 0
    nodes_total: int = 0
    stopped: str = ""                      # why the search ended
    passed_over: list[str] = field(default_factory=list)  # sensitive, but too many weights to keep in FP32
    seconds: float = 0.0
    # the gate's --min-sqnr on the same calibration samples (worst output), when it is set
    min_sqnr_db: float | None = None
    int8_sqnr_db: float | None = None      # all nodes INT8 (None: identical to FP32)
    final_sqnr_db: float | None = None
    sqnr_ok: bool | None = None            # the final model's worst output reaches --min-sqnr (None: no bar)
    searched_for: str = ""                 # what failed on the all-INT8 model: the task figure, SQNR, or both
    min_cosine: float | None = None        # the label-free budget (metric "cosine"), None otherwise
    # with min_cosine, the gate's own figures (agreement with FP32) stay a target: worst drop in points
    task_metric: str | None = None
    task_budget_points: float | None = None
    int8_task_drop: float | None = None
    final_task_drop: float | None = None
    scored_samples: int = 0                # calibration samples every verdict is measured on
    scored_available: int = 0              # offered to score (fewer scored: the reference's share of the box)
    scored_held_out: bool = False          # the calibration did not fit on them (holdout_split)
    sample_ms: float | None = None         # the FP32 reference's cost a sample, which sized the scored samples
    rank_samples: int = 0                  # of them, the ones the ranking is measured on (the first ones)
    ranking_seconds: float = 0.0
    requantized_nodes: int = 0             # ranked by ORT's quantizer again (the QDQ edit could not express them)
    int8_weight_share: float | None = None   # Conv/MatMul/Gemm weights in INT8 in the written model

    def to_dict(self) -> dict:
        return asdict(self)


# Values per sample from which an output's mean per-sample cosine is its figure (logits, embeddings, feature maps).
# Below, the cosine over all samples at once: a per-sample cosine of one value is always +-1, and one of a few
# values (a 2-value regression head) swings on the samples near the origin (0.984 at 37 dB SQNR, measured).
PER_SAMPLE_COSINE_VALUES = 8

# The time box goes to what decides (the ranking, the search's steps), not to verdicts. The scored samples are as
# many as the FP32 reference runs in VERDICT_SHARE of the box (an INT8 verdict costs about as much), at least
# MIN_SCORED; the ranking's as many as rank every node in RANK_SHARE of it, at least MIN_RANK. PP-OCR rec at load
# 10 (54-150 ms a sample) spent 287 s of its 300 s on two verdicts of 256 samples before this.
VERDICT_SHARE = 0.1
RANK_SHARE = 0.5
MIN_SCORED = 32
MIN_RANK = 8
# The budget is scored on calibration samples the ranges and bias correction were not fitted on where the data has
# them: past the samples the calibration reads (at least MIN_SCORED). Fewer: the fitted samples, whose figure is
# biased high (PP-OCR cls photo strips: 0.9930 there, 0.9899 held out), said so. Holding a quarter out of the fit
# instead was measured and dropped: PP-OCR rec fitted on the other 192 of 256 samples fell from 0.9950 to 0.9876 held
# out (benchmarks/QUANT_RESULTS.md, label-free fallback, fifth round).


def holdout_split(n: int, fit_samples: int | None, most: int) -> tuple[np.ndarray, bool]:
    """Which of n calibration samples score the fallback's budget (at most `most`, spread over the data) and
    whether the calibration, which reads the first `fit_samples` (None: all), did not fit on them."""
    fitted = n if fit_samples is None else min(n, fit_samples)
    if n - fitted >= MIN_SCORED:
        return fitted + _spread_indices(n - fitted, most), True
    return _spread_indices(n, most), False


def _spread_indices(n: int, k: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(n, k)).astype(int))


def spread_order(n: int) -> np.ndarray:
    """0..n-1 reordered so that every prefix is spread over the range (bit-reversed): the scored samples cut to
    the time box and the ranking's first ones are spread over the data (folders are sorted by class)."""
    bits = max(1, (n - 1).bit_length())
    i = np.arange(2 ** bits)
    rev = np.zeros_like(i)
    for b in range(bits):
        rev |= ((i >> b) & 1) << (bits - 1 - b)
    return rev[rev < n]


class _Rows:
    """Samples `idx` (in that order) of a whole-set dict feed, read batch by batch along each input's batch axis:
    reordering or cutting the scored samples copies nothing (they may be 512 decoded images)."""

    def __init__(self, feed: dict, layout, idx=None):
        from edgec.core.feeds import batch_len
        self.feed, self.layout = feed, layout
        self.idx = np.arange(batch_len(feed, layout)) if idx is None else np.asarray(idx, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.idx)

    def take(self, idx) -> "_Rows":
        return _Rows(self.feed, self.layout, self.idx[np.asarray(idx, dtype=np.int64)])

    def batches(self, size: int):
        for start in range(0, len(self.idx), size):
            rows = self.idx[start:start + size]
            yield {k: np.take(np.asarray(v), rows, axis=self.layout.axis(k)) for k, v in self.feed.items()}

    def bytes_per_sample(self) -> int:
        from edgec.core.feeds import batch_len
        return sum(np.asarray(v).nbytes for v in self.feed.values()) // max(1, batch_len(self.feed, self.layout))


def _samples(x, session):
    """The scored samples as something with len() and .take(): a dataset as it is, a dict feed (or one array:
    single-input models) as a _Rows view."""
    if hasattr(x, "take") and hasattr(x, "batches"):
        return x
    from edgec.core.feeds import FeedLayout, as_feed
    return _Rows(as_feed(x, [i.name for i in session.get_inputs()]), FeedLayout.of_onnx(session.get_inputs()))


def output_cosine(agreement, subset=None) -> float:
    """One output's agreement with FP32: the mean per-sample cosine, or for an output with fewer than
    PER_SAMPLE_COSINE_VALUES values per sample the cosine over all samples at once."""
    if (agreement.columns or 0) >= PER_SAMPLE_COSINE_VALUES:
        return float(agreement.cosines(subset).mean())
    return agreement.pooled_cosine(subset)


def cosine_score(refs: list, outs: list) -> float:
    """Agreement of every output with FP32, the worst one (output_cosine); compared in float64 chunks."""
    return float(min(output_cosine(Agreement().update(r, o)) for r, o in zip(refs, outs)))


def _mixed_parts(fp32_path, session, names, refs) -> list:
    """(name, output index, (axis, start, stop)) of each part of a joined output whose parts' peaks differ
    metrics.MIXED_PART_RATIO or more (NudeNet's boxes and scores): the fallback scores them as the gate does."""
    from edgec.exporters.compare import output_batch_axis
    from edgec.exporters.metrics import MIXED_PART_RATIO, joined_parts
    found = []
    for name, (axis, sizes) in joined_parts(fp32_path).items():
        i = names.index(name) if name in names else None
        if i is None or output_batch_axis(session, i) != 0 or refs[i].ndim <= axis or refs[i].shape[axis] != sum(sizes):
            continue
        bounds = np.cumsum([0, *sizes])
        peaks = [float(np.abs(np.take(refs[i], range(a, b), axis=axis)).max()) for a, b in zip(bounds, bounds[1:])]
        if min(peaks) > 0 and max(peaks) >= MIXED_PART_RATIO * min(peaks):
            found += [(f"{name}[{a}:{b}]", i, (axis, int(a), int(b))) for a, b in zip(bounds, bounds[1:])]
    return found


def _with_parts(checks, names: list, parts: list):
    """The checks with the parts as outputs of task none; a task or labels given for the only output stay its."""
    import dataclasses
    tasks = {(names[0] if k == "" and len(names) == 1 else k): v for k, v in checks.tasks.items()}
    label_output = checks.label_output or (names[0] if len(names) == 1 else None)
    return dataclasses.replace(checks, tasks={**tasks, **{p: "none" for p in parts}}, label_output=label_output)


@dataclass(frozen=True)
class _Measure:
    score: float                           # the budget's figure as a fraction (accuracy, agreement, cosine)
    error: float                           # the worst output's noise-to-signal ratio
    task_drop: float = 0.0                 # cosine budget: the gate's figures' worst drop, points (0: none)
    agreements: tuple = field(default=(), compare=False, repr=False)   # per output, per sample (compare.Agreement)


class _Evaluator:
    """Scores candidate INT8 models against the FP32 reference on fixed real samples, with the gate's figures
    (and, `cosine`, the outputs' mean cosine to FP32 as the budget's figure). The reference is computed once, in
    spread order (spread_order) for as long as `seconds` allows (at least MIN_SCORED samples), and reused by
    every verdict and by the ranking (its first samples); a candidate runs batch by batch against it, its
    figures accumulated per batch (compare.Agreement, metrics.CandidateScore): only the reference is kept whole."""

    def __init__(self, fp32_path, x, y, batch_size: int | None, checks=None, num_classes: int | None = None,
                 cosine: bool = False, seconds: float | None = None):
        from edgec.exporters.metrics import CandidateScore, CheckOptions, take_labels
        self.batch, self.cosine = batch_size, cosine
        session = ort_session(fp32_path)
        x = _samples(x, session)
        n = len(x)
        order = spread_order(n)
        x, y = x.take(order), take_labels(y, order)
        t0 = time.perf_counter()
        parts: list = []
        done = 0
        for feed, outs in iter_onnx(session, x, batch_size):
            parts.append(self._outputs(session, feed, outs))
            done += len(parts[-1][0])
            if seconds is not None and MIN_SCORED <= done < n and time.perf_counter() - t0 > seconds:
                break                      # a heavy model: score fewer samples, keep the box for the ranking
        self.sample_seconds = (time.perf_counter() - t0) / done   # FP32, a sample
        self.refs = [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]
        del parts
        self.available, self.n = n, done
        self.x = x if done == n else x.take(np.arange(done))
        names, checks = [o.name for o in session.get_outputs()], checks if checks is not None else CheckOptions()
        self.joined = _mixed_parts(fp32_path, session, names, self.refs)
        if self.joined:   # each part of a joined output scored as an output of its own (task none)
            checks = _with_parts(checks, names, [n for n, _, _ in self.joined])
            names = names + [n for n, _, _ in self.joined]
            self.refs = self.refs + self._parts(self.refs)
        self.scorer = CandidateScore(names, self.refs, y if done == n else take_labels(y, np.arange(done)),
                                     checks, num_classes)
        self.task_metric = self.scorer.metric if self.scorer.gated else None
        self.metric, self.fp32_score = ("cosine", 1.0) if cosine else (self.scorer.metric, self.scorer.fp32_score)
        self.session_seconds = self.run_seconds = 0.0   # of the last candidate: its session's start, its run
        self.run_rows = 0

    def _outputs(self, session, feed, outs) -> list:
        from edgec.exporters.metrics import batch_first, padding_mask, without_padding
        # token models: padded positions count for nothing (metrics.py)
        (outs,), _ = without_padding(padding_mask(feed), batch_first(session, outs))
        return outs + self._parts(outs) if getattr(self, "joined", None) else outs

    def _parts(self, outs) -> list:
        return [np.take(outs[i], range(start, stop), axis=axis) for _, i, (axis, start, stop) in self.joined]

    def __call__(self, path, *, rows: int | None = None, error_only: bool = False) -> _Measure:
        """The candidate's figures on the scored samples (`rows`: the first that many); `error_only`: the output
        error alone (what ranks nodes: the task figures of a big output cost more than the run, 2.5 s for 64
        samples of PP-OCR rec's 40 x 6625 probabilities)."""
        from edgec.exporters.metrics import worst_noise_ratio
        t0 = time.perf_counter()
        session = ort_session(path)
        t1 = time.perf_counter()
        data = self.x if rows is None or rows >= self.n else self.x.take(np.arange(rows))
        agreements = tuple(Agreement() for _ in self.refs)
        checks = None if error_only or (self.cosine and not self.task_metric) else self.scorer.start()
        start = 0
        for feed, outs in iter_onnx(session, data, self.batch):
            outs = self._outputs(session, feed, outs)
            refs = [r[start:start + len(outs[0])] for r in self.refs]
            for a, r, g in zip(agreements, refs, outs):
                a.update(r, g)
            if checks is not None:
                self.scorer.update(checks, refs, outs, start)
            start += len(outs[0])
        del session
        self.session_seconds, self.run_seconds, self.run_rows = t1 - t0, time.perf_counter() - t1, start
        error = worst_noise_ratio(agreements)
        if error_only:
            return _Measure(float("nan"), error, agreements=agreements)
        if self.cosine:
            drop = 100.0 * (self.scorer.fp32_score - self.scorer.score_of(checks)) if self.task_metric else 0.0
            return _Measure(min(output_cosine(a) for a in agreements), error, drop, agreements)
        return _Measure(self.scorer.score_of(checks), error, 0.0, agreements)

    def rank_rows(self, nodes: int, seconds: float, most: int) -> int:
        """Samples per ranked node so that `nodes` nodes take about `seconds` (the last verdict's per-sample
        cost and session start measured), within [MIN_RANK, most] and the scored samples."""
        per_sample = self.run_seconds / max(1, self.run_rows)
        fit = (seconds / max(1, nodes) - self.session_seconds) / max(per_sample, 1e-9)
        return int(min(self.n, most, max(MIN_RANK, fit)))


def fallback(prepared: Prepared, out_path, x, y=None, options: FallbackOptions | None = None, *,
             progress: Progress | None = None, force: bool = True, held_out: bool = False
             ) -> tuple[QuantInfo, FallbackReport]:
    """Quantize with the user's exclusions, then keep the most sensitive nodes in FP32 until the budget holds on
    the scored samples `x` (`held_out`: the calibration did not fit on them, holdout_split; recorded)."""
    options = options or FallbackOptions()
    options.validate()
    progress = default_progress(progress)
    started = time.perf_counter()
    deadline = started + options.time_budget_s
    cosine = y is None and options.min_cosine is not None
    task_budget = options.max_accuracy_drop
    # the budget in points of its figure: the task figure's drop, or with min_cosine 100 x (1 - cosine)
    budget = round(100 * (1 - options.min_cosine), 6) if cosine else task_budget
    ev = _Evaluator(prepared.fp32_path, x, y, options.batch_size, options.checks, options.num_classes, cosine=cosine,
                    seconds=VERDICT_SHARE * options.time_budget_s)
    base_excl = prepared.resolve_exclusions(prepared.options.exclude_nodes, prepared.options.exclude_op_types)
    work = Path(prepared.workdir)
    cand = work / "candidate.onnx"

    def trial(exclude: list[str], path: Path = cand) -> _Measure:
        prepared.quantize(path, exclude)
        return ev(path)

    from edgec.exporters.metrics import ratio_db, sqnr_ratio
    min_sqnr = getattr(options.checks, "min_sqnr", None)
    max_err = sqnr_ratio(min_sqnr)

    def drop(m: _Measure) -> float:
        return 100.0 * (ev.fp32_score - m.score)

    def passes(m: _Measure) -> bool:
        return ((budget is None or drop(m) <= budget) and (max_err is None or m.error <= max_err)
                and (not cosine or task_budget is None or m.task_drop <= task_budget))

    def rank(m: _Measure, excluded: list) -> tuple:
        return passes(m), m.score, -m.task_drop, -m.error, -len(excluded)

    base_path = work / "all-int8.onnx"
    base = trial(base_excl, base_path)
    report = FallbackReport(ev.metric, ev.fp32_score, base.score, base.score, drop(base),
                            budget if budget is not None else 100.0, False, [], scored_samples=ev.n,
                            scored_available=ev.available, scored_held_out=held_out,
                            sample_ms=round(1000 * ev.sample_seconds, 2))
    if cosine:
        report.min_cosine = options.min_cosine
        if ev.task_metric and task_budget is not None:
            report.task_metric, report.task_budget_points = ev.task_metric, task_budget
            report.int8_task_drop = round(base.task_drop, 3)
    if max_err is not None:
        report.min_sqnr_db, report.int8_sqnr_db = min_sqnr, ratio_db(base.error)
    failed = []
    if budget is not None and report.drop_points > budget:
        failed.append(f"cosine {base.score:.4f} under {options.min_cosine:g}" if cosine
                      else f"{ev.metric} drop over {budget:g} points")
    if report.task_metric and base.task_drop > task_budget:
        failed.append(f"{ev.task_metric} drop over {task_budget:g} points")
    if max_err is not None and base.error > max_err:
        failed.append(f"SQNR {report.int8_sqnr_db} dB under --min-sqnr {min_sqnr:g}")
    report.searched_for = " and ".join(failed)
    best = (rank(base, base_excl), base, list(base_excl))
    policy_float = set((prepared.policy or {}).get("nodes", []))   # kept out by the policy: FP32 already
    compute = [n for n, t in prepared.node_ops.items()
               if t in COMPUTE_OPS and n not in base_excl and n not in policy_float]
    report.nodes_total = len(compute)
    # at least one node: on a small model one FP32 layer beats failing the budget
    limit = max(1, int(options.max_excluded_share * len(compute))) if options.max_excluded_share > 0 else 0
    searched = False

    if passes(base):
        report.stopped = (f"all-INT8 model already within cosine {options.min_cosine:g}" if cosine
                          else "all-INT8 model already within budget")
    elif limit == 0:
        report.stopped = "max_excluded_share allows no node in FP32"
    else:
        searched = True
        t0 = time.perf_counter()
        ranking = _rank_nodes(prepared, ev, base, options, base_excl, base_path, compute, deadline, progress, report)
        report.ranking_seconds = round(time.perf_counter() - t0, 2)
        excluded = list(base_excl)
        sizes = _weight_sizes(prepared)
        total = max(1, sum(sizes.values()))
        for r in ranking:
            if len(excluded) - len(base_excl) >= limit:
                report.stopped = report.stopped or f"reached the limit of {limit} FP32 nodes"
                break
            if 1 - sum(sizes.get(n, 0) for n in [*excluded, r.node]) / total < options.min_int8_weight_share:
                report.passed_over.append(r.node)
                continue
            if r.error_reduction <= 0:
                report.stopped = report.stopped or "no remaining node reduces the output error"
                break
            if time.perf_counter() > deadline:
                report.stopped = report.stopped or "time box hit during fallback"
                break
            excluded.append(r.node)
            m = trial(excluded)
            report.excluded.append({**asdict(r), f"{ev.metric}_after": m.score, "output_error_after": m.error,
                                    "sqnr_db_after": ratio_db(m.error)})
            if rank(m, excluded) > best[0]:
                best = (rank(m, excluded), m, list(excluded))
            if passes(m):
                report.stopped = (f"within cosine {options.min_cosine:g}" if cosine else "within budget")
                break
        else:
            report.stopped = report.stopped or "every measured node tried"
        if report.passed_over:
            report.stopped += (f"; {len(report.passed_over)} sensitive node(s) passed over to keep "
                               f"{options.min_int8_weight_share:.0%} of the weights in INT8")
    # Keep the best model found: trim the trail to the exclusions that produced it.
    _, final, final_excl = best
    kept = set(final_excl) - set(base_excl)
    report.excluded = [e for e in report.excluded if e["node"] in kept]
    info = write_quantized(prepared, out_path, final_excl, force=force, started=started)
    if searched:   # what is shipped is what is reported: the written file, measured again
        final = ev(out_path)
    report.final_score = final.score
    report.drop_points = round(drop(final), 3)
    report.within_budget = passes(final)
    if report.task_metric:
        report.final_task_drop = round(final.task_drop, 3)
    if max_err is not None:
        report.final_sqnr_db = ratio_db(final.error)
        report.sqnr_ok = final.error <= max_err
    report.int8_weight_share = info.ops.get("int8_weight_share")
    report.seconds = round(time.perf_counter() - started, 2)
    info.seconds = round(time.perf_counter() - started, 2)
    info.sensitivity = report.to_dict()
    return info, report


def _rank_nodes(prepared: Prepared, ev: _Evaluator, base: _Measure, options: FallbackOptions, base_excl: list,
                base_path: Path, compute: list, deadline: float, progress, report: FallbackReport
                ) -> list[NodeSensitivity]:
    """Every candidate alone in FP32 on the first scored samples (as many as rank every node in RANK_SHARE of
    the box, at most rank_samples), most error reduction first; the all-INT8 error on them is the verdict's."""
    from edgec.exporters.metrics import worst_noise_ratio
    rows = ev.rank_rows(len(compute), RANK_SHARE * options.time_budget_s, options.rank_samples)
    report.rank_samples = rows
    base_err = worst_noise_ratio(base.agreements, slice(0, rows))
    edits = _QdqBypass(prepared, base_path)
    cand = Path(prepared.workdir) / "ranked.onnx"
    ranking: list[NodeSensitivity] = []
    for i, node in enumerate(compute):  # one node in FP32 at a time
        if time.perf_counter() > deadline:
            report.stopped = f"time box hit while measuring sensitivity ({i}/{len(compute)} nodes)"
            break
        how = "qdq_edit" if edits.write(node, cand) else "requantized"
        if how == "requantized":   # a node the edit cannot express: ORT's quantizer with this node excluded
            prepared.quantize(cand, [*base_excl, node])
        err = ev(cand, rows=rows, error_only=True).error
        ranking.append(NodeSensitivity(node, prepared.node_ops[node], err, base_err - err, how))
        if progress:
            progress(i + 1, len(compute), "sensitivity")
    ranking.sort(key=lambda r: -r.error_reduction)
    report.nodes_measured = len(ranking)
    report.requantized_nodes = sum(r.measured_by == "requantized" for r in ranking)
    report.ranking = [asdict(r) for r in ranking[:20]]
    return ranking


class _QdqBypass:
    """The all-INT8 QDQ graph with one compute node run in FP32, as ORT's quantizer would write it with that node
    excluded: the node's weight and bias are the FP32 ones (uncorrected, as Prepared.quantize restores them); its
    input keeps its Q/DQ pair where another quantized node still quantizes that tensor (another reader of the
    pair, or a producer that runs quantized and so quantizes its own output), else reads the float tensor; its
    output keeps its pair where a reader quantizes it again (a quantized op), else is read in FP32 (the graph
    output, a float op). Anything else (a dynamically quantized or
    activation x activation MatMul, a weight that is not an initializer) is left to the real quantizer."""

    def __init__(self, prepared: Prepared, int8_path: Path):
        import onnx
        from onnx import numpy_helper
        self.model = onnx.load(str(int8_path))
        pre = onnx.load(str(prepared.model_path))
        inits = {i.name: i for i in pre.graph.initializer}
        weights, biases = dict(prepared.weight_originals or {}), dict(prepared.bias_originals or {})
        self.floats: dict[str, tuple] = {}
        for n in pre.graph.node:
            if n.op_type not in COMPUTE_OPS or len(n.input) < 2 or n.input[1] not in inits:
                continue
            w = weights[n.name][1] if n.name in weights else numpy_helper.to_array(inits[n.input[1]])
            if n.name in biases:
                b = biases[n.name][1]
            elif len(n.input) > 2 and n.input[2]:
                if n.input[2] not in inits:
                    continue
                b = numpy_helper.to_array(inits[n.input[2]])
            else:
                b = None
            self.floats[n.name] = (np.asarray(w), None if b is None else np.asarray(b))
        del pre

    def write(self, node: str, path: Path) -> bool:
        """Write the candidate with `node` in FP32 to `path`; False when the edit cannot express it."""
        import onnx
        if node not in self.floats:
            return False
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        if not _run_in_fp32(model.graph, node, *self.floats[node]):
            return False
        onnx.save_model(model, str(path))
        return True


def _run_in_fp32(g, name: str, weight: np.ndarray, bias: np.ndarray | None) -> bool:
    from collections import defaultdict
    from onnx import numpy_helper
    nodes = list(g.node)
    node = next((n for n in nodes if n.name == name), None)
    if node is None or node.op_type not in COMPUTE_OPS or len(node.input) < 2:
        return False
    producer = {o: n for n in nodes for o in n.output}
    readers = defaultdict(list)
    for n in nodes:
        for i in n.input:
            readers[i].append(n)
    inits = {i.name for i in g.initializer}
    outputs = {o.name for o in g.output}

    def dq(tensor):
        p = producer.get(tensor)
        return p if p is not None and p.op_type == "DequantizeLinear" else None

    w_dq, x_dq = dq(node.input[1]), dq(node.input[0])
    if w_dq is None or w_dq.input[0] not in inits or x_dq is None:
        return False   # not a static INT8 node
    if len(node.input) > 2 and node.input[2] and bias is None:
        return False   # a bias that the FP32 graph does not have: not this edit's case
    g.initializer.append(numpy_helper.from_array(weight.astype(np.float32, copy=False), f"{name}/edgec_fp32/W"))
    node.input[1] = f"{name}/edgec_fp32/W"
    if bias is not None:
        g.initializer.append(numpy_helper.from_array(bias.astype(np.float32, copy=False), f"{name}/edgec_fp32/B"))
        if len(node.input) > 2:
            node.input[2] = f"{name}/edgec_fp32/B"
        else:
            node.input.append(f"{name}/edgec_fp32/B")
    def quantizes(n) -> bool:   # a node that runs quantized quantizes what it reads (and what it gives)
        return n.op_type in COMPUTE_OPS or any(r.op_type == "QuantizeLinear" for o in n.output for r in readers[o])

    q = producer.get(x_dq.input[0])
    if q is not None and q.op_type == "QuantizeLinear":
        tensor = q.input[0]
        others = [r for r in readers[x_dq.output[0]] if r is not node]
        shared = any(quantizes(r) for r in others) or any(r is not x_dq for r in readers[q.output[0]])
        src = producer.get(tensor)
        quantized_src = src is not None and any(dq(i) is not None for i in src.input)
        if not shared and not quantized_src:   # nothing else quantizes it: every reader gets the float tensor
            for r in [node, *others]:
                for k, i in enumerate(r.input):
                    if i == x_dq.output[0]:
                        r.input[k] = tensor
    drop = set()
    out_q = readers.get(node.output[0], [])
    if len(out_q) == 1 and out_q[0].op_type == "QuantizeLinear" and node.output[0] not in outputs:
        out_dq = readers[out_q[0].output[0]]
        after = [r for d in out_dq for r in readers[d.output[0]]]
        to_graph = [d.output[0] for d in out_dq if d.output[0] in outputs]
        if (out_dq and all(d.op_type == "DequantizeLinear" for d in out_dq) and len(to_graph) <= 1
                and not any(quantizes(r) for r in after)):   # no reader quantizes it again: FP32 out
            target = to_graph[0] if to_graph else node.output[0]
            node.output[0] = target
            for d in out_dq:
                for r in readers[d.output[0]]:
                    for k, i in enumerate(r.input):
                        if i == d.output[0]:
                            r.input[k] = target
            drop |= {id(out_q[0]), *(id(d) for d in out_dq)}
    # Q/DQ nodes that nothing reads any more
    used = {i for n in nodes if id(n) not in drop for i in n.input} | outputs
    changed = True
    while changed:
        changed = False
        for n in nodes:
            if id(n) not in drop and n.op_type in ("QuantizeLinear", "DequantizeLinear") \
                    and not any(o in used for o in n.output):
                drop.add(id(n))
                changed = True
        used = {i for n in nodes if id(n) not in drop for i in n.input} | outputs
    if drop:
        kept = [type(n)() for n in nodes if id(n) not in drop]
        for new, old in zip(kept, (n for n in nodes if id(n) not in drop)):
            new.CopyFrom(old)
        del g.node[:]
        g.node.extend(kept)
    return True


def _weight_sizes(prepared: Prepared) -> dict[str, int]:
    """Weight parameter count of each Conv/MatMul/Gemm node (input 1 when it is an initializer)."""
    import onnx
    model = onnx.load(str(prepared.model_path), load_external_data=False)
    dims = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer}
    return {n.name: dims.get(n.input[1], 0) for n in model.graph.node
            if n.op_type in COMPUTE_OPS and len(n.input) > 1}


def quantize_with_budget(fp32_path, out_path, calibration, x, y=None, options: QuantOptions | None = None,
                         fallback_options: FallbackOptions | None = None, *, progress: Progress | None = None,
                         force: bool = True, held_out: bool = False) -> tuple[QuantInfo, FallbackReport]:
    """quantize_int8 + accuracy-aware fallback, calibrating once (`--max-accuracy-drop`, `--min-cosine`);
    `held_out`: `calibration` does not hold the scored samples `x` (holdout_split)."""
    started = time.perf_counter()
    prepared = prepare(fp32_path, calibration, options or QuantOptions(), progress=progress)
    try:
        info, report = fallback(prepared, out_path, x, y, fallback_options, progress=progress, force=force,
                                held_out=held_out)
        info.seconds = round(time.perf_counter() - started, 2)   # the whole step, calibration included
        return info, report
    finally:
        prepared.cleanup()
