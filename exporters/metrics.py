"""Per-output checks of a candidate model (INT8) against its reference (FP32) that cannot be fooled.

Every output gets SQNR over the whole eval set (10*log10(sum ref^2 / sum (ref-got)^2)), relative error and
max abs error relative to the output's range; outputs whose task is known also get the task's own figure:
  classify   (N,K) scores: top-1 agreement; accuracy with integer labels
  multilabel (N,K) probabilities (decided at 0.5) or logits (at 0): per-label decision agreement; F1 with labels
  regress / score: Pearson correlation and abs error over the eval set (never a per-sample cosine: it is 1.0
             for a one-column output whatever the model does)
  embed      per-sample cosine and nearest-neighbour agreement within the eval set
  none       SQNR only
The task is given (`--task OUTPUT=TASK`) or detected from the reference outputs where that is safe, and the
record says which. Everything is accumulated batch by batch: the eval set is never held in memory at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from edgec.core.errors import DataError, OptionError
from edgec.exporters.policy import MIXED_RANGE_RATIO

TASKS = ("classify", "multilabel", "regress", "score", "embed", "none")
LABELLED_TASKS = ("classify", "multilabel", "regress", "score")
# benchmarks/SQNR_THRESHOLD.md: properly calibrated INT8 outputs measured 26-44 dB (demo ResNet18 35 dB); INT8
# calibrated on a wrong range (clipped, an outlier) 0-6 dB, on a range 20x too wide 12-23 dB (a few task figures
# still within a point). A per-sample cosine of 0.99 (the bar for embeddings) is about 17 dB and
# EfficientNet-Lite0's good INT8 (cosine 0.995, QUANT_RESULTS.md) about 20 dB: 15 dB fails the broken without
# failing those; the task figures catch what SQNR lets through.
DEFAULT_MIN_SQNR = 15.0
EMBED_MIN_DIM = 32         # an unlabelled (N,D) float output with D >= this is taken for an embedding
NN_SAMPLES = 1024          # rows kept for the nearest-neighbour check (bounded memory, O(NN_SAMPLES^2) time)


@dataclass
class CheckOptions:
    """What the user asked to be checked, before the outputs are known."""
    tasks: dict = field(default_factory=dict)   # output name -> task; "" = the only output
    label_output: str | None = None             # the output labels apply to; "none" = ignore the labels
    min_sqnr: float | None = DEFAULT_MIN_SQNR   # dB, every output; None or -inf: not gated
    max_drop: float | None = 1.0                # points, every output with a task metric

    def validate(self) -> None:
        if self.min_sqnr is not None and not (math.isfinite(self.min_sqnr) or self.min_sqnr == -math.inf):
            raise OptionError(f"--min-sqnr {self.min_sqnr}: a number of dB, e.g. {DEFAULT_MIN_SQNR} (-inf: no check)")
        if self.max_drop is not None and not self.max_drop >= 0:
            raise OptionError(f"--max-accuracy-drop {self.max_drop}: a budget in points, 0 or more")


def parse_tasks(values: Iterable[str]) -> dict:
    """`--task OUTPUT=TASK` (repeatable) or `--task TASK` for a single-output model -> {output: task}."""
    tasks = {}
    for value in values:
        name, eq, task = value.rpartition("=")
        name, task = name.strip(), task.strip()
        if eq and not name:
            raise OptionError(f"--task {value!r}: give OUTPUT=TASK or, for a one-output model, TASK")
        if task not in TASKS:
            raise OptionError(f"--task {value!r}: unknown task {task!r}; one of {', '.join(TASKS)}")
        if name in tasks:
            raise OptionError(f"--task given twice for {name or 'the output'}")
        tasks[name] = task
    return tasks


def check_names(names: Sequence[str], options: CheckOptions, labelled, named: Sequence[str] = ()) -> str | None:
    """Unknown output names are loud errors; returns the output the plain labels (`y`) apply to (None: none).

    `labelled`: the data has plain labels; `named`: outputs the data labels by name (`y:OUTPUT`). Cheap and
    shape-free, so a build can call it before any long work."""
    names = list(names)
    listed = ", ".join(names)
    for name in options.tasks:
        if name == "" and len(names) > 1:
            raise OptionError(f"--task {options.tasks[name]} without an output name, but the model has outputs "
                              f"{listed}; give --task OUTPUT=TASK")
        if name and name not in names:
            raise OptionError(f"--task {name}=...: the model has no output {name!r}; outputs: {listed}")
    label = options.label_output
    if label is not None and label != "none" and label not in names:
        raise OptionError(f"--label-output {label}: the model has no output {label!r}; outputs: {listed}")
    unknown = [n for n in named if n not in names]
    if unknown and label != "none":
        raise DataError(f"the data has labels 'y:{unknown[0]}' but the model has no output {unknown[0]!r}; "
                        f"outputs: {listed} (rename the array to y:OUTPUT)")
    if not labelled or label == "none":
        if not labelled and named and label not in (None, "none", *named):
            raise OptionError(f"--label-output {label}: the data labels only {', '.join(named)} (keys y:OUTPUT); "
                              "save the labels as y:" + label + " or drop --label-output")
        return None
    if label is None:
        if len(names) > 1:
            raise OptionError(f"the data has labels and the model has outputs {listed}: name the one they apply "
                              "to with --label-output NAME (or --label-output none to ignore them)")
        label = names[0]
    if label in named:
        raise DataError(f"the data has both y and y:{label}, both for output {label}; keep one of them")
    return label


def label_map(names: Sequence[str], labels, options: CheckOptions) -> dict:
    """{output name: its labels} from the data's label sets (None, one array for the label output, or
    {"": plain y, output name: labels}); names checked as check_names does."""
    if labels is None or options.label_output == "none":
        return {}
    sets = dict(labels) if isinstance(labels, dict) else {"": labels}
    plain = sets.pop("", None)
    out = dict(sets)
    target = check_names(names, options, plain is not None, list(sets))
    if target is not None:
        out[target] = plain
    return {k: np.asarray(v) for k, v in out.items()}


def slice_labels(labels, start: int, stop: int):
    """The labels of samples [start, stop) in whatever form they came (array or {key: array})."""
    if labels is None:
        return None
    if isinstance(labels, dict):
        return {k: v[start:stop] for k, v in labels.items()}
    return labels[start:stop]


def take_labels(labels, indices):
    """The labels of samples `indices` (in that order), in whatever form they came (array or {key: array})."""
    if labels is None:
        return None
    if isinstance(labels, dict):
        return {k: np.asarray(v)[indices] for k, v in labels.items()}
    return np.asarray(labels)[indices]


def _take_rows(y, rows: slice):
    return {k: v[rows] for k, v in y.items()} if isinstance(y, dict) else y[rows]


def label_task(labels: np.ndarray, out_shape: tuple) -> str:
    """The task a label set implies for an output of per-sample shape `out_shape` (before any output is seen)."""
    k = int(np.prod(out_shape)) if out_shape else 1
    if labels.ndim == 1 and labels.dtype.kind in "iu" and k > 1:
        return "classify"
    if labels.ndim == 2 and k > 1 and np.isin(labels, (0, 1)).all():
        return "multilabel"
    return "score" if k == 1 else "regress"


def check_labels(names: Sequence[str], out_shapes: Sequence[tuple], labels, options: CheckOptions) -> dict:
    """Before any long work: every label set against the output it is tied to (its given task, else the task
    the labels imply); one DataError naming the fix for labels that cannot score it. Returns {output: task}."""
    out = {}
    for name, y in label_map(names, labels, options).items():
        shape = tuple(out_shapes[list(names).index(name)])
        given = options.tasks.get(name, options.tasks.get("") if len(names) == 1 else None)
        task = given or label_task(y, shape)
        ref = np.zeros((1, *shape))
        problem = _label_problem(task, ref.reshape(1, -1) if task in ("classify", "multilabel") else ref, y)
        if problem:
            raise DataError(f"labels for output {name} ({task}{', --task' if given else ''}): {problem}; give "
                            "matching labels (y for --label-output, y:OUTPUT per output), another --task or "
                            "--label-output, or --label-output none")
        out[name] = task
    return out


# ---------------------------------------------------------------- tasks

@dataclass
class OutputTask:
    name: str
    task: str
    chosen: str            # "given" | "auto"
    why: str
    labelled: bool = False
    threshold: float = 0.5  # multilabel decisions: 0.5 on probabilities, 0 on logits


def _rows(a) -> np.ndarray:
    a = np.asarray(a)
    a = a.astype(np.float64) if a.dtype != np.float64 else a
    return a.reshape(len(a), -1)


def detect_task(ref: np.ndarray, labels: np.ndarray | None = None, num_classes: int | None = None,
                only_output: bool = True) -> tuple[str, str]:
    """(task, why) from one batch of reference outputs (and their labels, when they apply to this output).

    num_classes: the data's class count where it is known (class folders, built-in data); without it, integer
    labels are taken for class ids of a (N,K) output when they fit in 0..K-1 and K is small or most ids occur."""
    ref = np.asarray(ref)
    if not (np.issubdtype(ref.dtype, np.floating)):
        return "none", f"{ref.dtype} output"
    if ref.ndim == 1 or (ref.ndim == 2 and ref.shape[1] == 1):
        return "score", "one value per sample"
    if ref.ndim != 2:
        return "none", f"rank-{ref.ndim} output"
    k = ref.shape[1]
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim == 2 and labels.shape[1] == k:
            if np.isin(labels, (0, 1)).all():
                return "multilabel", f"0/1 labels with {k} columns"
            return "regress", f"float labels with {k} columns"
        if labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer) and len(labels):
            fits = labels.min() >= 0 and labels.max() < k
            if num_classes is not None and num_classes == k:
                return "classify", f"{k} columns, {num_classes} label classes"
            if num_classes is None and fits and (k < EMBED_MIN_DIM or len(np.unique(labels)) > k / 2):
                return "classify", f"{k} columns, labels within 0..{k - 1}"
    if ref.min() >= 0 and np.allclose(ref.sum(1), 1.0, atol=1e-3):
        return "classify", "rows are probabilities summing to 1"
    norms = np.linalg.norm(ref.astype(np.float64), axis=1)
    if norms.size and np.allclose(norms, 1.0, atol=1e-3):   # before [0,1]: a ReLU'd embedding is non-negative
        return "embed", "unit-length rows"
    if ref.min() >= 0 and ref.max() <= 1 and float(ref.std(0).max()) > 1e-3:
        return "multilabel", f"{k} columns of independent values in [0,1]"
    if k >= EMBED_MIN_DIM:
        return "embed", f"{k} columns" + (", the labels do not fit them" if labels is not None else "")
    if only_output and labels is None:  # a lone small (N,K) float output is a classifier's logits far more often
        return "classify", f"the model's only output, {k} columns (say --task regress if they are not class scores)"
    return "none", f"{k} columns of unknown meaning"


def resolve_tasks(names: Sequence[str], refs: Sequence[np.ndarray], y, options: CheckOptions,
                  num_classes: int | None = None) -> list[OutputTask]:
    """The task of every output, from what the user gave and (else) from the first batch of reference outputs."""
    by_output = label_map(names, y, options)
    out = []
    for name, ref in zip(names, refs):
        ref = np.asarray(ref)
        given = options.tasks.get(name, options.tasks.get("") if len(names) == 1 else None)
        labels = by_output.get(name)
        if given:
            task, chosen, why = given, "given", ""
        else:
            task, why = detect_task(ref, labels, num_classes, only_output=len(names) == 1)
            chosen = "auto"
        _check_shape(name, task, ref)
        problem = None if labels is None else _label_problem(task, ref, np.asarray(labels))
        tied = options.label_output == name or (isinstance(y, dict) and name in y)
        if problem and tied:  # the user tied these labels to this output
            raise DataError(f"labels for output {name} ({task}): {problem}; give matching labels, another "
                            "--label-output, or --label-output none")
        if problem:
            why += f"; labels not used ({problem})"
        ot = OutputTask(name, task, chosen, why.strip("; "), labels is not None and not problem)
        if task == "multilabel":
            ot.threshold = 0.5 if ref.min() >= 0 and ref.max() <= 1 else 0.0
        out.append(ot)
    return out


def _check_shape(name: str, task: str, ref: np.ndarray) -> None:
    if task in ("classify", "multilabel") and (ref.ndim != 2 or ref.shape[1] < 2):
        raise OptionError(f"--task {name}={task} needs an (N, K>1) output; {name} is {tuple(ref.shape)}")
    if task == "embed" and _rows(ref).shape[1] < 2:
        raise OptionError(f"--task {name}=embed needs more than one value per sample; {name} is "
                          f"{tuple(ref.shape)} (use score or regress)")


def _label_problem(task: str, ref: np.ndarray, labels: np.ndarray) -> str | None:
    """Why these labels cannot score this output's task (None: they can)."""
    if task not in LABELLED_TASKS:
        return f"a {task} output takes no labels"
    if task == "classify":
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            return f"class ids must be integers (N,), got {labels.dtype} {tuple(labels.shape)}"
        if len(labels) and (labels.min() < 0 or labels.max() >= ref.shape[1]):
            return f"ids span {int(labels.min())}..{int(labels.max())} for {ref.shape[1]} columns"
    if task == "multilabel":
        if labels.shape[1:] != ref.shape[1:]:
            return f"need (N, {ref.shape[1]}) 0/1 labels, got {tuple(labels.shape)}"
        if not np.isin(labels, (0, 1)).all():
            return "multilabel labels must be 0 or 1 (threshold scores first, or use --task OUTPUT=regress)"
    if task in ("regress", "score") and _rows(labels).shape[1] != _rows(ref).shape[1]:
        return f"{_rows(labels).shape[1]} label values per sample for {_rows(ref).shape[1]} output values"
    return None


