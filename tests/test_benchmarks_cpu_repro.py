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


def test_a_training_in_a_fresh_process_matches_one_in_this_process():
    # the benchmark's premise on one machine: same setting, same bits (smoke sizes, a few seconds)
    here = bench_cpu_repro.train_one("fcn", "gmm_official", "smoke")
    there = bench_cpu_repro.run_setting("default", "fcn", "gmm_official", "smoke")
    assert 0.0 <= here["miou"] <= 1.0
    assert there["fingerprint"] == here["fingerprint"] and there["miou"] == here["miou"]
