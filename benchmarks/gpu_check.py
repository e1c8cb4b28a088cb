"""A short accelerator check, for the few minutes a GPU is lent: the GMM code on the device against the CPU, a
short mixed-precision training run, and the speed benchmarks at GPU sizes, in one command.

    python -m benchmarks.gpu_check --device cuda --out DIR     # a few minutes on one GPU
    python -m benchmarks.gpu_check --device cpu --quick        # tiny sizes; what the test suite runs

Writes ``DIR/gpu_check.md`` and ``DIR/gpu_check.json`` (default: ``benchmarks/``) and prints the Markdown;
``RESULTS.md`` is left alone (copy the sections over by hand once read). Every check runs even when an earlier one
failed; a failure is reported with its exception and makes the exit status 1. ``gpu_check.json`` is rewritten
after every check (``"complete": false`` until the last), so a run stopped by a timeout keeps what it measured.

Checks
------
``loglik``     ``diag_gaussian_log_prob`` and its input gradient on the device (float32) vs a float64 CPU reference
``sinkhorn``   batched, masked ``sinkhorn`` on the device vs the CPU in float64
``head``       ``GMMHead`` (both variants) copied to the device: logits, gradients and EM state after a few steps
``train``      a short ``train()`` run per head (bf16 autocast on CUDA; the official head also with fp16):
               finite losses and seconds per step
``gmm_head``   ``bench_gmm_head``'s reference and ours, in this process, with the device's peak memory
``train_step`` ``bench_train_step`` at the gpu profile's sizes: the GMM head's overhead over softmax
``full_step``  the same overhead in full-size networks (smp SegFormer MiT-B5 and DeepLabV3+ ResNet-101, 2 images
               of 768x768, 19 classes, D = 64, K = 5: one GPU of the released training), with each step's peak
               memory
``launches``   kernel launches and host synchronisations per training step, per head (``torch.profiler``)
``profile``    the gpu profile's trainings, shortened: seconds per step (data loading included), an extrapolated
               notebook-03 runtime, and bf16 / DataLoader workers tried on one model

Not run by default (``--only notebooks``, about ten minutes on one H100):

``notebooks``  the six notebooks executed by papermill on the device, each in its own kernel, as users batch-run
               them: the smoke profile (every code path of every notebook on the device), then the gpu profile
               shortened (``SHORT_GPU``: 100 steps, 48 training images, one seed). The executed copies (and the
               trained models) go to ``DIR/notebooks/<profile>/``, or to ``outputs/gpu_check/<profile>/`` when
               ``--out`` is left at ``benchmarks/``. With ``--quick``: notebook 01 of the smoke profile only.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from gmmseg_core._files import atomic_write_text
from gmmseg_core._machine import cpu_description

HERE = Path(__file__).resolve().parent


def _max_abs(a, b) -> float:
    return float((a.detach().double().cpu() - b.detach().double().cpu()).abs().max())


def check_loglik(device, quick):
    from gmmseg_core.mixture import diag_gaussian_log_prob

    g = torch.Generator().manual_seed(0)
    n, m, d = (500, 6, 8) if quick else (73_728, 95, 64)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    means = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=-1)
    variances = torch.rand(m, d, generator=g, dtype=torch.float64) * 0.05 + 0.01
    weights = torch.randn(n, m, generator=g, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    ref = diag_gaussian_log_prob(xr, means, variances)
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), xr)
    xd = x.float().to(device).requires_grad_(True)
    out = diag_gaussian_log_prob(xd, means.float().to(device), variances.float().to(device))
    (grad,) = torch.autograd.grad((out * weights.float().to(device)).sum(), xd)
    value_err, grad_err = _max_abs(out, ref), _max_abs(grad, ref_grad) / max(float(ref_grad.abs().max()), 1e-12)
    return dict(ok=value_err < 1e-2 and grad_err < 1e-4, max_abs_error_nats=value_err,
                max_rel_grad_error=grad_err, shape=[n, m, d])


def check_sinkhorn(device, quick):
    from gmmseg_core.mixture import sinkhorn

    g = torch.Generator().manual_seed(1)
    b, n, k = (3, 50, 3) if quick else (19, 4000, 5)
    scores = torch.rand(b, n, k, generator=g, dtype=torch.float64) * 2 - 1
    mask = torch.rand(b, n, generator=g) < 0.8
    ref = sinkhorn(scores, epsilon=0.05, n_iters=3, mask=mask)
    out = sinkhorn(scores.float().to(device), epsilon=0.05, n_iters=3, mask=mask.to(device))
    err = _max_abs(out, ref)
    return dict(ok=err < 1e-4, max_abs_error=err, shape=[b, n, k])


def check_head(device, quick):
    c, k, d, cf = (3, 2, 4, 6) if quick else (19, 5, 64, 64)
    b, h, w = (2, 8, 8) if quick else (2, 96, 96)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(b, cf, h, w, generator=g), torch.randint(0, c, (b, 4 * h, 4 * w), generator=g))
               for _ in range(3)]
    report = {}
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False     # float32 against float32: TF32 would hide nothing but add noise
    try:
        for variant in ("paper", "official"):
            report[variant] = _compare_head(device, variant, batches, c, k, d, cf)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    report["ok"] = all(r["ok"] for r in report.values())
    return report


def _compare_head(device, variant, batches, c, k, d, cf):
    from gmmseg_core.heads import GMMHead

    torch.manual_seed(0)
    cpu_head = GMMHead(cf, c, embed_dim=d, num_components=k, variant=variant, update_interval=1,
                       mean_momentum=0.5, memory_size=256)
    dev_head = GMMHead(cf, c, embed_dim=d, num_components=k, variant=variant, update_interval=1,
                       mean_momentum=0.5, memory_size=256).to(device)
    dev_head.load_state_dict(cpu_head.state_dict())
    errs = {"logits_rel": 0.0, "embed_grad": 0.0}
    for feats, labels in batches:
        for head, dev in ((cpu_head, "cpu"), (dev_head, device)):
            head.zero_grad(set_to_none=True)
            f, y = feats.to(dev), labels.to(dev)
            logits, comp = head(f, return_component_logp=True)
            up = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
            (F.cross_entropy(up, y) + head.extra_loss(f, y, component_logp=comp)).backward()
            head.update(f, y, None)
            if head is cpu_head:
                cpu_logits = logits
            else:
                # relative to the logits' scale: the paper variant's log-densities reach hundreds of nats
                errs["logits_rel"] = max(errs["logits_rel"], _max_abs(logits, cpu_logits)
                                     / max(float(cpu_logits.detach().abs().max()), 1.0))
                errs["embed_grad"] = max(errs["embed_grad"], _max_abs(dev_head.embed[0].weight.grad,
                                                                       cpu_head.embed[0].weight.grad))
    errs["means"] = _max_abs(dev_head.means, cpu_head.means)
    errs["variances"] = _max_abs(dev_head.variances, cpu_head.variances)
    errs["memory_count_equal"] = bool(torch.equal(dev_head.memory_count.cpu(), cpu_head.memory_count))
    # hard assignments may flip on near ties between devices; the means then differ by one row's share
    errs["ok"] = errs["logits_rel"] < 1e-3 and errs["means"] < 1e-2 and errs["variances"] < 1e-2
    return errs


def check_train(device, quick, work):
    """A short ``train()`` per head with bf16 autocast, and the official head once more with fp16 (GradScaler)."""
    from gmmseg_core.config import TrainConfig
    from gmmseg_core.train import train

    cuda = torch.device(device).type == "cuda"
    size, iters, width = ([32, 32], 3, 4) if quick else ([256, 512], 60, 32)
    runs = (("softmax", "softmax", {}, "bf16"), ("gmm_paper", "gmm", {"variant": "paper"}, "bf16"),
            ("gmm_official", "gmm", {"variant": "official"}, "bf16"),
            ("gmm_official_fp16", "gmm", {"variant": "official"}, "fp16"))
    report = {}
    for name, head, kw, amp in runs:
        amp = amp if cuda else "none"
        head_kwargs = dict(kw, embed_dim=16 if quick else 64) if head == "gmm" else {}
        cfg = TrainConfig(arch="segformer", head=head, head_kwargs=head_kwargs,
                          model_kwargs={"width": width}, dataset="scenes",
                          dataset_kwargs={"image_size": size, "num_images": 16},
                          val_dataset_kwargs={"num_images": 4}, iters=iters, batch_size=4 if quick else 16,
                          amp=amp, device=device, out_dir=str(work), run_name=name, progress=False)
        run_dir = Path(train(cfg))
        metrics = json.loads((run_dir / "metrics.json").read_text())
        with open(run_dir / "log.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        losses = [float(r["loss"]) for r in rows]
        step_times = sorted(float(r["step_time_s"]) for r in rows[min(5, len(rows) - 1):])   # after warm-up
        report[name] = dict(amp=amp, final_miou=metrics["final"]["miou"], losses_finite=all(map(math.isfinite, losses)),
                            seconds_per_step=step_times[len(step_times) // 2])
    report["ok"] = all(r["losses_finite"] for r in report.values())
    report["summary"] = f"{iters} steps: " + "; ".join(
        f"{n} ({r['amp']}) {1000 * r['seconds_per_step']:.1f} ms/step, losses finite {r['losses_finite']}"
        for n, r in report.items() if isinstance(r, dict))
    return report


def check_gmm_head(device, quick):
    from benchmarks import bench_gmm_head as bench

    cfg = bench.QUICK if quick else bench.FULL
    dev = torch.device(device)
    out = {}
    for path in ("reference", "ours"):
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        out[path] = bench.run_path(path, cfg, dev, steps=3)
    for key in ("step_s", "gmm_step_s", "fwd_bwd_s", "loglik_fwd_s"):
        out[f"speedup_{key}"] = out["reference"][key] / out["ours"][key]
    peak, what = (("peak_bytes", "peak CUDA memory") if dev.type == "cuda"
                  else ("step_added_rss_bytes", "peak RSS added by the step"))
    out["summary"] = (f"whole head per step {out['reference']['step_s'] * 1e3:.1f} -> {out['ours']['step_s'] * 1e3:.1f} ms "
                      f"({out['speedup_step_s']:.0f}x), without the embedding {out['speedup_gmm_step_s']:.0f}x; "
                      f"{what}: {out['reference'][peak] / 2**30:.2f} vs {out['ours'][peak] / 2**30:.2f} GiB")
    out["ok"] = True
    return out


def check_train_step(device, quick):
    from benchmarks import bench_train_step as bench
    from gmmseg_core.profiles import TRAIN

    p = TRAIN["gpu"]
    if quick:
        size, batch, widths, d, k, interval, reps = (32, 32), 2, [4], 4, 2, 1, 2
    else:
        size, batch, widths = tuple(p["image_size"]), p["batch_size"], [p["width"]]
        d, k, interval, reps = p["embed_dim"], p["num_components"], p["update_interval"], 20
    results = bench.run(["fcn", "deeplabv3plus", "segformer"], widths, size, batch, d, k, interval, reps, 2, device)
    out = {f"{arch} width {width}": {name: dict(step_ms=1000 * r["step_s"], overhead=r["overhead"])
                                     for name, r in per.items()} for (arch, width), per in results.items()}
    out["summary"] = "; ".join(
        f"{arch} w{width}: softmax {1000 * per['softmax']['step_s']:.1f} ms, GMM "
        + " / ".join(f"{100 * r['overhead']:+.0f}%" for name, r in per.items() if name != "softmax")
        for (arch, width), per in results.items())
    out["ok"] = True
    return out


FULL_STEP_ARCHS = ("smp:Segformer:mit_b5", "smp:DeepLabV3Plus:resnet101")


def check_full_step(device, quick):
    """The GMM head's cost in a training step of a full-size network: one GPU's share of the released training.

    The released configuration trains SegFormer MiT-B5 with 2 images of 768x768 per GPU (73,728 feature pixels,
    the paper scale of ``gmm_head``), 19 classes, K = 5, D = 64 and 32,000 memory rows per component (official
    variant; the paper variant keeps its default memory). The same step as ``train_step`` (forward, backward,
    AdamW, ``update_head``), heads interleaved on one synthetic batch (random images, labels constant on 32x32
    blocks), for smp's SegFormer MiT-B5 and DeepLabV3+ ResNet-101 without pretrained weights (the speed does not
    depend on them). On CUDA also each step's peak memory above what the models hold.
    """
    from benchmarks import bench_train_step as bench
    from gmmseg_core.heads import OFFICIAL_MEMORY_SIZE

    dev = torch.device(device)
    archs, size, batch, classes, d, k = (("smp:Segformer:mit_b0",), (32, 32), 2, 4, 4, 2) if quick else \
        (FULL_STEP_ARCHS, (768, 768), 2, 19, 64, 5)
    memory, interval, reps, warmup = (64, 1, 2, 1) if quick else (OFFICIAL_MEMORY_SIZE, 5, 50, 3)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, *size, generator=g).to(dev)
    blocks = torch.randint(0, classes, (batch, size[0] // 32, size[1] // 32), generator=g)
    labels = blocks.repeat_interleave(32, dim=1).repeat_interleave(32, dim=2).to(dev)
    variants = (("softmax", "softmax", {}), ("gmm paper", "gmm", {"variant": "paper"}),
                ("gmm official", "gmm", {"variant": "official", "memory_size": memory}))
    out = {}
    for arch in archs:
        steps = {name: bench.make_step(arch, kw, head, classes, None, d, k, interval, dev,
                                       model_kwargs=dict(encoder_weights=None)) for name, head, kw in variants}
        per = bench.time_interleaved(steps, images, labels, warmup, max(1, reps // interval), interval, dev)
        if dev.type == "cuda":
            for name, step in steps.items():
                torch.cuda.synchronize(dev)
                held = torch.cuda.memory_allocated(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                step(images, labels)
                per[name]["step_peak_gib"] = (torch.cuda.max_memory_allocated(dev) - held) / 2**30
        out[arch] = {name: dict(step_ms=1000 * r["step_s"], update_ms=1000 * r["update_s"], overhead=r["overhead"],
                                overhead_quartiles=r["overhead_quartiles"],
                                extra_phase_ms={phase: 1000 * s for phase, s in r.get("extra_phase_s", {}).items()},
                                **({"step_peak_gib": r["step_peak_gib"]} if "step_peak_gib" in r else {}))
                     for name, r in per.items()}
        del steps
    out["summary"] = (f"batch {batch} of {size[0]}x{size[1]}, {classes} classes, D={d}, K={k}: " + "; ".join(
        f"{arch} softmax {per['softmax']['step_ms']:.1f} ms, GMM paper / official "
        + " / ".join(f"{100 * r['overhead']:+.1f}%" for name, r in per.items() if name != "softmax")
        for arch, per in out.items()))
    out["ok"] = True
    return out


def check_profile(device, quick, work, settings=None, iters=None, n_images=None, n_val=None):
    """The gpu profile's trainings, shortened, to turn its runtime into a measured estimate.

    Every (architecture, head) of notebook 03 trains ``iters`` steps at the profile's sizes on pre-generated
    scenes; the wall time per step (data loading included, from one timestamp per step) and the fixed cost per
    training (set-up, final evaluation on the validation set, checkpoint) then extrapolate to the profile's
    schedule. Extra runs on one model compare the profile's ``amp`` / ``num_workers`` with the alternatives.
    ``settings`` (a list of ``(arch, kind, amp, workers)``), ``iters``, ``n_images`` and ``n_val`` override the
    defaults, for a shorter run.
    """
    from gmmseg_core.data import build_dataset
    from gmmseg_core.profiles import HEAD_KINDS, PROFILES, TRAIN, experiment_config
    from gmmseg_core.train import train

    profile = "smoke" if quick else "gpu"
    p = dict(TRAIN[profile])
    full_iters, n_train, full_val = p["train_iters"], p["num_train_images"], p["num_val_images"]
    default_iters, default_images, n_gen = (4, 8, 2) if quick else (120, 192, 24)
    iters, n_images = iters or default_iters, n_images or default_images
    n_val = n_val or full_val
    p.update(train_iters=iters, num_train_images=n_images, num_val_images=n_val)
    data_dir = Path(work) / "data"
    size = list(p["image_size"])
    gen = build_dataset("scenes", "train", image_size=size, num_images=n_gen + 1, cache=False)
    gen.load(0)                                 # textures load once per process
    t0 = time.perf_counter()
    for i in range(1, n_gen + 1):
        gen.load(i)                             # generation alone, as bench_data times it
    gen_s = (time.perf_counter() - t0) / n_gen
    build_dataset("scenes", "train", image_size=size, num_images=n_images, cache_dir=str(data_dir)).preload()
    build_dataset("scenes", "val", image_size=size, num_images=n_val, cache_dir=str(data_dir)).preload()

    nb03 = PROFILES[profile]["03_closed_set"]
    archs, amp, workers = nb03["archs"], p["amp"], p["num_workers"]
    if settings is None:
        settings = [(arch, kind, amp, workers) for arch in archs for kind in HEAD_KINDS]
        settings += [(archs[-1], "gmm_official", a, w) for a, w in (("none", 0), ("bf16", workers))
                     if (a, w) != (amp, workers)]
        if quick:
            settings = settings[:1] + settings[-1:]
    runs = {}
    for arch, kind, run_amp, run_workers in settings:
        cfg = experiment_config(p, arch, kind, "scenes", 0, device=device, cache_dir=str(work)).replace(
            amp=run_amp if torch.device(device).type == "cuda" else "none", num_workers=run_workers,
            run_name=f"{arch}_{kind}_{run_amp}_{run_workers}")
        stamps = []
        t0 = time.perf_counter()
        train(cfg, on_step=lambda step, model, out, stamps=stamps: stamps.append(time.perf_counter()))
        wall = time.perf_counter() - t0
        gaps = sorted(b - a for a, b in zip(stamps[len(stamps) // 4:], stamps[len(stamps) // 4 + 1:]))
        per_step = gaps[len(gaps) // 2]
        fixed = wall - per_step * iters
        name = f"{arch} {kind} amp={run_amp} workers={run_workers}"
        runs[name] = dict(ms_per_step=1000 * per_step, fixed_s=fixed, full_training_s=full_iters * per_step + fixed)
        print(f"   {name}: {1000 * per_step:.1f} ms/step, {fixed:.1f} s fixed", flush=True)
    plain = [r for name, r in runs.items() if name.endswith(f"amp={amp} workers={workers}")]
    per_matrix = sum(r["full_training_s"] for r in plain)
    seeds, datasets = len(nb03["seeds"]), len(nb03["datasets"])
    generation = datasets * (n_train + full_val) * gen_s
    nb03_s = seeds * datasets * per_matrix + generation
    summary = (f"notebook 03 of the {profile} profile, extrapolated: {nb03_s / 3600:.2f} h ({seeds} seeds x "
               f"{datasets} data sets x {len(plain)} models of {full_iters} steps; data generation "
               f"{generation / 60:.1f} min at {1000 * gen_s:.0f} ms/image). Per step: " + "; ".join(
                   f"{name} {r['ms_per_step']:.1f} ms" for name, r in runs.items()))
    return dict(ok=True, runs=runs, generation_s_per_image=gen_s, notebook03_hours=nb03_s / 3600, summary=summary)


def check_launches(device, quick):
    """Kernel launches and host synchronisations per training step, per head (``torch.profiler``).

    On a GPU the GMM head is bound by launches, not arithmetic: this is the number to bring down. On a CPU
    the launch count is the number of aten operations dispatched.
    """
    from torch.profiler import ProfilerActivity, profile

    from benchmarks import bench_train_step as bench
    from gmmseg_core.profiles import TRAIN

    p, dev = TRAIN["smoke" if quick else "gpu"], torch.device(device)
    size, batch = tuple(p["image_size"]), p["batch_size"]
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, *size, generator=g).to(dev)
    labels = torch.randint(0, 8, (batch, *size), generator=g).to(dev)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    (steps, warmup), out = ((2, 1) if quick else (5, 3)), {}
    for name, head, kw in (("softmax", "softmax", {}), ("gmm official", "gmm", {"variant": "official"}),
                           ("gmm paper", "gmm", {"variant": "paper"})):
        step = bench.make_step("fcn", kw, head, 8, p["width"], p["embed_dim"], p["num_components"],
                               p["update_interval"], dev)
        for _ in range(warmup):
            step(images, labels)
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step(images, labels)
        events = prof.key_averages()
        if dev.type == "cuda":
            launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC"))
            syncs = sum(e.count for e in events if e.key == "cudaStreamSynchronize")
        else:
            launches = sum(e.count for e in events if e.key.startswith("aten::"))
            syncs = sum(e.count for e in events if e.key in ("aten::item", "aten::nonzero"))
        cpu_ms = sum(e.self_cpu_time_total for e in events) / 1000 / steps
        out[name] = dict(launches_per_step=launches / steps, syncs_per_step=syncs / steps, host_ms_per_step=cpu_ms)
    out["summary"] = "fcn at the profile's sizes, per step: " + "; ".join(
        f"{k} {v['launches_per_step']:.0f} launches, {v['syncs_per_step']:.0f} syncs, host {v['host_ms_per_step']:.1f} ms"
        for k, v in out.items()) + (" (CPU: aten events at every nesting level, item/nonzero calls)" if dev.type != "cuda" else "")
    out["ok"] = True
    return out


def check_notebooks(device, quick, out_dir):
    """Execute the notebooks through ``gmmseg_core.reproduce`` on ``device``, with ``keep_going``: every notebook
    runs even when an earlier one failed (a later one then trains the models it needs itself)."""
    from gmmseg_core import reproduce as reproduce_module
    from gmmseg_core.profiles import NOTEBOOKS

    base = Path("outputs") / "gpu_check" if Path(out_dir).resolve() == HERE else Path(out_dir) / "notebooks"
    plan = [("smoke", NOTEBOOKS[:1] if quick else NOTEBOOKS, None)]
    if not quick:
        plan.append(("gpu", NOTEBOOKS, SHORT_GPU))
    out = {}
    for profile, names, parameters in plan:
        folder = base / profile
        try:
            result = reproduce_module.reproduce(
                profile, device=device, out_dir=folder, figures_dir=folder / "figures", notebooks=list(names),
                parameters=parameters, keep_going=True,
                log=lambda msg, _profile=profile, **_: print(f"   {_profile}: {msg}", flush=True))
        except reproduce_module.NotebooksFailedError as err:
            result = err.result
        for name, info in result["notebooks"].items():
            out[f"{profile}/{name}"] = dict(ok="error" not in info, seconds=info["seconds"],
                                            **({"error": info["error"]} if "error" in info else {}))
    failed = [k for k, r in out.items() if not r["ok"]]
    out["summary"] = "; ".join(f"{k} {r['seconds']:.0f} s" for k, r in out.items()) + (
        f"; FAILED: {', '.join(failed)} (see error)" if failed else "; all passed")
    if failed:
        out["error"] = " | ".join(out[k]["error"] for k in failed)
    out["ok"] = not failed
    return out


# The gpu profile, shortened for the notebooks check: every notebook on the device in about 7 minutes (H100).
SHORT_GPU = dict(train_iters=100, num_train_images=48, num_val_images=16, seeds=[0], n_starts=10)

CHECKS = ("loglik", "sinkhorn", "head", "train", "gmm_head", "train_step", "full_step", "launches", "profile")
EXTRA_CHECKS = ("notebooks",)


def _markdown(report) -> str:
    env = report["environment"]
    lines = [f"# Accelerator check: {env['device_name']}", "",
             f"torch {env['torch']}, CUDA {env['cuda']}, {env['date']}, quick={report['quick']}; "
             f"total {report['seconds']:.0f} s.", "", "| check | ok | seconds | details |", "|---|---|---|---|"]
    for name, r in report["checks"].items():
        details = {k: v for k, v in r.items() if k not in ("ok", "seconds", "error", "traceback")}
        text = r.get("error") or r.get("summary") or json.dumps(details, default=str)[:600]
        lines.append(f"| {name} | {r.get('ok')} | {r.get('seconds', float('nan')):.1f} | {text} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(HERE), help="folder for gpu_check.md / .json (default benchmarks/)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds, also on a CPU)")
    parser.add_argument("--only", nargs="+", choices=CHECKS + EXTRA_CHECKS,
                        help=f"run only these checks (default: all but {', '.join(EXTRA_CHECKS)})")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device!r}: torch sees no CUDA device here (torch {torch.__version__})",
              file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(device=str(device), torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
               date=time.strftime("%Y-%m-%d %H:%M"),
               device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description())
    report = dict(environment=env, quick=args.quick, checks={}, complete=False)
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        for name in args.only or CHECKS:
            t0 = time.perf_counter()
            print(f"== {name}", flush=True)
            try:
                fn = globals()[f"check_{name}"]
                if name == "notebooks":
                    result = fn(args.device, args.quick, out_dir)
                elif name in ("train", "profile"):
                    result = fn(args.device, args.quick, Path(work))
                else:
                    result = fn(args.device, args.quick)
            except Exception as err:  # report and go on: the machine time is precious
                result = dict(ok=False, error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
            result["seconds"] = time.perf_counter() - t0
            report["checks"][name] = result
            print(f"   ok={result.get('ok')} in {result['seconds']:.1f} s", flush=True)
            # after every check: a run cut short (the machine's lease, a timeout) keeps what it measured
            atomic_write_text(out_dir / "gpu_check.json", json.dumps(report, indent=1, default=str))
    report["seconds"] = time.perf_counter() - t_all
    report["complete"] = True
    atomic_write_text(out_dir / "gpu_check.json", json.dumps(report, indent=1, default=str))
    md = _markdown(report)
    atomic_write_text(out_dir / "gpu_check.md", md)
    print(md)
    return 0 if all(r.get("ok") for r in report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