# ---------------------------------------------------------------- streamed statistics

class _Moments:
    """Per-column Pearson correlation of two streams, merged batch by batch (Chan et al.): no cancellation
    when the values sit on a large offset, which naive sums of squares would suffer."""

    def __init__(self):
        self.n = 0

    def update(self, a: np.ndarray, b: np.ndarray) -> None:
        nb = len(a)
        if nb == 0:
            return
        ma, mb = a.mean(0), b.mean(0)
        da, db = a - ma, b - mb
        saa, sbb, sab = (da * da).sum(0), (db * db).sum(0), (da * db).sum(0)
        if self.n == 0:
            self.n, self.ma, self.mb, self.saa, self.sbb, self.sab = nb, ma, mb, saa, sbb, sab
            return
        n = self.n + nb
        xa, xb = ma - self.ma, mb - self.mb
        w = self.n * nb / n
        self.saa = self.saa + saa + xa * xa * w
        self.sbb = self.sbb + sbb + xb * xb * w
        self.sab = self.sab + sab + xa * xb * w
        self.ma, self.mb, self.n = self.ma + xa * nb / n, self.mb + xb * nb / n, n

    def pearson(self) -> float | None:
        """The worst column's correlation; columns constant in the reference are left out (None if all are)."""
        if self.n < 2:
            return None
        ok = self.saa > 0
        if not ok.any():
            return None
        r = self.sab[ok] / np.sqrt(self.saa[ok] * np.maximum(self.sbb[ok], 1e-300))
        r = np.where(self.sbb[ok] > 0, r, 0.0)  # a constant candidate where the reference varies: no correlation
        return float(np.clip(r, -1, 1).min())


