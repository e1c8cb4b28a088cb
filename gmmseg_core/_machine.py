"""A description of the processor, for the records a run or a benchmark leaves.

The same code trains slightly different models on processors whose floating-point kernels differ (torch and its
BLAS pick them by processor and SIMD level), so a recorded result names its machine by both.
"""

from __future__ import annotations

import os
import platform


def cpu_description() -> str:
    """``"<model name>, <SIMD level>"``, e.g. ``"AMD EPYC, AVX512"``.

    The model name comes from ``/proc/cpuinfo`` on Linux, else from :mod:`platform` (which may give only the
    architecture, ``x86_64``); the SIMD level is the one torch's CPU kernels dispatch to, where this torch says.
    """
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "unknown processor"
    try:
        import torch

        level = torch.backends.cpu.get_cpu_capability()
    except (ImportError, AttributeError):   # a torch without the query
        level = ""
    return f"{name}, {level}" if level else name


# Environment variables that cap the instruction set of torch's own CPU kernels, oneDNN's and MKL's (or put MKL on
# its processor-independent path): trainings under different caps round differently.
KERNEL_CAP_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS")


def kernel_caps() -> dict:
    """The kernel caps set in this process's environment, ``{variable: value}`` (empty when none is)."""
    return {name: os.environ[name] for name in KERNEL_CAP_VARIABLES if name in os.environ}
