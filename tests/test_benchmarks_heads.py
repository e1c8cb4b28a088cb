"""Tests of benchmarks/bench_gmm_head.py (tiny sizes, RESULTS.md untouched)."""

import argparse
import os
import subprocess

import pytest
import torch
import torch.nn.functional as F

from benchmarks import bench_gmm_head, gpu_check
from gmmseg_core.heads import GMMHead


def test_bench_gmm_head_quick_runs_both_paths(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_gmm_head, "RESULTS", tmp_path / "RESULTS.md")
    results = bench_gmm_head.main(["--quick", "--steps", "1", "--inprocess"])
    assert set(results) == {"reference", "ours"}
    for out in results.values():
        assert out["step_s"] > 0 and out["maxrss_bytes"] > 0
    assert not (tmp_path / "RESULTS.md").exists()


def test_both_paths_run_their_training_step_equally_often(monkeypatch):
    calls = {"reference": 0, "ours": 0}
    for path, cls in (("reference", bench_gmm_head.ReferenceHead), ("ours", GMMHead)):
        forward = cls.forward

        def counted(self, *args, _path=path, _forward=forward, **kwargs):
            calls[_path] += 1
            return _forward(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", counted)
    for path in calls:
        bench_gmm_head.run_path(path, bench_gmm_head.QUICK, torch.device("cpu"), steps=2, warmup=3)
    assert calls == {"reference": 5, "ours": 5}        # the same untimed warm-up on both sides


def _can_reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _can_reset_peak_rss(), reason="needs Linux's resettable peak RSS")
def test_in_process_peaks_are_each_paths_own(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_gmm_head, "RESULTS", tmp_path / "RESULTS.md")
    rss = bench_gmm_head._mark_rss()
    spike = torch.ones(2 ** 26)                        # 256 MiB, freed before the paths run (earlier work's peak)
    del spike
    results = bench_gmm_head.main(["--quick", "--inprocess", "--steps", "1"])
    for out in results.values():
        assert out["maxrss_bytes"] < rss + 2 ** 27


def _parts(step_s, embed_s, peak):
    return dict(loglik_fwd_s=0.01, fwd_bwd_s=step_s, e_push_s=0.01, m_step_s=0.01, step_s=step_s, embed_s=embed_s,
                gmm_step_s=step_s - embed_s, matmul_s=0.001, maxrss_bytes=peak, step_added_rss_bytes=peak / 2)


def test_section_keeps_a_decimal_for_ratios_below_ten():
    results = {"reference": _parts(1.6, 0.16, 2 ** 31), "ours": _parts(0.8, 0.1, 2 ** 30)}
    args = argparse.Namespace(device="cpu", threads=1, steps=3, warmup=2, rounds=2, inprocess=False)
    text = bench_gmm_head._section(results, bench_gmm_head.QUICK, args)
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("|")}
    assert rows["| **whole head per step**"].endswith("| 2.0x |")
    assert rows["| of which the embedding (fwd + bwd; same layers, ours channels-last)"].endswith("| 1.6x |")
    assert rows["| peak RSS added by the training step (above the set-up: torch, data, memory bank)"].endswith(
        "| 2.0x less |")
    assert "Whole head per step: 2.0x faster" in text and "is 1.6x faster in ours" in text


def test_in_process_section_does_not_speak_of_worker_processes():
    results = {"reference": _parts(1.6, 0.16, 2 ** 31), "ours": _parts(0.8, 0.1, 2 ** 30)}
    args = argparse.Namespace(device="cpu", threads=1, steps=3, warmup=2, rounds=2, inprocess=True)
    text = bench_gmm_head._section(results, bench_gmm_head.QUICK, args)
    assert "worker process" not in text and "both paths in this process" in text
    assert "best of 3 runs per part, after 2 untimed," in text


def test_gpu_check_reports_each_paths_step_memory_on_the_cpu():
    out = gpu_check.check_gmm_head("cpu", quick=True)
    ref, ours = (out[p]["step_added_rss_bytes"] / 2 ** 30 for p in ("reference", "ours"))
    assert out["summary"].endswith(f"peak RSS added by the step: {ref:.2f} vs {ours:.2f} GiB")