def _f1(tp, fp, fn) -> float:
    return 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0


class OutputCheck:
    """Streamed figures of one output: feed batches with update(), read result()."""

    def __init__(self, task: OutputTask):
        self.t = task
        self.n = 0
        self.signal = self.noise = 0.0
        self.max_abs = 0.0
        self.lo, self.hi = math.inf, -math.inf
        self.non_finite = 0
        self.c = {}  # task counters
        self.moments = _Moments()
        self.label_moments = (_Moments(), _Moments())
        self.keep_ref, self.keep_got = [], []
        self.masked_by = None  # the attention mask input whose padded positions were left out
        self.parts = None      # (axis, sizes) of an output a Concat joins (joined_parts), figures per part
        self.part_sums = None  # per part [signal, noise, max |ref|]

    def update(self, ref, got, y=None) -> None:
        """One batch (any size: compared in float64 chunks of rows, compare.CHUNK_VALUES values each)."""
        from edgec.exporters.compare import row_chunks
        ref, got = np.asarray(ref), np.asarray(got)
        if ref.shape[:1] != got.shape[:1] or ref[:1].size != got[:1].size:
            raise DataError(f"output {self.t.name}: the candidate gives {tuple(np.shape(got))}, the reference "
                            f"{tuple(np.shape(ref))}")
        for rows in row_chunks(len(ref), ref[:1].size):
            self._update(ref[rows], got[rows], None if y is None else _take_rows(y, rows))
            if self.parts is not None and ref.ndim > self.parts[0]:
                self._update_parts(ref[rows], got[rows])

    def _update_parts(self, ref, got) -> None:
        axis, sizes = self.parts
        if ref.shape[axis] != sum(sizes):
            return
        self.part_sums = self.part_sums or [[0.0, 0.0, 0.0] for _ in sizes]
        start = 0
        for sums, size in zip(self.part_sums, sizes):
            r = np.take(ref, range(start, start + size), axis=axis).astype(np.float64)
            g = np.take(got, range(start, start + size), axis=axis).astype(np.float64)
            g = np.where(np.isfinite(g), g, 0.0)
            sums[0] += float((r * r).sum())
            sums[1] += float(((r - g) ** 2).sum())
            sums[2] = max(sums[2], float(np.abs(r).max()) if r.size else 0.0)
            start += size

    def part_figures(self) -> dict:
        """SQNR of each part of a joined output whose parts' ranges differ MIXED_PART_RATIO or more (a detector's
        boxes and scores): the whole output's SQNR is the largest part's."""
        if not self.part_sums:
            return {}
        peaks = [m for _, _, m in self.part_sums if m > 0]
        if len(peaks) < 2 or max(peaks) < MIXED_PART_RATIO * min(peaks):
            return {}
        axis, sizes = self.parts
        parts, start = [], 0
        for (sig, noise, peak), size in zip(self.part_sums, sizes):
            db = math.inf if noise == 0 else (-math.inf if sig == 0 else 10 * math.log10(sig / noise))
            parts.append({"slice": f"{start}:{start + size}", "axis": axis, "sqnr_db": _finite(db, 2),
                          "ref_max": _finite(peak, 6)})
            start += size
        worst = min((p for p in parts if p["sqnr_db"] is not None), key=lambda p: p["sqnr_db"], default=None)
        return {"parts": parts, "worst_part": worst}

    def _update(self, ref, got, y) -> None:
        r, g = _rows(ref), _rows(got)
        bad = ~np.isfinite(g)
        self.non_finite += int(bad.sum())
        g = np.where(bad, 0.0, g)
        d = r - g
        self.n += len(r)
        self.signal += float((r * r).sum())
        self.noise += float((d * d).sum())
        if r.size:
            self.max_abs = max(self.max_abs, float(np.abs(d).max()))
            self.lo, self.hi = min(self.lo, float(r.min())), max(self.hi, float(r.max()))
        getattr(self, f"_{self.t.task}", lambda *a: None)(r, g, None if y is None or not self.t.labelled else y)

    def _add(self, **counts):
        for k, v in counts.items():
            self.c[k] = self.c.get(k, 0) + v

    def _classify(self, r, g, y):
        pr, pg = r.argmax(1), g.argmax(1)
        self._add(agree=int((pr == pg).sum()))
        if y is not None:
            y = np.asarray(y).reshape(-1)
            self._add(fp32_correct=int((pr == y).sum()), int8_correct=int((pg == y).sum()))

    def _multilabel(self, r, g, y):
        dr, dg = r > self.t.threshold, g > self.t.threshold
        self._add(agree=int((dr == dg).sum()), decisions=int(dr.size))
        if y is not None:
            y = _rows(y) > 0.5
            for kind, d in (("fp32", dr), ("int8", dg)):
                self._add(**{f"{kind}_tp": int((d & y).sum()), f"{kind}_fp": int((d & ~y).sum()),
                             f"{kind}_fn": int((~d & y).sum())})

    def _regress(self, r, g, y):
        self.moments.update(r, g)
        self._add(abs_err=float(np.abs(r - g).sum()), values=int(r.size))
        if y is not None:
            y = _rows(y)
            self.label_moments[0].update(r, y)
            self.label_moments[1].update(g, y)
            self._add(fp32_label_abs_err=float(np.abs(r - y).sum()), int8_label_abs_err=float(np.abs(g - y).sum()))

    _score = _regress

    def _embed(self, r, g, y):
        nr, ng = np.linalg.norm(r, axis=1), np.linalg.norm(g, axis=1)
        den = nr * ng
        cos = np.where(den > 0, (r * g).sum(1) / np.maximum(den, 1e-300),
                       np.where(np.abs(r - g).max(1) == 0, 1.0, 0.0))
        self._add(cos_sum=float(cos.sum()))
        self.c["cos_min"] = min(self.c.get("cos_min", 1.0), float(cos.min()))
        room = NN_SAMPLES - sum(len(k) for k in self.keep_ref)
        if room > 0:
            self.keep_ref.append(r[:room].astype(np.float32))
            self.keep_got.append(g[:room].astype(np.float32))

    # ---- results

    def sqnr_db(self) -> float:
        """inf when the outputs are identical, -inf when the reference is all zeros and the candidate is not."""
        if self.non_finite:
            return -math.inf
        if self.noise == 0:
            return math.inf
        if self.signal == 0:
            return -math.inf
        return 10 * math.log10(self.signal / self.noise)

    def task_figures(self) -> dict:
        """{metric, fp32, int8} in percent (the gate's figure: higher is better) plus the task's own extras."""
        t, c, n = self.t, self.c, max(self.n, 1)
        if t.task == "classify":
            out = {"top1_agreement": 100 * c.get("agree", 0) / n}
            if t.labelled:
                fp, q = 100 * c["fp32_correct"] / n, 100 * c["int8_correct"] / n
                return {"metric": "accuracy", "fp32": fp, "int8": q, **out, "fp32_accuracy": fp, "int8_accuracy": q}
            return {"metric": "top1_agreement", "fp32": 100.0, "int8": out["top1_agreement"], **out}
        if t.task == "multilabel":
            out = {"decision_agreement": 100 * c.get("agree", 0) / max(c.get("decisions", 0), 1),
                   "threshold": t.threshold}
            if t.labelled:
                fp = 100 * _f1(c["fp32_tp"], c["fp32_fp"], c["fp32_fn"])
                q = 100 * _f1(c["int8_tp"], c["int8_fp"], c["int8_fn"])
                return {"metric": "f1", "fp32": fp, "int8": q, **out, "fp32_f1": fp, "int8_f1": q}
            return {"metric": "decision_agreement", "fp32": 100.0, "int8": out["decision_agreement"], **out}
        if t.task in ("regress", "score"):
            r = self.moments.pearson()
            out = {"pearson": r, "mean_abs_error": c.get("abs_err", 0.0) / max(c.get("values", 0), 1)}
            if t.labelled:
                rf, rq = (m.pearson() for m in self.label_moments)
                vals = max(c.get("values", 0), 1)
                out.update(fp32_label_pearson=rf, int8_label_pearson=rq,
                           fp32_label_mae=c["fp32_label_abs_err"] / vals, int8_label_mae=c["int8_label_abs_err"] / vals)
                if rf is not None and rq is not None:
                    return {"metric": "label_pearson", "fp32": 100 * rf, "int8": 100 * rq, **out}
            if r is None:  # a reference constant over the eval set: correlation says nothing, SQNR still does
                return {"metric": None, **out}
            return {"metric": "pearson", "fp32": 100.0, "int8": 100 * r, **out}
        if t.task == "embed":
            out = {"mean_cosine": c.get("cos_sum", 0.0) / n, "min_cosine": c.get("cos_min", 1.0)}
            out.update(_nn_agreement(self.keep_ref, self.keep_got))
            return {"metric": "mean_cosine", "fp32": 100.0, "int8": 100 * out["mean_cosine"], **out}
        return {"metric": None}

    def result(self) -> dict:
        sqnr = self.sqnr_db()
        span = self.hi - self.lo if self.n else 0.0
        why = self.t.why + (f"; padded positions ({self.masked_by} = 0) left out" if self.masked_by else "")
        rec = {"name": self.t.name, "task": self.t.task, "chosen": self.t.chosen, "why": why,
               "labels": self.t.labelled, "samples": self.n,
               "sqnr_db": _finite(sqnr, 2),
               "identical": self.noise == 0 and not self.non_finite,
               "rel_error": _finite(math.sqrt(self.noise / self.signal), 6) if self.signal > 0 else None,
               "max_abs_error": _finite(self.max_abs, 6),
               "max_abs_error_of_range": _finite(self.max_abs / span, 6) if span > 0 else None,
               "ref_range": [_finite(self.lo, 6), _finite(self.hi, 6)],
               "non_finite": self.non_finite}
        fig = self.task_figures()
        if fig.get("metric") is not None:
            fig["drop_points"] = fig["fp32"] - fig["int8"]
        rec.update({k: _round(v) for k, v in fig.items()})
        rec.update(self.part_figures())
        return rec


