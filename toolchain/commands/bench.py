"""edgec bench: the command of the lean edgec-runtime distribution (edgec.runtime.cli), mounted here unchanged so that
the full CLI and the device run one implementation of the latency gate."""
from edgec.runtime.cli import bench_cmd  # noqa: F401
