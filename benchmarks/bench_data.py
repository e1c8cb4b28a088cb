"""Data pipeline throughput: images per second for generation and through a DataLoader.

For ``scenes``, ``fashion`` (when the IDX files are installed) and ``digits`` at the CPU profile's image size,
and ``scenes`` at the GPU profile's size (where the main process must keep up with a GPU step of ~35 ms):

- generation: items drawn one after another in the main process, no cache (the cost of a cold epoch);
- DataLoader, cold: a fresh dataset (every item generated inside the loader), ``num_workers`` 0 and 2;
- DataLoader, warm: the in-memory cache filled first (every later epoch), ``num_workers`` 0 and 2;
- DataLoader, warm + ``train_transforms`` (mmseg's augmentations), ``num_workers`` 0;
- the per-image normalisation at the GPU size against the numpy expression it replaced, in the same run.

Run ``python -m benchmarks.bench_data`` (writes the ``## bench_data`` section of ``benchmarks/RESULTS.md``) or
``--quick`` (tiny sizes, no file written unless ``--write``).
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch
from torch.utils.data import DataLoader

from benchmarks.results import RESULTS, cpu_cores, start_load, write_section
from gmmseg_core._machine import cpu_description
from gmmseg_core.data import build_dataset, train_transforms

SECTION = "bench_data"


def _rate(n: int, seconds: float) -> float:
    return n / max(seconds, 1e-9)


def _loader_rate(ds, workers: int, batch_size: int) -> float:
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, shuffle=False,
                        persistent_workers=False)
    t = time.perf_counter()
    n = sum(x.shape[0] for x, _ in loader)
    return _rate(n, time.perf_counter() - t)


def bench_dataset(name: str, image_size, n: int, batch_size: int, seed: int = 0) -> dict:
    """Throughputs (images / s) for one dataset; see the module docstring."""
    kw = dict(image_size=image_size, num_images=n, seed=seed)
    build_dataset(name, "train", cache=False, **kw).load(0)  # load sources / texture banks once
    gen = build_dataset(name, "train", cache=False, **kw)
    t, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        gen.load(i)
    row = {"generate": _rate(n, time.perf_counter() - t), "generate_cpu": _rate(n, time.process_time() - cpu)}
    for workers in (0, 2):
        row[f"cold_w{workers}"] = _loader_rate(build_dataset(name, "train", **kw), workers, batch_size)
    warm = build_dataset(name, "train", **kw)
    for i in range(n):
        warm.load(i)
    for workers in (0, 2):
        row[f"warm_w{workers}"] = _loader_rate(warm, workers, batch_size)
    crop = min(image_size)
    aug = build_dataset(name, "train", transform=train_transforms(crop), **kw)
    for i in range(n):
        aug.load(i)
    row["warm_aug_w0"] = _loader_rate(aug, 0, batch_size)
    return row


def _numpy_normalize(ds, image):
    """The previous normalisation, kept as the reference: float copy, ``(x - mean) / std``, transpose copy."""
    import numpy as np

    mean = np.asarray(ds.mean, dtype=np.float32) * 255.0
    std = np.asarray(ds.std, dtype=np.float32) * 255.0
    out = (image.astype(np.float32) - mean) / std
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


def bench_normalize(image_size, repeats: int) -> dict:
    """Milliseconds per image of ``normalize`` and of the numpy reference (median), and whether they agree."""
    ds = build_dataset("scenes", "train", image_size=image_size, num_images=1, cache=False)
    image = ds.load(0)[0]
    out = {}
    for key, fn in (("numpy_ms", lambda: _numpy_normalize(ds, image)), ("ours_ms", lambda: ds.normalize(image))):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[key] = 1000 * sorted(times)[len(times) // 2]
    out["bitwise_equal"] = bool(torch.equal(_numpy_normalize(ds, image), ds.normalize(image)))
    return out


def _available(name: str) -> bool:
    try:
        build_dataset(name, "train", num_images=1)
        return True
    except FileNotFoundError:
        return False


def run(quick: bool = False) -> tuple[list[tuple[str, str, dict]], dict]:
    load = start_load()                # before the measurements, whose own work the load average would hold
    torch.set_num_threads(1)
    if quick:
        cases = [("scenes", (32, 64), 8), ("fashion", (32, 32), 8), ("digits", (32, 32), 8), ("scenes", (64, 64), 4)]
        batch, gpu_size, repeats = 4, (64, 64), 3
    else:
        cases = [("scenes", (64, 128), 256), ("fashion", (64, 128), 256), ("digits", (64, 128), 256),
                 ("scenes", (256, 512), 64)]
        batch, gpu_size, repeats = 16, (256, 512), 50
    rows = []
    for name, size, n in cases:
        if not _available(name):
            rows.append((name, f"{size[0]}x{size[1]}", n, None))
            continue
        rows.append((name, f"{size[0]}x{size[1]}", n, bench_dataset(name, size, n, batch)))
    info = dict(batch=batch, load=load, cores=cpu_cores(), gpu_size=gpu_size,
                normalize=bench_normalize(gpu_size, repeats))
    return rows, info


def format_section(rows, info) -> str:
    today = datetime.date.today().isoformat()
    lines = [
        f"Machine: {info['cores']}-core CPU ({cpu_description()}), torch {torch.__version__}, {today}; 1-minute load "
        "average at the start "
        f"{info['load']:.1f}" + (" (the machine was shared with other work: absolute rates are noisy)."
                                 if info["load"] > 1.0 else "."),
        "",
        f"Images per second over the number of training images in `n`, batch {info['batch']}, 1 torch thread. "
        "`generate`: items drawn in the main process without cache (a cold epoch). `cold`: a fresh dataset "
        "through a DataLoader (items generated inside it). `warm`: in-memory cache filled first (later epochs). "
        "`+aug`: warm, with `train_transforms` (resize 0.5-2, crop with cat_max_ratio, flip, photometric). "
        "`wN`: num_workers=N; every pass builds a fresh loader, so a `w2` rate includes starting its two "
        "worker processes, a fixed cost that dominates the short warm passes (a training starts them once). "
        "`generate (CPU)` divides by the process's CPU time instead of wall time, which "
        "is less sensitive to other work on the machine. Target for scene generation: hundreds of images per "
        "second.",
        "",
        "| dataset | size | n | generate | generate (CPU) | cold w0 | cold w2 | warm w0 | warm w2 | warm +aug w0 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, size, n, r in rows:
        if r is None:
            lines.append(f"| {name} | {size} | {n} | not installed | | | | | | |")
            continue
        lines.append(f"| {name} | {size} | {n} | {r['generate']:.0f} | {r['generate_cpu']:.0f} | "
                     f"{r['cold_w0']:.0f} | {r['cold_w2']:.0f} | {r['warm_w0']:.0f} | {r['warm_w2']:.0f} | "
                     f"{r['warm_aug_w0']:.0f} |")
    norm, (h, w) = info["normalize"], info["gpu_size"]
    lines += ["", f"Normalising one {h}x{w} image (median of repeated calls): the numpy expression "
                  f"`(x.astype(float32) - mean) / std` + transpose copy {norm['numpy_ms']:.2f} ms, `normalize` "
                  f"(one conversion into the channel-first layout, then in-place `sub_` / `div_`) "
                  f"{norm['ours_ms']:.2f} ms: {norm['numpy_ms'] / max(norm['ours_ms'], 1e-9):.1f}x; bitwise equal: "
                  f"{norm['bitwise_equal']}."]
    scenes = next((r for name, _, _, r in rows if name == "scenes" and r is not None), None)
    if scenes is not None:
        wall, cpu = scenes["generate"], scenes["generate_cpu"]
        verdict = "met" if wall >= 200 else ("met in CPU time only" if cpu >= 200 else "**missed**")
        lines += ["", f"Scene generation target (>= 200 images/s): {verdict} ({wall:.0f}/s wall, {cpu:.0f}/s per "
                      "CPU second). Generation is paid once per process and item: later epochs read the "
                      "in-memory cache (`warm`), later runs the `cache_dir` files."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--write", action="store_true", help="with --quick: still write RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="do not write RESULTS.md")
    args = parser.parse_args(argv)
    rows, info = run(quick=args.quick)
    body = format_section(rows, info)
    text = f"## {SECTION}\n\n{body}"
    print(text)
    if not args.no_write and (not args.quick or args.write):
        write_section(SECTION, body, RESULTS)
    return text


if __name__ == "__main__":
    main()