def worst_part_text(record: dict) -> str:
    """", worst part [4:22] on axis 1: SQNR 3.6 dB" for an output checked by parts, else ""."""
    w = record.get("worst_part")
    return f", worst part [{w['slice']}] on axis {w['axis']}: SQNR {w['sqnr_db']} dB" if w else ""


def _finite(x: float, digits: int):
    return round(x, digits) if math.isfinite(x) else None


def _round(v):
    return round(v, 4) if isinstance(v, float) else v


def _nn_agreement(keep_ref: list, keep_got: list) -> dict:
    """Share of kept samples whose nearest other sample (cosine) is the same under both models."""
    if not keep_ref:
        return {}
    r, g = np.concatenate(keep_ref), np.concatenate(keep_got)
    if len(r) < 3:
        return {}

    def nearest(a):
        a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-30)
        sim = a @ a.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(1)
    return {"nn_agreement": 100 * float((nearest(r) == nearest(g)).mean()), "nn_samples": len(r)}


# ---------------------------------------------------------------- whole models and the gate

class OutputChecks:
    """All outputs of a model pair: tasks resolved on the first batch, then every batch accumulated."""

    def __init__(self, names: Sequence[str], options: CheckOptions, num_classes: int | None = None,
                 parts: dict | None = None):
        self.names, self.options, self.num_classes = list(names), options, num_classes
        self.parts = parts or {}
        self.checks: list[OutputCheck] | None = None

    def update(self, refs: Sequence[np.ndarray], gots: Sequence[np.ndarray], y=None) -> None:
        if self.checks is None:
            tasks = resolve_tasks(self.names, refs, y, self.options, self.num_classes)
            self.checks = [OutputCheck(t) for t in tasks]
            for c in self.checks:
                c.parts = self.parts.get(c.t.name)
        by_output = label_map(self.names, y, self.options)
        for check, r, g in zip(self.checks, refs, gots):
            check.update(r, g, by_output.get(check.t.name))

    def results(self) -> list[dict]:
        return [c.result() for c in self.checks or []]


