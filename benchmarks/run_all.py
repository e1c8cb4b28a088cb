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
