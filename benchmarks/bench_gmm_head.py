"""The GMM head per training step: ``GMMHead(variant="official")`` against the released code's style.

One training step of the head at the released configuration's scale: 73,728 pixels (2 images of 768x768 at
stride 4), 19 classes x 5 components, D = 64, a memory of 32,000 embeddings per component. Both paths do the
same work: embedding (1x1 conv, BN, ReLU, LayerNorm, L2), component log-likelihoods, max over components,
LayerNorm across classes, cross-entropy + 0.01 component cross-entropy, backward, per-class Sinkhorn E-step
(hard), memory push of at most 20 correctly classified pixels per component, and the M-step every 5 steps
(its time divided by 5).

``reference`` is written in the released code's style: the log-likelihood broadcasts an (N, C*K, D) tensor
(``MultivariateNormalDiag.log_prob`` with ``factor_n = factor_c = 1``) and the E-step, enqueue and M-step loop
over classes and components in Python. ``ours`` is :class:`gmmseg_core.heads.GMMHead`.

Every path runs in a fresh subprocess, so its peak resident memory (``ru_maxrss``) is its own; on CUDA the
peak is ``torch.cuda.max_memory_allocated``. ``--quick`` runs tiny sizes and does not write RESULTS.md.

    python -m benchmarks.bench_gmm_head [--quick] [--device cuda] [--steps 3] [--warmup 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.results import RESULTS, cpu_cores, load_caveat, start_load, synchronize, write_section
from gmmseg_core._machine import cpu_description

SECTION = "bench_gmm_head"
FULL = dict(batch=2, height=192, width=192, in_channels=64, classes=19, components=5, dim=64, memory=32000)
QUICK = dict(batch=1, height=16, width=16, in_channels=16, classes=4, components=3, dim=8, memory=64)
INTERVAL, MAX_PER_COMPONENT, EPS, ITERS = 5, 20, 0.05, 3
WARMUP = 2       # untimed repetitions of every part, before the timed ones, on both paths


# ----------------------------------------------------------------------------- the released code's style
class ReferenceHead(nn.Module):
    """The released head's step, kept in its style (broadcast log-likelihood, Python loops)."""

    def __init__(self, cin, C, K, D, M):
        super().__init__()
        self.C, self.K, self.D, self.M = C, K, D, M
        self.projection = nn.Sequential(nn.Conv2d(cin, D, 1, bias=False), nn.BatchNorm2d(D), nn.ReLU(True))
        self.feat_norm, self.mask_norm = nn.LayerNorm(D), nn.LayerNorm(C)
        self.register_buffer("means", F.normalize(torch.randn(C, K, D), dim=-1))
        self.register_buffer("diagonal", torch.ones(C, K, D))
        self.register_buffer("queue", torch.empty(C * K, D, M))
        for g in range(C * K):                     # the released random start, filled without a second copy
            self.queue[g] = F.normalize(torch.randn(D, M), dim=0)
        self.register_buffer("queue_ptr", torch.zeros(C * K, dtype=torch.long))

    def log_prob(self, x):
        loc, scale = self.means.view(-1, self.D), self.diagonal.view(-1, self.D)
        diff = x[:, None, :] - loc                                           # (N, C*K, D)
        return (-0.5 * self.D * math.log(2 * math.pi) - scale.log().sum(-1)
                - 0.5 * (diff / scale).pow(2).sum(-1))

    def embedding(self, features):
        x = self.projection(features).permute(0, 2, 3, 1).reshape(-1, self.D)
        return F.normalize(self.feat_norm(x), dim=-1)

    def forward(self, features, gt):
        x = self.embedding(features)
        probs = self.log_prob(x).view(-1, self.C, self.K)
        seg = self.mask_norm(probs.amax(-1))
        gt = gt.view(-1)
        pred = seg.argmax(1)
        target, qs = gt.clone().float(), torch.zeros(x.shape[0], self.K, device=x.device)
        with torch.no_grad():
            for k in gt.unique().long():                                    # per-class Sinkhorn E-step
                if k == 255:
                    continue
                init_q = probs[:, k][gt == k].detach()
                q, idx = _reference_sinkhorn(init_q / init_q.abs().max())
                q = q * (pred == gt)[gt == k][:, None]
                target[gt == k] = idx.float() + self.K * k
                qs[gt == k] = q
        loss = F.cross_entropy(seg, gt, ignore_index=255)
        loss = loss + 0.01 * F.cross_entropy(probs.flatten(1), target.long(), ignore_index=255)
        return loss, x.detach(), gt, qs

    @torch.no_grad()
    def enqueue(self, x, gt, qs):
        for c in gt.unique().tolist():
            if c == 255:
                continue
            embs, cluster = x[gt == c], qs[gt == c].bool()
            for k in range(self.K):
                g, ptr = c * self.K + k, int(self.queue_ptr[c * self.K + k])
                if cluster[:, k].sum() == 0:
                    continue
                e = embs[cluster[:, k]]
                if e.shape[0] > MAX_PER_COMPONENT:
                    e = e[torch.linspace(0, e.shape[0] - 1, MAX_PER_COMPONENT).long()]
                n = e.shape[0]
                if ptr + n >= self.M:
                    self.queue[g, :, ptr:] = e[: self.M - ptr].T
                    self.queue[g, :, : n - self.M + ptr] = e[self.M - ptr:].T
                else:
                    self.queue[g, :, ptr:ptr + n] = e.T
                self.queue_ptr[g] = (ptr + n) % self.M

    @torch.no_grad()
    def m_step(self, classes):
        means, diag = self.means.clone(), self.diagonal.clone()
        for c in classes:
            for k in range(self.K):
                mem = self.queue[c * self.K + k].T
                f = F.normalize(mem.sum(0), dim=-1)
                means[c, k] = 0.999 * means[c, k] + 0.001 * f
                diag[c, k] = (((mem - f) ** 2).mean(0) + 1e-2).sqrt()
        self.means.copy_(F.normalize(means, dim=-1))
        self.diagonal.copy_(diag)


