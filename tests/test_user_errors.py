"""Every user mistake is a user error: one `edgec: error:` line, the documented exit code, nothing written.

Each row was an internal error, a hang, or a silent wrong result before (issue 10 section 4)."""
import json
import os

import numpy as np
import pytest

from conftest import SMALL_ARCH, run_cli

CHEAP = ["--bench-seconds", "0", "--samples", "32"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import torch
    from PIL import Image

    from edgec.data import load_data
    from edgec.exporters.onnx_export import export_onnx
    from edgec.modelio import build_arch, save_model
    d = tmp_path_factory.mktemp("mistakes")
    torch.manual_seed(0)
    model = build_arch(SMALL_ARCH)
    save_model(d / "m.pt", model, SMALL_ARCH, (1, 3, 32, 32))
    export_onnx(model, torch.zeros(1, 3, 32, 32), d / "m.onnx")
    for folder in ("bomb/a", "bomb/b", "fifo/a", "fifo/b"):
        (d / folder).mkdir(parents=True)
    Image.new("1", (14000, 14000)).save(d / "bomb/a/big.png")  # 196 Mpixel in a few KB
    for folder in ("fifo/a", "fifo/b"):
        Image.new("RGB", (40, 40)).save(d / folder / "ok.png")
    for i in range(40):  # enough samples to calibrate: the bomb is what fails
        Image.new("RGB", (40, 40)).save(d / "bomb/b" / f"ok{i}.png")
    os.mkfifo(d / "fifo/a/x.jpg")  # reading it would block forever
    (d / "random.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    # attacut's forward(self, inputs): x, lengths = inputs, traced with a tuple as the one argument
    torch.jit.save(torch.jit.trace(TupleArg().eval(), ((torch.zeros(2, 8), torch.ones(2)),)), d / "tuple.ts.pt")
    np.savez(d / "tuple.npz", inputs=np.zeros((40, 8), np.float32))
    digits = load_data("builtin:digits:train")
    np.savez(d / "one.npz", x=digits.head(1)["x"], y=digits.y[:1])
    np.savez(d / "badlabels.npz", x=digits.head(64)["x"], y=np.full(64, 57))
    json.dump({"schema": "edgec.bench/1", "results": [{"ep": "cpu", "model": "m.onnx"}]}, open(d / "nop50.json", "w"))
    json.dump({"schema": "edgec.bench/1", "results": [{"ep": "cpu", "latency_ms": {"p50": "fast"}}]},
              open(d / "text.json", "w"))
    return d


def TupleArg():
    import torch

    class Unpacks(torch.nn.Module):
        def forward(self, inputs):
            x, lengths = inputs
            return x * lengths[:, None]
    return Unpacks()


BUILD = ["build", "{d}/m.pt", "-o", "{out}"]
MISTAKES = [
    # (arguments, exit code, a word the message must contain)
    (BUILD + ["--image-size", "-5", "--data", "{d}/fifo"], 2, "--image-size"),
    (BUILD + ["--image-size", "0", "--data", "{d}/fifo"], 2, "--image-size"),
    (BUILD + ["--image-size", "32", "--data", "{d}/bomb"], 4, "pixels"),
    (BUILD + ["--image-size", "32", "--data", "{d}/fifo"], 4, "not a regular file"),
    (BUILD + ["--data", "{d}/one.npz"], 4, "at least 32"),
    (BUILD + ["--data", "{d}/badlabels.npz", "--prune", "0.3", "--distill"], 4, "labels"),
    (BUILD + ["--distill", "--lr", "nan"], 2, "--lr"),
    (BUILD + ["--distill", "--temperature", "inf"], 2, "--temperature"),
    (BUILD + ["--max-accuracy-drop", "nan"], 2, "--max-accuracy-drop"),
    (BUILD + ["--fallback-seconds", "nan"], 2, "--fallback-seconds"),
    (BUILD + ["--min-cosine", "1.5"], 2, "--min-cosine"),
    (["quantize", "{d}/m.onnx", "-o", "{out}", "--min-cosine", "-0.5"], 2, "--min-cosine"),
    (BUILD + ["--mean", "nan,0,0"], 2, "--mean"),
    (BUILD + ["--opset", "99"], 2, "opset 17 to 20"),
    (BUILD + ["--opset", "9"], 2, "opset 17 to 20"),
    (["export", "{d}/m.pt", "-o", "{out}", "--opset", "99"], 2, "opset"),
    (["quantize", "{d}/random.onnx", "-o", "{out}"], 3, "not an ONNX model"),
    (["build", "{d}/tuple.ts.pt", "--data", "{d}/tuple.npz", "-o", "{out}"], 3, "is a Tuple[Tensor, Tensor]"),
    (["quantize", "{d}/m.onnx", "--data", "{d}/one.npz", "-o", "{out}"], 4, "at least 32"),
    (["bench", "{d}/m.onnx", "--batch", "100000000"], 2, "--batch"),
    (["bench", "{d}/m.onnx", "--batch", "0"], 2, "--batch"),
    (["bench", "{d}/m.onnx", "--runs", "3", "--baseline", "{d}/nop50.json"], 2, "latency_ms.p50"),
    (["bench", "{d}/m.onnx", "--runs", "3", "--baseline", "{d}/text.json"], 2, "latency_ms.p50"),
    (["compare", "{d}/m.pt", "-o", "{out}", "--prune-ratio", "nan"], 2, "--prune-ratio"),
    (["prune", "{d}/m.pt", "-o", "{out}", "--ratio", "nan"], 2, "--ratio"),
]


@pytest.mark.parametrize("args,code,word", MISTAKES, ids=[" ".join(a[3:] if a[0] == "build" else a) for a, _, _
                                                            in MISTAKES])
def test_mistake_is_one_line(files, tmp_path, args, code, word):
    out = tmp_path / "out"
    args = [a.format(d=files, out=out) for a in args]
    got, stdout, stderr = run_cli(*args, *(CHEAP if args[0] == "build" else []))
    errors = [line for line in stderr.splitlines() if not line.startswith("[edgec]")]
    assert got == code, stderr
    assert len(errors) == 1 and errors[0].startswith("edgec: error: ") and word in errors[0], stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir()]
