"""The `gpu` extra gives GPU providers: exactly one onnxruntime build per extra, and a fresh `gpu` install lists
CUDAExecutionProvider (onnxruntime-gpu lists it on a machine without a GPU too)."""
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _requires(dist: str, extra: str | None) -> set[str]:
    """Names of what `dist[extra]` pulls in (markers evaluated for that extra)."""
    out = set()
    for text in metadata.distribution(dist).requires or []:
        req = Requirement(text)
        if req.marker is None or (extra and req.marker.evaluate({"extra": extra})):
            out.add(req.name + (f"[{','.join(sorted(req.extras))}]" if req.extras else ""))
    return out


def test_each_extra_brings_one_onnxruntime_build():
    builds = {"onnxruntime", "onnxruntime-gpu"}
    assert not _requires("edgec", None) & builds and not _requires("edgec-runtime", None) & builds
    assert "edgec-runtime" in _requires("edgec", None)
    assert "edgec-runtime[cpu]" in _requires("edgec", "cpu") and "edgec-runtime[gpu]" in _requires("edgec", "gpu")
    assert _requires("edgec-runtime", "cpu") & builds == {"onnxruntime"}
    assert _requires("edgec-runtime", "gpu") & builds == {"onnxruntime-gpu"}


@pytest.mark.skipif(os.environ.get("EDGEC_TEST_GPU_INSTALL") != "1",
                    reason="downloads onnxruntime-gpu from PyPI (about 300 MB; 35-65 s here): set EDGEC_TEST_GPU_INSTALL=1")
def test_fresh_gpu_install_lists_cuda(tmp_path):
    venv = tmp_path / "gpu"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    p = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
                        f"{ROOT / 'edgec-runtime'}[gpu]"], capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    probe = ("import onnxruntime as o; from edgec.runtime.install import check_install; "
             "print(check_install(), *o.get_available_providers())")
    out = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "onnxruntime-gpu" and "CUDAExecutionProvider" in out[1:] and "TensorrtExecutionProvider" in out
    listed = subprocess.run([str(venv / "bin" / "edgec-runtime"), "bench", "--list-providers"], capture_output=True,
                            text=True, check=True).stdout
    assert any(line.split()[:3] == ["cuda", "CUDAExecutionProvider", "available"] for line in listed.splitlines())
