"""Shared by the benchmarks: one ``## <name>`` section of RESULTS.md per benchmark with the machine it ran on, the
thread-sweep driver, and device synchronisation around timings."""

from __future__ import annotations

import datetime
import os
import re
from pathlib import Path

import torch

from gmmseg_core._files import atomic_write_text
from gmmseg_core._machine import cpu_description

RESULTS = Path(__file__).with_name("RESULTS.md")


def read_section(name, path=RESULTS) -> str | None:
    """The body of the ``## name`` section of ``path`` (without its heading), or None when there is none."""
    path = Path(path)
    if not path.exists():
        return None
    found = re.search(rf"^## {re.escape(name)}\n(.*?)(?=^## |\Z)", path.read_text(), re.S | re.M)
    return found.group(1).strip() if found else None


def write_section(name, body, path=RESULTS):
    """Replace (or append) the ``## name`` section of ``path`` with ``body``, leaving the other sections alone."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    section = f"## {name}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    atomic_write_text(path, text)       # a benchmark stopped while writing leaves RESULTS.md whole


def machine_note(threads):
    """One line: CPU count, torch version, threads, load average before the run."""
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (
        f"{cpu_cores()}-core CPU ({cpu_description()}), torch {torch.__version__}, "
        f"{threads} thread(s); load average before the run (1, 5, 15 min): {load}"
    )


def load_caveat(load=None):
    """A sentence for reports measured while other work loaded the machine ('' when it was not)."""
    load = os.getloadavg()[0] if load is None else load
    if load <= cpu_cores():
        return ""
    return (
        f" The 1-minute load average ({load:.1f}) exceeded the core count: other work shared this CPU, so "
        "absolute times are inflated and noisy, and multi-threaded runs suffer most (threads stall waiting for "
        "each other, scikit-learn's numpy/BLAS worst of all). Compare within one table and prefer the "
        "1-thread one."
    )


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def start_load() -> float:
    """The 1-minute load average now (NaN where the platform has none): read it before a benchmark runs, since
    afterwards it holds the benchmark's own work."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def machine_line(how: str = "ratios were measured interleaved in one run", load: float | None = None,
                 device="cpu") -> str:
    """``Machine: <cores>-core CPU (<model>, <SIMD level>)[ and <GPU>], torch <version>, <date>``, the load and
    ``how`` the numbers were taken.

    ``load`` is the 1-minute load average at the start (from :func:`start_load`); None reads it now, which is only
    the start when nothing has run yet. A CUDA ``device`` adds its name.
    """
    cores = cpu_cores()
    load = start_load() if load is None else load
    shared = "the machine was shared with other work, so absolute times are noisy; " if load > cores else ""
    gpu = f" and one {torch.cuda.get_device_name(device)}" if torch.device(device).type == "cuda" else ""
    return (f"Machine: {cores}-core CPU ({cpu_description()}){gpu}, torch {torch.__version__}, "
            f"{datetime.date.today().isoformat()}; "
            f"1-minute load average at the start {load:.1f} ({shared}{how}).")


def add_sweep_arguments(parser):
    """The options every thread-sweep benchmark takes: ``--quick``, ``--no-write`` and ``--threads``."""
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    parser.add_argument(
        "--threads", default="1",
        help="comma-separated thread counts to run, e.g. 1,2 (default 1, as every benchmark: the recorded runs)"
    )


def run_thread_sweep(name, threads_arg, run_once, report, write):
    """Run ``run_once(threads)`` for each thread count of ``threads_arg`` ("1,2"; None: torch's), print the
    reports and, if ``write``, replace the benchmark's section of RESULTS.md. Returns the results."""
    counts = [int(t) for t in threads_arg.split(",")] if threads_arg else [torch.get_num_threads()]
    parts, results = [], []
    previous = torch.get_num_threads()
    for threads in counts:
        note = machine_note(threads)
        res = run_once(threads)
        results.append(res)
        parts.append(f"### {threads} thread(s)\n\n" + report(res, note))
    torch.set_num_threads(previous)
    flags = f" --threads {threads_arg}" if threads_arg else ""
    text = "\n\n".join(parts) + f"\n\nRun {datetime.date.today().isoformat()}: `python -m benchmarks.{name}{flags}`."
    print(text)
    if write:
        write_section(name, text, RESULTS)
    return results


def synchronize(device) -> None:
    """Wait for the work queued on ``device`` (a no-op off CUDA), so wall-clock timings cover it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
