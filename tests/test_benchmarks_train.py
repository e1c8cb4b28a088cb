"""Smoke tests of benchmarks/bench_train_step.py, bench_anomaly_metrics.py and run_all.py (tiny sizes; RESULTS.md
is left alone)."""

import argparse
import os
from pathlib import Path

import pytest
import torch

from benchmarks import bench_anomaly_metrics, bench_train_step, run_all
from benchmarks import results as results_module
from benchmarks.results import read_section, write_section
from gmmseg_core.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def test_bench_train_step_quick(capsys):
    before = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    assert bench_train_step.main(["--quick", "--archs", "fcn"]) == 0
    out = capsys.readouterr().out
    for name in ("softmax", "gmm paper", "gmm official"):
        assert f"| fcn | 4 | {name} |" in out
    ops = {name: int(_row(out, name)[-1].strip(" |")) for name in ("softmax", "gmm paper", "gmm official")}
    assert 0 < ops["softmax"] < min(ops["gmm paper"], ops["gmm official"])      # the GMM head dispatches more
    assert (ROOT / "benchmarks" / "RESULTS.md").read_text() == before
    phase_rows = [line for line in out.splitlines() if line.startswith("| fcn | 4 | gmm ") and line.count("|") == 8]
    assert len(phase_rows) == 2                                   # one per GMM variant, a cell per phase


def test_step_times_each_phase():
    step = bench_train_step.make_step("fcn", {"variant": "paper"}, "gmm", 4, 4, 4, 2, 1)
    spent = step(torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32)))
    assert tuple(spent) == bench_train_step.PHASES and all(t > 0 for t in spent.values())


def test_phase_extras_pair_each_cycle_with_the_softmax_cycle_it_ran_beside():
    times = {"softmax": [10, 10, 20, 20, 30, 30], "gmm paper": [14, 14, 25, 25, 33, 33]}
    phases = {"softmax": {"forward": [4, 4, 8, 8, 12, 12], "update_head": [0] * 6},
              "gmm paper": {"forward": [5, 5, 10, 10, 13, 13], "update_head": [3, 1, 3, 1, 3, 1]}}
    per = bench_train_step.summarise(times, {k: v["update_head"] for k, v in phases.items()}, 2, phases)
    assert per["gmm paper"]["extra_phase_s"] == {"forward": 1, "update_head": 2}     # cycle extras 1, 2, 1
    assert per["softmax"]["extra_phase_s"] == {"forward": 0, "update_head": 0}
    phased = dict(per["gmm paper"], extra_phase_s=dict.fromkeys(bench_train_step.PHASES, 0.0015))
    text = _format({("fcn", 4): {"softmax": per["softmax"], "gmm paper": phased}})
    assert "| fcn | 4 | gmm paper | +1.50 | +1.50 | +1.50 | +1.50 |" in text
    assert "Where the GMM head's extra time goes" not in _format({("fcn", 4): {"softmax": _result(40.0, 0.0, 40.0)}})


def test_bench_anomaly_metrics_quick_agrees_with_sklearn():
    stream = bench_anomaly_metrics.measure("stream", 20_000)
    exact = bench_anomaly_metrics.measure("exact", 20_000)
    ref = bench_anomaly_metrics.measure("sklearn", 20_000)
    for k in ("auroc", "ap", "fpr95"):
        assert abs(exact[k] - ref[k]) < 1e-9 and abs(stream[k] - ref[k]) < 1e-3


def test_run_all_discovers_benchmarks_and_update_section(tmp_path):
    assert {"bench_train_step", "bench_anomaly_metrics"} <= set(run_all.discover())
    results = tmp_path / "RESULTS.md"
    results.write_text("# R\n\n## other\n\nkeep me\n")
    write_section("bench_x", "first", results)
    write_section("bench_x", "second", results)
    text = results.read_text()
    assert "keep me" in text and "second" in text and "first" not in text and text.count("## bench_x") == 1
    assert read_section("bench_x", results) == "second" and read_section("other", results) == "keep me"
    assert read_section("bench_y", results) is None and read_section("bench_x", tmp_path / "none.md") is None


def _result(step_ms, update_ms, softmax_ms):
    return {"step_s": step_ms / 1000, "update_s": update_ms / 1000, "overhead": step_ms / softmax_ms - 1}


def _format(results, repeated=None):
    args = argparse.Namespace(
        device="cpu", batch_size=2, image_size=(32, 32), widths=[4], quick=True, profile="cpu", profile_width=4,
        embed_dim=4, num_components=2, update_interval=5, threads=1, reps=10, warmup=1)
    return bench_train_step.format_results(results, args, repeated)


def _row(text, name):
    return next(line for line in text.splitlines() if line.startswith(f"| fcn | 4 | {name} |")).split(" | ")


