"""Smoke tests: the mixture benchmarks' --quick paths run in-process (without touching RESULTS.md)."""


import os

import pytest
import torch

from benchmarks import bench_gmm_fit, bench_loglik, results
from benchmarks.results import write_section


def test_bench_loglik_quick(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RESULTS", tmp_path / "RESULTS.md")
    torch.set_num_threads(2)
    try:
        (res,) = bench_loglik.main(["--quick"])
        # one thread by default, as every benchmark (and the recorded runs); the caller's count is restored
        assert res["threads"] == 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert set(res["times_ms"]) == {"matmul", "ours", "ours+grad", "broadcast"}
    assert res["max_abs_err_ours"] < 1e-3
    assert not (tmp_path / "RESULTS.md").exists()


def test_bench_loglik_report_names_the_rows_it_checked():
    res = bench_loglik.run(n=300, d=4, m=3, min_run_time=0.001, threads=1)
    assert "Accuracy on 300 rows vs a float64 reference" in bench_loglik.report(res, "note")


def test_bench_gmm_fit_quick():
    (res,) = bench_gmm_fit.main(["--quick", "--no-write"])
    rows = res["rows"]
    sk, ours = rows["sklearn (float64)"], rows["ours em (float64)"]
    assert sk["n_iter"] == ours["n_iter"]  # same start, same trajectory
    assert ours["heldout_ll"] == pytest.approx(sk["heldout_ll"], abs=1e-6)


def test_write_section_replaces_only_its_own(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(
        "# Benchmark results\n\nintro\n\n## other\n\nkeep me\n\n"
        "## bench_loglik\n\nold\n\n## last\n\nkeep too\n"
    )
    write_section("bench_loglik", "new body", path)
    text = path.read_text()
    assert "old" not in text and "new body" in text
    assert "keep me" in text and "keep too" in text and text.index("keep me") < text.index("new body")
    write_section("bench_gmm_fit", "appended", path)
    assert path.read_text().rstrip().endswith("appended")


def test_machine_descriptions_count_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert results.machine_note(1).startswith("4-core CPU")
    assert results.machine_line(load=0.5).startswith("Machine: 4-core CPU")
    assert results.load_caveat(5.0) and not results.load_caveat(3.5)     # compared with the 4 usable cores
