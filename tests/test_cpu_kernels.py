"""The compiled CPU kernels against the torch code they replace (which every other device runs)."""

import contextlib
import copy
import os
import subprocess
import sys

import pytest
import torch

from gmmseg_core import cpu_kernels, mixture
from gmmseg_core.heads import GMMHead


def _groups_and_scores(n, K, G, dtype, seed=0, absent=(1,)):
    g = torch.Generator().manual_seed(seed)
    groups = torch.randint(0, G, (n,), generator=g)
    for a in absent:                                   # groups without rows
        groups[groups == a] = 0
    scores = torch.randn(K, n, generator=g, dtype=dtype).T * 0.4 - 1.0      # (n, K), the head's (K, n).T layout
    return groups, scores


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_iters", [1, 3])
@pytest.mark.parametrize("scale", [False, True])
def test_sinkhorn_kernel_equals_the_torch_steps(dtype, n_iters, scale):
    G = 5
    groups, scores = _groups_and_scores(700, 3, G, dtype)
    scores = scores * (1 + groups[:, None])            # groups of different spreads: scaling matters
    with cpu_kernels.disabled():
        if scale:
            largest = torch.zeros(G, dtype=dtype).scatter_reduce_(0, groups, scores.abs().amax(1), "amax")
            expected = mixture.grouped_sinkhorn(scores / largest.clamp_min(torch.finfo(dtype).tiny)[groups, None],
                                                groups, G, epsilon=0.05, n_iters=n_iters)
        else:
            expected = mixture.grouped_sinkhorn(scores, groups, G, epsilon=0.05, n_iters=n_iters)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-13)
    for layout in (scores, scores.contiguous()):       # any strides
        plan, component = cpu_kernels.grouped_sinkhorn(layout, groups, G, 0.05, n_iters, scale=scale)
        assert plan.dtype == dtype and plan.shape == scores.shape
        torch.testing.assert_close(plan, expected, **tol)
        assert torch.equal(component, expected.max(1).indices)
        none, assigned = cpu_kernels.grouped_sinkhorn(layout, groups, G, 0.05, n_iters, scale=scale, assign=True)
        assert none is None and torch.equal(assigned, component)


def test_sinkhorn_kernel_declines_what_the_torch_steps_solve_another_way():
    groups, scores = _groups_and_scores(50, 3, 2, torch.float32)
    for bad in (float("inf"), float("nan")):
        odd = scores.clone()
        odd[7, 1] = bad
        assert cpu_kernels.grouped_sinkhorn(odd, groups, 2, 0.05, 3) is None
    # a column whose mass underflows float32 (exp(-100)), which float64 still holds
    spread = torch.zeros(4, 2)
    spread[:, 1] = -40.0
    assert cpu_kernels.grouped_sinkhorn(spread, torch.zeros(4, dtype=torch.long), 1, 0.4, 3) is None
    assert cpu_kernels.grouped_sinkhorn(spread.double(), torch.zeros(4, dtype=torch.long), 1, 0.4, 3) is not None


def test_sinkhorn_kernel_names_a_group_outside_the_range():
    with pytest.raises(ValueError, match=r"groups must lie in \[0, 2\), got values from 0 to 2"):
        mixture.grouped_sinkhorn(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0]), 2)


@pytest.mark.parametrize("size, ignore_index", [((8, 12), 255), ((7, 9), 1)])   # a strided view; a resize
def test_own_class_table_equals_the_torch_gather(size, ignore_index):
    g = torch.Generator().manual_seed(2)
    head = GMMHead(6, 4, embed_dim=4, num_components=3, ignore_index=ignore_index)
    features = torch.randn(2, 6, 4, 6, generator=g)
    labels = torch.randint(-1, 6, (2,) + size, generator=g)            # -1, 4, 5: outside the classes
    labels[0, 0, 0] = 255
    with torch.no_grad():
        cache = head._cached(features)
    got = head._assignments(dict(cache), labels)
    with cpu_kernels.disabled():
        expected = head._assignments(dict(cache), labels)
    for key in ("idx", "labels", "image", "logp", "component"):
        assert torch.equal(got[key], expected[key]), key
    assert got["idx"].numel() > 0 and not (got["labels"] == ignore_index).any()


def _push_inputs(n, C, K, D, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (n,), generator=g)
    component = torch.randint(0, K, (n,), generator=g)
    x = torch.randn(n + 5, D, generator=g)
    rows = torch.randperm(n + 5, generator=g)[:n]
    keep = torch.rand(n, generator=g) < 0.7
    resp = torch.softmax(torch.randn(K, n, generator=g), 0).T
    return labels, component, x, rows, keep, resp


@pytest.mark.parametrize("variant, max_per_component", [("paper", None), ("paper", 3), ("official", 20),
                                                        ("official", 2), ("official", None)])