def test_in_process_run_uses_the_thread_count_it_reports(monkeypatch, tmp_path):
    monkeypatch.setattr(bench_gmm_head, "RESULTS", tmp_path / "RESULTS.md")
    seen = []

    def timed(path, cfg, device, steps, warmup):
        seen.append(torch.get_num_threads())
        return _parts(1.0, 0.1, 2 ** 30)

    monkeypatch.setattr(bench_gmm_head, "run_path", timed)
    torch.set_num_threads(2)
    try:
        bench_gmm_head.main(["--quick", "--inprocess", "--threads", "1"])
        assert seen == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_section_reports_the_load_from_before_the_run(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench_gmm_head, "RESULTS", tmp_path / "RESULTS.md")
    load = {"now": 0.3}

    def timed(path, cfg, device, steps, warmup):
        load["now"] = 9.5                              # the benchmark's own work
        return _parts(1.0, 0.1, 2 ** 30)

    run = subprocess.run

    def uptime(cmd, **kwargs):
        if cmd != ["uptime"]:
            return run(cmd, **kwargs)
        return subprocess.CompletedProcess(cmd, 0, stdout=f"load average: {load['now']:.2f}\n", stderr="")

    monkeypatch.setattr(os, "getloadavg", lambda: (load["now"],) * 3)
    monkeypatch.setattr(bench_gmm_head.subprocess, "run", uptime)
    monkeypatch.setattr(bench_gmm_head, "run_path", timed)
    bench_gmm_head.main(["--quick", "--inprocess", "--threads", "1"])
    text = capsys.readouterr().out
    assert "load average: 0.30`" in text and "9.5" not in text and "exceeded the core count" not in text


def _max_diff(a, b):
    return float((a - b).abs().max())


def test_reference_head_does_the_work_of_ours():
    """The released-style path computes what ``GMMHead(variant="official")`` computes, so the timings compare
    like with like: loss, E-step, memory push and M-step agree (float64, same parameters, a full memory)."""
    cfg = dict(bench_gmm_head.QUICK, height=32, width=32, classes=5, components=3, dim=8, memory=64)
    C, K, D, M = cfg["classes"], cfg["components"], cfg["dim"], cfg["memory"]
    features, labels = bench_gmm_head._data(cfg, torch.device("cpu"))
    features = features.double()
    ref = bench_gmm_head.ReferenceHead(cfg["in_channels"], C, K, D, M).double()
    ours = GMMHead(cfg["in_channels"], C, embed_dim=D, num_components=K, variant="official", memory_size=M).double()
    with torch.no_grad():
        ours.embed[0].weight.copy_(ref.projection[0].weight)
        ref.feat_norm.weight.copy_(torch.rand(D) + 0.5)
        ours.embed_norm.weight.copy_(ref.feat_norm.weight)
        ref.mask_norm.weight.copy_(torch.rand(C) + 0.5)
        ours.class_normalizer.weight.copy_(ref.mask_norm.weight)
        ref.diagonal.copy_(torch.rand(C, K, D) * 0.3 + 0.2)                 # standard deviations
        ours.means.copy_(ref.means)
        ours.variances.copy_(ref.diagonal ** 2)
        ours.memory.copy_(ref.queue.transpose(1, 2))
        ours.memory_count.fill_(M)
        ours.refresh_memory_statistics()

    loss_ref, emb, gt, qs = ref(features, labels)
    logits, comp = ours(features, return_component_logp=True)
    loss_ours = F.cross_entropy(logits, labels, ignore_index=255) + ours.extra_loss(features, labels,
                                                                                    component_logp=comp)
    assert abs(loss_ours.item() - loss_ref.item()) < 1e-10

    ref.enqueue(emb, gt, qs)
    ours.num_updates.fill_(1)                                               # no M-step in this update
    ours.update(features, labels, None)
    assert torch.equal(ours.memory_ptr, ref.queue_ptr)                     # the same rows per ring, from 0
    assert _max_diff(ours.memory, ref.queue.transpose(1, 2)) < 1e-12

    ref.m_step(list(range(C)))
    ours.m_step(torch.ones(C, dtype=torch.bool))
    assert _max_diff(ours.means, ref.means) < 1e-12 and _max_diff(ours.variances, ref.diagonal ** 2) < 1e-12
