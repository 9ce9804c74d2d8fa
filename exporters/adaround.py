"""AdaRound: learn whether each INT8 weight rounds up or down (Nagel et al. 2020, "Up or Down? Adaptive
Rounding for Post-Training Quantization"; AIMET's AdaRound follows the paper).

Rounding every weight to the nearest grid point minimises each weight's own error, not the layer's output
error: for a layer y = W x the output error of a rounding W_q is E||(W_q - W) x||^2 = tr(dW H dW^T), with
H = E[x x^T] the second moment of the layer's input patches. AdaRound relaxes the choice floor/ceil to a
soft h(V) in [0, 1] (rectified sigmoid), minimises that error plus a regulariser that pushes every h to 0
or 1 (its exponent beta annealed from 20 to 2 after a warm start), then rounds h.

Here each layer's H is collected once from the FP32 model's own activations on calibration samples (ONNX
Runtime, a random subset of output positions per sample), so an iteration costs one (Cout x D) @ (D x D)
product per layer whatever the number of samples, instead of a forward and backward pass over a batch of
activations. Per-channel scales are ORT's own (read from a first quantization), so the learned integers are
written back as W = scale * q: ORT then quantizes them to exactly those integers.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

ZETA, GAMMA = 1.1, -0.1      # stretch of the rectified sigmoid (the paper's and AIMET's values)


@dataclass
class AdaRoundConfig:
    iterations: int = 500
    lr: float = 1e-2
    reg: float = 0.01                # weight of the rounding regulariser (AIMET's default)
    beta: tuple = (20.0, 2.0)        # annealing of the regulariser's exponent
    warm_start: float = 0.2          # share of iterations without the regulariser
    positions: int = 64              # output positions sampled per calibration sample for H
    time_budget_s: float = 60.0      # past it, the remaining layers keep round-to-nearest
    seed: int = 0


def _conv_geometry(node, w_shape, attr):
    k = list(w_shape[2:])
    d = len(k)
    return {"kernel": k, "strides": attr(node, "strides", [1] * d), "dilations": attr(node, "dilations", [1] * d),
            "pads": attr(node, "pads", [0] * 2 * d), "group": attr(node, "group", 1),
            "auto_pad": attr(node, "auto_pad", "NOTSET")}


def _patches(x: np.ndarray, geo: dict, rng, positions: int) -> np.ndarray:
    """Input patches at up to `positions` random output positions (the same for every sample of the chunk):
    (N, C, *spatial) -> (N, C * prod(kernel), P), in the weight's (C, k...) order; 1-D and 2-D convs."""
    k, s, dl, p = geo["kernel"], geo["strides"], geo["dilations"], geo["pads"]
    d = len(k)
    x = np.pad(x, [(0, 0), (0, 0)] + [(p[a], p[a + d]) for a in range(d)])
    outs = [(x.shape[2 + a] - dl[a] * (k[a] - 1) - 1) // s[a] + 1 for a in range(d)]
    total = int(np.prod(outs))
    flat = rng.choice(total, positions, replace=False) if total > positions else np.arange(total)
    coords = np.unravel_index(flat, outs)
    # index of each (position, tap) along each spatial axis
    idx = [coords[a][:, None] * s[a] + np.arange(k[a])[None, :] * dl[a] for a in range(d)]
    if d == 1:
        g = x[:, :, idx[0]]                                             # (N, C, P, k)
    else:
        g = x[:, :, idx[0][:, :, None], idx[1][:, None, :]]             # (N, C, P, kh, kw)
    n, c, npos = g.shape[0], g.shape[1], g.shape[2]
    return np.moveaxis(g, 2, -1).reshape(n, c * int(np.prod(k)), npos)


class _Layer:
    """One Conv/Gemm: its FP32 weight as (groups, out/group, D), ORT's scale per output channel, and H."""

    def __init__(self, node, w, scale, qmin, qmax, geo):
        self.node, self.geo, self.qmin, self.qmax = node, geo, qmin, qmax
        self.shape = w.shape
        if geo is None:                      # Gemm weight as (N, K) rows = outputs
            self.w = w.reshape(1, w.shape[0], -1)
            self.groups = 1
        else:
            self.groups = geo["group"]
            self.w = w.reshape(self.groups, w.shape[0] // self.groups, -1)
        self.scale = np.asarray(scale, np.float64).reshape(self.groups, -1, 1) * np.ones((1, 1, 1))
        d = self.w.shape[2]
        # A Gemm sees one row per sample: fewer rows than inputs, so its rows are kept (the error is then
        # ||X dW^T||^2, cheaper than dW H dW^T with H of D x D); a conv's many positions are folded into H.
        self.h = np.zeros((self.groups, d, d)) if geo is not None else None
        self.x: list = []
        self.rows = 0

    def add(self, x, rng, positions):
        if self.geo is None:
            self.x.append(x.reshape(len(x), -1).astype(np.float32))
            self.rows += len(x)
            return
        p = _patches(x, self.geo, rng, positions)                    # (N, G*D, P), float32
        n = p.shape[0]
        p = p.reshape(n, self.groups, -1, p.shape[2]).transpose(1, 2, 0, 3).reshape(self.groups, self.w.shape[2], -1)
        self.h += np.matmul(p, p.transpose(0, 2, 1))                  # per chunk in float32, summed in float64
        self.rows += p.shape[2]


def _optimise(layer: _Layer, cfg: AdaRoundConfig, deadline: float) -> tuple[np.ndarray, dict]:
    """Learn the rounding of one layer (stopping early at `deadline`); returns (new FP32 weight = scale * q,
    figures)."""
    import torch
    w = torch.from_numpy(layer.w.astype(np.float32))
    s = torch.from_numpy(np.broadcast_to(layer.scale, layer.w.shape[:2] + (1,)).astype(np.float32).copy())
    if layer.h is not None:
        h = torch.from_numpy((layer.h / max(layer.rows, 1)).astype(np.float32))
        error = lambda dw: ((dw @ h) * dw).sum()                           # noqa: E731
    else:
        x = torch.from_numpy(np.concatenate(layer.x)) / math.sqrt(max(layer.rows, 1))
        error = lambda dw: ((x @ dw[0].T) ** 2).sum()                       # noqa: E731
    ws = w / s
    floor = torch.floor(ws)
    rest = (ws - floor).clamp(1e-4, 1 - 1e-4)
    v = torch.log((rest - GAMMA) / (ZETA - rest)).requires_grad_(True)   # h(v) = rest at the start

    def soft(v):
        return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def recon(q):
        return error(s * q.clamp(layer.qmin, layer.qmax) - w)

    with torch.no_grad():
        nearest = recon(torch.round(ws)).item()
    opt = torch.optim.Adam([v], lr=cfg.lr)
    warm = int(cfg.warm_start * cfg.iterations)
    done = 0
    for it in range(cfg.iterations):
        if it % 25 == 0 and time.perf_counter() > deadline:
            break
        done += 1
        hv = soft(v)
        loss = recon(floor + hv)
        if it >= warm:
            rel = (it - warm) / max(1, cfg.iterations - warm)
            beta = cfg.beta[1] + 0.5 * (cfg.beta[0] - cfg.beta[1]) * (1 + math.cos(rel * math.pi))
            loss = loss + cfg.reg * (1 - (2 * hv - 1).abs().pow(beta)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        q = (floor + (soft(v) >= 0.5).float()).clamp(layer.qmin, layer.qmax)
        learned = recon(q).item()
        flipped = int((q != torch.round(ws).clamp(layer.qmin, layer.qmax)).sum())
    if learned >= nearest:       # never worse than round-to-nearest on the layer's own objective
        q = torch.round(ws).clamp(layer.qmin, layer.qmax)
    new = (s * q).numpy().reshape(layer.shape)
    return new, {"error_nearest": nearest, "error_learned": min(learned, nearest), "flipped": flipped,
                 "iterations": done}


def adaround(model, qdq_model, calibration, *, reduce_range: bool, weight_type: str, num_samples: int, workdir,
             exclude=(), config: AdaRoundConfig | None = None) -> tuple[dict, dict]:
    """Learned rounding of every quantized Conv (1-D/2-D) and Gemm weight of `model` (the FP32 graph that
    will be quantized), in place. `qdq_model`: ORT's quantization of it (its per-channel weight scales).
    Returns (record, originals: node -> (weight name, original value))."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType
    from edgec.exporters.transforms import _attr, _const, _targets, run_collect
    cfg = config or AdaRoundConfig()
    started = time.perf_counter()
    g, targets, skipped, producers, inits = _targets(model, qdq_model, exclude)
    qtype = TensorProto.INT8 if weight_type == "int8" else TensorProto.UINT8
    qmin, qmax = (float(v) for v in get_qmin_qmax_for_qType(qtype, reduce_range=reduce_range, symmetric=True))
    layers, by_input = [], {}
    for n, qn in targets:
        w = g.array(n.input[1])
        if w is None or not g.private(n.input[1]):
            skipped["weight shared or not a constant"] += 1
            continue
        if n.op_type == "Conv":
            if w.ndim not in (3, 4):
                skipped["Conv other than 1-D/2-D"] += 1
                continue
            geo = _conv_geometry(n, w.shape, _attr)
            if geo["auto_pad"] not in ("NOTSET", "VALID"):
                skipped["auto_pad"] += 1
                continue
        else:
            geo = None
            if _attr(n, "transB", 0) == 0:
                w = w.T                                    # rows = outputs, like a Conv weight
        dq = producers[qn.input[1]]
        zp = inits.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        scale = inits.get(dq.input[1])
        if scale is None or (zp is not None and np.any(zp != 0)):
            skipped["weight scale not found or not symmetric"] += 1
            continue
        scale = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (w.shape[0],))
        # the grid ORT used for this weight (depthwise convs may keep all 8 bits under reduce_range): its
        # largest channel maximum maps to the top of the grid
        top = float(np.abs(inits[dq.input[0]]).max()) if dq.input[0] in inits else qmax
        lo, hi = (-top, top) if qmin < 0 and top > qmax else (qmin, qmax)
        layer = _Layer(n, w.astype(np.float64), scale, lo, hi, geo)
        layer.transposed = n.op_type == "Gemm" and _attr(n, "transB", 0) == 0
        layers.append(layer)
        by_input.setdefault(n.input[0], []).append(layer)
    if not layers:
        return {"applied": False, "layers": 0, "skipped": dict(skipped)}, {}
    rng = np.random.default_rng(cfg.seed)

    def reduce(name, value):
        for layer in by_input.get(name, ()):
            layer.add(value, rng, cfg.positions)
    seen = run_collect(model, list(by_input), calibration, num_samples, workdir, reduce)
    collected = time.perf_counter() - started
    deadline = started + cfg.time_budget_s
    originals, errors, flipped, timed_out, cut = {}, [], 0, 0, 0
    for layer in layers:
        if time.perf_counter() > deadline:
            timed_out += 1
            continue
        new, fig = _optimise(layer, cfg, deadline)
        cut += fig["iterations"] < cfg.iterations
        n = layer.node
        originals[n.name] = (n.input[1], g.array(n.input[1]).copy())
        g.set(n.input[1], new.T if layer.transposed else new)
        errors.append((fig["error_nearest"], fig["error_learned"]))
        flipped += fig["flipped"]
    gain = [1 - l / e for e, l in errors if e > 0]
    record = {"applied": bool(originals), "layers": len(originals), "samples": seen,
              "iterations": cfg.iterations, "positions_per_sample": cfg.positions,
              "weights_flipped_from_nearest": flipped, "skipped": dict(skipped),
              "layers_left_nearest_by_time_box": timed_out, "layers_cut_short_by_time_box": cut,
              "mean_layer_error_reduction": round(float(np.mean(gain)), 4) if gain else 0.0,
              "collect_seconds": round(collected, 2), "seconds": round(time.perf_counter() - started, 2)}
    return record, originals


__all__ = ["AdaRoundConfig", "adaround"]
