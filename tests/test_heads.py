"""SoftmaxHead and GMMHead: likelihoods against torch.distributions, EM bookkeeping against naive references."""

import copy
import math
import os
import pickle
import re
import socket
import tempfile
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from gmmseg_core import mixture
from gmmseg_core.heads import VARIANT_DEFAULTS, GMMHead, SoftmaxHead
from gmmseg_core.memory import ranks_in_group, ring_push, select_evenly_spaced

C, K, D, CF = 3, 2, 4, 6


def _head(**kw):
    kw = dict(dict(embed_dim=D, num_components=K, memory_size=16), **kw)
    return GMMHead(CF, C, **kw)


def _randomise(head, seed=1):
    g = torch.Generator().manual_seed(seed)
    head.means.copy_(torch.randn(head.means.shape, generator=g) * 0.5)
    head.variances.copy_(torch.rand(head.variances.shape, generator=g) * 0.5 + 0.05)


def test_softmax_head_shapes_and_interface():
    head = SoftmaxHead(CF, C)
    f = torch.randn(2, CF, 5, 7)
    assert head(f).shape == (2, C, 5, 7)
    assert not head.is_generative
    assert float(head.extra_loss(f, torch.zeros(2, 5, 7, dtype=torch.long))) == 0.0
    head.update(f, torch.zeros(2, 5, 7, dtype=torch.long), None)
    with pytest.raises(TypeError, match="generative"):
        head.class_log_likelihood(f)


def test_softmax_head_drops_feature_channels_in_training_only():
    torch.manual_seed(0)
    head = SoftmaxHead(CF, C, dropout=0.5)
    f = torch.randn(2, CF, 5, 6)
    torch.manual_seed(1)
    mask = F.dropout2d(torch.ones(2, CF, 1, 1), 0.5)
    torch.manual_seed(1)
    torch.testing.assert_close(head(f), head.classifier(f * mask))
    head.eval()
    torch.testing.assert_close(head(f), head.classifier(f))


