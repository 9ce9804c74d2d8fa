"""What the label-free fallback scores, and how: comparisons streamed in float64 chunks with the whole-array
figures, the FP32 reference computed once (in spread order, cut to the time box on a heavy model), and the
budget scored on calibration samples held out of the calibration's fit."""
from __future__ import annotations

import numpy as np
import pytest

from edgec.exporters import compare
from edgec.exporters.compare import Agreement, ort_session, output_agreement, run_onnx
from edgec.exporters.metrics import CandidateScore, CheckOptions, OutputCheck, noise_ratio, resolve_tasks
from edgec.exporters.sensitivity import (MIN_RANK, MIN_SCORED, PER_SAMPLE_COSINE_VALUES, _Evaluator, cosine_score,
                                         holdout_split, spread_order)


# ---------------------------------------------------------------- the whole-array figures, as they were

def whole_agreement(ref, got) -> dict:
    """output_agreement before streaming: whole outputs in float64 at once (the oracle)."""
    ref = np.asarray(ref, dtype=np.float64).reshape(len(ref), -1)
    got = np.asarray(got, dtype=np.float64).reshape(len(got), -1)
    num = (ref * got).sum(1)
    den = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    tiny = 1e-6 * max(1.0, float(np.abs(ref).max()))
    close = np.abs(ref - got).max(1) <= tiny
    cos = np.where(close, 1.0, np.where(den > 0, num / np.maximum(den, 1e-30), 0.0))
    out = {"max_abs_err": float(np.abs(ref - got).max()), "mean_cosine": float(cos.mean()),
           "min_cosine": float(cos.min()), "ref_abs_max": float(np.abs(ref).max())}
    if ref.shape[1] > 1:
        out["top1_agreement"] = float((ref.argmax(1) == got.argmax(1)).mean())
    return out


def whole_noise_ratio(refs, gots) -> float:
    worst = 0.0
    for r, g in zip(refs, gots):
        r, g = (np.asarray(a, dtype=np.float64).reshape(len(a), -1) for a in (r, g))
        worst = max(worst, float(((r - g) ** 2).sum()) / float((r * r).sum()))
    return worst


def whole_cosine_score(refs, gots) -> float:
    """The fallback's figure before streaming: per-sample mean cosine, or over all samples for small outputs."""
    scores = []
    for r, g in zip(refs, gots):
        if r.reshape(len(r), -1).shape[1] >= PER_SAMPLE_COSINE_VALUES:
            scores.append(whole_agreement(r, g)["mean_cosine"])
        else:
            scores.append(whole_agreement(r.reshape(1, -1), g.reshape(1, -1))["mean_cosine"])
    return min(scores)


SHAPES = {"one column": (96, 1), "two values": (96, 2), "logits": (96, 10), "sequence (N,T,C)": (96, 40, 97),
          "feature map": (96, 3, 8, 8)}


def _pair(shape, seed=0):
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=shape).astype(np.float32)
    got = (ref + 0.1 * rng.normal(size=shape)).astype(np.float32)
    ref[3] = 0.0          # a zero row against a non-zero one: no agreement
    got[5] = ref[5]       # an identical row
    return ref, got


@pytest.mark.parametrize("kind", list(SHAPES))
def test_chunked_comparison_gives_the_whole_array_figures(kind, monkeypatch):
    ref, got = _pair(SHAPES[kind])
    monkeypatch.setattr(compare, "CHUNK_VALUES", 100)   # rows compared a few at a time (one at a time: sequence)
    streamed = Agreement()
    for lo, hi in ((0, 5), (5, 6), (6, 50), (50, 96)):  # fed in uneven batches, as evaluations come
        streamed.update(ref[lo:hi], got[lo:hi])
    whole = whole_agreement(ref, got)
    assert streamed.figures() == pytest.approx(whole, rel=1e-9, abs=1e-12)
    assert output_agreement(ref, got) == pytest.approx(whole, rel=1e-9, abs=1e-12)
    assert noise_ratio([ref], [got]) == pytest.approx(whole_noise_ratio([ref], [got]), rel=1e-9)
    assert cosine_score([ref], [got]) == pytest.approx(whole_cosine_score([ref], [got]), rel=1e-9)
    # any subset of the samples from the per-sample numbers: what the ranking reads off the all-INT8 verdict
    assert streamed.figures(slice(0, 40)) == pytest.approx(whole_agreement(ref[:40], got[:40]), rel=1e-9, abs=1e-12)
    noise, signal = streamed.noise_signal(slice(0, 40))
    assert noise / signal == pytest.approx(whole_noise_ratio([ref[:40]], [got[:40]]), rel=1e-9)
    # the gate's streamed checks: chunked rows give the figures of one whole batch
    task = resolve_tasks(["out"], [ref], None, CheckOptions())[0]
    chunked = OutputCheck(task)
    chunked.update(ref, got)
    monkeypatch.setattr(compare, "CHUNK_VALUES", 10 ** 9)
    one = OutputCheck(task)
    one.update(ref, got)
    a, b = chunked.result(), one.result()
    numbers = [k for k, v in b.items() if isinstance(v, float)]
    assert {k: v for k, v in a.items() if k not in numbers} == {k: v for k, v in b.items() if k not in numbers}
    assert {k: a[k] for k in numbers} == pytest.approx({k: b[k] for k in numbers}, rel=1e-9)


