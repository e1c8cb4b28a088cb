

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
