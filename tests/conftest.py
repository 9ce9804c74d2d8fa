"""Shared fixtures: a small CNN really trained on the embedded digits (real data, not random weights:
a random-init network makes accuracy and quantization checks meaningless)."""
from __future__ import annotations

import os

import pytest

SMALL_ARCH = "edgec.models.zoo:digits_cnn"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    # the demo model cache must not leak between the user's machine and the tests
    os.environ.setdefault("EDGEC_CACHE", str(tmp_path_factory.mktemp("edgec-cache")))


@pytest.fixture(scope="session")
def digits():
    from edgec.data import load_data
    return load_data("builtin:digits:train"), load_data("builtin:digits:test")


@pytest.fixture(scope="session")
def trained_cnn(tmp_path_factory, digits):
    """An edgec model file of digits_cnn trained for 5 epochs (about 98% on the test split, ~15 s)."""
    import torch
    from edgec.modelio import build_arch, save_model
    from edgec.train import TrainConfig, train
    torch.manual_seed(0)
    train_ds, test_ds = digits
    model = build_arch(SMALL_ARCH)
    record = train(model, train_ds, TrainConfig(epochs=5, lr=0.05, batch_size=32), eval_data=test_ds, label="fixture")
    path = tmp_path_factory.mktemp("models") / "cnn.pt"
    save_model(path, model, SMALL_ARCH, (1, 3, 32, 32), history=[{"stage": "train", **record}])
    return path, record["best_accuracy"]


@pytest.fixture(scope="session")
def cnn_state_dict(tmp_path_factory, trained_cnn):
    """The same trained weights as a plain state_dict (needs --arch)."""
    import torch
    from edgec.modelio import load_model
    path = tmp_path_factory.mktemp("models") / "cnn_state_dict.pt"
    torch.save(load_model(trained_cnn[0]).module.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def outlier_calibration(tmp_path_factory):
    """Digits with one sample scaled x1000: min/max ranges blow up and INT8 collapses (a real PTQ failure)."""
    import numpy as np
    from edgec.data import load_data
    x = load_data("builtin:digits:train").x[:256].copy()
    x[0] *= 1000
    path = tmp_path_factory.mktemp("calib") / "outlier.npz"
    np.savez(path, x=x)
    return path


@pytest.fixture(scope="session")
def built_package(trained_cnn, tmp_path_factory):
    """A package made by the real writer (`edgec build` of the trained CNN on builtin:digits), once per session:
    (path, stdout). Tests that change it work on a copy (copy_package)."""
    out = tmp_path_factory.mktemp("pkg") / "cnn.edgec"
    code, stdout, stderr = run_cli("build", trained_cnn[0], "-o", out, "--bench-seconds", "0.3", "--samples", "128")
    assert code == 0, stderr
    return out, stdout


def copy_package(src, dst):
    import shutil
    shutil.copytree(src, dst, symlinks=True)
    return dst


def run_cli(*args):
    """Run the real CLI entry point in-process; returns (exit_code, stdout, stderr)."""
    import contextlib
    import io

    from edgec.cli import main
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, out.getvalue(), err.getvalue()


# Prepended to a subprocess's script: any import of torch, torchvision or onnx fails there (torch-free checks).
BLOCKER = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchvision', 'onnx'):
            raise ImportError(f'{name} is blocked for this test')
sys.meta_path.insert(0, _Block())
"""
