"""The GMM head's hand-written autograd operations against the plain torch expressions they replace."""

import math

import pytest
import torch
import torch.nn.functional as F

from gmmseg_core import mixture
from gmmseg_core.head_ops import (
    ChannelLayerNorm,
    ComponentLogProbMaps,
    L2Normalize,
    first_max,
    gaussian_terms,
)
from gmmseg_core.mixture import diag_gaussian_log_prob


def _gaussians(n, C, K, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=dtype)
    means = torch.randn(C * K, D, generator=g, dtype=dtype)
    variances = torch.rand(C * K, D, generator=g, dtype=dtype) + 0.2
    return x, means, variances


@pytest.fixture(params=["one block", "many blocks"])
def blocks(request, monkeypatch):
    """Whole-tensor blocks, or blocks of a few rows with a ragged last one (the CPU loops' edges)."""
    if request.param == "many blocks":
        monkeypatch.setattr(mixture, "_BLOCK_ELEMENTS", 100)
    return request.param


def _as_maps(table, batch):
    """``(B*P, M)`` rows of a log-density table as ``(B, M, P)`` maps."""
    return table.view(batch, -1, table.shape[1]).transpose(1, 2)


@pytest.mark.parametrize("batch, pixels", [(1, 50), (4, 13)])
@pytest.mark.parametrize("reduce", ["max", "logsumexp"])
def test_component_log_prob_maps_equal_log_prob_then_the_reduction(blocks, batch, pixels, reduce):
    C, K, D = 4, 3, 5
    x, means, variances = _gaussians(batch * pixels, C, K, D)
    g = torch.Generator().manual_seed(1)
    grad_comp = torch.randn(batch, C * K, pixels, generator=g, dtype=x.dtype)
    grad_scores = torch.randn(batch, C, pixels, generator=g, dtype=x.dtype)

    def reference(table):
        per_class = table.reshape(batch, C, K, pixels)
        return per_class.amax(2) if reduce == "max" else torch.logsumexp(per_class, 2)

    for use_comp, use_scores in ((True, True), (True, False), (False, True)):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        comp, scores = ComponentLogProbMaps.apply(xa.view(batch, pixels, D), gaussian_terms(means, variances), K,
                                                  reduce if use_scores else None)
        ref = _as_maps(diag_gaussian_log_prob(xb, means, variances), batch)
        torch.testing.assert_close(comp, ref)
        if use_scores:
            torch.testing.assert_close(scores, reference(ref))
        else:
            assert scores is None
        loss = (comp * grad_comp).sum() * use_comp + ((scores * grad_scores).sum() if use_scores else 0.0)
        loss.backward()
        ((ref * grad_comp).sum() * use_comp + (reference(ref) * grad_scores).sum() * use_scores).backward()
        torch.testing.assert_close(xa.grad, xb.grad)
    small = x[:2 * 3].reshape(2, 3, D).clone().requires_grad_()
    terms = gaussian_terms(means, variances)
    assert torch.autograd.gradcheck(lambda t: ComponentLogProbMaps.apply(t, terms, K, reduce), (small,))


