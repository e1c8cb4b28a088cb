"""Pooled anomaly metrics at scale: streaming histograms on 10^8 pixels versus the exact sort at 10^7.

Each measurement runs in a fresh process so its peak resident memory (``ru_maxrss``) is its own. Scores are
synthetic (20% anomalies shifted by +1.5 sigma, rounded to 1e-5: ties at 10^7 pixels, and
finer than the histogram's bins, so the streaming error shows, 5% void pixels), drawn
chunk by chunk from a seeded generator so every mode sees the same pixels.

    python -m benchmarks.bench_anomaly_metrics           # 10^8 streaming, 10^7 exact / sklearn; RESULTS.md
    python -m benchmarks.bench_anomaly_metrics --quick   # 10^6 / 10^5, print only
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

CHUNK = 2 ** 21  # one 1024x2048 image per update


def chunks(n: int, chunk: int = CHUNK):
    """Yield (scores float32, labels uint8) chunks totalling ``n`` pixels, deterministic (the same pixels for
    every mode, as all use the same chunk size)."""
    g = torch.Generator().manual_seed(0)
    done = 0
    while done < n:
        m = min(chunk, n - done)
        labels = (torch.rand(m, generator=g) < 0.2).to(torch.uint8)
        scores = torch.randn(m, generator=g) + 1.5 * labels
        scores = torch.round(scores * 1e5) / 1e5
        labels[torch.rand(m, generator=g) < 0.05] = 255
        yield scores, labels
        done += m


def measure(mode: str, n: int) -> dict:
    """Run one mode in this process: 'stream', 'exact' or 'sklearn'. Returns metrics, seconds, peak RSS.

    Seconds count the metric only (updates + compute for streaming), not the data generation.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    from gmmseg_core.metrics import AnomalyMetric, anomaly_metrics

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "stream":
        metric = AnomalyMetric()
        seconds = 0.0
        for s, y in chunks(n):
            t0 = time.perf_counter()
            metric.update(s, y)
            seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        r = metric.compute()
        seconds += time.perf_counter() - t0
    else:
        s, y = zip(*chunks(n))
        s, y = torch.cat(s), torch.cat(y)
        t0 = time.perf_counter()
        if mode == "exact":
            r = anomaly_metrics(s, y)
        else:
            keep = (y != 255).numpy()
            s_np, y_np = s.numpy()[keep], y.numpy()[keep]
            fpr, tpr, _ = roc_curve(y_np, s_np, drop_intermediate=False)
            r = {"auroc": roc_auc_score(y_np, s_np), "ap": average_precision_score(y_np, s_np),
                 "fpr95": float(fpr[np.argmax(tpr >= 0.95)])}
        seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "n": n, "seconds": seconds, "peak_rss_mb": rss / 1024, "baseline_rss_mb": rss0 / 1024,
            **{k: float(r[k]) for k in ("auroc", "ap", "fpr95")}}


def in_subprocess(mode: str, n: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_anomaly_metrics", "--worker", mode, str(n)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10^6 / 10^5 pixels, print only")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.worker:
        print(json.dumps(measure(args.worker[0], int(args.worker[1]))))
        return 0
    from benchmarks.results import machine_line, start_load, write_section

    load = start_load()
    big, small = (10 ** 6, 10 ** 5) if args.quick else (10 ** 8, 10 ** 7)
    # quick: in this process (fast smoke test; the peak RSS column is then not per mode)
    run_one = measure if args.quick else in_subprocess
    runs = [run_one("stream", big), run_one("stream", small), run_one("exact", small), run_one("sklearn", small)]
    ref = runs[-1]
    lines = [f"Pooled AUROC / AP / FPR95; synthetic scores with ties (20% anomalies, 5% void). Streaming = "
             f"`AnomalyMetric` (2^20 bins, one update per {CHUNK:,} pixels = one 1024x2048 image); exact = "
             f"`anomaly_metrics` (sort); sklearn = roc_auc_score + average_precision_score + roc_curve. Times "
             f"are of the metric only (data generation excluded; streaming: all updates + compute). Peak RSS "
             f"of a fresh process per row; its baseline (interpreter + torch + sklearn, "
             f"~{runs[0]['baseline_rss_mb']:.0f} MB) is subtracted in the next column, which also holds the "
             f"scores and labels: streaming generates one image's at a time, exact and sklearn hold all of them "
             f"(5 bytes per pixel, twice while the chunks are joined: ~100 MB at 10^7). One torch thread. "
             f"The exact paths are compared at 10^7 only: at 10^8 they would hold several GB (float64 scores, "
             f"sort indices, cumulative counts).",
             "", "| mode | pixels | time (s) | peak RSS (MB) | RSS over baseline (MB) | AUROC | AP | FPR95 | "
             "max abs diff vs sklearn |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        diff = (max(abs(r[k] - ref[k]) for k in ("auroc", "ap", "fpr95")) if r["n"] == ref["n"] else None)
        lines.append(f"| {r['mode']} | {r['n']:.0e} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['peak_rss_mb'] - r['baseline_rss_mb']:.0f} | "
                     f"{r['auroc']:.6f} | {r['ap']:.6f} | {r['fpr95']:.6f} | "
                     f"{'' if diff is None else f'{diff:.1e}'} |")
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        write_section("bench_anomaly_metrics",
                      machine_line("the rows ran one after another, each in a fresh process", load=load) + "\n\n"
                      + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
