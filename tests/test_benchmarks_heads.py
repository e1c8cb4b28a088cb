"""Smoke test of benchmarks/bench_gmm_head.py (tiny sizes, RESULTS.md untouched)."""



from benchmarks import bench_gmm_head


def test_bench_gmm_head_quick_runs_both_paths(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_gmm_head, "RESULTS", tmp_path / "RESULTS.md")
    results = bench_gmm_head.main(["--quick", "--steps", "1", "--inprocess"])
    assert set(results) == {"reference", "ours"}
    for out in results.values():
        assert out["step_s"] > 0 and out["maxrss_bytes"] > 0
    assert not (tmp_path / "RESULTS.md").exists()