def failures(records: Sequence[dict], options: CheckOptions) -> list[str]:
    """Why the candidate fails the gate, one line per broken check (empty: it passes)."""
    out = []
    for r in records:
        if r["non_finite"]:
            out.append(f"output {r['name']}: {r['non_finite']} NaN/Inf values")
            continue
        if options.min_sqnr not in (None, -math.inf) and not r["identical"]:
            if r["sqnr_db"] is None:
                out.append(f"output {r['name']}: the reference is all zeros and INT8 is not")
            elif r["sqnr_db"] < options.min_sqnr:
                out.append(f"output {r['name']}: SQNR {r['sqnr_db']:.1f} dB < {options.min_sqnr:g} dB")
            worst = r.get("worst_part")
            if worst and worst["sqnr_db"] < options.min_sqnr <= r["sqnr_db"]:
                out.append(f"output {r['name']}: its part [{worst['slice']}] on axis {worst['axis']} (values up to "
                           f"{worst['ref_max']:g}, beside parts up to {max(p['ref_max'] or 0 for p in r['parts']):g}) "
                           f"has SQNR {worst['sqnr_db']:.1f} dB < {options.min_sqnr:g} dB, under the whole "
                           f"output's {r['sqnr_db']:.1f} dB")
        if options.max_drop is not None and r.get("metric") and r["drop_points"] > options.max_drop:
            out.append(f"output {r['name']} ({r['task']}): {r['metric']} {r['int8']:.2f} vs FP32 {r['fp32']:.2f}, "
                       f"{r['drop_points']:.2f} points lost (allowed {options.max_drop:g})")
    return out


