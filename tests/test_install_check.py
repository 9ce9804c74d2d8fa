"""Two onnxruntime builds in one environment (the old `pip install -e ".[gpu]"` result: onnxruntime and
onnxruntime-gpu, one `onnxruntime` module, CPU providers only) are refused at start-up with the exact fix."""
import subprocess
import sys

import pytest


def _with_extra_build(tmp_path, name="onnxruntime_gpu", version="1.32.0"):
    """A site folder holding a second build's installed metadata, as pip leaves it next to the first one."""
    info = tmp_path / "site" / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n")
    return tmp_path / "site"


@pytest.mark.parametrize("entry", ["edgec.cli", "edgec.runtime.cli"])
def test_mixed_builds_are_refused_with_the_fix(tmp_path, entry):
    site = _with_extra_build(tmp_path)
    script = f"import sys; sys.path.insert(0, {str(site)!r}); from {entry} import main; main(['bench', '--list-providers'])"
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 6, p.stderr
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith(("edgec: error:", "edgec-runtime: error:"))
    assert "onnxruntime 1." in line and "onnxruntime-gpu 1.32.0 are installed together" in line
    assert "`pip uninstall -y onnxruntime onnxruntime-gpu`, then reinstall one: `pip install onnxruntime`" in line
    assert p.stdout == ""


def test_one_build_passes_and_is_named():
    from edgec.runtime.install import check_install, installed_builds
    assert check_install() in installed_builds() and len(installed_builds()) == 1
