"""Execution providers: what the installed onnxruntime offers, the short names edgec uses for them,
and the session options every edgec session is created with."""
from __future__ import annotations

import os

import onnxruntime as ort

from edgec.core.errors import OptionError, ProviderError
from edgec.runtime.install import gpu_hint

# short name -> ORT providers to pass, most preferred first. GPU providers keep CPU last because ORT
# places the nodes they cannot run there; `graph.fallback_nodes` in the results shows which ones.
CHAINS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
AUTO_ORDER = ("tensorrt", "cuda", "cpu")
GPU_EPS = ("cuda", "tensorrt")
OPT_LEVELS = {
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def available() -> list[str]:
    """Short names of the providers this onnxruntime build offers (in CHAINS order)."""
    have = set(ort.get_available_providers())
    return [name for name, chain in CHAINS.items() if chain[0] in have]


def list_providers() -> list[dict]:
    """Every provider edgec knows, and every other one this onnxruntime offers, with availability."""
    have = ort.get_available_providers()
    rows = [{"ep": name, "ort_name": chain[0], "available": chain[0] in have,
             "how_to_get": None if chain[0] in have else gpu_hint(name)} for name, chain in CHAINS.items()]
    known = {chain[0] for chain in CHAINS.values()}
    rows += [{"ep": None, "ort_name": p, "available": True, "how_to_get": None} for p in have if p not in known]
    return rows


def resolve(ep: str) -> tuple[str, list[str]]:
    """'cpu' | 'cuda' | 'tensorrt' | 'auto' -> (short name, ORT provider list). Raises ProviderError."""
    name = ep.strip().lower()
    if name == "auto":
        name = next(n for n in AUTO_ORDER if n in available())
    if name not in CHAINS:
        raise ProviderError(f"unknown execution provider '{ep}'; choose one of: {', '.join([*CHAINS, 'auto'])}")
    if CHAINS[name][0] not in ort.get_available_providers():
        raise ProviderError(f"execution provider '{name}' ({CHAINS[name][0]}) is not available in this onnxruntime "
                            f"{ort.__version__} (it has: {', '.join(available())}); {gpu_hint(name)}")
    return name, list(CHAINS[name])


def check_session_providers(name: str, session: ort.InferenceSession) -> None:
    """ORT silently drops a GPU provider whose libraries fail to load; a benchmark must not then report CPU numbers
    under the GPU's name."""
    wanted = CHAINS[name][0]
    if wanted not in session.get_providers():
        raise ProviderError(f"onnxruntime offers {wanted} but could not start it (session runs on "
                            f"{', '.join(session.get_providers())}); {gpu_hint(name)}, or use --ep cpu")


def session_options(threads: int | None = None, opt_level: str = "all", profile_prefix: str | None = None,
                    spinning: bool = True) -> ort.SessionOptions:
    if opt_level not in OPT_LEVELS:
        raise OptionError(f"unknown graph optimisation level '{opt_level}'; choose one of {', '.join(OPT_LEVELS)}")
    so = ort.SessionOptions()
    if threads is not None:
        if threads < 1:
            raise OptionError(f"--threads must be at least 1, got {threads}")
        most = max(16, 4 * (os.cpu_count() or 1))   # ORT starts them all at once: 10**5 hung, unkillable
        if threads > most:
            raise OptionError(f"--threads {threads} is far more than this machine's {os.cpu_count()} cores; use "
                              f"at most {most} (one per core measures best)")
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1   # sequential execution: the intra-op pool is the only one that matters
    so.graph_optimization_level = OPT_LEVELS[opt_level]
    # fatal only: ORT warnings (e.g. unused initializers) would flood a CI log, and its errors come back as
    # exceptions that edgec reports in one line (logged too, they printed a second, coloured copy first)
    so.log_severity_level = 4
    if not spinning:  # idle pools of other sessions must not busy-wait on the cores the timed session needs
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so