def padding_mask(feed) -> tuple[str, np.ndarray] | None:
    """A token model's attention mask in a dict feed: an integer or bool (N, L) input named like a mask, 0/1 only."""
    for name, a in (feed.items() if isinstance(feed, dict) else ()):
        a = np.asarray(a)
        if ("mask" in name.lower() and a.ndim == 2 and (a.dtype == bool or np.issubdtype(a.dtype, np.integer))
                and np.isin(a, (0, 1)).all()):
            return name, a.astype(bool)
    return None


def without_padding(mask: tuple[str, np.ndarray] | None, *runs: Sequence[np.ndarray]) -> tuple[list, set]:
    """Per-token outputs (N, L, ...) with padded positions zeroed in every run alike, and the indices of the
    outputs this touched. What a model computes at padding is never used; counting it fails good INT8 models
    (MiniLM's last_hidden_state: 5.7 dB over all positions, 15.8 dB over real tokens)."""
    if mask is None:
        return [list(r) for r in runs], set()
    m, masked = mask[1], set()
    out = []
    for run in runs:
        fixed = []
        for i, o in enumerate(run):
            if o.ndim >= 3 and o.shape[:2] == m.shape and not m.all():
                o = np.where(m.reshape(m.shape + (1,) * (o.ndim - 2)), o, 0)
                masked.add(i)
            fixed.append(o)
        out.append(fixed)
    return out, masked