def test_rest_column_compares_steps_without_update_head_on_both_sides():
    per = {"softmax": _result(40.0, 0.5, 40.0), "gmm paper": _result(50.0, 4.0, 40.0),
           "gmm official": _result(48.0, 2.0, 40.0)}
    text = _format({("fcn", 4): per})
    assert _row(text, "softmax")[5] == "+0.0"
    assert _row(text, "gmm paper")[5] == "+6.5"          # (50 - 4) - (40 - 0.5)
    assert _row(text, "gmm official")[5] == "+6.5"       # (48 - 2) - (40 - 0.5)


def test_overhead_pairs_each_cycle_with_the_softmax_cycle_it_ran_beside():
    # cycles of 2 steps; the machine slows down in the third cycle, for both heads alike
    times = {"softmax": [10, 10, 20, 20, 30, 30], "gmm paper": [25, 25, 21, 21, 33, 33]}
    update = {"softmax": [0] * 6, "gmm paper": [1, 3, 1, 3, 1, 3]}
    per = bench_train_step.summarise(times, update, 2)["gmm paper"]
    assert per["overhead"] == pytest.approx(0.1)             # paired (1.5, 0.05, 0.1), not 25 / 20 - 1
    assert per["overhead_quartiles"] == pytest.approx((0.075, 0.8))
    assert per["step_s"] == 25 and per["update_s"] == 2


def test_verdict_marks_a_target_inside_the_range_over_cycles():
    verdict = bench_train_step.target_verdict
    assert verdict({"overhead": 0.10, "overhead_quartiles": (0.08, 0.12)}) == "yes"
    assert verdict({"overhead": 0.14, "overhead_quartiles": (0.12, 0.16)}) == "yes (edge)"
    assert verdict({"overhead": 0.16, "overhead_quartiles": (0.14, 0.18)}) == "**no** (edge)"
    assert verdict({"overhead": 0.20, "overhead_quartiles": (0.18, 0.22)}) == "**no**"


def test_section_places_each_variants_e_step_in_the_phase_that_runs_it(monkeypatch):
    from gmmseg_core.heads import GMMHead

    phase, seen = {"now": None}, set()
    e_step = GMMHead._e_step

    def spy(self, *args, **kwargs):
        seen.add(phase["now"])
        return e_step(self, *args, **kwargs)

    monkeypatch.setattr(GMMHead, "_e_step", spy)
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32))
    for variant in ("paper", "official"):
        model = build_model("fcn", "gmm", num_classes=4, width=4,
                            head_kwargs=dict(variant=variant, embed_dim=4, num_components=2))
        phase["now"] = (variant, "forward")
        out = model.forward_train(images, labels)
        out["loss"].backward()
        phase["now"] = (variant, "update_head")
        model.update_head(out["features"], labels)
    text = _format({("fcn", 4): {"softmax": _result(40.0, 0.0, 40.0)}})
    assert seen == {("paper", "update_head"), ("official", "forward")}
    assert "for the official variant also its component loss and the Sinkhorn E-step" in " ".join(text.split())
    assert "\"update_head\" is the EM bookkeeping after the step (memory push, M-step amortised; for the paper " \
           "variant also the Sinkhorn E-step)" in " ".join(text.split())


def test_machine_line_holds_the_load_before_the_run(monkeypatch):
    load, written = {"now": 0.3}, []

    def measured(*args, **kwargs):
        load["now"] = 6.5                        # the benchmark's own work
        return {("fcn", 8): {"softmax": _result(40.0, 0.0, 40.0), "gmm paper": _result(44.0, 2.0, 40.0),
                             "gmm official": _result(44.0, 2.0, 40.0)}}

    monkeypatch.setattr(os, "getloadavg", lambda: (load["now"],) * 3)
    monkeypatch.setattr(bench_train_step, "run", measured)
    monkeypatch.setattr(results_module, "write_section", lambda name, body, *a: written.append((name, body)))
    assert bench_train_step.main(["--archs", "fcn", "--widths", "8", "--repeats", "0"]) == 0
    (name, body), = written
    assert name == "bench_train_step" and "load average at the start 0.3 (" in body and "6.5" not in body


def test_anomaly_metrics_machine_line_holds_the_load_before_the_run(monkeypatch):
    load, written = {"now": 0.3}, []

    def measured(mode, n):
        load["now"] = 6.5
        return dict(mode=mode, n=n, seconds=1.0, peak_rss_mb=700.0, baseline_rss_mb=600.0, auroc=0.9, ap=0.5,
                    fpr95=0.4)

    monkeypatch.setattr(os, "getloadavg", lambda: (load["now"],) * 3)
    monkeypatch.setattr(bench_anomaly_metrics, "in_subprocess", measured)
    monkeypatch.setattr(results_module, "write_section", lambda name, body, *a: written.append((name, body)))
    assert bench_anomaly_metrics.main([]) == 0
    (name, body), = written
    assert name == "bench_anomaly_metrics" and "load average at the start 0.3 (" in body and "6.5" not in body
    # the exact paths' memory column holds their input too, not only the metric's own
    assert "exact and sklearn hold all of them" in " ".join(body.split())


