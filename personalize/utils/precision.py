"""Which autocast precision a run uses: ``train.mixed_precision`` ``no`` / ``fp16`` / ``bf16`` as given, or
``auto``, which picks what the hardware does natively.

bfloat16 autocast is only fast where the processor has bfloat16 instructions: a CUDA GPU that supports it,
or a CPU with AVX512-BF16 / AMX-BF16 (x86) or BF16 (Arm). Elsewhere PyTorch emulates it, and a CPU run
becomes many times slower than float32: the toy U-Net's training step (batch 8, one thread) took 11.3 s under
bf16 autocast vs 0.83 s in float32 on an AMD EPYC with AVX2 only (``python eval/cpu_precision.py``), while on
CPUs with bf16 instructions issue 4 measured bf16 autocast 1.5-3.5x *faster* than float32. So the toy recipes say
``auto``, and an explicit ``bf16`` on such a CPU is kept (the user asked for it) but warned about.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

logger = logging.getLogger("personalize")

BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # /proc/cpuinfo: x86 flags, Arm "Features"


def cpu_flags(cpuinfo: str) -> set[str]:
    """The instruction-set flags of a ``/proc/cpuinfo`` text (x86 ``flags`` lines, Arm ``Features``)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


@functools.lru_cache(maxsize=1)
def cpu_bf16_flags() -> frozenset[str]:
    """This CPU's bfloat16 instruction flags, from ``/proc/cpuinfo`` (none where it is missing)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(cpu_flags(text) & BF16_CPU_FLAGS)


def cpu_has_native_bf16() -> bool:
    """True when this CPU has bfloat16 instructions."""
    return bool(cpu_bf16_flags())


def resolve_mixed_precision(requested: str, device_type: str) -> str:
    """``requested`` (``no`` / ``fp16`` / ``bf16`` / ``auto``) for a run on ``device_type`` (``cuda``, ``cpu``,
    ...) -> the precision to run with. ``auto``: bf16 on a CUDA GPU that supports it (else fp16), bf16 on a
    CPU with bfloat16 instructions, otherwise no (float32)."""
    if requested != "auto":
        if requested == "bf16":
            warn_if_slow_bf16(device_type, "train.mixed_precision: bf16")
        return requested
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device_type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "no"
    return "no"


def warn_if_slow_bf16(device_type: str, what: str) -> None:
    """Warn that ``what`` (bf16 autocast) is emulated when ``device_type`` is a CPU without bf16 instructions."""
    if device_type != "cpu" or cpu_has_native_bf16():
        return
    logger.warning("%s on a CPU without bfloat16 instructions (no avx512_bf16 / amx_bf16 in /proc/cpuinfo): "
                   "PyTorch emulates bf16 there, measured 13.6x slower than float32 for the toy U-Net "
                   "(eval/cpu_precision.py). "
                   "Use 'auto' (float32 on this CPU) or 'no' unless you want exactly bf16 numerics.", what)
