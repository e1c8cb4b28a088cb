"""The GMM head's hand-written autograd operations against the plain torch expressions they replace."""

import pytest
import torch
import torch.nn.functional as F

from gmmseg_core import mixture
from gmmseg_core.head_ops import ComponentLogProbMax, L2Normalize
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


def test_component_log_prob_max_equals_log_prob_then_amax(blocks):
    n = 50
    C, K, D = 4, 3, 5
    x, means, variances = _gaussians(n, C, K, D)
    g = torch.Generator().manual_seed(1)
    grad_comp, grad_max = torch.randn(n, C * K, generator=g, dtype=x.dtype), torch.randn(n, C, generator=g,
                                                                                      dtype=x.dtype)
    for use_comp, use_max in ((True, True), (True, False), (False, True)):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        comp, maxima = ComponentLogProbMax.apply(xa, means, variances, K)
        ref = diag_gaussian_log_prob(xb, means, variances)
        torch.testing.assert_close(comp, ref)
        torch.testing.assert_close(maxima, ref.view(n, C, K).amax(-1))
        ((comp * grad_comp).sum() * use_comp + (maxima * grad_max).sum() * use_max).backward()
        ((ref * grad_comp).sum() * use_comp + (ref.view(n, C, K).amax(-1) * grad_max).sum() * use_max).backward()
        torch.testing.assert_close(xa.grad, xb.grad)
    small = x[:6].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ComponentLogProbMax.apply(t, means, variances, K), (small,))


def test_component_log_prob_max_refuses_gradients_for_the_gaussians():
    x, means, variances = _gaussians(4, 2, 2, 3)
    _, maxima = ComponentLogProbMax.apply(x, means.requires_grad_(), variances, 2)
    with pytest.raises(RuntimeError, match="no gradient to the means and variances"):
        maxima.sum().backward()


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


def test_component_log_prob_max_gradient_far_from_the_origin_in_float32():
    # data and means near 1000: the backward must centre them like the forward, or float32 loses the gradient
    x, means, variances = _gaussians(40, 2, 3, 4)
    x, means = (x * 0.1 + 1000.0).float().double(), (means * 0.1 + 1000.0).float().double()   # float32 values
    g = torch.Generator().manual_seed(2)
    grad_comp, grad_max = torch.randn(40, 6, generator=g, dtype=x.dtype), torch.randn(40, 2, generator=g,
                                                                                   dtype=x.dtype)
    grads = []
    for dtype in (torch.float64, torch.float32):
        xa = x.detach().to(dtype).requires_grad_()
        comp, maxima = ComponentLogProbMax.apply(xa, means.to(dtype), variances.to(dtype), 3)
        ((comp * grad_comp.to(dtype)).sum() + (maxima * grad_max.to(dtype)).sum()).backward()
        grads.append(xa.grad.double())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-4)