def test_a_head_pushes_the_same_rows_with_the_kernels_as_with_torch(variant, max_per_component):
    C, K, D = 3, 2, 4
    head = GMMHead(6, C, embed_dim=D, num_components=K, memory_size=9, variant=variant,
                   max_per_component=max_per_component)
    reference = copy.deepcopy(head)
    for step in range(6):          # rings of 9 take up to 9 (or the cap), wrap around, the running sums follow
        labels, component, x, rows, keep, resp = _push_inputs(120, C, K, D, step)   # ~14 rows a ring
        resp = resp if head.memory_resp is not None else None
        head._push(x, rows, labels, resp, component, keep)
        with cpu_kernels.disabled():
            reference._push(x, rows, labels, resp, component, keep)
        for name in ("memory", "memory_ptr", "memory_count", "memory_resp"):
            if getattr(head, name) is not None:
                assert torch.equal(getattr(head, name), getattr(reference, name)), (step, name)
        if head.memory_sum is not None:
            torch.testing.assert_close(head.memory_sum, reference.memory_sum, rtol=0, atol=1e-12)
            torch.testing.assert_close(head.memory_sumsq, reference.memory_sumsq, rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_a_training_step_with_the_kernels_equals_one_with_torch(variant):
    # one step: over several, the Sinkhorn plans' rounding differences (~1e-7) flip the odd near-tie between two
    # components (equipartition makes them common), and the runs then drift apart as any two runs would
    from gmmseg_core.models import build_model

    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32))
    labels[:, :4] = 255
    states = []
    for use_kernels in (True, False):
        torch.manual_seed(0)
        model = build_model("fcn", "gmm", num_classes=4, width=4,
                            head_kwargs=dict(variant=variant, embed_dim=4, num_components=2, update_interval=1))
        with contextlib.nullcontext() if use_kernels else cpu_kernels.disabled():
            out = model.forward_train(images, labels)
            out["loss"].backward()
            torch.optim.SGD(model.parameters(), lr=0.1).step()
            model.update_head(out["features"], labels)
        assert int(model.head.memory_count.sum()) > 0
        states.append((out["loss"].detach(), model.state_dict()))
    (loss, got), (expected_loss, expected) = states
    assert torch.equal(loss, expected_loss)
    for name, value in got.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(value, expected[name]), name


def test_push_kernel_names_a_ring_outside_the_memory_and_writes_nothing():
    memory = torch.zeros(4, 3, 2)
    ptr, count = torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long)
    labels, component = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 0])       # ring 2 * 2 + 0 = 4 of 4
    with pytest.raises(ValueError, match=r"ring indices labels \* 2 \+ component must lie in \[0, 4\)"):
        cpu_kernels.push_evenly_spaced(memory, ptr, count, torch.ones(3, 2), None, labels, component, 2, None, 3)
    assert not memory.any() and not ptr.any() and not count.any()
    with pytest.raises(ValueError, match=r"cap must be in \[1, 3\] \(the ring size\), got 4"):
        cpu_kernels.push_evenly_spaced(memory, ptr, count, torch.ones(3, 2), None, labels, component, 2, None, 4)


def test_the_kernels_serve_cpu_tensors_of_numpy_dtypes_only_and_can_be_switched_off():
    assert cpu_kernels.available(torch.zeros(2), torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.long))
    assert not cpu_kernels.available(torch.zeros(2, dtype=torch.float16))
    assert not cpu_kernels.available(torch.zeros(2, dtype=torch.bfloat16))
    assert not cpu_kernels.available(torch.zeros(2, device="meta"))
    with cpu_kernels.disabled():
        assert not cpu_kernels.available(torch.zeros(2))
    assert cpu_kernels.available(torch.zeros(2))
    env = dict(os.environ, GMMSEG_CPU_KERNELS="0")
    out = subprocess.run([sys.executable, "-c", "import torch; from gmmseg_core import cpu_kernels; "
                          "print(cpu_kernels.available(torch.zeros(1)))"], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_without_numba_the_torch_path_runs_and_a_warning_says_why():
    code = ("import sys, warnings, torch; sys.modules['numba'] = None\n"
            "from gmmseg_core import cpu_kernels, mixture\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    plan = mixture.grouped_sinkhorn(torch.randn(6, 2), torch.tensor([0, 1, 0, 1, 1, 0]), 2)\n"
            "    mixture.grouped_sinkhorn(torch.randn(6, 2), torch.tensor([0, 1, 0, 1, 1, 0]), 2)\n"
            "message = str(caught[0].message)\n"
            "print(len(caught), message.startswith('numba could not be imported'), 'torch path' in message,"
            " tuple(plan.shape))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1 True True (6, 2)"
