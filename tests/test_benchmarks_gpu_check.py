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
    # an smp network with each head, timed side by side: the GMM rows carry their overhead over softmax
    full = report["checks"]["full_step"]["smp:Segformer:mit_b0"]
    assert list(full) == ["softmax", "gmm paper", "gmm official"] and full["softmax"]["overhead"] == 0.0
    assert all(r["step_ms"] > 0 and r["overhead"] > -1 for r in full.values())
    assert report["complete"] is True
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| train |" in md and md in capsys.readouterr().out


def test_a_failing_check_is_reported_and_fails_the_run(tmp_path, monkeypatch):
    def broken(device, quick):
        raise RuntimeError("boom")

    monkeypatch.setattr(gpu_check, "check_sinkhorn", broken)
    assert gpu_check.main(["--device", "cpu", "--quick", "--only", "loglik", "sinkhorn", "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["checks"]["loglik"]["ok"] and report["checks"]["sinkhorn"]["error"] == "RuntimeError: boom"


def test_a_run_cut_short_keeps_the_report_of_the_checks_done(tmp_path, monkeypatch):
    def killed(device, quick):
        raise KeyboardInterrupt   # as when the machine's time runs out mid-check

    monkeypatch.setattr(gpu_check, "check_sinkhorn", killed)
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(["--device", "cpu", "--quick", "--only", "loglik", "sinkhorn", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["checks"]["loglik"]["ok"] and report["complete"] is False
    assert "sinkhorn" not in report["checks"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_device_is_refused(tmp_path, capsys):
    assert gpu_check.main(["--device", "cuda", "--quick", "--out", str(tmp_path)]) == 2
    assert "sees no CUDA device" in capsys.readouterr().err


def test_notebooks_check_is_opt_in_and_executes_a_notebook(tmp_path):
    assert "notebooks" not in gpu_check.CHECKS
    assert gpu_check.main(["--device", "cpu", "--quick", "--only", "notebooks", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())["checks"]["notebooks"]
    assert result["ok"] and list(result) == ["smoke/01_discriminative_vs_generative", "summary", "ok", "seconds"]
    assert (tmp_path / "notebooks" / "smoke" / "01_discriminative_vs_generative.ipynb").is_file()


def test_a_failing_notebook_fails_the_check_and_the_others_still_run(tmp_path, monkeypatch):
    from gmmseg_core import reproduce as reproduce_module
    from gmmseg_core.profiles import NOTEBOOKS

    calls = []

    def fake_reproduce(profile, notebooks, keep_going=False, **kwargs):
        calls.append((profile, list(notebooks), keep_going))
        result = {"notebooks": {n: {"output": "x", "seconds": 1.0} for n in notebooks}}
        if profile == "smoke":              # the second notebook fails; keep_going ran the others
            err = reproduce_module.NotebookExecutionError(notebooks[1], tmp_path / "x.ipynb", 3, "ValueError", "bad")
            result["notebooks"][notebooks[1]]["error"] = str(err)
            raise reproduce_module.NotebooksFailedError([err], result)
        return result

    monkeypatch.setattr(reproduce_module, "reproduce", fake_reproduce)
    result = gpu_check.check_notebooks("cpu", False, tmp_path)
    assert calls == [("smoke", list(NOTEBOOKS), True), ("gpu", list(NOTEBOOKS), True)]
    assert not result["ok"] and "cell 3: ValueError: bad" in result["error"]
    assert result[f"gpu/{NOTEBOOKS[0]}"]["ok"] and result[f"smoke/{NOTEBOOKS[2]}"]["ok"]
    assert not result[f"smoke/{NOTEBOOKS[1]}"]["ok"]