@torch.no_grad()
def _reference_sinkhorn(out, iters=ITERS, eps=EPS):
    Q = torch.exp(out / eps).t()
    n, K = Q.shape[1], Q.shape[0]
    Q /= Q.sum()
    for _ in range(iters):
        Q /= Q.sum(1, keepdim=True)
        Q /= K
        Q /= Q.sum(0, keepdim=True)
        Q /= n
    idx = (Q * n).t().argmax(1)
    return F.one_hot(idx, K).float(), idx


# ----------------------------------------------------------------------------- one path, in this process
def _timeit(fn, device, repeats, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t)
    return min(times)


def _data(cfg, device):
    g = torch.Generator().manual_seed(0)
    B, H, W, C = cfg["batch"], cfg["height"], cfg["width"], cfg["classes"]
    features = torch.randn(B, cfg["in_channels"], H, W, generator=g)
    coarse = torch.randint(0, C, (B, 1, max(1, H // 8), max(1, W // 8)), generator=g).float()
    labels = F.interpolate(coarse, size=(H, W), mode="nearest")[:, 0].long()
    labels[:, : max(1, H // 16)] = 255
    return features.to(device), labels.to(device)


def run_path(path, cfg, device, steps, warmup=WARMUP):
    """Time one path; returns a dict of seconds (and the CUDA peak).

    Each part runs ``warmup`` untimed times, then ``steps`` timed times (the best is kept), the same for both
    paths: a training process repeats the step thousands of times, and the first calls pay for the allocator
    finding its footing (on Linux, glibc returns the freshly freed blocks of tens of MB to the system until its
    threshold has adapted, and every new block is then faulted in page by page).
    """
    def timeit(fn):
        return _timeit(fn, device, steps, warmup)

    from gmmseg_core import cpu_kernels
    from gmmseg_core.heads import GMMHead
    from gmmseg_core.mixture import diag_gaussian_log_prob

    torch.manual_seed(0)
    if device.type == "cuda":                  # this path's peak only, also after another path in this process
        torch.cuda.reset_peak_memory_stats(device)
    C, K, D, M = cfg["classes"], cfg["components"], cfg["dim"], cfg["memory"]
    features, labels = _data(cfg, device)
    N = features.shape[0] * features.shape[2] * features.shape[3]
    x = F.normalize(torch.randn(N, D, device=device), dim=-1)
    out = {}
    if path == "reference":
        head = ReferenceHead(cfg["in_channels"], C, K, D, M).to(device)
        setup_peak, setup_rss = _maxrss_bytes(), _mark_rss()
        out["loglik_fwd_s"] = timeit(lambda: head.log_prob(x))
        out["embed_s"] = timeit(lambda: head.embedding(features).sum().backward())
        state = {}

        def fwd_bwd():
            loss, emb, gt, qs = head(features, labels)
            loss.backward()
            state.update(emb=emb, gt=gt, qs=qs)

        out["fwd_bwd_s"] = timeit(fwd_bwd)
        out["e_push_s"] = timeit(lambda: head.enqueue(state["emb"], state["gt"], state["qs"]))
        classes = [c for c in state["gt"].unique().tolist() if c != 255]
        out["m_step_s"] = timeit(lambda: head.m_step(classes))
    else:
        head = GMMHead(cfg["in_channels"], C, embed_dim=D, num_components=K, variant="official", memory_size=M)
        head = head.to(device)
        with torch.no_grad():      # a full memory, as the released code keeps one
            for g in range(C * K):
                head.memory[g] = F.normalize(torch.randn(M, D, device=device), dim=-1)
            head.memory_count.fill_(M)
            head.refresh_memory_statistics()
        cpu_kernels.available(x)      # on a CPU this loads numba (a library, as torch is) before the mark
        setup_peak, setup_rss = _maxrss_bytes(), _mark_rss()
        out["loglik_fwd_s"] = timeit(lambda: diag_gaussian_log_prob(x, head.means.view(-1, D),
                                                                     head.variances.view(-1, D)))
        head.train()
        out["embed_s"] = timeit(lambda: head.embedding(features).sum().backward())
        head._cache = None
        state = {}

        def fwd_bwd():
            logits, comp = head(features, return_component_logp=True)
            loss = F.cross_entropy(logits, labels, ignore_index=255)
            loss = loss + head.extra_loss(features, labels, component_logp=comp)
            loss.backward()
            state["logits"] = logits.detach()

        def e_push():
            head.num_updates.fill_(1)              # not a multiple of the interval: no M-step here
            head._cache = saved                    # the forward's cache, E-step included (as in reference)
            head.update(features, labels, None)

        out["fwd_bwd_s"] = timeit(fwd_bwd)
        saved = head._cache
        out["e_push_s"] = timeit(e_push)
        out["m_step_s"] = timeit(lambda: head.m_step(torch.ones(C, dtype=torch.bool, device=device)))
    w = torch.randn(D, C * K, device=device)
    out["matmul_s"] = timeit(lambda: x @ w)
    out["step_s"] = out["fwd_bwd_s"] + out["e_push_s"] + out["m_step_s"] / INTERVAL
    out["step_added_rss_bytes"] = _peak_rss_since_mark(setup_rss) - setup_rss
    out["maxrss_bytes"] = max(setup_peak, _maxrss_bytes())    # the mark may have reset the kernel's peak
    out["gmm_step_s"] = out["step_s"] - out["embed_s"]
    if device.type == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def _maxrss_bytes():
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _proc_status_bytes(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def _mark_rss():
    """The resident memory now, with the kernel's peak reset to it (Linux), so that the peak of what follows
    is its own: a set-up temporary freed before the mark (e.g. the float64 blocks of the ring sums) does not hide
    it. Elsewhere the peak so far, which such a temporary can hide."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_bytes("VmRSS")
    except (OSError, AttributeError):
        return _maxrss_bytes()


def _peak_rss_since_mark(mark):
    try:
        return max(mark, _proc_status_bytes("VmHWM"))
    except (OSError, AttributeError):
        return _maxrss_bytes()


def _worker(args):
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = QUICK if args.quick else FULL
    rss0 = _maxrss_bytes()
    out = run_path(args.worker, cfg, device, args.steps, args.warmup)
    out["maxrss_at_start_bytes"] = rss0
    print("RESULT " + json.dumps(out))


def _spawn(path, args):
    cmd = [sys.executable, "-m", "benchmarks.bench_gmm_head", "--worker", path, "--device", args.device,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    cmd += ["--quick"] if args.quick else []
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                         env=dict(os.environ), check=False)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark worker {path!r} failed:\n{res.stdout}\n{res.stderr}")
    return json.loads(lines[-1][len("RESULT "):])


def _fmt_s(s):
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _fmt_ratio(r):
    """``37x``, and one decimal below 10 (``1.6x``, ``0.8x``), where rounding to a whole number misleads."""
    return f"{r:.0f}x" if r >= 10 else f"{r:.1f}x"


def _uptime():
    """``uptime``'s line (time, load averages), or '' where there is no such command."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def _section(results, cfg, args, before=None):
    """The RESULTS.md section; ``before`` is ``(uptime line, 1-minute load)`` read before the run (None: now)."""
    ref, ours = results["reference"], results["ours"]
    uptime, load = before if before is not None else (_uptime(), None)
    peak = "maxrss_bytes" if args.device == "cpu" else "peak_bytes"
    rows = [("log-likelihood forward (N x C*K)", "loglik_fwd_s"), ("forward + losses + backward (E-step included)",
            "fwd_bwd_s"), ("memory push", "e_push_s"),
            ("M-step (one call; amortised / 5 in the total)", "m_step_s"), ("**whole head per step**", "step_s"),
            ("of which the embedding (fwd + bwd; same layers, ours channels-last)", "embed_s"),
            ("**GMM part per step** (whole head minus embedding)", "gmm_step_s")]
    gpu = f" and {torch.cuda.get_device_name(args.device)}" if torch.device(args.device).type == "cuda" else ""
    lines = [f"Machine: {cpu_cores()}-core CPU ({cpu_description()}){gpu}, torch "
             f"{torch.__version__}, {args.threads} thread(s) per worker, device `{args.device}`; "
             f"{time.strftime('%Y-%m-%d %H:%M')}. Load before the run: `{uptime}`." + load_caveat(load), "",
             f"Scale: {cfg['batch']} x {cfg['height']} x {cfg['width']} = "
             f"{cfg['batch'] * cfg['height'] * cfg['width']:,} pixels, {cfg['classes']} classes x "
             f"{cfg['components']} components, D = {cfg['dim']}, memory {cfg['memory']:,} per component, "
             f"{cfg['in_channels']} input channels; best of {args.steps} runs per part, after {args.warmup} untimed, "
             + ("with both paths in this process, one after the other (each path's peaks from a reset at its "
                "start)." if args.inprocess else f"in each of {args.rounds} alternated worker processes per path."),
             "",
             "| part | reference (released style) | ours (`GMMHead`) | speed-up |", "|---|---|---|---|"]
    for name, key in rows:
        lines.append(f"| {name} | {_fmt_s(ref[key])} | {_fmt_s(ours[key])} | {_fmt_ratio(ref[key] / ours[key])} |")
    lines.append(f"| bare matmul (N, D) @ (D, C*K), for scale | {_fmt_s(ref['matmul_s'])} | "
                 f"{_fmt_s(ours['matmul_s'])} | |")
    label = (("peak RSS while the path ran" if args.inprocess else "peak RSS of the worker process")
             if args.device == "cpu" else "CUDA max_memory_allocated")
    lines.append(f"| {label} | {ref[peak] / 2**30:.2f} GiB | {ours[peak] / 2**30:.2f} GiB | "
                 f"{ref[peak] / ours[peak]:.1f}x less |")
    if args.device == "cpu":
        extra = {k: v["step_added_rss_bytes"] / 2**30 for k, v in results.items()}
        # the peak above the resident memory at the mark (see _mark_rss); below 0.01 GiB a ratio means nothing
        ours_extra, ratio_text = ((f"{extra['ours']:.2f} GiB",
                                   f"{_fmt_ratio(extra['reference'] / extra['ours'])} less")
                                  if extra["ours"] >= 0.01 else ("< 0.01 GiB", ""))
        lines.append(f"| peak RSS added by the training step (above the set-up: torch, data, memory bank) | "
                     f"{extra['reference']:.2f} GiB | {ours_extra} | {ratio_text} |")
    ratio, gmm_ratio = ref["step_s"] / ours["step_s"], ref["gmm_step_s"] / ours["gmm_step_s"]
    bank = cfg["classes"] * cfg["components"] * cfg["memory"] * cfg["dim"] * 4 / 2**30
    lines += ["", f"Whole head per step: {_fmt_ratio(ratio)} faster; GMM part (log-likelihoods, class scores, "
              f"both losses, backward, E-step, memory, M-step): {_fmt_ratio(gmm_ratio)} faster. Target >= 50x: "
              f"{'met' if gmm_ratio >= 50 else '**missed**'} for the GMM part, "
              f"{'met' if ratio >= 50 else '**missed**'} for the whole head (its embedding, a 1x1 conv + BN + "
              f"ReLU + LayerNorm + L2 on every pixel, is {ref['embed_s'] / ours['embed_s']:.1f}x faster in "
              f"ours: channels-last layout and a fused L2 backward). Both "
              f"{'paths' if args.inprocess else 'processes'} hold a full memory bank of {bank:.2f} GiB (float32), "
              "included in the peaks.",
              "", f"Noise: the bare matmul row runs identical code in both columns and still differs by "
              f"{abs(ref['matmul_s'] / ours['matmul_s'] - 1) * 100:.0f}% here; ratios move by "
              "tens of percent between runs, so read them as orders of magnitude.", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes; do not write RESULTS.md")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3, help="repetitions per part (the best is kept)")
    parser.add_argument("--warmup", type=int, default=WARMUP,
                        help="untimed repetitions per part before the timed ones (both paths alike)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="worker processes per path, alternated; the best time of all is kept")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per worker (1: stable timings on a shared machine)")
    parser.add_argument("--inprocess", action="store_true",
                        help="run both paths in this process (peak memory then not separated)")
    parser.add_argument("--worker", choices=["reference", "ours"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return None
    cfg = QUICK if args.quick else FULL
    before = (_uptime(), start_load())         # afterwards the load average holds this benchmark's own work
    if args.inprocess:             # for the smoke test: no interpreter start-up
        results, threads = {}, torch.get_num_threads()
        torch.set_num_threads(args.threads)        # as a worker does; the caller's count is restored
        try:
            for path in ("reference", "ours"):
                rss0 = _mark_rss()                 # the peak RSS from here on is this path's (Linux)
                results[path] = run_path(path, cfg, torch.device(args.device), args.steps, args.warmup)
                results[path].update(maxrss_at_start_bytes=rss0)
        finally:
            torch.set_num_threads(threads)
    else:                          # alternate the paths so that a busy spell of the machine hits both
        results = {}
        for _ in range(args.rounds):
            for path in ("reference", "ours"):
                new = _spawn(path, args)
                old = results.setdefault(path, new)
                for key, value in new.items():
                    old[key] = max(old[key], value) if key.endswith("_bytes") else min(old[key], value)
        for out in results.values():               # totals from the best parts
            out["step_s"] = out["fwd_bwd_s"] + out["e_push_s"] + out["m_step_s"] / INTERVAL
            out["gmm_step_s"] = out["step_s"] - out["embed_s"]
    body = _section(results, cfg, args, before)
    # one section per thread count, so that a run with both cores does not replace the one-thread record
    section = SECTION if args.threads == 1 else f"{SECTION} ({args.threads} threads)"
    print(f"## {section}\n\n{body}")
    if not args.quick:
        write_section(section, body, RESULTS)
    return results


if __name__ == "__main__":
    main()
