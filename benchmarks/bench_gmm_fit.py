"""GaussianMixture.fit (torch) versus scikit-learn's diagonal GaussianMixture on the same data and start.

Data: N = 200,000 training and 50,000 held-out samples in D = 64 from K = 5 equal-weight, strongly overlapping
diagonal Gaussians (EM needs tens of iterations). Both estimators start from the same parameters (k-means++
centres from scikit-learn, the pooled variance, uniform weights), with the same ``tol`` and ``max_iter``, so
EM follows the same trajectory in both: the wall times compare equal work. Reported: median wall time over
repeats (runs alternate), iterations, held-out log-likelihood per sample.

Run ``python -m benchmarks.bench_gmm_fit`` (writes its section of benchmarks/RESULTS.md) or with ``--quick``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import numpy as np
import torch
from sklearn.cluster import kmeans_plusplus
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture
from threadpoolctl import threadpool_limits

from benchmarks.results import add_sweep_arguments, load_caveat, run_thread_sweep
from gmmseg_core.mixture import GaussianMixture


def make_data(n_train, n_test, d, k, separation, seed=0):
    """Equal-weight mixture with random diagonal variances in [0.5, 2]; returns (train, test, true means)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(k, d)) * separation
    stds = np.sqrt(rng.uniform(0.5, 2.0, size=(k, d)))

    def draw(n):
        labels = rng.integers(k, size=n)
        return means[labels] + rng.normal(size=(n, d)) * stds[labels]

    return draw(n_train), draw(n_test), means


def initial_parameters(X, k, seed=0):
    centres, _ = kmeans_plusplus(X, k, random_state=seed)
    precisions = np.tile(1.0 / X.var(0), (k, 1))
    return centres, precisions, np.full(k, 1.0 / k)


def _timed(fn):
    start = time.perf_counter()
    model = fn()
    return time.perf_counter() - start, model


def run(
    n_train=200_000,
    n_test=50_000,
    d=64,
    k=5,
    separation=0.06,
    tol=1e-4,
    max_iter=300,
    repeats=3,
    threads=None,
    seed=0,
):
    load = os.getloadavg()[0]
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    X, X_test, _ = make_data(n_train, n_test, d, k, separation, seed)
    means0, precisions0, weights0 = initial_parameters(X, k, seed)
    common = {
        "means_init": means0,
        "precisions_init": precisions0,
        "weights_init": weights0,
        "tol": tol,
        "max_iter": max_iter,
        "reg_covar": 1e-6,
    }
    X32, X_test32 = X.astype(np.float32), X_test.astype(np.float32)
    runs = {
        "sklearn (float64)": lambda: SkGaussianMixture(k, covariance_type="diag", **common).fit(X),
        "ours em (float64)": lambda: GaussianMixture(k, method="em", **common).fit(X),
        "ours em (float32)": lambda: GaussianMixture(k, method="em", **common).fit(X32),
        "ours sinkhorn (float64)": lambda: GaussianMixture(k, method="sinkhorn", **common).fit(X),
        "ours sinkhorn (float32)": lambda: GaussianMixture(k, method="sinkhorn", **common).fit(X32),
    }
    times = {name: [] for name in runs}
    models = {}
    with threadpool_limits(limits=threads), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for _ in range(repeats):
            for name, fit in runs.items():  # alternate, so drifting load hits every estimator alike
                seconds, models[name] = _timed(fit)
                times[name].append(seconds)
    rows = {}
    for name, model in models.items():
        test = X_test32 if "float32" in name else X_test
        rows[name] = {
            "seconds": statistics.median(times[name]),
            "n_iter": int(model.n_iter_),
            "converged": bool(model.converged_),
            "heldout_ll": float(model.score(test)),
        }
    return {
        "load": load,
        "n_train": n_train,
        "n_test": n_test,
        "d": d,
        "k": k,
        "tol": tol,
        "max_iter": max_iter,
        "repeats": repeats,
        "threads": threads,
        "rows": rows,
    }


def report(res, note):
    rows = res["rows"]
    base = rows["sklearn (float64)"]
    lines = [
        f"N={res['n_train']:,} train / {res['n_test']:,} held-out, D={res['d']}, K={res['k']}, overlapping "
        f"equal-weight diagonal components; tol={res['tol']:g}, max_iter={res['max_iter']}, "
        "same start for all; "
        f"median wall time of {res['repeats']} alternating runs. {note}.",
        "",
        "| estimator | fit (s) | speed-up vs sklearn | iterations | converged | held-out LL / sample | "
        "LL - sklearn |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['seconds']:.2f} | {base['seconds'] / r['seconds']:.2f}x | {r['n_iter']} | "
            f"{r['converged']} | {r['heldout_ll']:.4f} | {r['heldout_ll'] - base['heldout_ll']:+.4f} |"
        )
    em = rows["ours em (float64)"]
    speed = base["seconds"] / em["seconds"]
    gap = abs(em["heldout_ll"] - base["heldout_ll"])
    met = speed >= 2 and gap <= 0.01
    lines += [
        "",
        f"Target (ours em float64 vs sklearn: at least 2x faster, held-out LL within 0.01 nats): "
        f"{'met' if met else 'missed'} ({speed:.2f}x, |dLL| = {gap:.1e}). "
        "Sinkhorn EM fixes the weights to 1/K (true here) and balances the components; its iteration count "
        "differs from EM's, so its time is not a "
        "per-iteration comparison." + load_caveat(res["load"]),
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sweep_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    quick = dict(n_train=2_000, n_test=500, d=8, k=3, max_iter=20, repeats=1)
    return run_thread_sweep(
        "bench_gmm_fit",
        args.threads,
        lambda threads: run(threads=threads, **(quick if args.quick else {"repeats": args.repeats})),
        report,
        write=not (args.no_write or args.quick),
    )


if __name__ == "__main__":
    main()
