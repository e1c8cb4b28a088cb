"""Smoke tests of benchmarks/bench_train_step.py, bench_anomaly_metrics.py and run_all.py (tiny sizes; RESULTS.md
is left alone)."""

from pathlib import Path

from benchmarks import bench_anomaly_metrics, bench_train_step, run_all
from benchmarks.results import write_section

ROOT = Path(__file__).resolve().parents[1]


def test_bench_train_step_quick(capsys):
    before = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    assert bench_train_step.main(["--quick", "--archs", "fcn"]) == 0
    out = capsys.readouterr().out
    for name in ("softmax", "gmm paper", "gmm official"):
        assert f"| fcn | 4 | {name} |" in out
    assert (ROOT / "benchmarks" / "RESULTS.md").read_text() == before


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
