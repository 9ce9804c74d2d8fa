"""Shared fixtures: a small CNN really trained on the embedded digits (real data, not random weights:
a random-init network makes accuracy and quantization checks meaningless)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from test_runtime_fixtures import dynamic_hw_onnx, int8_onnx, tiny_onnx  # noqa: F401 (once per session here:
# a fixture imported into several test modules would run once per module)

SMALL_ARCH = "edgec.models.zoo:digits_cnn"


def _one_share_of_the_cores_per_worker() -> None:
    """Under pytest-xdist (`-n 2`) each worker keeps its own share of the cores, set before torch and onnxruntime
    start their thread pools: their defaults (and edgec's training_threads) follow the CPU affinity, so two workers
    on two cores do not each start two busy threads (the subprocesses a test starts inherit the share)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    share = cores[int(worker.removeprefix("gw")) % count::count]
    if share and len(cores) >= count:
        os.sched_setaffinity(0, share)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(len(share))


_one_share_of_the_cores_per_worker()


def pytest_collection_modifyitems(items):
    """The long end-to-end tests (marked `slow`) start first, so parallel workers finish together instead of one
    of them starting a minutes-long test last; among them, those that make a folder shared by others
    (`slow(makes=...)`: the README walkthrough, the lean venv) before those that wait for it. Nothing is skipped."""
    def rank(item):
        slow = item.get_closest_marker("slow")
        return 2 if slow is None else 0 if slow.kwargs.get("makes") else 1
    items.sort(key=rank)   # stable: within a rank, the collection order


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    # the demo model cache must not leak between the user's machine and the tests
    os.environ.setdefault("EDGEC_CACHE", str(tmp_path_factory.mktemp("edgec-cache")))


@pytest.fixture(scope="session")
def digits():
    from edgec.data import load_data
    return load_data("builtin:digits:train"), load_data("builtin:digits:test")


def made_once(tmp_path_factory, name: str, make):
    """The files of an expensive session fixture, made once per test run: `make(folder)` writes them and returns
    a JSON value, which is what the fixture returns. Under pytest-xdist the workers share one folder (the first
    makes it under a lock, the others wait and reuse it); tests only read these files (copy before changing)."""
    import json

    from filelock import FileLock
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent   # the run's folder, above each worker's own
    folder, done = root / f"once-{name}", root / f"once-{name}.json"
    with FileLock(str(root / f"once-{name}.lock")):
        if not done.is_file():
            folder.mkdir(exist_ok=True)
            done.write_text(json.dumps(make(folder)))
    return json.loads(done.read_text())


@pytest.fixture(scope="session")
def trained_cnn(tmp_path_factory):
    """An edgec model file of digits_cnn trained for 5 epochs (about 98% on the test split, ~15 s): (path, best
    accuracy)."""
    def make(folder):
        import torch
        from edgec.data import load_data
        from edgec.modelio import build_arch, save_model
        from edgec.train import TrainConfig, train
        torch.manual_seed(0)
        model = build_arch(SMALL_ARCH)
        record = train(model, load_data("builtin:digits:train"), TrainConfig(epochs=5, lr=0.05, batch_size=32),
                       eval_data=load_data("builtin:digits:test"), label="fixture")
        save_model(folder / "cnn.pt", model, SMALL_ARCH, (1, 3, 32, 32), history=[{"stage": "train", **record}])
        return [str(folder / "cnn.pt"), record["best_accuracy"]]
    path, accuracy = made_once(tmp_path_factory, "trained-cnn", make)
    return Path(path), accuracy


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
def separable(tmp_path_factory):
    """A depthwise-separable CNN trained 3 epochs on the embedded digits (a few seconds), exported to ONNX: the
    subject of test_transforms and test_adaround. Tests write into "dir" (this worker's own folder), never next to
    the shared fp32.onnx."""
    from test_transforms import _digits, train_separable
    x, y = _digits()

    def make(folder):
        train_separable(folder / "fp32.onnx", seed=0)
        return str(folder)
    fp32 = Path(made_once(tmp_path_factory, "separable", make)) / "fp32.onnx"
    return {"dir": tmp_path_factory.mktemp("transforms"), "fp32": fp32, "calib": x[:512], "x": x[1400:],
            "y": y[1400:]}


@pytest.fixture(scope="session")
def built_package(trained_cnn, tmp_path_factory):
    """A package made by the real writer (`edgec build` of the trained CNN on builtin:digits), once per run:
    (path, stdout). Tests that change it work on a copy (copy_package)."""
    def make(folder):
        out = folder / "cnn.edgec"
        code, stdout, stderr = run_cli("build", trained_cnn[0], "-o", out, "--bench-seconds", "0.3", "--samples", "128")
        assert code == 0, stderr
        return [str(out), stdout]
    path, stdout = made_once(tmp_path_factory, "built-package", make)
    return Path(path), stdout


def copy_package(src, dst):
    import shutil
    shutil.copytree(src, dst, symlinks=True)
    return dst


def private_source(src, dst):
    """A copy of a project folder to pip-install from (symlinks followed, no earlier build output): pip builds in
    the source folder (build/, *.egg-info), so two parallel installs of one folder would race there."""
    import shutil
    return shutil.copytree(src, dst, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".venv*",
                                                                   ".git", "*.edgec"))


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
