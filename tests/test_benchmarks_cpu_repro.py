"""benchmarks/bench_cpu_repro.py: the weight fingerprint and a training's reproducibility on one machine."""

import torch

from benchmarks import bench_cpu_repro


def test_fingerprint_sees_every_bit_and_ignores_key_order():
    state = {"a.weight": torch.arange(6.0).reshape(2, 3), "a.num_batches_tracked": torch.tensor(3)}
    same = {"a.num_batches_tracked": torch.tensor(3), "a.weight": torch.arange(6.0).reshape(2, 3)}
    assert bench_cpu_repro.state_fingerprint(state) == bench_cpu_repro.state_fingerprint(same)
    flipped = dict(state, **{"a.weight": state["a.weight"].clone()})
    flipped["a.weight"].view(torch.int32)[1, 2] ^= 1                  # one bit of one value
    assert bench_cpu_repro.state_fingerprint(flipped) != bench_cpu_repro.state_fingerprint(state)
    reshaped = dict(state, **{"a.weight": state["a.weight"].reshape(3, 2)})    # same bytes, other shape
    assert bench_cpu_repro.state_fingerprint(reshaped) != bench_cpu_repro.state_fingerprint(state)
    half = {"w": torch.ones(3, dtype=torch.bfloat16), "empty": torch.zeros(0), "flag": torch.tensor(True)}
    assert len(bench_cpu_repro.state_fingerprint(half)) == 64                # dtypes numpy lacks, empty tensors


def test_a_training_in_a_fresh_process_matches_one_in_this_process():
    # the benchmark's premise on one machine: same setting, same bits (smoke sizes, a few seconds)
    here = bench_cpu_repro.train_one("fcn", "gmm_official", "smoke")
    there = bench_cpu_repro.run_setting("default", "fcn", "gmm_official", "smoke")
    assert 0.0 <= here["miou"] <= 1.0
    assert there["fingerprint"] == here["fingerprint"] and there["miou"] == here["miou"]


def test_a_run_says_under_which_settings_it_agrees_with_the_section_it_replaces():
    body = "\n".join([
        "Machine: 2-core CPU (Some CPU, AVX512), torch 2.14.1, 2026-11-27; 1-minute load average at the start 0.5.",
        "", bench_cpu_repro.format_results([
            dict(setting="default", arch="fcn", kind="softmax", miou=0.5, fingerprint="a" * 64, cpu="Some CPU, AVX512"),
            dict(setting="avx2-capped", arch="fcn", kind="softmax", miou=0.5, fingerprint="b" * 64, cpu="x, AVX2"),
        ], "cpu")])
    machine, recorded = bench_cpu_repro.recorded_fingerprints(body)
    assert machine.startswith("Machine: 2-core CPU (Some CPU")
    assert recorded == {("default", "fcn softmax"): "a" * 16, ("avx2-capped", "fcn softmax"): "b" * 16}
    now = [dict(setting="default", arch="fcn", kind="softmax", fingerprint="c" * 64),      # another machine's
           dict(setting="avx2-capped", arch="fcn", kind="softmax", fingerprint="b" * 64),
           dict(setting="avx2-capped", arch="segformer", kind="softmax", fingerprint="d" * 64)]   # not recorded
    result = bench_cpu_repro.comparison(now, recorded)
    assert result == {"default": (0, 1), "avx2-capped": (1, 1)}
    sentence = bench_cpu_repro.format_comparison(result, machine)
    assert "recorded on 2-core CPU (Some CPU, AVX512), torch 2.14.1, 2026-11-27)" in sentence
    assert "default equal for 0 of 1 models; avx2-capped equal for 1 of 1 models" in sentence
    assert bench_cpu_repro.format_comparison({}, machine) == ""
    assert bench_cpu_repro.recorded_fingerprints(None) == (None, {})