def test_non_finite_candidates_stay_the_worst():
    ref, got = _pair((16, 10))
    got[2, 3] = np.nan
    ag = Agreement().update(ref, got)
    assert ag.noise_signal()[0] == np.inf and noise_ratio([ref], [got]) == 1e30
    assert ag.cosines()[2] == 0.0 and np.isnan(ag.figures()["max_abs_err"])


# ---------------------------------------------------------------- a real multi-output model in ORT sessions

@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """A conv net on (N, 4, 32) sequences with three outputs: a score (N,1), logits (N,10) and a per-step
    sequence (N,32,12); the candidate is the same graph with its weights perturbed (a real second model)."""
    import onnx
    import torch
    from onnx import numpy_helper
    from torch import nn
    from edgec.exporters.onnx_export import export_onnx

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv1d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv1d(16, 12, 3, padding=1))
            self.logits, self.score = nn.Linear(12, 10), nn.Linear(12, 1)

        def forward(self, x):
            h = self.body(x)
            pooled = h.mean(2)
            return self.score(pooled), self.logits(pooled), h.permute(0, 2, 1)

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    t = np.linspace(0, 4 * np.pi, 32, dtype=np.float32)
    x = np.stack([np.stack([np.sin(f * t + p) for f, p in zip(rng.uniform(0.5, 2, 4), rng.uniform(0, 6, 4))])
                  for _ in range(160)]).astype(np.float32)
    x += 0.05 * rng.normal(size=x.shape).astype(np.float32)
    root = tmp_path_factory.mktemp("heads")
    export_onnx(Heads().eval(), torch.from_numpy(x[:2]), root / "fp32.onnx")
    model = onnx.load(str(root / "fp32.onnx"))
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.size > 1:
            init.CopyFrom(numpy_helper.from_array((w + 0.05 * np.abs(w).mean() * rng.normal(size=w.shape))
                                                  .astype(np.float32), init.name))
    onnx.save(model, str(root / "cand.onnx"))
    return root / "fp32.onnx", root / "cand.onnx", x


def test_evaluator_streams_a_multi_output_model_with_the_whole_array_figures(heads, monkeypatch):
    fp32, cand, x = heads
    monkeypatch.setattr(compare, "CHUNK_VALUES", 64)
    session = ort_session(fp32)
    names = [o.name for o in session.get_outputs()]
    shapes = [r.shape[1:] for r in run_onnx(session, x[:2])]
    assert shapes == [(1,), (10,), (32, 12)]
    checks = CheckOptions(tasks={names[1]: "classify"})
    ev = _Evaluator(fp32, x, None, 7, checks, cosine=True)   # batches of 7: chunks and batches both uneven
    assert ev.n == ev.available == len(x)
    assert ev.task_metric == f"worst drop of pearson of {names[0]}, top1_agreement of {names[1]}"
    m = ev(cand)
    order = spread_order(len(x))
    refs, gots = run_onnx(ort_session(fp32), x[order]), run_onnx(ort_session(cand), x[order])
    assert all(np.array_equal(a, b) for a, b in zip(ev.refs, refs))   # the reference, kept once, in that order
    assert m.score == pytest.approx(whole_cosine_score(refs, gots), rel=1e-7) and m.score < 0.999
    assert m.error == pytest.approx(whole_noise_ratio(refs, gots), rel=1e-6) and m.error > 0
    whole_drop = 100 * (1 - CandidateScore(names, refs, None, checks).score(gots))
    assert m.task_drop == pytest.approx(whole_drop, abs=1e-9)
    # the ranking's first rows, and the same rows read off the whole verdict
    first = ev(cand, rows=20, error_only=True)
    assert first.error == pytest.approx(whole_noise_ratio([r[:20] for r in refs], [g[:20] for g in gots]), rel=1e-6)
    from edgec.exporters.metrics import worst_noise_ratio
    assert worst_noise_ratio(m.agreements, slice(0, 20)) == pytest.approx(first.error, rel=1e-6)


