"""Where an INT8 model's error comes from: edgec's default quantization taken apart on held-out samples.

    python benchmarks/ablate_int8.py FP32.onnx CALIB.npz EVAL.npz [--per-tensor] [--option bias_correction=false]

(npz files with an array `x`: the model's single input, or one array per input name.) Quantizes with
`quantize_int8`'s pipeline (edgec.exporters.quantize.prepare), then scores variants of the QDQ graph against the
FP32 model, all run with ORT's exact QDQ arithmetic (graph optimisation off) unless said otherwise:

- all INT8 as it runs (ORT optimised: fused kernels) and as exact QDQ arithmetic;
- weights only: every activation Q/DQ pair replaced by a Clip to its range (its rounding gone, its clipping kept);
- activations only: every weight and bias DequantizeLinear replaced by the pre-processed FP32 value, the bias
  as it was before bias correction (ORT's optimiser would quantize float weights between Q/DQ pairs again,
  hence exact arithmetic);
- clipping only: FP32 weights, every activation only clipped to its range;
- with --per-tensor, for every activation: the error its rounding adds to "clipping only" (all others clipped),
  and the error its clipping alone costs: which tensors the 8-bit grid hurts.

The error is the mean (1 - cosine) per sample of all float outputs flattened together. A Relu or Clip that ORT
folded into a range (a range starting at the grid's lowest level is one) is put back as Clip(0) when a pair is
removed, so "nothing quantized" is the FP32 model again (checked: the `exact` row).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np


def _load(path) -> dict | np.ndarray:
    d = np.load(path)
    return d["x"] if list(d.keys()) == ["x"] else {k: d[k] for k in d.keys()}


def outputs(path, data, optimize: bool = True) -> np.ndarray:
    """All float outputs of every sample, flattened side by side: (samples, values)."""
    from edgec.exporters.compare import ort_session, run_onnx
    outs = run_onnx(ort_session(path, optimize=optimize), data, 32)
    return np.concatenate([o.reshape(len(o), -1).astype(np.float64) for o in outs if o.dtype.kind == "f"], 1)


def deficit(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """1 - cosine per sample."""
    norm = np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1), 1e-30)
    return 1.0 - (ref * got).sum(1) / norm


def activation_quantizers(model) -> dict:
    """tensor -> (QuantizeLinear node, (lo, hi) of its grid, folded: whether the range starts at the grid's
    lowest level, where ORT may have folded a Relu/Clip into it) for every activation Q/DQ pair."""
    from onnx import numpy_helper
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits and n.input[1] in inits:
            scale, zp = float(inits[n.input[1]].reshape(-1)[0]), inits[n.input[2]].reshape(-1)
            info = np.iinfo(zp.dtype)
            z = int(zp[0])
            out[n.input[0]] = (n, ((info.min - z) * scale, (info.max - z) * scale), z == info.min)
    return out


def _topological(model):
    avail = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    pending, ordered = list(model.graph.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in avail for i in n.input):
                ordered.append(n)
                avail.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError("graph has a cycle or a missing input")
        pending = rest
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    return model


def variant(qdq, *, rounded, clipped, fp32_weights=None):
    """A copy of the QDQ model where the activations in `rounded` keep their Q/DQ pair, those in `clipped` are
    clipped to their range without rounding, and the others pass exactly (a folded Relu put back); with
    `fp32_weights` (name -> TensorProto of the pre-processed FP32 model) weights and biases are FP32."""
    import onnx
    from onnx import numpy_helper
    m = onnx.ModelProto()
    m.CopyFrom(qdq)
    quantizers = activation_quantizers(m)
    by_q = {q.output[0]: (t, rng, folded) for t, (q, rng, folded) in quantizers.items()}
    drop, extra = set(), []
    inits = {i.name for i in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type != "DequantizeLinear":
            continue
        if n.input[0] in by_q:
            tensor, (lo, hi), folded = by_q[n.input[0]]
            if tensor in rounded:
                continue
            if tensor not in clipped:
                lo, hi = (0.0 if folded else -np.inf), np.inf
            name = f"{n.output[0]}/ablation_clip"   # the Clip writes the DequantizeLinear's output
            m.graph.initializer.extend([numpy_helper.from_array(np.array(lo, np.float32), name + "_lo"),
                                        numpy_helper.from_array(np.array(hi, np.float32), name + "_hi")])
            extra.append(onnx.helper.make_node("Clip", [tensor, name + "_lo", name + "_hi"], [n.output[0]],
                                               name=name))
            drop.update([n.name, quantizers[tensor][0].name])
        elif fp32_weights is not None and n.input[0] in inits and n.input[0].endswith("_quantized") \
                and n.input[0][:-len("_quantized")] in fp32_weights:
            t = onnx.TensorProto()
            t.CopyFrom(fp32_weights[n.input[0][:-len("_quantized")]])
            t.name = n.output[0]
            m.graph.initializer.append(t)
            drop.add(n.name)
    nodes = [n for n in m.graph.node if n.name not in drop] + extra
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return _topological(m)


def ablate(fp32, calib, x, options=None, *, per_tensor: bool = False, workdir=None) -> dict:
    """The figures of the module doc for one model (mean / max deficit per variant; per tensor with
    per_tensor)."""
    import tempfile
    import onnx
    from edgec.exporters.quantize import QuantOptions, prepare
    from edgec.exporters.transforms import restore_biases
    work = Path(workdir or tempfile.mkdtemp(prefix="edgec-ablate-"))
    work.mkdir(parents=True, exist_ok=True)
    p = prepare(fp32, calib, options or QuantOptions(num_samples=None))
    try:
        q = p.quantize(work / "int8.onnx", p.resolve_exclusions())
        pre = onnx.load(str(p.model_path))
        # the FP32 weights and the biases before bias correction: "nothing quantized" is the FP32 model
        restore_biases(pre, p.bias_originals or {}, list(p.bias_originals or {}))
        restore_biases(pre, p.weight_originals or {}, list(p.weight_originals or {}))
    finally:
        p.cleanup()
    qdq = onnx.load(str(q))
    weights = {i.name: i for i in pre.graph.initializer}
    acts = set(activation_quantizers(qdq))
    ref = outputs(fp32, x)

    def score(model=None, path=None, optimize=False) -> float:
        if model is not None:
            path = work / "variant.onnx"
            onnx.save(model, str(path))
        return float(deficit(ref, outputs(path, x, optimize)).mean())

    rows = {"all INT8 (ORT optimised)": score(path=q, optimize=True), "all INT8 (exact QDQ)": score(path=q),
            "weights only (activations clipped, not rounded)": score(variant(qdq, rounded=set(), clipped=acts)),
            "activations only (FP32 weights)": score(variant(qdq, rounded=acts, clipped=acts, fp32_weights=weights)),
            "clipping only (FP32 weights)": score(variant(qdq, rounded=set(), clipped=acts, fp32_weights=weights)),
            "exact (nothing quantized: must be ~0)": score(variant(qdq, rounded=set(), clipped=set(),
                                                                    fp32_weights=weights))}
    result = {"variants": rows, "activation_quantizers": len(acts)}
    if per_tensor:
        base = rows["clipping only (FP32 weights)"]
        tensors = []
        for t in sorted(acts):
            r = score(variant(qdq, rounded={t}, clipped=acts, fp32_weights=weights)) - base
            c = score(variant(qdq, rounded=set(), clipped={t}, fp32_weights=weights))
            tensors.append({"tensor": t, "rounding": r, "clipping": c})
        result["per_tensor"] = sorted(tensors, key=lambda d: -d["rounding"])
    if workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _option(text: str):
    key, _, value = text.partition("=")
    return key, json.loads(value)


def main(argv=None) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    ap = argparse.ArgumentParser(prog="python benchmarks/ablate_int8.py", description=__doc__.splitlines()[0])
    ap.add_argument("fp32", type=Path)
    ap.add_argument("calib", type=Path)
    ap.add_argument("eval", type=Path)
    ap.add_argument("--per-tensor", action="store_true")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--option", action="append", default=[], type=_option, help="QuantOptions field=JSON value")
    a = ap.parse_args(argv)
    from edgec.exporters.quantize import QuantOptions
    calib = _load(a.calib)
    batches = [calib[i:i + 32] for i in range(0, len(calib), 32)] if isinstance(calib, np.ndarray) else [calib]
    r = ablate(a.fp32, batches, _load(a.eval), QuantOptions(num_samples=None, **dict(a.option)),
               per_tensor=a.per_tensor)
    print("| variant | mean 1 - cos | mean cos |\n|---|---|---|")
    for k, v in r["variants"].items():
        print(f"| {k} | {v:.5f} | {1 - v:.5f} |")
    if a.per_tensor:
        print(f"\n| activation (top {a.top} by rounding) | rounding adds | clipping alone |\n|---|---|---|")
        for d in r["per_tensor"][:a.top]:
            print(f"| `{d['tensor']}` | {d['rounding']:.5f} | {d['clipping']:.5f} |")
        print(f"\nsum over {len(r['per_tensor'])} tensors: rounding {sum(d['rounding'] for d in r['per_tensor']):.5f}, "
              f"clipping {sum(d['clipping'] for d in r['per_tensor']):.5f}")


if __name__ == "__main__":
    main()
