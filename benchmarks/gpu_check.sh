#!/usr/bin/env bash
# One-command GPU check: CPU vs CUDA (and TensorRT where present) latency of the same model through `edgec bench`.
# Installs nothing. Needs edgec with onnxruntime-gpu (pip install 'edgec[gpu]'); runs in well under 5 minutes.
#
#   benchmarks/gpu_check.sh [MODEL.onnx | NAME.edgec]     (default: exports torchvision ResNet18 if torch is present)
#
# UNVERIFIED: written without access to a GPU; see benchmarks/RESULTS.md.
set -euo pipefail
PY=${PYTHON:-python}
EDGEC=(${EDGEC:-$PY -m edgec.cli})
MODEL=${1:-}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [[ -z "$MODEL" ]]; then
  MODEL="$WORK/resnet18.onnx"
  echo "[gpu_check] no model given: exporting torchvision ResNet18 (random weights) to $MODEL" >&2
  "$PY" - "$MODEL" <<'PYEOF'
import sys, torch, torchvision
m = torchvision.models.resnet18(weights=None).eval()
torch.onnx.export(m, torch.randn(1, 3, 224, 224), sys.argv[1], input_names=["input"], output_names=["logits"],
                  opset_version=17, dynamo=False)
PYEOF
fi

"${EDGEC[@]}" bench --list-providers >&2
EPS=(--ep cpu)
AVAIL=$("${EDGEC[@]}" bench --list-providers --json)
has() { "$PY" -c "import json,sys; d=json.load(sys.stdin); sys.exit(0 if any(p['ep']=='$1' and p['available'] for p in d['providers']) else 1)" <<<"$AVAIL"; }
has cuda && EPS+=(--ep cuda) || echo "[gpu_check] CUDAExecutionProvider missing: pip install 'edgec[gpu]'" >&2
has tensorrt && EPS+=(--ep tensorrt) || echo "[gpu_check] TensorrtExecutionProvider missing: CPU vs CUDA only" >&2

# Device time only (IO binding), then with host<->device copies; 20 s of timed runs per (model, ep) at most.
"${EDGEC[@]}" bench "$MODEL" "${EPS[@]}" --warmup 20 --runs 10s --json > "$WORK/device.json"
"${EDGEC[@]}" bench "$MODEL" "${EPS[@]}" --warmup 20 --runs 5s --include-copies --no-inspect --json > "$WORK/copies.json"

"$PY" - "$WORK/device.json" "$WORK/copies.json" <<'PYEOF'
import json, sys
dev, cp = (json.load(open(p)) for p in sys.argv[1:3])
copies = {r["ep"]: r for r in cp["results"]}
print(f"{'ep':9} {'p50 ms':>9} {'p90 ms':>9} {'+copies p50':>12} {'vs cpu':>8}  CPU-fallback nodes / INT8 kernels")
cpu = next(r for r in dev["results"] if r["ep"] == "cpu")["latency_ms"]["p50"]
for r in dev["results"]:
    lat, g = r["latency_ms"], r["graph"] or {}
    c = copies.get(r["ep"], {}).get("latency_ms", {}).get("p50", float("nan"))
    print(f"{r['ep']:9} {lat['p50']:9.3f} {lat['p90']:9.3f} {c:12.3f} {cpu / lat['p50']:7.2f}x  "
          f"{len(g.get('fallback_nodes', []))} / {sum(g.get('int8_kernels', {}).values())}")
for r in dev["results"]:
    for w in r["warnings"]:
        print("warning:", w)
PYEOF