def batch_first(session, outputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """A session's outputs with the batch axis first (a recurrent state may carry it elsewhere)."""
    from edgec.exporters.compare import output_batch_axis
    return [np.moveaxis(o, output_batch_axis(session, i), 0) for i, o in enumerate(outputs)]


# parts of a joined output whose largest values differ this much are checked each on its own: the ratio at which
# the policy keeps such a join float
MIXED_PART_RATIO = MIXED_RANGE_RATIO


def joined_parts(model_path) -> dict:
    """{output: (axis, part sizes)} for each graph output a Concat makes directly, its parts' sizes on the joined
    axis static (NudeNet's (N, 4 + 18, A): boxes and scores)."""
    import onnx
    from onnx import helper
    try:
        model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path), load_external_data=False))
    except Exception:  # noqa: BLE001 - no shapes, no parts
        return {}
    g = model.graph
    dims = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in [*g.input, *g.value_info, *g.output] if v.type.tensor_type.HasField("shape")}
    dims.update({i.name: list(i.dims) for i in g.initializer})
    outputs, found = {o.name for o in g.output}, {}
    for n in (n for n in g.node if n.op_type == "Concat" and n.output[0] in outputs):
        rank = len(dims.get(n.output[0]) or [])
        axis = next((helper.get_attribute_value(a) for a in n.attribute if a.name == "axis"), 0)
        axis = axis + rank if axis < 0 else axis
        sizes = [(dims.get(i) or [None] * rank)[axis] if len(dims.get(i) or []) == rank else None for i in n.input]
        if rank and 0 < axis < rank and sizes and all(isinstance(k, int) and k > 0 for k in sizes) and len(sizes) > 1:
            found[n.output[0]] = (axis, sizes)
    return found


