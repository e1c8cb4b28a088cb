"""Cost of one training step: the same network with a softmax head versus the GMM head (both variants).

A step is what ``gmmseg_core.train.train`` does per iteration: ``forward_train``, backward, AdamW step, then the
head's EM bookkeeping (``update_head``: Sinkhorn E-step, memory push, M-step every ``update_interval`` steps).
Each of these phases is timed too (the device is synchronised after each), and a second table splits the GMM
head's extra time among them.
The variants run interleaved (round robin) on the same batch so machine load hits them alike; a step's time is
amortised over a cycle of ``update_interval`` steps (one M-step each) and the median over cycles is reported. The
overhead is paired: each cycle's GMM step over the same cycle's softmax step, whose median and interquartile range
over the cycles are reported (at the cpu profile's width the GMM head's extra is a few milliseconds, and
run-to-run noise moves the overhead by several points: the range shows when a verdict could go either way). The
GMM head's cost grows with the feature pixels, not with the backbone's channels, so the overhead is reported for
the profile's backbone width and for two wider backbones of the same architecture. Target: GMM overhead <= 15%
over softmax. Since the overhead moves more between runs than between the cycles of one run, the profile's width is
then measured again in several fresh processes (``--repeats``), and its verdict is the median over those runs.

    python -m benchmarks.bench_train_step                               # cpu profile sizes, updates RESULTS.md
    python -m benchmarks.bench_train_step --device cuda --profile gpu   # its own RESULTS.md section
    python -m benchmarks.bench_train_step --quick                       # tiny smoke run, prints only
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.results import start_load, synchronize
from gmmseg_core.data import build_dataset
from gmmseg_core.models import build_model
from gmmseg_core.train import adamw

TARGET = 0.15         # the GMM head's overhead over softmax that the target allows
VARIANTS = (("softmax", {}), ("gmm paper", {"variant": "paper"}), ("gmm official", {"variant": "official"}))
PHASES = ("forward", "backward", "optimizer", "update_head")    # of a training step, in order


def make_step(arch, head_kwargs, head, num_classes, width, embed_dim, num_components, update_interval,
              device="cpu", model_kwargs=None):
    """A training step of a fresh seeded model (``model_kwargs`` go to the backbone; default ``width=width``)."""
    torch.manual_seed(0)
    hk = dict(head_kwargs)
    if head == "gmm":
        hk.update(embed_dim=embed_dim, num_components=num_components, update_interval=update_interval)
    backbone_kwargs = dict(width=width) if model_kwargs is None else model_kwargs
    model = build_model(arch, head, num_classes=num_classes, head_kwargs=hk, **backbone_kwargs).to(device)
    model.train()
    opt = adamw(model.parameters(), lr=1e-4)  # as gmmseg_core.train builds it

    def step(images, labels):
        """One step; returns the seconds of each of its :data:`PHASES` (the device is synchronised after each)."""
        marks = [time.perf_counter()]

        def mark():
            synchronize(device)
            marks.append(time.perf_counter())

        out = model.forward_train(images, labels)
        mark()
        out["loss"].backward()
        mark()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark()
        model.update_head(out["features"], labels)  # as gmmseg_core.train does
        mark()
        return {phase: b - a for phase, a, b in zip(PHASES, marks, marks[1:])}

    return step


def run(archs, widths, image_size, batch_size, embed_dim, num_components, update_interval, reps, warmup,
        device="cpu", count=True):
    """Per (arch, width): :func:`summarise` of each head's steps, over ``reps // update_interval`` cycles of
    ``update_interval`` steps after ``warmup`` steps, the heads alternating step by step; with ``count`` also
    each head's ``ops_per_step`` (:func:`count_ops`)."""
    ds = build_dataset("scenes", "train", image_size=image_size, num_images=batch_size)
    images = torch.stack([ds[i][0] for i in range(batch_size)]).to(device)
    labels = torch.stack([ds[i][1] for i in range(batch_size)]).to(device)
    cycles = max(1, reps // update_interval)
    results = {}
    for arch in archs:
        for width in widths:
            steps = {name: make_step(arch, kw, "softmax" if name == "softmax" else "gmm", ds.num_classes, width,
                                     embed_dim, num_components, update_interval, device) for name, kw in VARIANTS}
            results[(arch, width)] = time_interleaved(steps, images, labels, warmup, cycles, update_interval, device)
            for name, step in steps.items() if count else ():
                results[(arch, width)][name]["ops_per_step"] = count_ops(step, images, labels, update_interval)
    return results


def _overheads_in_this_process(threads, *run_args) -> dict:
    """``{arch: {head: overhead}}`` of :func:`run` (one width, no op counts) in this process."""
    torch.set_num_threads(threads)
    results = run(*run_args, count=False)
    return {arch: {name: r["overhead"] for name, r in per.items() if name != "softmax"}
            for (arch, _), per in results.items()}


def repeat_in_fresh_processes(repeats, threads, archs, width, *sizes) -> dict:
    """``{arch: {head: [overhead of each run]}}``: :func:`run` at one ``width`` for every arch, ``repeats`` times,
    each time in a new process (spawned, one after another), so that no run inherits another's allocator, caches
    or models. ``sizes`` are :func:`run`'s arguments after ``widths``."""
    import multiprocessing

    per_run = []
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        for _ in range(repeats):
            per_run.append(pool.apply(_overheads_in_this_process, (threads, archs, [width], *sizes)))
    return {arch: {name: [run_[arch][name] for run_ in per_run] for name in per_run[0][arch]} for arch in archs}


def time_interleaved(steps, images, labels, warmup, cycles, update_interval, device="cpu") -> dict:
    """:func:`summarise` of ``steps`` (head name -> :func:`make_step`'s step, ``"softmax"`` among them) run round
    robin on one batch: ``warmup`` untimed steps each, then ``cycles`` cycles of ``update_interval`` steps."""
    times = {name: [] for name in steps}
    phases = {name: {phase: [] for phase in PHASES} for name in steps}
    for i in range(warmup + cycles * update_interval):
        for name, step in steps.items():
            synchronize(device)
            t0 = time.perf_counter()
            spent = step(images, labels)
            synchronize(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
                for phase in PHASES:
                    phases[name][phase].append(spent[phase])
    return summarise(times, {name: p["update_head"] for name, p in phases.items()}, update_interval, phases)


def count_ops(step, images, labels, steps) -> float:
    """Aten operations dispatched per step over ``steps`` untimed steps (``torch.profiler``; every nesting level,
    views included): at the cpu profile's sizes each costs microseconds whatever its size, so this count, more
    than the arithmetic, sets what a head adds to a small network's step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(images, labels)
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) / steps


def summarise(times, update, update_interval, phases=None) -> dict:
    """Per head: ``step_s`` and ``update_s`` (medians over cycles of ``update_interval`` steps of each cycle's mean
    step, so every cycle holds one M-step), ``overhead`` (median over cycles of the cycle's step over the softmax
    head's step in the same cycle) and ``overhead_quartiles`` (its first and third quartiles); with ``phases``
    also ``extra_phase_s``: per phase, the median over cycles of the cycle's phase time minus the softmax head's
    in the same cycle.

    ``times`` and ``update`` map each head (``"softmax"`` among them) to its measured steps in order, in seconds;
    ``phases`` maps each head to ``{phase: seconds per step}`` (:data:`PHASES`).
    """
    def cycle_means(values):
        return [statistics.fmean(values[c * update_interval:(c + 1) * update_interval])
                for c in range(len(values) // update_interval)]

    def paired_extra(mine, theirs):
        return statistics.median([a - b for a, b in zip(cycle_means(mine), cycle_means(theirs))])

    softmax = cycle_means(times["softmax"])
    per = {}
    for name, measured in times.items():
        mine = cycle_means(measured)
        paired = [g / s - 1 for g, s in zip(mine, softmax)]
        per[name] = {"step_s": statistics.median(mine), "update_s": statistics.median(cycle_means(update[name])),
                     "overhead": statistics.median(paired), "overhead_quartiles": quartiles(paired)}
        if phases is not None:
            per[name]["extra_phase_s"] = {phase: paired_extra(phases[name][phase], phases["softmax"][phase])
                                          for phase in phases[name]}
    return per


def quartiles(values) -> tuple[float, float]:
    """First and third quartiles of ``values`` (both the value itself for a single one)."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def overhead_range(result) -> tuple[float, float]:
    """A head's ``overhead_quartiles``; both its overhead for a result recorded without them."""
    return result.get("overhead_quartiles", (result["overhead"],) * 2)


def target_verdict(result, target=TARGET) -> str:
    """``yes`` / ``**no**`` by the median overhead, marked ``(edge)`` when the target lies inside the
    interquartile range over cycles."""
    met = "yes" if result["overhead"] <= target else "**no**"
    q1, q3 = overhead_range(result)
    return f"{met} (edge)" if q1 <= target < q3 else met


def format_results(results, args, repeated=None) -> str:
    lines = [f"Device `{args.device}`. One training step (forward_train + backward + AdamW + update_head), "
             f"batch {args.batch_size} of "
             f"{args.image_size[0]}x{args.image_size[1]} scenes images, in-house `tiny` backbones of width "
             f"{', '.join(map(str, args.widths))}"
             + (" (quick sizes)" if args.quick else f" (the {args.profile} profile trains width {args.profile_width})")
             + "; "
             f"GMM head "
             f"D={args.embed_dim}, K={args.num_components}, M-step every {args.update_interval} steps; "
             f"{args.threads} torch thread(s). Heads run interleaved on the same batch; a step's time is the mean "
             f"over a cycle of {args.update_interval} steps (so the M-step is amortised), the median over "
             f"{max(1, args.reps // args.update_interval)} cycles after {args.warmup} warm-up steps. The overhead "
             f"is paired: the median over cycles of a cycle's GMM step over the same cycle's softmax step, with its "
             f"interquartile range; *(edge)* marks a verdict whose range holds the target. "
             f"Target: GMM overhead <= {TARGET:.0%}.", "",
             "| arch | width | head | step (ms) | of which update_head (ms) | rest minus softmax step (ms) | "
             "overhead vs softmax | its range over cycles (IQR) | target met in this run | aten ops per step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (arch, width), per in results.items():
        for name, r in per.items():
            met = "" if name == "softmax" else target_verdict(r)
            q1, q3 = overhead_range(r)
            spread = "" if name == "softmax" else f"{100 * q1:+.1f} to {100 * q3:+.1f}%"
            # like for like: the step without update_head, against the softmax step without its (no-op) one
            rest = (r["step_s"] - r["update_s"]) - (per["softmax"]["step_s"] - per["softmax"]["update_s"])
            ops = f"{r['ops_per_step']:.0f}" if "ops_per_step" in r else ""
            lines.append(f"| {arch} | {width} | {name} | {1000 * r['step_s']:.1f} | {1000 * r['update_s']:.1f} | "
                         f"{1000 * rest:+.1f} | {100 * r['overhead']:+.1f}% | {spread} | {met} | {ops} |")
    lines += ["", "\"rest minus softmax step\" is the extra cost of the GMM head's forward, backward and optimiser "
              "step (embedding, log-densities of all C x K components at feature resolution; for the official "
              "variant also its component loss and the Sinkhorn E-step that loss needs) over the softmax head's "
              "1x1 convolution, both without update_head; \"update_head\" is the EM bookkeeping after the step "
              "(memory push, M-step amortised; for the paper variant also the Sinkhorn E-step). Absolute step "
              "times vary between runs on this shared machine (by up to 1.7x at width 8 between two days), "
              "overheads by a few points; compare heads within one run. \"aten ops per step\" counts the operations "
              "torch dispatched in an untimed cycle (every nesting level, views included): on a CPU each costs "
              "microseconds whatever its size, so at small sizes this count, more than the arithmetic, sets a "
              "head's extra time."]
    lines += ["", "The GMM head's extra time per step (step minus the softmax step, both variants) by backbone width, "
              "and the widths at which both variants meet the target:", ""]
    for arch in dict.fromkeys(a for a, _ in results):
        extra, met = [], []
        for (a, width), per in results.items():
            if a != arch:
                continue
            gmm = [r for name, r in per.items() if name != "softmax"]
            more = f"width {width}: " + " / ".join(f"{1000 * (r['step_s'] - per['softmax']['step_s']):+.1f}"
                                                   for r in gmm) + " ms"
            if all("ops_per_step" in r for r in per.values()):
                more += " (" + " / ".join(f"{r['ops_per_step'] - per['softmax']['ops_per_step']:+.0f}"
                                          for r in gmm) + " aten ops)"
            extra.append(more)
            over_runs = bool(repeated) and arch in repeated and width == args.profile_width
            if over_runs:                                           # the median over runs decides
                overheads = [statistics.median(values) for values in repeated[arch].values()]
            else:
                overheads = [r["overhead"] for r in gmm]
            if all(v <= TARGET for v in overheads):
                runs = len(next(iter(repeated[arch].values()))) if over_runs else 0
                met.append(f"{width} (median over {runs} runs)" if over_runs else str(width))
        verdict = f"target met at width {', '.join(met)}" if met else "target missed at every width measured"
        lines.append(f"- {arch}: {'; '.join(extra)}; {verdict}.")
    lines += phase_table(results)
    lines += run_to_run_table(repeated, args.profile_width)
    return "\n".join(lines)


def run_to_run_table(repeated, width, target=TARGET) -> list[str]:
    """Markdown lines: the overhead of every head at ``width`` in each of several runs
    (:func:`repeat_in_fresh_processes`), their median and range, and the verdict on the median over runs."""
    if not repeated:
        return []
    runs = len(next(iter(next(iter(repeated.values())).values())))
    lines = ["", f"Run to run, at width {width}: the same measurement in {runs} fresh processes, one after another "
             "(each interleaves the heads over its cycles as above). The overhead moves more between runs than "
             "between the cycles of one run (the machine's speed drifts over minutes, and a GMM step, made of "
             "many small operations, does not slow down in proportion to a softmax step), so at this width the "
             "verdict is taken on the median over runs.", "",
             "| arch | head | overhead in each run | median over runs | range | target met (median) |",
             "|---|---|---|---|---|---|"]
    for arch, heads in repeated.items():
        for name, values in heads.items():
            median = statistics.median(values)
            each = ", ".join(f"{100 * v:+.1f}%" for v in values)
            met = "yes" if median <= target else "**no**"
            lines.append(f"| {arch} | {name} | {each} | {100 * median:+.1f}% | {100 * min(values):+.1f} to "
                         f"{100 * max(values):+.1f}% | {met} |")
    return lines


def phase_table(results) -> list[str]:
    """Markdown lines: where each GMM variant's extra time goes, phase by phase (nothing for results recorded
    without the phases)."""
    rows = [(arch, width, name, r["extra_phase_s"]) for (arch, width), per in results.items()
            for name, r in per.items() if name != "softmax" and "extra_phase_s" in r]
    if not rows:
        return []
    lines = ["", "Where the GMM head's extra time goes: per phase of the step, the median over cycles of the phase's "
             "time minus the softmax head's in the same cycle (ms per step; the phases' medians need not add up "
             "to the step's). \"forward\" is forward_train (backbone, head, losses), \"optimizer\" AdamW's step "
             "and zero_grad.", "",
             "| arch | width | head | " + " | ".join(PHASES) + " |", "|---|---|---|" + "---|" * len(PHASES)]
    for arch, width, name, extra in rows:
        lines.append(f"| {arch} | {width} | {name} | "
                     + " | ".join(f"{1000 * extra[phase]:+.2f}" for phase in PHASES) + " |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, print only (no RESULTS.md)")
    parser.add_argument("--archs", nargs="+", default=["fcn", "deeplabv3plus", "segformer"])
    parser.add_argument("--reps", type=int, default=100, help="measured steps per head (whole M-step cycles)")
    parser.add_argument("--widths", type=int, nargs="+", default=None,
                        help="backbone widths (default: the profile's, then 2x and 4x)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5,
                        help="runs at the profile's width, each in a fresh process, for the run-to-run table "
                             "(0 skips them; --quick skips them)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    parser.add_argument("--profile", choices=["cpu", "gpu"], default="cpu",
                        help="take image size, batch, width, D and K from this profile's training parameters")
    args = parser.parse_args(argv)
    if args.repeats < 0:
        parser.error(f"--repeats must be >= 0, got {args.repeats}")
    if args.quick:
        args.image_size, args.batch_size, args.profile_width, args.embed_dim = (32, 32), 2, 4, 4
        args.num_components, args.update_interval, args.reps, args.warmup = 2, 1, 2, 1
    else:
        # the profile's sizes, read from the profile itself
        from gmmseg_core.profiles import TRAIN

        sizes = TRAIN[args.profile]
        args.image_size, args.batch_size = tuple(sizes["image_size"]), sizes["batch_size"]
        args.profile_width, args.embed_dim = sizes["width"], sizes["embed_dim"]
        args.num_components, args.update_interval, args.warmup = sizes["num_components"], sizes["update_interval"], 3
    torch.set_num_threads(args.threads)
    default_widths = [args.profile_width] if args.quick else [args.profile_width * f for f in (1, 2, 4)]
    args.widths = args.widths or default_widths
    load = start_load()
    sizes = (args.image_size, args.batch_size, args.embed_dim, args.num_components, args.update_interval, args.reps,
             args.warmup, args.device)
    results = run(args.archs, args.widths, *sizes)
    repeated = None
    if args.repeats > 0 and not args.quick:
        repeated = repeat_in_fresh_processes(args.repeats, args.threads, args.archs, args.profile_width, *sizes)
    text = format_results(results, args, repeated)
    print(text)
    if not args.quick:
        from benchmarks.results import machine_line, write_section

        # one section per device, profile and thread count: a run with other settings keeps the recorded one
        where = [] if (args.device, args.profile) == ("cpu", "cpu") else [f"{args.device}, {args.profile} profile"]
        where += [] if args.threads == 1 else [f"{args.threads} threads"]
        write_section("bench_train_step" + (f" ({', '.join(where)})" if where else ""),
                      machine_line(load=load, device=args.device) + "\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
