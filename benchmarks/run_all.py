"""Run every ``benchmarks/bench_*.py`` (each in its own process, as ``python -m benchmarks.<name>``).

Usage: ``python -m benchmarks.run_all [--quick] [--only bench_train_step ...]``. Each benchmark updates its own
section of ``benchmarks/RESULTS.md`` (not with ``--quick``). Exit status: the number of failed benchmarks
(capped at 1 for the shell).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"


def update_results_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section ``## <name>`` of RESULTS.md with ``body``; other sections are kept."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = text.splitlines()
    heading = f"## {name}"
    out, skipping, replaced = [], False, False
    for line in lines:
        if line.strip() == heading:
            skipping, replaced = True, True
            out.extend([heading, "", body.strip(), ""])
            continue
        if skipping and line.startswith("## "):
            skipping = False
        if not skipping:
            out.append(line)
    if not replaced:
        while out and not out[-1].strip():
            out.pop()
        out.extend(["", heading, "", body.strip(), ""])
    path.write_text("\n".join(out).rstrip() + "\n")


def machine_line(how: str = "ratios were measured interleaved in one run") -> str:
    """``<cores>-core CPU, torch <version>, <date>``, the load and ``how`` the numbers were taken, for the
    RESULTS.md sections."""
    import datetime
    import os

    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"Machine: {cores}-core CPU, torch {torch.__version__}, {datetime.date.today().isoformat()}; "
            f"1-minute load average at the start {load:.1f}"
            + (" (the machine was shared with other work, so absolute times are noisy" if load > cores else " (")
            + (f"; {how})." if load > cores else f"{how}).")
            )


def discover() -> list[str]:
    """Module names of the benchmarks, sorted: ``bench_*.py`` beside this file."""
    return sorted(p.stem for p in HERE.glob("bench_*.py"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes; RESULTS.md is left alone")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="benchmark module names to run")
    args = parser.parse_args(argv)
    names = discover()
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            print(f"unknown benchmark(s) {unknown}; available: {names}", file=sys.stderr)
            return 2
        names = [n for n in names if n in args.only]
    failed = []
    for name in names:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", f"benchmarks.{name}"] + (["--quick"] if args.quick else [])
        rc = subprocess.call(cmd, cwd=HERE.parent)
        print(f"== {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {time.perf_counter() - t0:.1f} s",
              flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
