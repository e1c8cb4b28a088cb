import os

from benchmarks import bench_data
from benchmarks.results import write_section


def test_quick_benchmark_runs_without_writing_results(tmp_path, monkeypatch):
    target = tmp_path / "RESULTS.md"
    target.write_text("# Benchmark results\n\n## other\n\nkept\n")
    monkeypatch.setattr(bench_data, "RESULTS", target)
    text = bench_data.main(["--quick"])
    assert text.startswith("## bench_data") and "| scenes | 32x64 |" in text
    assert target.read_text() == "# Benchmark results\n\n## other\n\nkept\n"


def test_write_section_replaces_only_its_own(tmp_path):
    target = tmp_path / "RESULTS.md"
    target.write_text("# R\n\n## a\n\nx\n\n## bench_data\n\nold\n\n## b\n\ny\n")
    write_section("bench_data", "new\n", target)
    assert target.read_text() == "# R\n\n## a\n\nx\n\n## bench_data\n\nnew\n\n## b\n\ny\n"
    write_section("bench_data", "newer\n", target)
    assert "newer" in target.read_text() and "## b\n\ny" in target.read_text()


def _fake_machine(monkeypatch, cores=8):
    """A load average that rises once the measurements start (their own work), on a ``cores``-core machine."""
    load = {"now": 0.3}
    monkeypatch.setattr(os, "getloadavg", lambda: (load["now"],) * 3)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    return load


def test_section_reports_the_machines_cores_and_the_load_before_the_run(monkeypatch):
    load = _fake_machine(monkeypatch)
    keys = ("generate", "generate_cpu", "cold_w0", "cold_w2", "warm_w0", "warm_w2", "warm_aug_w0")

    def measured(*args, **kwargs):
        load["now"] = 7.5
        return dict.fromkeys(keys, 100.0)

    monkeypatch.setattr(bench_data, "_available", lambda name: True)
    monkeypatch.setattr(bench_data, "bench_dataset", measured)
    monkeypatch.setattr(bench_data, "bench_normalize",
                        lambda *a: dict(numpy_ms=2.0, ours_ms=1.0, bitwise_equal=True))
    text = bench_data.main(["--quick", "--no-write"])
    assert "Machine: 8-core CPU" in text
    assert "load average at the start 0.3." in text and "7.5" not in text
    assert "a `w2` rate includes starting its two worker processes" in " ".join(text.split())