@pytest.mark.parametrize("reduce", ["logsumexp", "max"])
def test_logits_match_torch_distributions(reduce):
    head = _head(reduce=reduce, class_norm=False).eval()
    _randomise(head)
    f = torch.randn(2, CF, 3, 4)
    with torch.no_grad():
        logits = head(f)
        loglik = head.class_log_likelihood(f)
        x = head.embedding(f)                                     # (B, h, w, D)
    assert logits.shape == loglik.shape == (2, C, 3, 4)
    pixels = [(0, 0, 0), (0, 2, 3), (1, 1, 2)]
    for b, i, j in pixels:
        for c in range(C):
            comp = Independent(Normal(head.means[c], head.variances[c].sqrt()), 1)
            if reduce == "logsumexp":
                ref = MixtureSameFamily(Categorical(torch.ones(K)), comp).log_prob(x[b, i, j])
            else:
                ref = comp.log_prob(x[b, i, j][None].expand(K, D)).max()
            torch.testing.assert_close(logits[b, c, i, j], ref, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(loglik[b, c, i, j], ref, rtol=1e-5, atol=1e-4)


def test_official_logits_are_layernormed_max_scores():
    head = _head(variant="official").eval()
    _randomise(head)
    with torch.no_grad():
        head.class_normalizer.weight.uniform_(0.5, 2.0)
        head.class_normalizer.bias.normal_()
        f = torch.randn(2, CF, 3, 4)
        x = head.embedding(f)
        comp = torch.stack([Independent(Normal(head.means[c], head.variances[c].sqrt()), 1)
                            .log_prob(x[..., None, :]) for c in range(C)], -2)   # (B, h, w, C, K)
        scores = comp.amax(-1)
        ref = F.layer_norm(scores, (C,), head.class_normalizer.weight, head.class_normalizer.bias)
        torch.testing.assert_close(head(f), ref.permute(0, 3, 1, 2), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(head.class_log_likelihood(f), scores.permute(0, 3, 1, 2), rtol=1e-5, atol=1e-4)
    norms = head.embedding(f).norm(dim=-1)        # unit norm (0 only where ReLU zeroed every channel)
    assert bool((((norms - 1).abs() < 1e-5) | (norms == 0)).all()) and float((norms > 0).float().mean()) > 0.9


def test_embedding_is_conv_bn_relu_layernorm_l2_with_its_gradients():
    head, ref_head = _head(), _head()
    with torch.no_grad():
        head.embed_norm.weight.uniform_(0.5, 2.0)
        head.embed_norm.bias.normal_()
    ref_head.load_state_dict(head.state_dict())
    f = torch.randn(2, CF, 5, 6, requires_grad=True)
    fr = f.detach().clone().requires_grad_(True)
    grad = torch.randn(2, 5, 6, D)
    x = head.embedding(f)
    ref = F.normalize(ref_head.embed_norm(ref_head.embed(fr).permute(0, 2, 3, 1)), dim=-1)
    torch.testing.assert_close(x, ref)
    x.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(f.grad, fr.grad)
    for (name, p), (_, q) in zip(head.named_parameters(), ref_head.named_parameters()):
        if p.grad is not None or q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)
    torch.testing.assert_close(head.embed[1].running_mean, ref_head.embed[1].running_mean)


def test_dropout_drops_feature_channels_before_the_embedding_in_training_only():
    torch.manual_seed(0)
    head, plain = _head(dropout=0.5), _head()
    plain.load_state_dict(head.state_dict())          # dropout adds no state: checkpoints stay compatible
    f = torch.randn(2, CF, 5, 6)
    torch.manual_seed(1)
    mask = F.dropout2d(torch.ones(2, CF, 1, 1), 0.5)  # the channels Dropout2d keeps, and its 1 / (1 - p) scale
    torch.manual_seed(1)
    torch.testing.assert_close(head.embedding(f), plain.embedding(f * mask))
    assert not torch.equal(head.embedding(f), head.embedding(f))
    plain.load_state_dict(head.state_dict())          # the same BatchNorm statistics
    head.eval(), plain.eval()
    torch.testing.assert_close(head(f), plain(f))


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_gradients_reach_features_not_gaussians(variant):
    head = _head(variant=variant)
    f = torch.randn(2, CF, 4, 4, requires_grad=True)
    labels = torch.randint(0, C, (2, 8, 8))
    logits, comp = head(f, return_component_logp=True)
    assert comp.shape == (2, C, K, 4, 4)
    loss = F.cross_entropy(logits, labels[:, ::2, ::2]) + head.extra_loss(f, labels, component_logp=comp)
    loss.backward()
    assert f.grad is not None and f.grad.abs().sum() > 0
    assert head.embed[0].weight.grad.abs().sum() > 0
    assert not head.means.requires_grad and head.means.grad is None and head.variances.grad is None
    names = {n for n, _ in head.named_parameters()}
    assert "means" not in names and "variances" not in names
    assert {"means", "variances", "memory", "memory_ptr", "memory_count", "num_updates"} <= set(head.state_dict())


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_training_gradients_match_plain_autograd(variant):
    """Logits + component loss, backward: the head's hand-written pieces against the same step in plain ops."""
    head = _head(variant=variant, component_loss_weight=0.05)
    _randomise(head)
    with torch.no_grad():
        head.means.mul_(0.1)                      # near the unit-norm embeddings: no saturated softmax
        head.embed[1].bias.fill_(1.0)             # no all-zero ReLU output, whose L2 gradient is ~1e12
        if head.class_normalizer is not None:
            head.class_normalizer.weight.uniform_(0.5, 2.0)
            head.class_normalizer.bias.normal_()
    ref_head = _head(variant=variant, component_loss_weight=0.05)
    ref_head.load_state_dict(head.state_dict())
    f = torch.randn(2, CF, 4, 5, requires_grad=True)
    fr = f.detach().clone().requires_grad_(True)
    labels = torch.randint(0, C, (2, 4, 5))
    labels[0, 0] = 255

    logits, comp = head(f, return_component_logp=True)
    loss = F.cross_entropy(logits, labels, ignore_index=255) + head.extra_loss(f, labels, component_logp=comp)
    loss.backward()

    x = F.normalize(ref_head.embed_norm(ref_head.embed(fr).permute(0, 2, 3, 1)), dim=-1).reshape(-1, D)
    flat = torch.stack([Independent(Normal(ref_head.means.reshape(-1, D)[m], ref_head.variances.reshape(-1, D)[m]
                                           .sqrt()), 1).log_prob(x) for m in range(C * K)], 1)      # (N, C*K)
    per_class = flat.reshape(-1, C, K)
    scores = per_class.amax(-1) if variant == "official" else per_class.logsumexp(-1) - math.log(K)
    if ref_head.class_normalizer is not None:
        scores = ref_head.class_normalizer(scores)
    y = labels.reshape(-1)
    valid = (y != 255).nonzero().squeeze(1)
    with torch.no_grad():
        resp = ref_head.e_step(per_class[valid, y[valid]], y[valid])
    ref_loss = (F.cross_entropy(scores, y, ignore_index=255)
                + 0.05 * F.cross_entropy(flat[valid], y[valid] * K + resp.argmax(1)))
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    # float32 rounding of the two log-density formulas: tolerance relative to the largest entry
    torch.testing.assert_close(f.grad, fr.grad, rtol=1e-3, atol=1e-4 * float(fr.grad.abs().max()))
    for (name, p), (_, q) in zip(head.named_parameters(), ref_head.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4 * float(q.grad.abs().max()), msg=name)


def test_extra_loss_is_weighted_component_cross_entropy():
    head = _head(variant="official").eval()
    _randomise(head)
    f = torch.randn(2, CF, 3, 3)
    labels = torch.randint(0, C, (2, 3, 3))
    labels[0, 0, 0] = 255
    assert float(_head(variant="paper").extra_loss(f, labels)) == 0.0
    loss = head.extra_loss(f, labels)
    with torch.no_grad():
        x = head.embedding(f).reshape(-1, D)
        comp = mixture.diag_gaussian_log_prob(x, head.means.reshape(-1, D), head.variances.reshape(-1, D))
    y = labels.reshape(-1)
    valid = y != 255
    resp = head.e_step(comp.reshape(-1, C, K)[valid.nonzero().squeeze(1), y[valid]], y[valid])
    target = y[valid] * K + resp.argmax(1)
    ref = 0.01 * F.cross_entropy(comp[valid], target)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("em", ["sinkhorn", "classic"])
def test_batched_e_step_equals_per_class_loop(hard, em):
    head = _head(num_components=3, hard_assign=hard, em=em)
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([0] * 7 + [2] * 12 + [0] * 4 + [2] * 2)       # class 1 absent, interleaved order
    logp = torch.randn(labels.numel(), 3, generator=g) * 20 - 50
    resp = head.e_step(logp, labels)
    for c in (0, 2):
        rows = labels == c
        if em == "sinkhorn":
            s = logp[rows]
            ref = mixture.sinkhorn(s / s.abs().max(), epsilon=0.05, n_iters=3)
        else:
            ref = torch.softmax(logp[rows], -1)
        if hard:
            ref = F.one_hot(ref.argmax(1), 3).float()
        torch.testing.assert_close(resp[rows], ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(resp.sum(1), torch.ones(labels.numel()))


def _naive_push(rings, ptrs, counts, size, values, groups):
    for v, gi in zip(values, groups):
        rings[gi][ptrs[gi]] = v
        ptrs[gi] = (ptrs[gi] + 1) % size
        counts[gi] = min(counts[gi] + 1, size)


def test_ring_buffer_wraps_like_naive_fifo():
    g = torch.Generator().manual_seed(0)
    G, M, Dm = 4, 5, 2
    memory, ptr, count = torch.zeros(G, M, Dm), torch.zeros(G, dtype=torch.long), torch.zeros(G, dtype=torch.long)
    rings, ptrs, counts = [[None] * M for _ in range(G)], [0] * G, [0] * G
    stats = (torch.zeros(G, Dm, dtype=torch.float64), torch.zeros(G, Dm, dtype=torch.float64))
    step = 0
    for n in (3, 9, 1, 14, 0, 6):                  # 14 > M rows of one group at once: only the last M survive
        groups = torch.randint(0, G, (n,), generator=g)
        if n == 14:
            groups[:] = 2
        values = torch.arange(step, step + n, dtype=torch.float32)[:, None].repeat(1, Dm)
        step += n
        order = select_evenly_spaced(groups, G, None)
        ring_push(memory, ptr, count, values[order], groups[order], stats=stats)
        _naive_push(rings, ptrs, counts, M, values.tolist(), groups.tolist())
        assert ptr.tolist() == ptrs and count.tolist() == counts
        for gi in range(G):
            for m in range(counts[gi]):
                assert memory[gi, m].tolist() == rings[gi][m]
        torch.testing.assert_close(stats[0], memory.double().sum(1))
        torch.testing.assert_close(stats[1], memory.double().square().sum(1))


@pytest.mark.parametrize("dense_limit", [0, 1 << 22])                 # the sort path and the one-hot path
def test_ranks_in_group_count_earlier_rows_of_the_group(dense_limit):
    group = torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(2))
    group[group == 3] = 1                                                 # an empty group
    counts, ranks = ranks_in_group(group, 6, dense_limit=dense_limit)
    seen = [0] * 6
    expected = []
    for gi in group.tolist():
        expected.append(seen[gi])
        seen[gi] += 1
    assert counts.tolist() == seen and ranks.tolist() == expected and ranks.dtype == torch.long


def test_select_evenly_spaced_matches_linspace():
    groups = torch.tensor([1, 0, 1, 1, 2, 1, 1, 0, 1, 1, 1, 1, 1])
    sel = select_evenly_spaced(groups, 4, 3)
    expected = []
    for gi in range(4):
        members = (groups == gi).nonzero().squeeze(1)
        if members.numel():
            keep = torch.linspace(0, members.numel() - 1, min(3, members.numel())).long()
            expected += members[keep].tolist()
    assert sel.tolist() == expected


def _batch(seed=0, B=2, h=4, w=6):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(B, CF, h, w, generator=g)
    labels = torch.randint(0, C, (B, h, w), generator=g)
    labels[0, 0] = 255
    return f, labels


def test_a_ring_given_more_rows_than_it_holds_keeps_evenly_spaced_ones():
    # one class, one component: all 10 labelled pixels go to one ring of 4 rows; pushing all of them would
    # keep the last four (pixels 6-9), the even spread keeps pixels 0, 3, 6, 9
    head = GMMHead(CF, 1, embed_dim=D, num_components=1, variant="paper", memory_size=4).eval()
    f = torch.randn(1, CF, 2, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = head.embedding(f).reshape(-1, D)
    head.update(f, torch.zeros(1, 2, 5, dtype=torch.long))
    torch.testing.assert_close(head.memory[0], x[[0, 3, 6, 9]])
    assert head.memory_count.tolist() == [4]


@pytest.mark.usefixtures("cpu_path")
def test_correct_only_and_max_per_component():
    head = _head(variant="official", max_per_component=2, memory_size=32).eval()
    _randomise(head)
    f, labels = _batch()
    with torch.no_grad():
        x = head.embedding(f).reshape(-1, D)
        logits = head(f)
    pred = logits.argmax(1)
    correct = (pred == labels).reshape(-1)
    assert 0 < int(correct.sum()) < labels.numel() - 6
    head.update(f, labels, logits)
    count = head.memory_count.reshape(C, K)
    assert int(count.max()) <= 2
    stored = head.memory[head.memory_count[:, None] > torch.arange(32)]
    dist_to_correct = torch.cdist(stored, x[correct]).min(1).values
    assert float(dist_to_correct.max()) < 1e-5
    # the same data with every pixel allowed and no cap stores every labelled pixel
    head2 = _head(variant="official", max_per_component=None, correct_only=False, memory_size=32).eval()
    _randomise(head2)
    head2.update(f, labels, logits)
    assert int(head2.memory_count.sum()) == int((labels != 255).sum())


@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("variant", ["paper", "official"])
def test_update_moves_means_to_class_clusters(variant):
    torch.manual_seed(0)
    head = GMMHead(D, 2, embed_dim=D, num_components=2, variant=variant, correct_only=False, mean_momentum=0.0,
                   update_interval=1, memory_size=64, max_per_component=None).eval()
    with torch.no_grad():                          # identity-like embedding, so the clusters are known
        head.embed[0].weight.copy_(torch.eye(D)[:, :, None, None])
    centres = torch.tensor([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0], [0, 0, 0, 4.0]]) + 0.5
    labels = torch.tensor([0, 0, 1, 1]).repeat_interleave(16)             # clusters 0, 1 -> class 0; 2, 3 -> 1
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        pts = centres.repeat_interleave(16, 0) + 0.05 * torch.randn(64, D, generator=g)
        f = pts.T.reshape(1, D, 8, 8)
        head.update(f, labels.reshape(1, 8, 8), None)
    with torch.no_grad():
        x = head.embedding(centres.T.reshape(1, D, 2, 2)).reshape(4, D)
    target = F.normalize(x, dim=-1) if variant == "official" else x
    for cluster, cls in zip(range(4), (0, 0, 1, 1)):
        gap = (head.means[cls] - target[cluster]).norm(dim=-1).min()
        assert float(gap) < 0.05, (cluster, float(gap))


@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("variant", ["paper", "official"])
def test_state_dict_round_trip_resumes_identically(variant):
    a = _head(variant=variant, update_interval=2, mean_momentum=0.5, memory_size=8)
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    batches = [_batch(seed) for seed in range(6)]

    def step(head, opt, f, labels):
        logits, comp = head(f, return_component_logp=True)
        loss = F.cross_entropy(logits, labels[:, :, :], ignore_index=255) + head.extra_loss(f, labels, component_logp=comp)
        opt.zero_grad()
        loss.backward()
        opt.step()
        head.update(f, labels, logits.detach())

    for f, labels in batches[:3]:
        step(a, opt, f, labels)
    b = _head(variant=variant, update_interval=2, mean_momentum=0.5, memory_size=8)
    b.load_state_dict(a.state_dict())
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    opt_b.load_state_dict(opt.state_dict())
    for f, labels in batches[3:]:
        step(a, opt, f, labels)
        step(b, opt_b, f, labels)
    assert int(a.num_updates) == 6
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name
    if variant == "official":                      # the running ring sums agree with the memory after wrapping
        assert int(a.memory_count.max()) == 8
        running = a.memory_sum.clone(), a.memory_sumsq.clone()
        a.refresh_memory_statistics()
        torch.testing.assert_close(running[0], a.memory_sum, rtol=0, atol=1e-12)
        torch.testing.assert_close(running[1], a.memory_sumsq, rtol=0, atol=1e-12)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir, dtype):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        head = _head(variant="official", update_interval=1, mean_momentum=0.5, memory_size=8).to(dtype).eval()
        for step in range(3):
            f, labels = _batch(seed=10 * step + rank, B=rank + 1)          # different sizes per rank
            head.update(f.to(dtype), labels, None)
        torch.save(head.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ddp_gather_gives_identical_parameters_equal_to_union(dtype):
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_ddp_worker, args=(2, _free_port(), out, dtype), nprocs=2, join=True)
        states = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(2)]
    torch.manual_seed(0)
    ref = _head(variant="official", update_interval=1, mean_momentum=0.5, memory_size=8).to(dtype).eval()
    for step in range(3):
        parts = [_batch(seed=10 * step + r, B=r + 1) for r in range(2)]
        f = torch.cat([p[0] for p in parts]).to(dtype)
        labels = torch.cat([p[1] for p in parts])
        ref.update(f, labels, None)
    assert int(ref.memory_count.sum()) > 0 and states[0]["means"].dtype == dtype
    # float64 heads gather float64: as close to the one-process run as float64 rounding allows
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for name, value in ref.state_dict().items():
        assert torch.equal(states[0][name], states[1][name]), name
        torch.testing.assert_close(states[0][name], value, msg=name, **tol)


