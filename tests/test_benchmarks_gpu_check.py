"""The accelerator check script: every check runs at tiny sizes on the CPU and writes its report."""

import json

import pytest
import torch

from benchmarks import gpu_check


def test_quick_run_on_cpu_writes_a_passing_report(tmp_path, capsys):
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(report["checks"]) == list(gpu_check.CHECKS)
    for name, result in report["checks"].items():
        assert result["ok"], (name, result)
    # the CPU compared with itself: the head's state must agree exactly
    for variant in ("paper", "official"):
        assert report["checks"]["head"][variant]["means"] == 0.0
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| train |" in md and md in capsys.readouterr().out


def test_a_failing_check_is_reported_and_fails_the_run(tmp_path, monkeypatch):
    def broken(device, quick):
        raise RuntimeError("boom")

    monkeypatch.setattr(gpu_check, "check_sinkhorn", broken)
    assert gpu_check.main(["--device", "cpu", "--quick", "--only", "loglik", "sinkhorn", "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["checks"]["loglik"]["ok"] and report["checks"]["sinkhorn"]["error"] == "RuntimeError: boom"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_device_is_refused(tmp_path, capsys):
    assert gpu_check.main(["--device", "cuda", "--quick", "--out", str(tmp_path)]) == 2
    assert "sees no CUDA device" in capsys.readouterr().err
