"""Which onnxruntime build is installed. Every build (CPU, GPU, OpenVINO, ...) installs the same `onnxruntime`
module, so two of them overwrite each other's files: the last one unpacked wins, and `pip install 'edgec[gpu]'` on
top of the CPU build can leave CPU providers only. Read from the installed distributions' metadata, without
importing onnxruntime, so a missing or broken install is reported before anything imports it."""
from __future__ import annotations

from importlib import metadata

from edgec.core.errors import ProviderError

# distributions that provide the `onnxruntime` module
BUILDS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml", "onnxruntime-qnn",
          "onnxruntime-rocm", "onnxruntime-migraphx", "onnxruntime-training")
REINSTALL = "reinstall one: `pip install onnxruntime` (CPU) or `pip install onnxruntime-gpu` (NVIDIA GPU)"


def _normal(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def installed_builds() -> dict[str, str]:
    """{distribution: version} of every onnxruntime build installed in this environment."""
    found = {}
    for dist in metadata.distributions():
        name = _normal(dist.metadata["Name"] or "")
        if name in BUILDS:
            found[name] = dist.version
    return found


def check_install() -> str:
    """The one installed onnxruntime build's name; ProviderError (exit 6) naming the fix when there is none or
    several."""
    builds = installed_builds()
    if not builds:
        raise ProviderError("onnxruntime is not installed; install one build: `pip install onnxruntime` (CPU) or "
                            "`pip install onnxruntime-gpu` (NVIDIA GPU), i.e. the [cpu] or [gpu] extra")
    if len(builds) > 1:
        names = sorted(builds)
        listed = " and ".join(f"{n} {builds[n]}" for n in names)
        raise ProviderError(f"{listed} are installed together; they share the `onnxruntime` module and overwrite "
                            f"each other (GPU providers may be missing). Fix: `pip uninstall -y {' '.join(names)}`, "
                            f"then {REINSTALL}")
    return next(iter(builds))


def gpu_hint(ep: str) -> str:
    """How to get a GPU provider, given what is installed (never the command the user already ran)."""
    builds = installed_builds()
    if "onnxruntime-gpu" in builds:
        if ep == "tensorrt":
            return "install NVIDIA TensorRT libraries (libnvinfer) on the library path"
        return "check the NVIDIA driver and the CUDA 12 / cuDNN 9 libraries onnxruntime-gpu needs"
    if not builds:
        return "`pip install onnxruntime-gpu` (the [gpu] extra)"
    names = " ".join(sorted(builds))
    return (f"this environment has {names}, which has no GPU providers: `pip uninstall -y {names}`, then "
            f"`pip install onnxruntime-gpu` (the [gpu] extra)")
