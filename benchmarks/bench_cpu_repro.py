"""Do CPU trainings give the same bits on another machine? Fingerprints of cpu-profile trainings under kernel caps.

Training is deterministic on one machine, but the committed cpu-profile numbers moved on a second machine: torch's
CPU convolutions (oneDNN) and matrix products (MKL) pick kernels for the processor they run on, and kernels that
round differently change a 300-step training. This benchmark trains the same models once with the libraries' own
choices (``default``) and once with every library capped at AVX2 (``avx2-capped``: ``ATEN_CPU_CAPABILITY``,
``ONEDNN_MAX_CPU_ISA``, ``MKL_CBWR`` and ``MKL_ENABLE_INSTRUCTIONS``), each training in a fresh process (the
variables act when the libraries load), one thread, and records the SHA-256 of every trained weight and buffer.

Run it on two machines with the same torch version (the libraries' kernels change between releases too): a run
compares its fingerprints with those of the section it replaces and says, in the new section, under which settings
they agree. Equal fingerprints under a setting mean that setting reproduces cpu-profile trainings across those
machines.

    python -m benchmarks.bench_cpu_repro            # cpu profile sizes (about a minute), updates RESULTS.md
    python -m benchmarks.bench_cpu_repro --quick    # smoke sizes, prints only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SECTION = "bench_cpu_repro"
SETTINGS = {     # every variable of gmmseg_core._machine.KERNEL_CAP_VARIABLES
    "default": {},
    "avx2-capped": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2",
                    "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}
# convolutions and the GMM head's products (deeplabv3plus), linear layers and attention (segformer)
MODELS = (("deeplabv3plus", "gmm_paper"), ("segformer", "softmax"))


def state_fingerprint(state: dict) -> str:
    """SHA-256 (hex) over the names, dtypes, shapes and bytes of a state dict's tensors, in sorted name order."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())     # any dtype, bfloat16 too
    return digest.hexdigest()


def train_one(arch: str, kind: str, profile: str) -> dict:
    """Train one cpu-profile model (``scenes``, seed 0) in this process; its mIoU, fingerprint and kernel level."""
    import torch

    from gmmseg_core._machine import cpu_description
    from gmmseg_core.profiles import TRAIN, experiment_config
    from gmmseg_core.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = experiment_config(TRAIN[profile], arch, kind, "scenes", seed=0, device="cpu", cache_dir=tmp)
            run_dir = Path(train(cfg.replace(progress=False)))
            metrics = json.loads((run_dir / "metrics.json").read_text())
            state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    finally:
        torch.set_num_threads(threads)
    return {"miou": metrics["final"]["miou"], "fingerprint": state_fingerprint(state),
            "cpu": cpu_description(), "torch": torch.__version__}


def run_setting(setting: str, arch: str, kind: str, profile: str) -> dict:
    """:func:`train_one` in a fresh interpreter with ``SETTINGS[setting]`` in its environment."""
    from gmmseg_core._machine import KERNEL_CAP_VARIABLES

    inherited = {k: v for k, v in os.environ.items() if k not in KERNEL_CAP_VARIABLES}   # "default" means none
    env = {**inherited, **SETTINGS[setting], "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    code = (f"import json; from benchmarks.bench_cpu_repro import train_one; "
            f"print(json.dumps(train_one({arch!r}, {kind!r}, {profile!r})))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        raise RuntimeError(f"the {setting} training of {arch} {kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def recorded_fingerprints(body: str | None) -> tuple[str | None, dict]:
    """The machine line and the ``{(setting, model): first 16 hex digits}`` of a recorded section's body."""
    if not body:
        return None, {}
    machine = next((line for line in body.splitlines() if line.startswith("Machine:")), None)
    rows = re.findall(r"^\| ([\w-]+) \| ([^|]+?) \| [^|]+ \| `([0-9a-f]+)` \|", body, re.M)
    return machine, {(setting, model): fingerprint for setting, model, fingerprint in rows}


def comparison(rows: list[dict], recorded: dict) -> dict:
    """Per setting: ``(equal, compared)``, the models whose fingerprint equals the recorded one, out of those
    recorded for that setting."""
    out = {}
    for r in rows:
        old = recorded.get((r["setting"], f"{r['arch']} {r['kind']}"))
        if old is not None:
            equal, compared = out.get(r["setting"], (0, 0))
            out[r["setting"]] = (equal + (r["fingerprint"][:len(old)] == old), compared + 1)
    return out


def format_comparison(result: dict, machine: str | None) -> str:
    """One sentence on how this run's fingerprints compare with the replaced section's ('' when nothing compared)."""
    if not result:
        return ""
    where = machine.removeprefix("Machine: ").split(";")[0] if machine else "an unrecorded machine"
    return (f"Compared with the fingerprints this section held before (recorded on {where}): "
            + "; ".join(f"{setting} equal for {equal} of {compared} models" for setting, (equal, compared)
                        in result.items()) + ".")


def format_results(rows: list[dict], profile: str) -> str:
    lines = [f"One training per model and setting: the {profile} profile's `scenes` models (seed 0), each in a fresh "
             "process on one thread. `default` leaves every library its own kernel choice; `avx2-capped` caps "
             "torch's kernels, oneDNN and MKL at AVX2 (" + ", ".join(
                 f"`{k}={v}`" for k, v in SETTINGS["avx2-capped"].items()) + "). Equal fingerprints on two machines "
             "with the same torch version mean that setting trains the same bits on both; the mIoU is the validation "
             "mIoU of the trained model.",
             "", "| setting | model | mIoU (%) | weights SHA-256 (first 16 hex digits) | processor (torch's kernel level) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['arch']} {r['kind']} | {100 * r['miou']:.2f} | `{r['fingerprint'][:16]}` | "
                     f"{r['cpu']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke-profile sizes, print only (no RESULTS.md)")
    args = parser.parse_args(argv)
    from benchmarks.results import machine_line, read_section, start_load, write_section

    load = start_load()
    before = recorded_fingerprints(read_section(SECTION)) if not args.quick else (None, {})
    profile = "smoke" if args.quick else "cpu"
    rows = []
    for setting in SETTINGS:
        for arch, kind in MODELS:
            rows.append({"setting": setting, "arch": arch, "kind": kind, **run_setting(setting, arch, kind, profile)})
            print(f"{setting} {arch} {kind}: {rows[-1]['fingerprint'][:16]} ({100 * rows[-1]['miou']:.2f}% mIoU)",
                  flush=True)
    text = format_results(rows, profile)
    compared = format_comparison(comparison(rows, before[1]), before[0])
    if compared:
        text += "\n\n" + compared
    print(text)
    if not args.quick:
        write_section(SECTION, machine_line(how="each training in its own process", load=load) + "\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
