"""edgec.runtime and `edgec bench` work with torch (and onnx) unimportable, as on a device or a lean CI box."""
import json
import subprocess
import sys

from conftest import BLOCKER



def test_runtime_and_bench_cli_without_torch(tiny_onnx, tmp_path):
    script = BLOCKER + f"""
import json
from edgec.runtime import benchmark
(r,) = benchmark([{str(tiny_onnx)!r}], warmup='2', runs='20', threads=1)
assert r.latency.n == 20 and r.graph['float_kernels']
from edgec.cli import main
try:
    main(['bench', {str(tiny_onnx)!r}, '--runs', '20', '--warmup', '2', '--json', '--budget', 'p90=10s'])
except SystemExit as e:
    assert e.code == 0, e.code
blocked = [m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx')]
assert not blocked, blocked
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout)["results"][0]["latency_ms"]["n"] == 20
    # and the blocker really blocks (the test can fail)
    q = subprocess.run([sys.executable, "-c", BLOCKER + "import torch"], capture_output=True, text=True, timeout=60)
    assert q.returncode != 0 and "blocked" in q.stderr