def test_a_heavy_model_scores_fewer_samples_and_ranks_on_fewer(heads):
    """The reference stops once its share of the box is spent (at least MIN_SCORED samples, whole batches);
    the ranking's samples follow the last verdict's measured per-sample cost and session start."""
    fp32, cand, x = heads
    ev = _Evaluator(fp32, x, None, 8, cosine=True, seconds=0.0)
    assert ev.n == MIN_SCORED < ev.available == len(x) and ev.sample_seconds > 0
    assert len(ev.refs[0]) == MIN_SCORED and ev.refs[0].shape == (MIN_SCORED, 1)
    assert np.array_equal(ev.refs[2], run_onnx(ort_session(fp32), x[spread_order(len(x))[:MIN_SCORED]])[2])
    ev(cand)
    assert ev.run_rows == MIN_SCORED
    ev.run_seconds, ev.run_rows, ev.session_seconds = 1.0, 100, 0.5   # 10 ms a sample, 0.5 s a session
    assert ev.rank_rows(nodes=10, seconds=10.0, most=64) == 32 == ev.n      # 50 fit, capped at what was scored
    ev.run_seconds = 4.0                                                    # 40 ms a sample: 12 fit
    assert ev.rank_rows(nodes=10, seconds=10.0, most=64) == 12
    assert ev.rank_rows(nodes=10, seconds=10.0, most=6) == 6
    assert ev.rank_rows(nodes=100, seconds=10.0, most=64) == MIN_RANK      # not even one sample fits: the floor


def test_label_free_fallback_on_a_tiny_box_says_what_it_scored(heads, tmp_path):
    from edgec.core.package import Sensitivity
    from edgec.core.report import fallback_summary
    from edgec.exporters.quantize import QuantOptions
    from edgec.exporters.sensitivity import FallbackOptions, quantize_with_budget
    fp32, _, x = heads
    scored, held_out = holdout_split(len(x), 120, 512)      # the calibration reads the first 120 of 160
    info, rep = quantize_with_budget(fp32, tmp_path / "q.onnx", [x], x[scored], None, QuantOptions(num_samples=120),
                                     FallbackOptions(max_accuracy_drop=None, min_cosine=0.99999, time_budget_s=1e-6,
                                                     batch_size=8), held_out=held_out)
    assert held_out and rep.scored_held_out and info.samples == 120 and scored.min() == 120
    assert rep.scored_samples == MIN_SCORED and rep.scored_available == len(scored) == 40 and rep.sample_ms > 0
    line = fallback_summary(Sensitivity.from_json(rep.to_dict()))
    assert f"on {MIN_SCORED} of 40 held-out calibration samples (time box: " in line, line


# ---------------------------------------------------------------- which samples score the budget

def test_holdout_split_scores_on_samples_the_calibration_does_not_read():
    scored, held = holdout_split(1000, 256, 512)                # past the 256 it reads: held out
    assert held and len(scored) == 512 and scored.min() == 256 and scored.max() == 999
    scored, held = holdout_split(300, 256, 512)                 # 44 spare: enough (MIN_SCORED)
    assert held and list(scored) == list(range(256, 300))
    for n, fit in ((256, 256), (256, None), (280, 256)):        # too few spare: the fitted ones, said so
        scored, held = holdout_split(n, fit, 512)
        assert not held and list(scored) == list(range(n))
    scored, held = holdout_split(2000, None, 512)               # spread over the data (folders: sorted by class)
    assert not held and len(scored) == 512 and scored[0] == 0 and scored[-1] == 1999


def test_spread_order_prefixes_are_spread():
    order = spread_order(256)
    assert sorted(order) == list(range(256))
    assert list(order[:4]) == [0, 128, 64, 192] and sorted(order[:32]) == list(range(0, 256, 8))
    for n in (1, 2, 3, 100, 129):
        o = spread_order(n)
        assert sorted(o) == list(range(n))
        assert n < 8 or np.ptp(o[:n // 4]) >= n / 2              # a quarter of them covers half the range at least


def test_scored_samples_are_a_view_read_along_each_inputs_batch_axis():
    """Reordering and cutting the scored samples copies nothing, and a recurrent state's batch axis (1 here) is
    the one indexed."""
    from edgec.core.feeds import FeedLayout
    from edgec.exporters.sensitivity import _Rows
    rng = np.random.default_rng(0)
    feed = {"x": rng.normal(size=(10, 3)), "state": rng.normal(size=(2, 10, 4))}
    rows = _Rows(feed, FeedLayout(["x", "state"], {"x": 0, "state": 1})).take(spread_order(10)).take(np.arange(6))
    assert len(rows) == 6 and rows.bytes_per_sample() == (3 + 8) * 8
    want = spread_order(10)[:6]
    got = list(rows.batches(4))
    assert [len(b["x"]) for b in got] == [4, 2] and got[0]["state"].shape == (2, 4, 4)
    assert np.array_equal(np.concatenate([b["x"] for b in got]), feed["x"][want])
    assert np.array_equal(np.concatenate([b["state"] for b in got], axis=1), feed["state"][:, want])
