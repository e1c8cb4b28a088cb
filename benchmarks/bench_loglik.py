"""Diagonal-Gaussian log-likelihood table: matmul form versus the (N, M, D) broadcast and a bare matmul.

The GMM head scores every pixel embedding against every class component: N pixels (a 2 x 192 x 192 batch of
feature maps), D = 64, M = 19 classes x 5 components. Three ways, timed side by side:

* ``ours``       ``diag_gaussian_log_prob`` (centred expansion, two (N, D+1) @ (D+1, M) products)
* ``ours+grad``  the same function on an input that requires grad (the forward of the training path)
* ``broadcast``  ``-(x[:, None] - mu)^2 / var`` summed over D, in chunks of 1024 rows (the full (N, M, D) float32
                 tensor would take 1.8 GB): the released code's formula, but not its memory pattern, since it
                 broadcasts the whole batch at once (``factor_n = 1``; ``bench_gmm_head``'s reference, several
                 times slower than these cache-sized chunks), so the speed-up over it here is a lower bound
* ``matmul``     a bare ``(N, D) @ (D, M)`` product of the same shape: a floor, since the quadratic form needs
                 at least two products of that size

Run ``python -m benchmarks.bench_loglik`` (writes its section of benchmarks/RESULTS.md) or with ``--quick``.
"""

from __future__ import annotations

import argparse
import math
import os

import torch
from torch.utils import benchmark as tbench

from benchmarks.results import add_sweep_arguments, load_caveat, run_thread_sweep
from gmmseg_core.mixture import diag_gaussian_log_prob


def broadcast_log_prob(x, means, variances, chunk=1024):
    """The (N, M, D) broadcast form, ``chunk`` rows at a time."""
    const = -0.5 * (x.shape[1] * math.log(2 * math.pi) + variances.log().sum(1))
    out = torch.empty(x.shape[0], means.shape[0], dtype=x.dtype)
    for start in range(0, x.shape[0], chunk):
        diff = x[start : start + chunk, None, :] - means
        out[start : start + chunk] = const - 0.5 * (diff * diff / variances).sum(-1)
    return out


def _median_ms(stmt, env, min_run_time):
    timer = tbench.Timer(stmt, globals=env)
    timer.timeit(1)  # warm-up
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def run(n=73_728, d=64, m=19 * 5, min_run_time=2.0, threads=None, offset=100.0, seed=0):
    """Time the three forms and check accuracy; returns a dict of results."""
    load = os.getloadavg()[0]
    if threads is not None:
        torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(m, d, generator=gen) + offset
    variances = torch.rand(m, d, generator=gen) * 0.5 + 0.05
    x = means[torch.randint(m, (n,), generator=gen)] + torch.randn(n, d, generator=gen) * 0.3
    w = torch.randn(d, m, generator=gen)
    xg = x.clone().requires_grad_(True)

    sub = slice(0, min(n, 4096))
    ref = broadcast_log_prob(x[sub].double(), means.double(), variances.double())
    err_ours = (diag_gaussian_log_prob(x[sub], means, variances).double() - ref).abs().max().item()
    err_bcast = (broadcast_log_prob(x[sub], means, variances).double() - ref).abs().max().item()

    env = {
        "f": diag_gaussian_log_prob,
        "b": broadcast_log_prob,
        "x": x,
        "xg": xg,
        "mu": means,
        "var": variances,
        "w": w,
    }
    times = {
        "matmul": _median_ms("x @ w", env, min_run_time),
        "ours": _median_ms("f(x, mu, var)", env, min_run_time),
        "ours+grad": _median_ms("f(xg, mu, var)", env, min_run_time),
        "broadcast": _median_ms("b(x, mu, var)", env, min_run_time),
    }
    return {
        "load": load,
        "n": n,
        "d": d,
        "m": m,
        "offset": offset,
        "times_ms": times,
        "max_abs_err_ours": err_ours,
        "max_abs_err_broadcast": err_bcast,
        "accuracy_rows": sub.stop,
        "threads": torch.get_num_threads(),
    }


def report(res, note):
    t = res["times_ms"]
    lines = [
        f"N={res['n']:,}, D={res['d']}, M={res['m']}, float32, data and means at offset {res['offset']:g}; "
        f"median of repeated runs (torch.utils.benchmark), measured side by side. {note}.",
        "",
        "| form | time (ms) | vs bare matmul |",
        "|---|---:|---:|",
    ]
    for name in ("matmul", "ours", "ours+grad", "broadcast"):
        lines.append(f"| {name} | {t[name]:.2f} | {t[name] / t['matmul']:.2f}x |")
    ratio = t["ours"] / t["matmul"]
    lines += [
        "",
        f"Accuracy on {res['accuracy_rows']:,} rows vs a float64 reference: "
        f"ours max |error| {res['max_abs_err_ours']:.2e} nats, "
        f"float32 broadcast {res['max_abs_err_broadcast']:.2e}.",
        f"Speed-up over the broadcast form: {t['broadcast'] / t['ours']:.1f}x. "
        'Target "ours within 1.5x of the '
        f'bare matmul": {"met" if ratio <= 1.5 else "missed"} ({ratio:.2f}x). The diagonal quadratic form '
        "needs two products of the bare one's size (x @ (mu/var)^T and x^2 @ (1/var)^T), so about 2x is what "
        "this formulation should expect; the rest is the centring and squaring passes."
        + load_caveat(res["load"]),
    ]
    return "\n".join(lines)



def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sweep_arguments(parser)
    args = parser.parse_args(argv)
    quick = dict(n=512, d=8, m=6, min_run_time=0.01)
    return run_thread_sweep(
        "bench_loglik",
        args.threads,
        lambda threads: run(threads=threads, **(quick if args.quick else {})),
        report,
        write=not (args.no_write or args.quick),
    )


if __name__ == "__main__":
    main()
