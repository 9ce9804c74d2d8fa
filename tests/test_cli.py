"""The command line as a user meets it: help texts, one exit code per mistake, export without --data, short
summaries instead of internal dumps."""
import json

import numpy as np
import pytest

from conftest import run_cli

ARCHS = '''
from torch import nn


def conv(channels=1, classes=4):
    return nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, classes))


def mlp(features=16, classes=3):
    return nn.Sequential(nn.Linear(features, 8), nn.ReLU(), nn.Linear(8, classes))
'''


def test_help_texts_render_percentages():
    from edgec.cli import COMMANDS
    for name in COMMANDS:
        code, stdout, _ = run_cli(name, "--help")
        assert code == 0 and "%%" not in stdout, name
    assert "20% of --data" in run_cli("build", "--help")[1]


@pytest.mark.parametrize("arch,shape", [("conv?channels=1", (1, 1, 28, 28)), ("conv?channels=3", (1, 3, 224, 224)),
                                        ("mlp?features=16", (1, 16))])
def test_export_of_a_self_describing_model_needs_no_data(arch, shape, tmp_path):
    import onnxruntime as ort
    import torch
    from edgec.modelio import build_arch, save_model
    (tmp_path / "archs.py").write_text(ARCHS)
    spec = f"{tmp_path / 'archs.py'}:{arch}"
    torch.manual_seed(0)
    save_model(tmp_path / "m.pt", build_arch(spec), spec, shape)
    trust = ["--arch", spec]  # an architecture from outside torchvision/edgec runs only when the user names it
    code, stdout, stderr = run_cli("export", tmp_path / "m.pt", *trust, "-o", tmp_path / "m.onnx", "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert "random inputs of the recorded shape" in stderr  # it says what the check ran on
    assert summary["check"]["data"].startswith("random:") and summary["check"]["samples"] > 0
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: np.zeros(shape, np.float32)})[0]
    assert out.shape[0] == 1
    code, stdout, _ = run_cli("export", tmp_path / "m.pt", *trust, "-o", tmp_path / "m2.onnx")
    assert code == 0 and "matches torch" in stdout and len(stdout.splitlines()) < 8  # a summary, not a dump


def test_image_folder_takes_the_recorded_size(trained_cnn, tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    # the model file records 1x3x32x32: the folder is read at 32 px, not 224
    code, stdout, stderr = run_cli("export", trained_cnn[0], "--data", tmp_path / "imgs", "-o", tmp_path / "m.onnx",
                                   "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["check"]["data"] == str(tmp_path / "imgs")
    code, _, stderr = run_cli("export", trained_cnn[0], "--data", tmp_path / "imgs", "--image-size", "64",
                              "-o", tmp_path / "n.onnx")
    assert code == 4 and "--image-size 32" in stderr and not (tmp_path / "n.onnx").exists()


def test_needs_an_eager_model_is_one_error_everywhere(trained_cnn, tmp_path):
    import torch
    from edgec.modelio import load_model
    ts = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.script(load_model(trained_cnn[0]).module), ts)
    results = [run_cli("build", ts, "-o", tmp_path / "b.edgec", "--prune", "0.5", "--bench-seconds", "0"),
               run_cli("prune", ts, "--ratio", "0.5", "-o", tmp_path / "p.pt")]
    for code, _, stderr in results:
        assert code == 3 and "needs an eager model" in stderr, stderr
    assert not list(tmp_path.glob("b.edgec*")) and not (tmp_path / "p.pt").exists()