@pytest.mark.parametrize("reduce", ["max", "logsumexp"])
def test_component_log_prob_maps_add_the_score_offset_and_handle_far_apart_components(reduce):
    # float32 components over 87 nats apart: exp underflows for the far ones, which must change nothing
    C, K, D = 2, 3, 4
    x, means, variances = (t.float() for t in _gaussians(12, C, K, D))
    means = means * 4.0
    xa, xb = x.clone().requires_grad_(), x.double().requires_grad_()
    comp, scores = ComponentLogProbMaps.apply(xa.view(2, 6, D), gaussian_terms(means, variances), K, reduce,
                                              -math.log(K))
    ref = _as_maps(diag_gaussian_log_prob(xb, means.double(), variances.double()), 2).reshape(2, C, K, 6)
    assert (ref.amax(2, keepdim=True) - ref).amax() > 100                   # below float32 exp's normal range
    expected = (ref.amax(2) if reduce == "max" else torch.logsumexp(ref, 2)) - math.log(K)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-4)
    g = torch.randn(scores.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (scores * g.float()).sum().backward()
    (expected * g).sum().backward()
    torch.testing.assert_close(xa.grad.double(), xb.grad, rtol=1e-4, atol=1e-4)


def test_component_log_prob_maps_name_a_bad_reduction():
    x, means, variances = _gaussians(4, 2, 2, 3)
    with pytest.raises(ValueError, match="reduce must be 'max', 'logsumexp' or None, got 'mean'"):
        ComponentLogProbMaps.apply(x.view(1, 4, 3), gaussian_terms(means, variances), 2, "mean")


def test_component_log_prob_maps_refuse_gradients_for_the_gaussians():
    x, means, variances = _gaussians(4, 2, 2, 3)
    with pytest.raises(RuntimeError, match="no gradient to the means and variances"):
        ComponentLogProbMaps.apply(x.view(1, 4, 3), gaussian_terms(means.requires_grad_(), variances), 2, "max")


def test_l2_normalize_equals_f_normalize():
    x = torch.randn(5, 7, dtype=torch.float64)
    x[0] = 0.0                                          # the 1e-12 clamp, as F.normalize
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = L2Normalize.apply(a)
    torch.testing.assert_close(out, F.normalize(b, dim=-1))
    g = torch.randn(5, 7, dtype=torch.float64)
    (out * g).sum().backward()
    (F.normalize(b, dim=-1) * g).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)
    assert torch.autograd.gradcheck(L2Normalize.apply, (x[1:].clone().requires_grad_(),))


def test_component_log_prob_maps_gradient_far_from_the_origin_in_float32():
    # data and means near 1000: the backward must centre them like the forward, or float32 loses the gradient
    x, means, variances = _gaussians(40, 2, 3, 4)
    x, means = (x * 0.1 + 1000.0).float().double(), (means * 0.1 + 1000.0).float().double()   # float32 values
    g = torch.Generator().manual_seed(2)
    grad_comp = torch.randn(2, 6, 20, generator=g, dtype=x.dtype)
    grad_max = torch.randn(2, 2, 20, generator=g, dtype=x.dtype)
    grads = []
    for dtype in (torch.float64, torch.float32):
        xa = x.detach().to(dtype).requires_grad_()
        comp, maxima = ComponentLogProbMaps.apply(xa.view(2, 20, 4), gaussian_terms(means.to(dtype),
                                                                                    variances.to(dtype)), 3, "max")
        ((comp * grad_comp.to(dtype)).sum() + (maxima * grad_max.to(dtype)).sum()).backward()
        grads.append(xa.grad.double())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (3, 4, 7)])
def test_channel_layer_norm_equals_layer_norm_over_the_moved_dimension(shape):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 3 + 1
    weight = torch.randn(shape[1], generator=g, dtype=torch.float64)
    bias = torch.randn(shape[1], generator=g, dtype=torch.float64)
    grad = torch.randn(*shape, generator=g, dtype=torch.float64)
    ours = [t.clone().requires_grad_() for t in (x, weight, bias)]
    ref = [t.clone().requires_grad_() for t in (x, weight, bias)]
    out = ChannelLayerNorm.apply(*ours, 1e-5)
    expected = F.layer_norm(ref[0].movedim(1, -1), (shape[1],), ref[1], ref[2], 1e-5).movedim(-1, 1)
    torch.testing.assert_close(out, expected)
    (out * grad).sum().backward()
    (expected * grad).sum().backward()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad)
    small = [t[:1].clone().requires_grad_() if i == 0 else t.clone().requires_grad_() for i, t in enumerate(ours)]
    assert torch.autograd.gradcheck(lambda *t: ChannelLayerNorm.apply(*t, 1e-5), tuple(small))


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_first_max_equals_torch_max_with_ties(dim):
    g = torch.Generator().manual_seed(4)
    t = torch.randint(0, 3, (4, 5, 6), generator=g).float()          # many ties: the first index must win
    values, index = first_max(t, dim)
    expected = t.max(dim=dim)
    torch.testing.assert_close(values, expected.values)
    assert torch.equal(index, expected.indices)
    rows = torch.randn(6, 3, generator=g).T.contiguous().T           # a transposed view, as the E-step's
    assert torch.equal(first_max(rows, 1)[1], rows.max(dim=1).indices)