def compare_models(reference, candidate, batches: Iterable, labels, options: CheckOptions, *,
                   num_classes: int | None = None) -> list[dict]:
    """Both ONNX models on every batch (real ORT sessions, dict feeds or one array per batch), every output
    checked; labels align with the samples in batch order."""
    from edgec.exporters.compare import ort_session, run_onnx
    from edgec.exporters.compare import output_batch_axis
    a, b = ort_session(reference), ort_session(candidate)
    names = [o.name for o in a.get_outputs()]
    parts = {n: p for n, p in joined_parts(reference).items() if n in names and output_batch_axis(a, names.index(n)) == 0}
    checks = OutputChecks(names, options, num_classes, parts=parts)
    start = 0
    for batch in batches:
        refs, gots = batch_first(a, run_onnx(a, [batch])), batch_first(b, run_onnx(b, [batch]))
        mask = padding_mask(batch)
        (refs, gots), masked = without_padding(mask, refs, gots)
        n = len(refs[0])
        checks.update(refs, gots, slice_labels(labels, start, start + n))
        for i in masked:
            checks.checks[i].masked_by = mask[0]
        start += n
    if checks.checks is None:
        raise DataError("no samples to compare the models on; pass at least one sample")
    return checks.results()


class CandidateScore:
    """The gate's figures as one number, for the sensitivity fallback: per candidate, the score that is
    `fp32_score - (worst drop in points over the checked outputs) / 100`; with one checked output that is its
    task figure (accuracy, agreement, correlation, cosine) as a fraction. `error()` ranks candidates by the
    worst noise-to-signal ratio over all outputs (10^(-SQNR/10)), which a one-column output cannot hide.
    Streamed: `start()` the checks of a candidate, `update()` them batch by batch, `score_of()` them."""

    def __init__(self, names: Sequence[str], refs: Sequence[np.ndarray], y, options: CheckOptions,
                 num_classes: int | None = None):
        self.refs = [np.asarray(r) for r in refs]
        self.tasks = resolve_tasks(names, self.refs, y, options, num_classes)
        self.y = label_map(names, y, options)
        checks = self.start()
        self.update(checks, self.refs, self.refs, 0)
        base = [c.result() for c in checks]
        self.gated = [i for i, r in enumerate(base) if r.get("metric")]
        figures = [f"{base[i]['metric']} of {base[i]['name']}" for i in self.gated]
        self.metric = base[self.gated[0]]["metric"] if len(figures) == 1 else \
            f"worst drop of {', '.join(figures)}" if figures else "no task metric"
        self.fp32_score = min((base[i]["fp32"] / 100 for i in self.gated), default=1.0)

    def start(self) -> list["OutputCheck"]:
        return [OutputCheck(t) for t in self.tasks]

    def update(self, checks: list, refs: Sequence[np.ndarray], gots: Sequence[np.ndarray], start: int) -> None:
        """One batch of the candidate's outputs (`gots`) against the reference's (`refs`), samples
        [start, start + len) of the scored ones (where their labels are)."""
        n = len(gots[0])
        for c, r, g in zip(checks, refs, gots):
            y = self.y.get(c.t.name)
            c.update(r, g, None if y is None else y[start:start + n])

    def score_of(self, checks: list) -> float:
        recs = [c.result() for c in checks]
        return self.fp32_score - max((recs[i]["drop_points"] / 100 for i in self.gated), default=0.0)

    def score(self, gots: Sequence[np.ndarray]) -> float:
        checks = self.start()
        self.update(checks, self.refs, gots, 0)
        return self.score_of(checks)

    def error(self, gots: Sequence[np.ndarray]) -> float:
        return noise_ratio(self.refs, gots)


def noise_ratio(refs: Sequence[np.ndarray], gots: Sequence[np.ndarray]) -> float:
    """The worst output's noise-to-signal ratio, 10^(-SQNR/10): what the fallback ranks nodes by, and what
    --min-sqnr bounds (an output passes at ratio <= sqnr_ratio(min_sqnr)). Compared in float64 chunks."""
    from edgec.exporters.compare import Agreement
    return worst_noise_ratio(Agreement().update(r, g) for r, g in zip(refs, gots))


def worst_noise_ratio(agreements: Iterable, subset=None) -> float:
    """noise_ratio from streamed compare.Agreement records (all samples, or `subset` of them)."""
    worst = 0.0
    for a in agreements:
        noise, signal = a.noise_signal(subset)
        ratio = noise / signal if signal > 0 else (0.0 if noise == 0 else math.inf)
        worst = max(worst, ratio if math.isfinite(ratio) else 1e30)  # finite: the fallback subtracts these
    return worst


def sqnr_ratio(min_sqnr: float | None) -> float | None:
    """--min-sqnr as the largest noise-to-signal ratio it allows (None: no SQNR bar)."""
    if min_sqnr is None or not math.isfinite(min_sqnr):
        return None
    return 10 ** (-min_sqnr / 10)


def ratio_db(ratio: float) -> float | None:
    """A noise-to-signal ratio as SQNR in dB (None for identical outputs)."""
    return None if ratio <= 0 else round(-10 * math.log10(ratio), 2)
