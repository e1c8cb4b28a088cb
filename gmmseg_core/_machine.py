"""A description of the processor, for the records a run or a benchmark leaves.

The same code trains slightly different models on processors whose floating-point kernels differ (torch and its
BLAS pick them by processor and SIMD level), so a recorded result names its machine by both.
"""

from __future__ import annotations

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
