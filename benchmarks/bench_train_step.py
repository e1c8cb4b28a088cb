"""Cost of one training step: the same network with a softmax head versus the GMM head (both variants).

A step is what ``gmmseg_core.train.train`` does per iteration: ``forward_train``, backward, AdamW step, then the
head's EM bookkeeping (``update_head``: Sinkhorn E-step, memory push, M-step every ``update_interval`` steps).
The variants run interleaved (round robin) on the same batch so machine load hits them alike; the median step
time is reported. Target: GMM overhead <= 15% over softmax.

    python -m benchmarks.bench_train_step            # cpu profile sizes, updates RESULTS.md
    python -m benchmarks.bench_train_step --quick    # tiny smoke run, prints only
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gmmseg_core.data import build_dataset
from gmmseg_core.models import build_model

VARIANTS = (("softmax", {}), ("gmm paper", {"variant": "paper"}), ("gmm official", {"variant": "official"}))


def make_step(arch, head_kwargs, head, num_classes, width, embed_dim, num_components, update_interval):
    torch.manual_seed(0)
    hk = dict(head_kwargs)
    if head == "gmm":
        hk.update(embed_dim=embed_dim, num_components=num_components, update_interval=update_interval)
    model = build_model(arch, head, num_classes=num_classes, width=width, head_kwargs=hk)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(images, labels):
        """One step; returns the seconds spent in update_head."""
        out = model.forward_train(images, labels)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        model.update_head(out["features"], labels)  # as gmmseg_core.train does
        return time.perf_counter() - t0

    return step


def run(archs, image_size, batch_size, width, embed_dim, num_components, update_interval, reps, warmup):
    ds = build_dataset("scenes", "train", image_size=image_size, num_images=batch_size)
    images = torch.stack([ds[i][0] for i in range(batch_size)])
    labels = torch.stack([ds[i][1] for i in range(batch_size)])
    results = {}
    for arch in archs:
        steps = {name: make_step(arch, kw, "softmax" if name == "softmax" else "gmm", ds.num_classes, width,
                                 embed_dim, num_components, update_interval) for name, kw in VARIANTS}
        times = {name: [] for name in steps}
        update = {name: [] for name in steps}
        for i in range(warmup + reps):
            for name, step in steps.items():
                t0 = time.perf_counter()
                t_update = step(images, labels)
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
                    update[name].append(t_update)
        med = {name: statistics.median(t) for name, t in times.items()}
        results[arch] = {name: {"median_s": m, "overhead": m / med["softmax"] - 1,
                                "update_s": statistics.median(update[name])} for name, m in med.items()}
    return results


def format_results(results, args) -> str:
    lines = [f"One training step (forward_train + backward + AdamW + update_head), batch {args.batch_size} of "
             f"{args.image_size[0]}x{args.image_size[1]} scenes images, in-house `tiny` backbones with width "
             f"{args.width}; GMM head D={args.embed_dim}, K={args.num_components}, M-step every "
             f"{args.update_interval} steps; {args.threads} torch thread(s); median of {args.reps} interleaved "
             f"steps after {args.warmup} warm-up. Target: GMM overhead <= 15%.", "",
             "| arch | head | median step (ms) | of which update_head (ms) | rest minus softmax step (ms) | "
             "overhead vs softmax | target met |", "|---|---|---|---|---|---|---|"]
    for arch, per in results.items():
        for name, r in per.items():
            met = "" if name == "softmax" else ("yes" if r["overhead"] <= 0.15 else "**no**")
            rest = r["median_s"] - r["update_s"] - per["softmax"]["median_s"]
            lines.append(f"| {arch} | {name} | {1000 * r['median_s']:.1f} | {1000 * r['update_s']:.1f} | "
                         f"{1000 * rest:+.1f} | {100 * r['overhead']:+.1f}% | {met} |")
    lines += ["", "\"rest minus softmax step\" is the extra cost of the GMM head's forward, backward and optimiser "
              "step (embedding, log-densities of all C x K components at feature resolution, component loss) "
              "over the softmax head's 1x1 convolution; \"update_head\" is the EM bookkeeping (Sinkhorn E-step, "
              "memory push, M-step every few steps). Step times vary by ~10% between runs on this shared "
              "machine."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, print only (no RESULTS.md)")
    parser.add_argument("--archs", nargs="+", default=["fcn", "deeplabv3plus", "segformer"])
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.image_size, args.batch_size, args.width, args.embed_dim = (32, 32), 2, 4, 4
        args.num_components, args.update_interval, args.reps, args.warmup = 2, 1, 2, 1
    else:
        # the cpu profile's sizes, read from the profile itself
        from gmmseg_core.profiles import TRAIN

        cpu = TRAIN["cpu"]
        args.image_size, args.batch_size = tuple(cpu["image_size"]), cpu["batch_size"]
        args.width, args.embed_dim, args.num_components = cpu["width"], cpu["embed_dim"], cpu["num_components"]
        args.update_interval, args.warmup = cpu["update_interval"], 3
    torch.set_num_threads(args.threads)
    results = run(args.archs, args.image_size, args.batch_size, args.width, args.embed_dim, args.num_components,
                  args.update_interval, args.reps, args.warmup)
    text = format_results(results, args)
    print(text)
    if not args.quick:
        from benchmarks.results import machine_line, write_section

        write_section("bench_train_step", machine_line() + "\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
