"""What this machine computes fast, probed once: the training precision that fits it.

bf16 pays only where the hardware has it. On a CPU without AVX512-BF16 or AMX (AMD Zen 2/3,
Intel before Cooper Lake: the CPU of many cloud VMs and hosted CI runners) oneDNN emulates
bf16, and one 3x3 convolution ran 25x, a matmul 116x, slower than in fp32. So
``runtime.precision: auto`` takes bf16 on GPUs that support it and on CPUs with native
bf16, fp32 otherwise; an explicit ``bf16`` on such a CPU is kept, with a warning.

The probe is a plain function of (device, CPU flags, environment), so tests inject both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

# /proc/cpuinfo flags of the instruction sets oneDNN runs bf16 convolutions and matmuls on.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# ONEDNN_MAX_CPU_ISA values (oneDNN's cpu_isa names) that still include native bf16 kernels.
_BF16_ISAS = ("ALL", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
              "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2")
BF16_CPU_SLOWDOWN = "25x (convolution) to 116x (matmul)"  # measured on an AMD EPYC (Zen 3, AVX2), 1 thread


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run trains in, and the reason, for the run's layout line."""

    precision: str  # "bf16" or "fp32"
    reason: str
    warning: str = ""  # set when an explicit choice will run slowly here


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first CPU's feature flags (empty where /proc/cpuinfo does not exist, e.g. macOS)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_native_bf16(flags: frozenset[str], environ: Mapping[str, str] = os.environ) -> tuple[bool, str]:
    """Whether oneDNN will run bf16 natively here, and why (names the flag or the cap).
    A cap on oneDNN's instruction sets (``ONEDNN_MAX_CPU_ISA=AVX2``, the way to reproduce an
    AVX2-only CPU on a newer one) counts: bf16 is then emulated even on an AMX machine."""
    cap = (environ.get("ONEDNN_MAX_CPU_ISA") or environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    if cap and cap not in _BF16_ISAS:
        return False, f"oneDNN capped at ONEDNN_MAX_CPU_ISA={cap}, below native bf16"
    native = [flag for flag in NATIVE_BF16_FLAGS if flag in flags]
    if native:
        return True, f"the CPU has native bf16 ({', '.join(native)})"
    return False, "the CPU has no native bf16 (no AVX512-BF16 or AMX)"


def choose_precision(requested: str, where: torch.device, flags: Callable[[], frozenset[str]] = cpu_flags,
                     environ: Mapping[str, str] = os.environ,
                     gpu_bf16: Callable[[], bool] | None = None) -> PrecisionChoice:
    """Resolve ``runtime.precision`` (auto, bf16, fp32) for a process computing on ``where``."""
    if where.type == "cuda":
        return _gpu_choice(requested, (gpu_bf16 or torch.cuda.is_bf16_supported)())
    native, why = cpu_native_bf16(flags(), environ)
    if requested == "fp32":
        return PrecisionChoice("fp32", "runtime.precision=fp32")
    if requested == "bf16":
        if native:
            return PrecisionChoice("bf16", f"runtime.precision=bf16; {why}")
        return PrecisionChoice("bf16", f"runtime.precision=bf16; {why}",
                               warning=f"runtime.precision=bf16, but {why}: bf16 runs {BF16_CPU_SLOWDOWN} "
                                       f"slower than fp32 here; set runtime.precision=auto (or fp32) to train "
                                       f"in fp32")
    return PrecisionChoice("bf16" if native else "fp32", f"runtime.precision=auto; {why}")


def _gpu_choice(requested: str, supported: bool) -> PrecisionChoice:
    if requested == "fp32":
        return PrecisionChoice("fp32", "runtime.precision=fp32")
    if requested == "bf16":
        warning = "" if supported else ("runtime.precision=bf16 on a GPU without native bf16 (before Ampere): "
                                        "it is emulated and slow; set runtime.precision=auto or fp32")
        return PrecisionChoice("bf16", "runtime.precision=bf16", warning=warning)
    if supported:
        return PrecisionChoice("bf16", "runtime.precision=auto; the GPU supports bf16")
    return PrecisionChoice("fp32", "runtime.precision=auto; the GPU has no native bf16 (before Ampere)")