def test_runs_with_other_settings_keep_the_recorded_section_and_name_their_gpu(monkeypatch):
    written, threads = [], torch.get_num_threads()
    monkeypatch.setattr(bench_train_step, "run", lambda *a, **k: {
        ("fcn", 8): {"softmax": _result(40.0, 0.0, 40.0), "gmm paper": _result(44.0, 2.0, 40.0),
                     "gmm official": _result(44.0, 2.0, 40.0)}})
    monkeypatch.setattr(results_module, "write_section", lambda name, body, *a: written.append((name, body)))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    repeats = []
    monkeypatch.setattr(bench_train_step, "repeat_in_fresh_processes", lambda n, threads, archs, width, *sizes: (
        repeats.append((n, width)) or {"fcn": {"gmm paper": [0.1] * n, "gmm official": [0.12] * n}}))
    try:
        for argv in (["--threads", "2", "--repeats", "0"], ["--threads", "2", "--device", "cuda", "--profile", "gpu"],
                     []):
            assert bench_train_step.main(["--archs", "fcn", "--widths", "8", *argv]) == 0
    finally:
        torch.set_num_threads(threads)
    assert repeats == [(5, 64), (5, 8)]                       # the profile's width, 5 runs by default
    assert "Run to run" not in written[0][1] and "| fcn | gmm official | +12.0%" in written[2][1]
    assert [name for name, _ in written] == ["bench_train_step (2 threads)",
                                             "bench_train_step (cuda, gpu profile, 2 threads)", "bench_train_step"]
    from gmmseg_core._machine import cpu_description

    assert "Machine: " in written[1][1] and f"CPU ({cpu_description()}) and one Test GPU, torch" in written[1][1]
    assert "Test GPU" not in written[0][1]


def test_run_all_runs_each_benchmark_and_reports_failures(monkeypatch, capsys):
    calls = []

    def call(cmd, cwd=None):
        calls.append(cmd[1:])
        return 1 if cmd[-2:] == ["benchmarks.bench_loglik", "--quick"] else 0

    monkeypatch.setattr(run_all.subprocess, "call", call)
    assert run_all.main(["--quick", "--only", "bench_loglik", "bench_data"]) == 1
    assert calls == [["-m", "benchmarks.bench_data", "--quick"], ["-m", "benchmarks.bench_loglik", "--quick"]]
    assert "failed: ['bench_loglik']" in capsys.readouterr().err
    assert run_all.main(["--only", "bench_nothing"]) == 2 and len(calls) == 2


def test_run_to_run_table_decides_the_profile_width_on_the_median_over_runs():
    # the main run says 14% and 16%; over five runs the medians are 16% and 14%
    per = {"softmax": _result(40.0, 0.0, 40.0), "gmm paper": _result(45.6, 2.0, 40.0),
           "gmm official": _result(46.4, 1.0, 40.0)}
    repeated = {"fcn": {"gmm paper": [0.16, 0.12, 0.18, 0.16, 0.15], "gmm official": [0.14, 0.2, 0.13, 0.14, 0.1]}}
    text = _format({("fcn", 4): per}, repeated)
    assert ("| fcn | gmm paper | +16.0%, +12.0%, +18.0%, +16.0%, +15.0% | +16.0% | +12.0 to +18.0% | **no** |"
            in text)
    assert "| fcn | gmm official | +14.0%, +20.0%, +13.0%, +14.0%, +10.0% | +14.0% | +10.0 to +20.0% | yes |" in text
    assert "target missed at every width measured" in text
    assert "Run to run" not in _format({("fcn", 4): per}) and "target met at width 4" not in _format({("fcn", 4): per})
    repeated["fcn"]["gmm paper"] = [0.1] * 5
    assert "target met at width 4 (median over 5 runs)." in _format({("fcn", 4): per}, repeated)


def test_repeats_run_in_fresh_processes():
    sizes = ((32, 32), 2, 4, 2, 1, 2, 1, "cpu")         # image size, batch, D, K, M-step interval, reps, warm-up
    repeated = bench_train_step.repeat_in_fresh_processes(2, 1, ["fcn"], 4, *sizes)
    assert set(repeated) == {"fcn"} and set(repeated["fcn"]) == {"gmm paper", "gmm official"}
    assert all(len(values) == 2 and all(v > -1 for v in values) for values in repeated["fcn"].values())
