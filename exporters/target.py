"""Which INT8 scheme suits the device that will run the model.

No torch import here: the scheme is chosen from CPU feature flags (or a named target) only, so it can be
computed on a device box with just onnxruntime + numpy installed.
"""
from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgec.core.errors import OptionError

TARGETS = ("host", "cpu-avx2", "cpu-avx512", "cpu-vnni", "cpu-arm64", "cuda", "tensorrt")

# Flags that give an x86 CPU 8-bit dot products which accumulate without saturating.
_X86_VNNI = {"avx512_vnni", "avx_vnni", "amx_int8"}
_ARM_DOT = {"asimddp", "dotprod"}


@dataclass
class CpuInfo:
    arch: str                      # "x86_64" | "aarch64" | other
    features: list[str] = field(default_factory=list)  # only the ones that matter for INT8

    @property
    def vnni(self) -> bool:
        return bool(_X86_VNNI & set(self.features))

    @property
    def dotprod(self) -> bool:
        return bool(_ARM_DOT & set(self.features))


@dataclass
class QuantScheme:
    target: str
    activation_type: str           # "uint8" | "int8"
    weight_type: str               # "int8" | "uint8"
    per_channel: bool
    reduce_range: bool
    activation_symmetric: bool
    weight_symmetric: bool
    quant_format: str              # "QDQ" | "QOperator"
    dedicated_qdq_pair: bool = False
    # reduce_range for the GEMM-based kernels only: depthwise convs keep all 8 bits of their weights
    full_range_depthwise: bool = False
    cpu: CpuInfo | None = None
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


_RELEVANT = {"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile",
             "asimd", "asimddp", "dotprod", "i8mm", "sve"}


def parse_cpuinfo(text: str, machine: str | None = None) -> CpuInfo:
    """Read the first processor's flags (x86 `flags`, ARM `Features`) from /proc/cpuinfo text."""
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags = set(value.split())
            break
    machine = (machine or platform.machine() or "").lower()
    if {"asimd", "asimddp"} & flags and "avx2" not in flags:
        arch = "aarch64"
    elif "avx" in flags or "sse2" in flags:
        arch = "x86_64"
    else:
        arch = "aarch64" if machine in ("aarch64", "arm64") else machine or "unknown"
    return CpuInfo(arch=arch, features=sorted(flags & _RELEVANT))


def host_cpu() -> CpuInfo:
    path = Path("/proc/cpuinfo")
    text = path.read_text(errors="replace") if path.exists() else ""
    return parse_cpuinfo(text)


_SATURATION = ("U8S8 kernels saturate without VNNI (vpmaddubsw adds int8 products into int16): measured here "
               "94.7% -> 65.3% accuracy on a pruned CNN with reduce_range=False; weights use 7 bits instead")
_DEPTHWISE_FULL = ("depthwise convs keep 8-bit weights: ORT's depthwise U8S8 kernel widens to 16 bits before it "
                   "multiplies (measured: exact on worst-case inputs where a pointwise conv saturates), so only the "
                   "GEMM-based kernels need reduce_range; EfficientNet-Lite0 INT8 mean cosine 0.986 -> see "
                   "benchmarks/QUANT_RESULTS.md")
_U8_ACT = "activations uint8: ORT's CPU kernels fuse U8S8 QDQ pairs; signed int8 activations ran 2.1x slower than FP32"


def scheme_for(target: str | None = None, cpu: CpuInfo | None = None) -> QuantScheme:
    """The QDQ scheme for `target` (None/'host' = this machine, or `cpu` when given, e.g. from fake cpuinfo)."""
    target = target or "host"
    if target not in TARGETS:
        raise OptionError(f"unknown --target {target!r}; choose one of {', '.join(TARGETS)}")
    if target in ("cuda", "tensorrt"):
        s = QuantScheme(target, "int8", "int8", per_channel=True, reduce_range=False, activation_symmetric=True,
                        weight_symmetric=True, quant_format="QDQ", dedicated_qdq_pair=target == "tensorrt",
                        reasons=[f"{target}: symmetric int8 activations and weights (zero point 0), which the GPU "
                                 "INT8 kernels require; QDQ so the provider fuses the pairs itself",
                                 "reduce_range off: GPU int8 kernels accumulate in int32 without saturation"])
        if s.dedicated_qdq_pair:
            s.reasons.append("dedicated Q/DQ pair per consumer: TensorRT fuses each pair into its consumer")
        return s
    if target == "host":
        cpu = cpu or host_cpu()
    else:
        cpu = cpu or {"cpu-avx2": CpuInfo("x86_64", ["avx2", "fma"]),
                      "cpu-avx512": CpuInfo("x86_64", ["avx2", "avx512bw", "avx512f", "fma"]),
                      "cpu-vnni": CpuInfo("x86_64", ["avx2", "avx512_vnni", "avx512f", "avx_vnni"]),
                      "cpu-arm64": CpuInfo("aarch64", ["asimd", "asimddp"])}[target]
    s = QuantScheme(target, "uint8", "int8", per_channel=True, reduce_range=False, activation_symmetric=False,
                    weight_symmetric=True, quant_format="QDQ", cpu=cpu,
                    reasons=["QDQ format: as fast as QOperator on ORT CPU and portable to other providers",
                             "per-channel int8 weights: one scale per output channel keeps depthwise convs accurate"])
    name = f"{cpu.arch} [{' '.join(cpu.features) or 'no SIMD flags found'}]"
    if cpu.arch == "x86_64":
        s.reasons.append(_U8_ACT)
        if cpu.vnni:
            s.reasons.append(f"{name}: VNNI accumulates u8*s8 in int32, so reduce_range is off (it would only "
                             "cost precision)")
        else:
            s.reduce_range = True
            s.reasons.append(f"{name}: no VNNI; reduce_range on. {_SATURATION}")
            s.full_range_depthwise = True
            s.reasons.append(_DEPTHWISE_FULL)
    elif cpu.arch == "aarch64":
        s.reasons.append(f"{name}: ARM int8 kernels ({'dot-product' if cpu.dotprod else 'NEON widening multiply'}) "
                         "accumulate in int32 without saturation, so reduce_range is off")
    else:
        s.reduce_range = True
        s.reasons.append(f"{name}: unknown CPU family; reduce_range on as the safe choice (costs ~1 bit of weights)")
    return s