@pytest.mark.parametrize("kw, message", [
    (dict(variant="offical"), "variant must be one of"),
    (dict(em="kmeans"), "em must be one of"),
    (dict(reduce="mean"), "reduce must be one of"),
    (dict(num_components=0), "num_components must be a positive int, got 0"),
    (dict(embed_dim=2), "embed_dim must be >= 3, got 2: the embedding's LayerNorm"),
    (dict(memory_size=-1), "memory_size must be a positive int, got -1"),
    (dict(max_per_component=0), "max_per_component must be None or a positive int, got 0"),
    (dict(mean_momentum=1.0), r"mean_momentum must be in \[0, 1\), got 1.0"),
    (dict(variance_floor=0.0), "variance_floor must be > 0"),
    (dict(variance_floor=float("inf")), "variance_floor must be > 0 and finite, got inf"),
    (dict(sinkhorn_epsilon=float("inf")), "sinkhorn_epsilon must be > 0 and finite, got inf"),
    (dict(component_loss_weight=float("nan")), "component_loss_weight must be >= 0 and finite, got nan"),
    (dict(component_loss_weight=float("inf")), "component_loss_weight must be >= 0 and finite, got inf"),
    (dict(mean_momentum="0.9"), r"mean_momentum must be in \[0, 1\), got '0.9'"),
    (dict(class_norm="yes"), "class_norm must be a bool"),
    (dict(m_step_scope="all"), "m_step_scope must be one of"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
])
def test_bad_arguments_name_the_parameter(kw, message):
    with pytest.raises(ValueError, match=message):
        GMMHead(CF, C, **kw)


def test_numpy_integer_sizes_are_ints_and_bools_are_not():
    kw = dict(embed_dim=np.int64(4), num_components=np.int32(2), memory_size=np.int64(16),
              update_interval=np.int64(1), sinkhorn_iters=np.int64(3), max_per_component=np.int64(5))
    head = GMMHead(np.int64(CF), np.int64(C), **kw)
    reference = GMMHead(CF, C, **{k: int(v) for k, v in kw.items()})
    assert repr(head) == repr(reference)
    for name in ("num_classes", "embed_dim", "num_components", *list(kw)[2:]):
        assert type(getattr(head, name)) is int, name
    assert head(torch.randn(2, CF, 3, 3)).shape == (2, C, 3, 3)
    softmax = SoftmaxHead(np.int64(CF), np.int64(C), dropout=np.float64(0.1))
    assert type(softmax.num_classes) is int and softmax.dropout.p == 0.1
    with pytest.raises(ValueError, match="in_channels must be a positive int, got True"):
        SoftmaxHead(True, C)
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 2.0"):
        GMMHead(CF, 2.0)


@pytest.mark.parametrize("head", [GMMHead(CF, C, embed_dim=4, num_components=2), SoftmaxHead(CF, C)])
def test_a_head_names_the_feature_map_it_expects(head):
    for shape in [(2, CF + 1, 4, 4), (CF, 4, 4)]:
        with pytest.raises(ValueError, match=rf"features must be a feature map \(B, {CF}, h, w\), got "
                                             rf"{re.escape(str(shape))}"):
            head(torch.randn(*shape))


def test_variant_defaults_fill_unset_knobs():
    official = GMMHead(CF, C, variant="official")
    for knob, value in VARIANT_DEFAULTS["official"].items():
        assert getattr(official, knob) == value, knob
    assert official.reduce == "max" and official.hard_assign and official.max_per_component == 20
    mixed = GMMHead(CF, C, variant="official", reduce="logsumexp", max_per_component=None)
    assert mixed.reduce == "logsumexp" and mixed.max_per_component is None and mixed.class_norm
    assert GMMHead(CF, C).memory_resp is not None and official.memory_resp is None


def test_momentum_is_another_name_for_the_means_momentum():
    head = GMMHead(CF, C, variant="paper", momentum=0.9)
    assert head.mean_momentum == 0.9 and head.variance_momentum == 0.0
    assert GMMHead(CF, C, momentum=0.5, mean_momentum=0.5).mean_momentum == 0.5
    with pytest.raises(ValueError, match="momentum is another name for mean_momentum; got momentum=0.9 and "
                                         "mean_momentum=0.5"):
        GMMHead(CF, C, momentum=0.9, mean_momentum=0.5)
    with pytest.raises(ValueError, match=r"mean_momentum must be in \[0, 1\), got 1.0"):
        GMMHead(CF, C, momentum=1.0)


def test_official_m_step_matches_released_code_loop():
    head = _head(variant="official", mean_momentum=0.9, memory_size=8)
    g = torch.Generator().manual_seed(5)
    fill = torch.tensor([8, 3, 0, 5, 1, 8])                     # rings of (class, component); one empty
    with torch.no_grad():
        for ring, n in enumerate(fill.tolist()):
            head.memory[ring, :n] = F.normalize(torch.randn(n, D, generator=g), dim=-1)
        head.memory_count.copy_(fill)
    head.refresh_memory_statistics()
    old_means, old_vars = head.means.clone(), head.variances.clone()
    head.m_step(torch.tensor([True, True, False]))              # class 2 (rings 4, 5) not in the batch
    for ring, n in enumerate(fill.tolist()):
        c, k = divmod(ring, K)
        if n == 0 or c == 2:
            assert torch.equal(head.means[c, k], old_means[c, k]) and torch.equal(head.variances[c, k], old_vars[c, k])
            continue
        mem = head.memory[ring, :n]
        f = F.normalize(mem.sum(0), dim=0)
        mean = F.normalize(0.9 * old_means[c, k] + 0.1 * f, dim=0)
        var = ((mem - f) ** 2).mean(0) + 0.01
        torch.testing.assert_close(head.means[c, k], mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(head.variances[c, k], var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("counts", [[6, 2, 4, 4, 0, 0], [6] * 6])    # partly filled (masked) and full memory
def test_paper_m_step_is_responsibility_weighted(counts):
    head = _head(variant="paper", mean_momentum=0.0, memory_size=6)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        head.memory.copy_(torch.randn(head.memory.shape, generator=g))
        head.memory_resp.copy_(torch.softmax(torch.randn(head.memory_resp.shape, generator=g), -1))
        head.memory_count.copy_(torch.tensor(counts))
    old_means = head.means.clone()
    head.m_step()
    for c in range(C):
        rows = [(r, m) for r in range(c * K, c * K + K) for m in range(int(head.memory_count[r]))]
        if not rows:
            assert torch.equal(head.means[c], old_means[c])
            continue
        x = torch.stack([head.memory[r, m] for r, m in rows])
        w = torch.stack([head.memory_resp[r, m] for r, m in rows])          # (n, K)
        for k in range(K):
            mean = (w[:, k:k + 1] * x).sum(0) / w[:, k].sum()
            var = (w[:, k:k + 1] * (x - mean) ** 2).sum(0) / w[:, k].sum() + 0.01
            torch.testing.assert_close(head.means[c, k], mean, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(head.variances[c, k], var, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size", [(8, 16), (4, 4), (16, 32), (5, 7), (32, 64)])
def test_resize_labels_is_nearest_interpolation(size):
    from gmmseg_core.heads import resize_labels

    labels = torch.randint(0, 255, (2, 32, 64), generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
    out = resize_labels(labels, size)
    assert out.dtype == torch.long and torch.equal(out, expected)


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_a_float64_head_trains_in_float64(variant):
    head = _head(variant=variant).double().train()
    f = torch.randn(2, CF, 4, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, C, (2, 4, 4))
    logits, comp = head(f, return_component_logp=True)
    (F.cross_entropy(logits, labels) + head.extra_loss(f, labels, component_logp=comp)).backward()
    assert logits.dtype == comp.dtype == f.grad.dtype == torch.float64 and torch.isfinite(f.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_head_scores_in_float32(dtype):
    # the official head's class LayerNorm used to meet float32 log-densities with half-precision weights
    reference = _head(variant="official").eval()
    head = copy.deepcopy(reference).to(dtype)
    f = torch.randn(2, CF, 4, 4)
    logits = head(f.to(dtype))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert head.class_log_likelihood(f.to(dtype)).dtype == torch.float32
    torch.testing.assert_close(logits, reference(f), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_a_float16_head_scores_a_pixel_with_a_zero_embedding_as_a_float32_head_does(variant):
    # zero features give a zero row after the convolution, BatchNorm (fresh statistics), ReLU and LayerNorm (zero
    # bias at the start); the L2 normalisation's guard against dividing by 0 must not round to 0 in float16
    reference = _head(variant=variant).eval()
    head = copy.deepcopy(reference).half()
    f = torch.randn(1, CF, 4, 4)
    f[..., 0, 0] = 0
    logits = head(f.half())
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, reference(f), atol=0.1, rtol=0.05)



@pytest.mark.parametrize("variant", ["paper", "official"])
def test_update_inside_autocast_equals_update_outside(variant):
    head = _head(variant=variant, update_interval=1).train()
    _randomise(head)
    heads = [head, copy.deepcopy(head)]
    f = torch.randn(2, CF, 4, 4)
    labels = torch.randint(0, C, (2, 4, 4))
    heads[0].update(f, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):         # a caller that wraps its whole step
        heads[1].update(f, labels)
    for name, value in heads[0].state_dict().items():
        assert torch.equal(value, heads[1].state_dict()[name]), name


class _TorchBefore24(types.ModuleType):
    """torch as the head sees it under torch 2.3, which the package supports: ``is_autocast_enabled`` takes no
    device (it answers for CUDA) and the CPU has ``is_autocast_cpu_enabled``."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _query(device_type):
        try:
            return torch.is_autocast_enabled(device_type)
        except TypeError:  # this is torch 2.3 itself
            return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()

    @staticmethod
    def is_autocast_enabled():
        return _TorchBefore24._query("cuda")

    @staticmethod
    def is_autocast_cpu_enabled():
        return _TorchBefore24._query("cpu")


def test_update_inside_autocast_works_with_the_autocast_query_of_torch_2_3(monkeypatch):
    from gmmseg_core import heads as heads_module

    head = _head(update_interval=1).train()
    _randomise(head)
    reference = copy.deepcopy(head)
    f, labels = torch.randn(2, CF, 4, 4), torch.randint(0, C, (2, 4, 4))
    reference.update(f, labels)
    monkeypatch.setattr(heads_module, "torch", _TorchBefore24("torch"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        head.update(f, labels)
    for name, value in reference.state_dict().items():
        assert torch.equal(value, head.state_dict()[name]), name


def test_an_update_with_other_features_than_the_last_forward_uses_its_own():
    head = _head(update_interval=1).train()
    _randomise(head)
    head(torch.randn(2, CF, 4, 4))                  # leaves this batch's forward in the head's cache
    fresh = copy.deepcopy(head)                     # a copy carries no cache
    f, labels = torch.randn(2, CF, 4, 4), torch.randint(0, C, (2, 4, 4))
    head.update(f, labels)
    fresh.update(f, labels)
    for name, value in head.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[name]), name


def test_gaussians_made_trainable_get_gradients_through_the_general_path():
    head = _head(variant="official").train()
    head.means.requires_grad_(True)
    f = torch.randn(2, CF, 4, 4, requires_grad=True)
    labels = torch.randint(0, C, (2, 4, 4))
    logits, comp = head(f, return_component_logp=True)
    (F.cross_entropy(logits, labels) + head.extra_loss(f, labels, component_logp=comp)).backward()
    assert head.means.grad is not None and head.means.grad.abs().sum() > 0 and f.grad is not None


def test_casting_the_head_keeps_the_ring_sums_in_float64():
    head = GMMHead(CF, C, embed_dim=D, num_components=2, variant="official", memory_size=8)
    with torch.no_grad():
        head.memory.normal_(generator=torch.Generator().manual_seed(0))
        head.memory_count.fill_(8)
        head.refresh_memory_statistics()
    before = head.memory_sum.clone()
    head.float()
    assert head.memory_sum.dtype == torch.float64 and torch.equal(head.memory_sum, before)
    head.half()
    assert head.memory.dtype == torch.float16 and head.memory_sumsq.dtype == torch.float64
    torch.testing.assert_close(head.memory_sum, head.memory.double().sum(1))   # the sums of what the memory holds


def test_a_cast_that_changes_nothing_leaves_the_running_sums_bit_for_bit():
    torch.manual_seed(0)
    head = GMMHead(CF, C, embed_dim=D, num_components=2, variant="official", memory_size=4,
                   update_interval=1000).train()
    for _ in range(20):                                  # rings wrap: sums built by adding and subtracting
        head.update(torch.randn(2, CF, 8, 8), torch.randint(0, C, (2, 8, 8)))
    sums = head.memory_sum.clone(), head.memory_sumsq.clone()
    head.float()
    assert torch.equal(head.memory_sum, sums[0]) and torch.equal(head.memory_sumsq, sums[1])


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_a_head_copies_and_pickles_between_its_forward_and_update(variant):
    torch.manual_seed(0)
    head = _head(variant=variant, update_interval=1).train()
    f = torch.randn(2, CF, 4, 4, requires_grad=True)
    labels = torch.randint(0, C, (2, 4, 4))
    head(f).sum().backward()                           # a training forward: the head keeps its batch for update
    copies = [copy.deepcopy(head), pickle.loads(pickle.dumps(head))]
    reference = copy.deepcopy(copies[0])
    head.update(f, labels)
    for other in copies:
        other.update(f, labels)
    reference.update(f.detach(), labels)
    for name, value in head.state_dict().items():
        for other in copies + [reference]:
            torch.testing.assert_close(other.state_dict()[name], value, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize(("labels", "logits", "message"), [
    (torch.zeros(1, 4, 4, dtype=torch.long), None, r"labels must be a label map \(2, H, W\) .* got \(1, 4, 4\)"),
    (torch.zeros(3, 8, 8, dtype=torch.long), None, r"got \(3, 8, 8\)"),
    (torch.zeros(2, 1, 4, 4, dtype=torch.long), None, r"got \(2, 1, 4, 4\)"),
    (torch.zeros(4, 4, dtype=torch.long).numpy(), None, "got ndarray"),
    (torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(1, C, 4, 4), rf"logits must be \(2, {C}, H, W\) .* "
                                                                     rf"got \(1, {C}, 4, 4\)"),
    (torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, C + 1, 4, 4), rf"got \(2, {C + 1}, 4, 4\)"),
])
def test_update_names_labels_or_logits_that_do_not_fit_the_batch(labels, logits, message):
    head = _head(variant="official").train()
    f = torch.randn(2, CF, 4, 4)
    with pytest.raises(ValueError, match=message):
        head.update(f, labels, logits)
    if logits is None:
        with pytest.raises(ValueError, match=message):
            head.extra_loss(f, labels)
    assert int(head.memory_count.sum()) == 0 and int(head.num_updates) == 0


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_an_update_that_recomputes_the_embedding_leaves_the_batchnorm_buffers_alone(variant):
    torch.manual_seed(0)
    head = _head(variant=variant, update_interval=1000).train()
    before = {k: v.clone() for k, v in head.embed.state_dict().items()}
    f, labels = torch.randn(2, CF, 4, 4), torch.randint(0, C, (2, 4, 4))
    head.extra_loss(f, labels)                          # no forward before: both recompute the embedding
    head.update(f, labels)
    for name, value in head.embed.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("classes", [torch.tensor([0, 2]), torch.tensor([True, False]), [True, False, True]])
def test_m_step_names_a_class_selection_that_is_not_a_bool_mask(classes):
    head = _head()
    with pytest.raises(ValueError, match=rf"classes must be a bool mask \({C},\) over the classes, got "):
        head.m_step(classes)


def test_the_smallest_embedding_still_separates_pixels_and_passes_gradients():
    torch.manual_seed(0)
    head = GMMHead(CF, C, embed_dim=3, num_components=K).train()
    f = torch.randn(2, CF, 4, 4, requires_grad=True)
    x = head.embedding(f).detach().reshape(-1, 3)
    assert torch.unique(x.round(decimals=4), dim=0).shape[0] > 8
    head(f).sum().backward()
    assert f.grad.norm() > 1e-3


def test_select_evenly_spaced_keeps_input_order_within_groups_of_many_rows():
    # a few hundred rows: enough for an unstable sort to reorder the rows of a group
    groups = torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(4))
    for cap in (None, 1, 7, 1000):
        expected = []
        for gi in range(5):
            members = (groups == gi).nonzero().squeeze(1)
            m = members.numel() if cap is None else min(cap, members.numel())
            expected += members[torch.linspace(0, members.numel() - 1, m).long()].tolist()
        assert select_evenly_spaced(groups, 5, cap).tolist() == expected, cap


@pytest.mark.parametrize("cap", [1, 2, 5])
@pytest.mark.parametrize("absent_groups", [0, 40])
def test_select_evenly_spaced_at_group_sizes_around_the_cap(cap, absent_groups):
    # groups of 0, 1, 2, cap - 1, cap, cap + 1 and 3 cap + 2 rows, shuffled. Without absent groups the cap is
    # small beside the rows (the released head: 20 per component among a batch's pixels); with 40 more groups
    # their caps add up to more than the rows
    sizes = [0, 1, 2, max(cap - 1, 0), cap, cap + 1, 3 * cap + 2]
    groups = torch.cat([torch.full((n,), g, dtype=torch.long) for g, n in enumerate(sizes)])
    groups = groups[torch.randperm(groups.numel(), generator=torch.Generator().manual_seed(cap))]
    num_groups = len(sizes) + absent_groups
    chosen, chosen_groups, counts, ranks = select_evenly_spaced(groups, num_groups, cap, return_ranks=True)
    expected, expected_ranks = [], []
    for g, n in enumerate(sizes):
        members = (groups == g).nonzero().squeeze(1)
        m = min(n, cap)
        expected += members[torch.linspace(0, max(n - 1, 0), m).long()].tolist()
        expected_ranks += list(range(m))
    assert chosen.tolist() == expected
    assert torch.equal(chosen, select_evenly_spaced(groups, num_groups, cap))
    assert torch.equal(chosen_groups, groups[chosen]) and ranks.tolist() == expected_ranks
    assert counts.tolist() == [min(n, cap) for n in sizes] + [0] * absent_groups


@pytest.mark.parametrize("num_groups", [5, 300])                    # one-byte sort keys, and int32 ones
def test_select_evenly_spaced_returns_the_ranks_ring_push_would_compute(num_groups):
    g = torch.Generator().manual_seed(6)
    groups = torch.randint(0, 5, (300,), generator=g) * (num_groups // 5)
    for cap in (None, 1, 7, 1000):
        chosen, chosen_groups, counts, ranks = select_evenly_spaced(groups, num_groups, cap, return_ranks=True)
        assert torch.equal(chosen, select_evenly_spaced(groups, num_groups, cap))
        assert torch.equal(chosen_groups, groups[chosen])
        expected_counts, expected_ranks = ranks_in_group(chosen_groups, num_groups)
        assert torch.equal(counts, expected_counts) and torch.equal(ranks, expected_ranks), cap
        # and ring_push writes the same rings with them as without
        buffers = []
        for given in (False, True):
            memory = torch.zeros(num_groups, 4, 1)
            ptr, count = torch.zeros(num_groups, dtype=torch.long), torch.zeros(num_groups, dtype=torch.long)
            stats = (torch.zeros(num_groups, 1, dtype=torch.float64), torch.zeros(num_groups, 1, dtype=torch.float64))
            values = chosen[:, None].float()
            ring_push(memory, ptr, count, values, chosen_groups, stats=stats,
                      **(dict(counts=counts, ranks=ranks) if given else {}))
            buffers.append((memory, ptr, count, *stats))
        for a, b in zip(*buffers):
            assert torch.equal(a, b)


def test_ring_push_writes_extras_with_their_rows_when_a_ring_overflows():
    G, M = 2, 3
    memory, ptr, count = torch.zeros(G, M, 1), torch.zeros(G, dtype=torch.long), torch.zeros(G, dtype=torch.long)
    extra = torch.zeros(G, M, 2)
    group = torch.tensor([0] * 5 + [1] * 2)                       # ring 0 gets 5 rows for 3 slots
    values = torch.arange(7.0)[:, None]
    ring_push(memory, ptr, count, values, group, extras=((extra, torch.cat([values, -values], 1)),))
    torch.testing.assert_close(extra[..., 0], memory[..., 0])
    torch.testing.assert_close(extra[..., 1], -memory[..., 0])
    assert sorted(memory[0, :, 0].tolist()) == [2.0, 3.0, 4.0]


@pytest.mark.usefixtures("cpu_path")
def test_labels_outside_the_classes_are_skipped_like_ignore_index():
    f, labels = _batch(seed=3)
    odd = labels.clone()
    odd[0, 1, :3] = -1
    odd[1, 2, 2:] = C                                             # neither a class nor ignore_index
    skipped = labels.clone()
    skipped[odd != labels] = 255
    heads = []
    for lab in (odd, skipped):
        torch.manual_seed(0)                                      # the same embedding for both heads
        head = _head(update_interval=1, mean_momentum=0.5).eval()
        _randomise(head)
        head.update(f, lab)
        heads.append(head)
    for name in ("memory", "memory_count", "means", "variances"):
        assert torch.equal(getattr(heads[0], name), getattr(heads[1], name)), name


@pytest.mark.usefixtures("cpu_path")
def test_a_class_index_as_ignore_index_never_enters_the_memory():
    f, labels = _batch(seed=4)
    head = _head(ignore_index=1, update_interval=1).eval()
    head.update(f, labels)
    count = head.memory_count.reshape(C, K)
    assert int(count[1].sum()) == 0 and int(count.sum()) == int(((labels != 1) & (labels != 255)).sum())


@pytest.mark.parametrize("scope, third", [("seen", [True, True, False]), ("batch", [True, False, False])])
def test_m_step_runs_every_interval_on_the_classes_of_its_scope(scope, third):
    # one class per batch (2, then 1, then 0) and an M-step every second call, starting with the first: "seen"
    # re-estimates the classes seen since the previous M-step, "batch" those of the current batch only
    torch.manual_seed(0)
    head = _head(m_step_scope=scope, update_interval=2, mean_momentum=0.5).eval()
    _randomise(head)
    f, labels = _batch(seed=5)
    changed = []
    for c in (2, 1, 0):
        before = head.means.clone()
        head.update(f, torch.full_like(labels, c))
        changed.append((head.means != before).flatten(1).any(1).tolist())
    assert changed == [[False, False, True], [False, False, False], third]


@pytest.mark.usefixtures("cpu_path")
def test_a_cap_above_the_memory_size_still_keeps_evenly_spaced_rows():
    head = GMMHead(CF, 1, embed_dim=D, num_components=1, variant="paper", memory_size=4,
                   max_per_component=8).eval()
    f = torch.randn(1, CF, 2, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = head.embedding(f).reshape(-1, D)
    head.update(f, torch.zeros(1, 2, 5, dtype=torch.long))
    torch.testing.assert_close(head.memory[0], x[[0, 3, 6, 9]])


def test_paper_m_step_leaves_components_without_memory_or_mass_unchanged():
    head = _head(variant="paper", mean_momentum=0.0, memory_size=4)
    g = torch.Generator().manual_seed(7)
    resp = torch.softmax(torch.randn(4, K, generator=g), -1)
    with torch.no_grad():
        head.memory.copy_(torch.randn(head.memory.shape, generator=g))
        head.memory_resp[0] = resp                     # class 0: ring 1 empty, though its component has mass
        head.memory_resp[2:4, :, 0] = 1.0              # class 1: both rings filled, component 1 without mass
        head.memory_count.copy_(torch.tensor([4, 0, 4, 4, 0, 0]))
    old = head.means.clone(), head.variances.clone()
    head.m_step()
    for c, k in ((0, 1), (1, 1), (2, 0), (2, 1)):
        assert torch.equal(head.means[c, k], old[0][c, k]) and torch.equal(head.variances[c, k], old[1][c, k])
    assert not torch.equal(head.means[0, 0], old[0][0, 0]) and not torch.equal(head.means[1, 0], old[0][1, 0])


def test_refreshed_ring_sums_read_only_the_filled_rows():
    head = _head(variant="official", memory_size=5)
    g = torch.Generator().manual_seed(8)
    counts = torch.tensor([5, 3, 0, 1, 4, 2])
    with torch.no_grad():
        head.memory.copy_(torch.randn(head.memory.shape, generator=g))     # unfilled rows hold values too
        head.memory_count.copy_(counts)
    head.refresh_memory_statistics()
    for ring, n in enumerate(counts.tolist()):
        rows = head.memory[ring, :n].double()
        torch.testing.assert_close(head.memory_sum[ring], rows.sum(0))
        torch.testing.assert_close(head.memory_sumsq[ring], rows.square().sum(0))


@pytest.mark.usefixtures("cpu_path")
def test_every_pixel_is_filed_under_its_class_and_most_responsible_component():
    head = _head(variant="paper", memory_size=32).eval()
    _randomise(head)
    f, labels = _batch(seed=6)
    with torch.no_grad():
        x = head.embedding(f).reshape(-1, D)
    head.update(f, labels)
    y = labels.reshape(-1)
    for ring in range(C * K):
        c, k = divmod(ring, K)
        n = int(head.memory_count[ring])
        rows, resp = head.memory[ring, :n], head.memory_resp[ring, :n]
        assert (resp.argmax(1) == k).all()
        if n:
            assert float(torch.cdist(rows, x[y == c]).min(1).values.max()) < 1e-6
    assert int(head.memory_count.sum()) == int((y != 255).sum())


@pytest.mark.usefixtures("cpu_path")
def test_correct_only_reads_the_given_logits():
    # logits that predict every label exactly (at twice the feature resolution): every labelled pixel is correct
    head = _head(variant="official", max_per_component=None, memory_size=64).eval()
    _randomise(head)
    f, labels = _batch(seed=7)
    target = labels.clone()
    target[target == 255] = 0
    logits = F.one_hot(target, C).permute(0, 3, 1, 2).float().repeat_interleave(2, 2).repeat_interleave(2, 3)
    head.update(f, labels, logits)
    assert int(head.memory_count.sum()) == int((labels != 255).sum())


@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("size", [(8, 12), (7, 9)])         # twice the feature size (a view), and not a multiple
def test_correct_only_pushes_the_pixels_whose_nearest_logits_argmax_is_their_label(size):
    head = _head(variant="official", max_per_component=None, memory_size=64).eval()
    _randomise(head)
    f, labels = _batch(seed=7)
    (h, w), (H, W) = f.shape[-2:], size
    logits = torch.randn(labels.shape[0], C, H, W, generator=torch.Generator().manual_seed(2))
    i, j = ((labels[0] != 0) & (labels[0] != 255)).nonzero()[0].tolist()
    logits[0, :, i * H // h, j * W // w] = 1.0          # that pixel's source: a tie between all classes
    head.update(f, labels, logits)
    pred = F.interpolate(logits, size=(h, w), mode="nearest").argmax(1)
    correct = (pred == labels) & (labels != 255)
    assert not correct[0, i, j]                 # argmax takes class 0; the tie with its own class counts here
    assert 0 < int(head.memory_count.sum()) == int(correct.sum()) + 1


def test_paper_m_step_updates_a_component_with_less_than_one_unit_of_mass():
    head = _head(variant="paper", mean_momentum=0.0, memory_size=4)
    with torch.no_grad():
        head.memory[0, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
        head.memory[1, 0] = torch.tensor([0.0, 1.0, 0.0, 0.0])
        head.memory_resp[0, 0] = torch.tensor([0.8, 0.2])
        head.memory_resp[1, 0] = torch.tensor([0.3, 0.7])          # component 1: mass 0.9
        head.memory_count[:2] = 1
    head.m_step()
    torch.testing.assert_close(head.means[0, 1], torch.tensor([0.2, 0.7, 0.0, 0.0]) / 0.9)


def test_extra_loss_without_valid_pixels_is_a_differentiable_zero():
    head = _head(variant="official").train()
    f = torch.randn(1, CF, 3, 4, requires_grad=True)
    loss = head.extra_loss(f, torch.full((1, 3, 4), 255, dtype=torch.long))
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    assert f.grad is not None and float(f.grad.abs().max()) == 0.0


def test_component_loss_counts_the_target_that_equals_the_ignore_label():
    # 52 classes x 5 components: class 51's component 0 is target 255, the label the segmentation loss ignores
    torch.manual_seed(0)
    head = GMMHead(CF, 52, embed_dim=D, num_components=5, variant="official", memory_size=16)
    f = torch.randn(1, CF, 6, 6)
    labels = torch.full((1, 6, 6), 51)
    _, comp = head(f, return_component_logp=True)
    loss = head.extra_loss(f, labels, component_logp=comp)
    with torch.no_grad():
        own = comp[0, 51].reshape(5, -1).T                         # (pixels, K) of the labelled class
        target = 51 * 5 + head.e_step(own, labels.reshape(-1)).argmax(1)
    assert int((target == 255).sum()) > 0
    ref = F.cross_entropy(comp[0].reshape(52 * 5, -1).T, target)    # every pixel counts
    torch.testing.assert_close(loss, 0.01 * ref)


def _released_step(x, labels_small, pred, logp, memories, cap=20):
    """The released head's bookkeeping of one step, written loop by loop: per class, scores over its own
    components divided by their largest magnitude, 3 Sinkhorn iterations (components, then pixels) on
    exp(./0.05), argmax; the correctly classified pixels of each component, at most ``cap`` evenly spaced
    ones, appended to that component's FIFO list."""
    Kc = logp.shape[-1]
    for c in labels_small.unique().tolist():
        rows = (labels_small == c).nonzero().squeeze(1)
        s = logp[rows, c]
        q = torch.exp(s / s.abs().max() / 0.05).T                    # (K, n)
        q = q / q.sum()
        for _ in range(3):
            q = q / q.sum(1, keepdim=True) / Kc
            q = q / q.sum(0, keepdim=True) / rows.numel()
        assigned = q.argmax(0)
        for k in range(Kc):
            members = rows[(assigned == k) & (pred[rows] == c)]
            if members.numel() > cap:
                members = members[torch.linspace(0, members.numel() - 1, cap, dtype=torch.int64)]
            memories[c * Kc + k] = memories[c * Kc + k] + [x[i] for i in members.tolist()]
    return labels_small.unique().tolist()


@pytest.mark.usefixtures("cpu_path")
def test_official_variant_follows_the_released_training_step_loop_by_loop():
    torch.manual_seed(0)
    Cn, Kn, M = 3, 3, 6                                               # small rings: they wrap within 5 steps
    head = GMMHead(CF, Cn, embed_dim=D, num_components=Kn, variant="official", memory_size=M, update_interval=2)
    memories = [[] for _ in range(Cn * Kn)]
    means, variances = head.means.clone(), head.variances.clone()
    for step in range(5):
        f = torch.randn(2, CF, 6, 6)
        labels = torch.randint(0, Cn, (2, 12, 12))
        labels[0, :4] = 255
        logits = head(f)
        with torch.no_grad():
            x = head.embedding(f).reshape(-1, D)
            logp = torch.stack([Independent(Normal(means[c], variances[c].sqrt()), 1).log_prob(x[:, None])
                                for c in range(Cn)], 1)              # (pixels, C, K)
            small = F.interpolate(labels[:, None].float(), size=(6, 6), mode="nearest").reshape(-1).long()
            keep = small != 255
            pred = logits.argmax(1).reshape(-1)
            classes = _released_step(x[keep], small[keep], pred[keep], logp[keep], memories, cap=min(20, M))
        head.update(f, labels)
        if step % 2 == 0:                                            # M-step on the classes of the batch
            for c in classes:
                for k in range(Kn):
                    mem = memories[c * Kn + k][-M:]
                    if mem:
                        mem = torch.stack(mem)
                        centre = F.normalize(mem.sum(0), dim=0)
                        means[c, k] = F.normalize(0.999 * means[c, k] + 0.001 * centre, dim=0)
                        variances[c, k] = (mem - centre).square().mean(0) + 0.01
        torch.testing.assert_close(head.means, means, rtol=0, atol=1e-5)
        torch.testing.assert_close(head.variances, variances, rtol=0, atol=1e-5)
        for g in range(Cn * Kn):
            kept = memories[g][-M:]
            assert int(head.memory_count[g]) == len(kept)
            if kept:
                order = torch.arange(len(kept)) + (int(head.memory_ptr[g]) - len(kept)) % M
                torch.testing.assert_close(head.memory[g, order % M], torch.stack(kept), rtol=0, atol=1e-6)
    assert max(len(m) for m in memories) > M


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_the_gaussians_cached_terms_follow_every_change_of_the_means_and_variances(variant):
    torch.manual_seed(0)
    head = GMMHead(6, 3, embed_dim=4, num_components=2, variant=variant).eval()
    f = torch.randn(2, 6, 3, 5)

    def expected():
        x = head.embedding(f).reshape(-1, 4)
        comp = mixture.diag_gaussian_log_prob(x, head.means.reshape(-1, 4),
                                              head.variances.reshape(-1, 4)).view(2, 3, 5, 3, 2)
        scores = comp.amax(-1) if variant == "official" else torch.logsumexp(comp, -1) - math.log(2)
        return scores.permute(0, 3, 1, 2)

    torch.testing.assert_close(head.class_log_likelihood(f), expected())
    head.means.mul_(0.5)                                 # in place, as the M-step and load_state_dict write
    head.variances.add_(0.3)
    torch.testing.assert_close(head.class_log_likelihood(f), expected())
    state = {k: v.clone() for k, v in head.state_dict().items()}
    state["means"] = torch.randn_like(state["means"])
    head.load_state_dict(state)
    torch.testing.assert_close(head.class_log_likelihood(f), expected())
    head.means = torch.randn_like(head.means)              # a new tensor in place of the buffer
    torch.testing.assert_close(head.class_log_likelihood(f), expected())


@pytest.mark.usefixtures("cpu_path")
def test_update_with_other_labels_than_the_loss_runs_its_own_e_step():
    f, labels = _batch(seed=5)
    other = labels.roll(1, dims=2)
    memories = []
    for loss_labels in (labels, None):
        torch.manual_seed(0)
        head = _head(variant="official", update_interval=1).train()
        _randomise(head)
        head(f)
        if loss_labels is not None:
            head.extra_loss(f, loss_labels)             # its E-step is kept for an update with these labels
        head.update(f, other)
        memories.append((head.memory.clone(), head.memory_count.clone(), head.means.clone()))
    for a, b in zip(*memories):
        assert torch.equal(a, b)
