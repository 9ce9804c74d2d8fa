"""The lean `edgec-runtime` distribution: installed alone into a fresh venv (no torch, torchvision or onnx), its
`edgec-runtime` command gates, verifies and inspects a package that the full `edgec build` wrote elsewhere, with the
same JSON schema and exit codes as `edgec bench`. And both distributions side by side in this (editable) venv."""
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from conftest import made_once, private_source, run_cli

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--runs", "30", "--warmup", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def built(built_package):
    return built_package[0]


@pytest.fixture(scope="session")
def lean(tmp_path_factory):
    """A fresh venv with only `pip install ./edgec-runtime[cpu]` (pip of this venv drives it: no pip inside, so
    nothing but the lean distribution and its dependencies lands there; wheels come from pip's cache). Made once
    per run (the xdist workers share it); the tests only run its commands."""
    def make(folder):
        venv, source = folder / "venv", private_source(ROOT / "edgec-runtime", folder / "edgec-runtime")
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
        py = venv / "bin" / "python"
        p = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", f"{source}[cpu]"],
                           capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stderr[-3000:]
        return str(venv)
    return Path(made_once(tmp_path_factory, "lean-venv", make))


def lean_run(venv, *args, cwd=None):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    p = subprocess.run([str(venv / "bin" / "edgec-runtime"), *map(str, args)], capture_output=True, text=True,
                       timeout=300, env=env, cwd=cwd)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.slow(makes="the lean venv")
def test_lean_venv_has_no_torch_torchvision_onnx(lean):
    py = lean / "bin" / "python"
    probe = ("import importlib.util as u, json; print(json.dumps({m: u.find_spec(m) is not None for m in "
             "('torch', 'torchvision', 'onnx', 'onnxruntime', 'numpy', 'edgec.runtime', 'edgec.core', 'edgec.cli')}))")
    found = json.loads(subprocess.run([str(py), "-c", probe], capture_output=True, text=True, check=True).stdout)
    assert found == {"torch": False, "torchvision": False, "onnx": False, "onnxruntime": True, "numpy": True,
                     "edgec.runtime": True, "edgec.core": True, "edgec.cli": False}, found


def test_lean_gates_a_package_built_by_the_full_tool(lean, built, tmp_path):
    code, out, err = lean_run(lean, "bench", built, *FAST, "--budget", "p90=10s", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["schema"] == "edgec.bench/1" and doc["gate"]["passed"] and doc["results"][0]["model"] == "cnn.edgec"
    # same schema as the full tool's `edgec bench --json`, key for key
    full_code, full_out, _ = run_cli("bench", built, *FAST, "--json")
    full = json.loads(full_out)
    assert full_code == 0 and set(full) == set(doc) and set(full["results"][0]) == set(doc["results"][0])
    assert set(full["gate"]) == set(doc["gate"])

    code, out, err = lean_run(lean, "bench", built, *FAST, "--budget", "p90=1us")
    assert code == 7 and "budget breached: p90 measured" in err
    assert err.strip().splitlines()[-1].startswith("edgec-runtime: error: 1 budget(s) breached")

    base = tmp_path / "base.json"
    base.write_text(json.dumps(doc))
    code, _, err = lean_run(lean, "bench", built, *FAST, "--baseline", base, "--max-regression", "500%")
    assert code == 0, err
    code, _, err = lean_run(lean, "bench", built, *FAST, "--budget", "p90")
    assert code == 2 and "malformed --budget" in err


def test_lean_verifies_and_inspects_the_package(lean, built, tmp_path):
    code, out, err = lean_run(lean, "--help")
    assert code == 0 and all(name in out for name in ("bench", "inspect", "verify", "sign", "keygen"))
    code, out, err = lean_run(lean, "verify", built)
    assert code == 0, err
    code, out, err = lean_run(lean, "inspect", built, "--json")
    assert code == 0 and json.loads(out)["schema"] == "edgec.manifest/1"
    broken = tmp_path / "broken.edgec"
    shutil.copytree(built, broken)
    with open(broken / "model.onnx", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    code, _, err = lean_run(lean, "verify", broken)
    assert code == 9 and "edgec-runtime: error:" in err


def test_both_distributions_side_by_side_here():
    """This venv has the README's set-up (both distributions, editable: `edgec` is then a namespace that the two
    editable finders fill), and the full tool owns neither runtime nor core."""
    import edgec.cli
    import edgec.core
    import edgec.runtime
    import edgec.runtime.cli
    assert Path(edgec.runtime.__file__).resolve() == ROOT / "runtime" / "__init__.py"
    assert Path(edgec.cli.__file__).resolve() == ROOT / "toolchain" / "cli.py"
    full = metadata.distribution("edgec")
    assert any(r.startswith("edgec-runtime") for r in full.requires or [])
    assert metadata.distribution("edgec-runtime").version == full.version == edgec.core.__version__
    assert not [f for f in full.files or [] if str(f).startswith(("edgec/runtime/", "edgec/core/"))]


def test_full_bench_is_the_lean_command():
    from edgec.cli import cli
    from edgec.runtime.cli import bench_cmd
    assert cli.get_command(None, "bench") is bench_cmd


@pytest.mark.slow
def test_plain_install_of_both(tmp_path):
    """`pip install ./edgec-runtime .` (wheels, not editable) puts both into one edgec package folder, the full
    tool's wheel without runtime/ or core/; torch and onnxruntime come from this venv's own site folders."""
    target, full = tmp_path / "site", private_source(ROOT, tmp_path / "edgec")   # edgec-runtime/ inside, copied
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                        str(full / "edgec-runtime"), str(full)], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    import onnxruntime
    import torch
    deps = {str(Path(m.__file__).parents[1]) for m in (torch, onnxruntime)}
    probe = ("import edgec, edgec.runtime.cli, edgec.cli, edgec.pipeline; print(edgec.__file__); "
             "from edgec.cli import main; main(['bench', '--list-providers'])")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), *deps])}
    q = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True, timeout=300, env=env,
                       cwd=tmp_path)   # -S: no site, so this venv's editable finders stay out of it
    assert q.returncode == 0, q.stderr[-3000:]
    assert q.stdout.splitlines()[0] == str(target / "edgec" / "__init__.py") and "CPUExecutionProvider" in q.stdout
    record = (target / "edgec-0.1.0.dist-info" / "RECORD").read_text()
    assert "edgec/cli.py" in record and "edgec/runtime/" not in record and "edgec/core/" not in record
    assert "edgec/runtime/cli.py" in (target / "edgec_runtime-0.1.0.dist-info" / "RECORD").read_text()
