"""Tests of gmmseg_core.mixture against independent references (torch.distributions, POT, scikit-learn)."""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from gmmseg_core.mixture import (
    ConvergenceWarning,
    GaussianMixture,
    diag_gaussian_log_prob,
    estimate_diag_gaussian_parameters,
    estimate_grouped_diag_gaussian_parameters,
    grouped_sinkhorn,
    sinkhorn,
)


def _broadcast_log_prob(x, means, variances):
    """Float64 reference through the (N, M, D) broadcast."""
    x, means, variances = x.double(), means.double(), variances.double()
    diff = x[:, None, :] - means[None]
    return -0.5 * (math.log(2 * math.pi) * x.shape[1] + variances.log().sum(1) + (diff**2 / variances).sum(2))


def _random_params(n_comp, n_feat, dtype=torch.float64, offset=0.0):
    means = torch.randn(n_comp, n_feat, dtype=dtype) * 2 + offset
    variances = torch.rand(n_comp, n_feat, dtype=dtype) * 2 + 0.1
    return means, variances


def _mixture_data(rng, n_per, means, std=1.0):
    return np.concatenate([rng.normal(size=(n_per, means.shape[1])) * std + m for m in means])


# ---------------------------------------------------------------------------------------------------------
# diag_gaussian_log_prob
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_prob_matches_torch_distributions(dtype):
    means, variances = _random_params(7, 5, dtype)
    x = torch.randn(300, 5, dtype=dtype) * 3
    ours = diag_gaussian_log_prob(x, means, variances)
    dist = torch.distributions.Independent(torch.distributions.Normal(means, variances.sqrt()), 1)
    ref = dist.log_prob(x[:, None, :])
    assert ours.shape == (300, 7) and ours.dtype == dtype
    tol = 1e-10 if dtype == torch.float64 else 1e-3
    torch.testing.assert_close(ours, ref, atol=tol, rtol=tol)


def test_log_prob_matches_broadcast_reference_in_float64():
    means, variances = _random_params(11, 16)
    x = torch.randn(500, 16, dtype=torch.float64) * 2 + 1
    torch.testing.assert_close(
        diag_gaussian_log_prob(x, means, variances),
        _broadcast_log_prob(x, means, variances),
        atol=1e-9,
        rtol=0,
    )


def test_log_prob_far_from_origin_float32_matches_float64():
    means, variances = _random_params(6, 32, offset=100.0)
    x = (
        means[torch.randint(6, (2000,))]
        + torch.randn(2000, 32, dtype=torch.float64) * variances.sqrt().mean()
    )
    ref = _broadcast_log_prob(x, means, variances)
    ours = diag_gaussian_log_prob(x.float(), means.float(), variances.float())
    assert (ours.double() - ref).abs().max() < 1e-3
    # The same expansion without centring is what fails: the check above can tell the two apart.
    xf, mf, pf = x.float(), means.float(), variances.float().reciprocal()
    naive = (
        -0.5 * (xf * xf) @ pf.T
        + xf @ (mf * pf).T
        - 0.5 * (mf * mf * pf).sum(1)
        - 0.5 * (32 * math.log(2 * math.pi) + variances.float().log().sum(1))
    )
    assert (naive.double() - ref).abs().max() > 1e-2


def test_log_prob_blocks_and_grad_path_agree():
    # more rows than one CPU block, so the blocked loop runs several times
    means, variances = _random_params(4, 8, torch.float32)
    x = torch.randn(40_000, 8)
    fast = diag_gaussian_log_prob(x, means, variances)
    xg = x.clone().requires_grad_(True)
    slow = diag_gaussian_log_prob(xg, means, variances)
    torch.testing.assert_close(fast, slow.detach(), atol=1e-4, rtol=1e-5)
    # gradient against torch.distributions
    xs = x[:50].double().requires_grad_(True)
    diag_gaussian_log_prob(xs, means.double(), variances.double()).sum().backward()
    xr = x[:50].double().requires_grad_(True)
    dist = torch.distributions.Independent(
        torch.distributions.Normal(means.double(), variances.double().sqrt()), 1
    )
    dist.log_prob(xr[:, None, :]).sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad)


def test_log_prob_input_gradient_over_several_blocks_matches_reference():
    # 40,000 rows of D = 8: the CPU backward runs its row blocks several times
    means, variances = _random_params(4, 8, torch.float64)
    x = (torch.randn(40_000, 8, dtype=torch.float64) + 3).requires_grad_(True)
    weights = torch.randn(40_000, 4, dtype=torch.float64)
    (ours,) = torch.autograd.grad((diag_gaussian_log_prob(x, means, variances) * weights).sum(), x)
    (ref,) = torch.autograd.grad((_broadcast_log_prob(x, means, variances) * weights).sum(), x)
    torch.testing.assert_close(ours, ref)


def test_log_prob_backward_passes_gradcheck():
    x = (torch.randn(7, 3, dtype=torch.float64) + 5).requires_grad_(True)
    means = (torch.randn(4, 3, dtype=torch.float64) + 5).requires_grad_(True)
    variances = (torch.rand(4, 3, dtype=torch.float64) + 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(diag_gaussian_log_prob, (x, means, variances))
    # and agrees with autograd through the broadcast reference, also with respect to one input only
    weights = torch.randn(7, 4, dtype=torch.float64)
    ours = torch.autograd.grad(
        (diag_gaussian_log_prob(x, means, variances) * weights).sum(), (x, means, variances)
    )
    ref = torch.autograd.grad(
        (_broadcast_log_prob(x, means, variances) * weights).sum(), (x, means, variances)
    )
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
    (gx,) = torch.autograd.grad(diag_gaussian_log_prob(x, means.detach(), variances.detach()).sum(), x)
    torch.testing.assert_close(gx, torch.autograd.grad(_broadcast_log_prob(x, means, variances).sum(), x)[0])


def test_log_prob_shape_errors():
    means, variances = _random_params(3, 4)
    with pytest.raises(ValueError, match=r"x must have 2 dimensions, got shape \(5,\)"):
        diag_gaussian_log_prob(torch.zeros(5, dtype=torch.float64), means, variances)
    with pytest.raises(ValueError, match=r"same number of features.*\(5, 3\).*\(3, 4\)"):
        diag_gaussian_log_prob(torch.zeros(5, 3, dtype=torch.float64), means, variances)
    with pytest.raises(ValueError, match=r"variances must have the shape of means \(3, 4\), got \(3, 5\)"):
        diag_gaussian_log_prob(torch.zeros(5, 4), means, torch.ones(3, 5))
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got ndarray"):
        diag_gaussian_log_prob(np.zeros((5, 4)), means, variances)


# ---------------------------------------------------------------------------------------------------------
# sinkhorn
# ---------------------------------------------------------------------------------------------------------


def test_sinkhorn_marginals_hold():
    scores = torch.randn(60, 4, dtype=torch.float64) * 2
    q, errors = sinkhorn(scores, epsilon=1.0, n_iters=500, tol=1e-12, return_errors=True)
    assert len(errors) < 500 and errors[-1] < 1e-12
    torch.testing.assert_close(q.sum(1), torch.ones(60, dtype=torch.float64))
    torch.testing.assert_close(q.sum(0), torch.full((4,), 15.0, dtype=torch.float64))
    assert (q >= 0).all()


def test_sinkhorn_few_iterations_rows_exact_columns_approximate():
    scores = torch.randn(40, 5) * 3
    q, errors = sinkhorn(scores, epsilon=0.5, n_iters=3, return_errors=True)
    assert len(errors) == 3
    torch.testing.assert_close(q.sum(1), torch.ones(40))  # rows are normalised last
    col_err = torch.linalg.vector_norm(q.sum(0) / 40 - 1 / 5).item()
    assert col_err == pytest.approx(errors[-1], rel=1e-4)
    assert errors[-1] < errors[0]


def test_sinkhorn_balances_separated_components_only_with_many_iterations():
    # five well-separated clusters holding 50/20/15/10/5% of the samples, scored under their own components:
    # a few iterations leave the columns near those shares; the converged plan gives each component 1/5
    g = torch.Generator().manual_seed(0)
    shares = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    labels = torch.repeat_interleave(torch.arange(5), (shares * 400).long())
    means = torch.eye(5, dtype=torch.float64) * 6.0
    x = means[labels] + torch.randn(400, 5, generator=g, dtype=torch.float64)
    scores = diag_gaussian_log_prob(x, means, torch.ones(5, 5, dtype=torch.float64))
    few = sinkhorn(scores, epsilon=1.0, n_iters=3).sum(0) / 400
    torch.testing.assert_close(few, shares, atol=0.02, rtol=0)
    many, errors = sinkhorn(scores, epsilon=1.0, n_iters=2000, tol=1e-6, return_errors=True)
    assert errors[-1] < 1e-6
    torch.testing.assert_close(many.sum(0) / 400, torch.full((5,), 0.2, dtype=torch.float64), atol=1e-6, rtol=0)


def test_sinkhorn_batched_with_mask():
    scores = torch.randn(3, 12, 4, dtype=torch.float64)
    lengths = torch.tensor([12, 8, 0])
    mask = torch.arange(12)[None] < lengths[:, None]
    scores[~mask] = 1e30  # padding must not matter, whatever it holds
    q = sinkhorn(scores, epsilon=1.0, n_iters=300, tol=1e-12, mask=mask)
    assert torch.isfinite(q).all()
    assert (q[~mask] == 0).all()
    torch.testing.assert_close(q.sum(-1), mask.double())
    torch.testing.assert_close(q.sum(1), lengths[:, None].double().expand(3, 4) / 4)
    # each batch element equals the unbatched problem on its valid rows
    torch.testing.assert_close(q[1, :8], sinkhorn(scores[1, :8], epsilon=1.0, n_iters=300, tol=1e-12))
    single = sinkhorn(scores[1], epsilon=1.0, n_iters=300, tol=1e-12, mask=mask[1])
    torch.testing.assert_close(single, q[1])


def test_sinkhorn_without_rows_gives_an_empty_plan():
    assert sinkhorn(torch.zeros(0, 3)).shape == (0, 3)
    q, errors = sinkhorn(torch.zeros(2, 0, 3), hard=True, return_errors=True)
    assert q.shape == (2, 0, 3) and errors == [0.0, 0.0, 0.0]
    masked = sinkhorn(torch.randn(4, 3), mask=torch.zeros(4, dtype=torch.bool), return_errors=True)[1]
    assert masked == errors                   # as a problem whose rows are all masked


@pytest.mark.parametrize("n_iters", [1, 2, 5])
def test_sinkhorn_equals_pot_at_fixed_iterations(n_iters):
    ot = pytest.importorskip("ot")
    scores = torch.randn(30, 4, dtype=torch.float64) * 3
    n, k = scores.shape
    a, b = np.full(n, 1 / n), np.full(k, 1 / k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = ot.sinkhorn(a, b, -scores.numpy(), 0.7, method="sinkhorn_log", numItermax=n_iters, stopThr=0)
    np.testing.assert_allclose(sinkhorn(scores, epsilon=0.7, n_iters=n_iters).numpy() / n, plan, atol=1e-14)


def test_sinkhorn_equals_pot_at_convergence():
    ot = pytest.importorskip("ot")
    scores = torch.randn(50, 6, dtype=torch.float64) * 4
    n, k = scores.shape
    plan, log = ot.sinkhorn(
        np.full(n, 1 / n),
        np.full(k, 1 / k),
        -scores.numpy(),
        0.3,
        method="sinkhorn_log",
        stopThr=1e-13,
        numItermax=100_000,
        log=True,
    )
    q = sinkhorn(scores, epsilon=0.3, n_iters=100_000, tol=1e-13)
    np.testing.assert_allclose(q.numpy() / n, plan, atol=1e-12)
    assert log["err"][-1] < 1e-13


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_sinkhorn_huge_scores_stay_finite(dtype):
    big = torch.finfo(dtype).max
    scores = torch.tensor(
        [[1e6, -1e6, 0.0], [0.0, 1e6, -1e6], [-1e6, 0.0, 1e6], [big, -big, big / 2], [-big, -big, -big]]
    ).to(dtype)
    for eps in (0.05, 1e-3):
        q, errors = sinkhorn(scores, epsilon=eps, n_iters=20, return_errors=True)
        assert q.dtype == dtype
        assert torch.isfinite(q).all() and all(math.isfinite(e) for e in errors)
        torch.testing.assert_close(q.float().sum(1), torch.ones(5), atol=1e-2, rtol=0)
    batched = sinkhorn(
        scores[None].expand(2, 5, 3), hard=True, mask=torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 0, 1]]).bool()
    )
    assert torch.isfinite(batched).all()


def test_sinkhorn_impossible_and_undefined_scores():
    scores = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    scores[0, 0] = float("-inf")           # component 0 impossible for row 0
    scores[1] = float("-inf")              # no finite score
    scores[2, 1] = float("nan")            # undefined
    q = sinkhorn(scores, n_iters=5)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(1), torch.ones(6))
    assert q[0, 0] == 0 and q[0, 1:].sum() == pytest.approx(1.0)
    torch.testing.assert_close(q[1:3], torch.full((2, 3), 1 / 3))
    assert not torch.allclose(q[3:], torch.full((3, 3), 1 / 3), atol=0.05)   # the finite rows still choose


def test_sinkhorn_column_without_mass_recovers():
    # component 2 is hopeless for every row: its column sum underflows, yet equipartition must hold
    scores = torch.randn(30, 3, dtype=torch.float64)
    scores[:, 2] -= 1000.0
    q = sinkhorn(scores, epsilon=0.5, n_iters=1000, tol=1e-10)  # exp(-1000 / 0.5) underflows
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(0), torch.full((3,), 10.0, dtype=torch.float64), atol=1e-6, rtol=0)


def test_sinkhorn_column_impossible_for_every_row_gets_no_mass():
    scores = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    scores[:, 0] = float("-inf")
    for n_iters in (3, 200):
        q = sinkhorn(scores, epsilon=1.0, n_iters=n_iters)
        assert torch.isfinite(q).all() and q[:, 0].abs().max() == 0
        torch.testing.assert_close(q.sum(1), torch.ones(8, dtype=torch.float64))
    # the two reachable columns share the rows equally at convergence; the third stays in the error
    torch.testing.assert_close(q.sum(0)[1:], torch.full((2,), 4.0, dtype=torch.float64), atol=1e-6, rtol=0)
    _, errors = sinkhorn(scores, epsilon=1.0, n_iters=200, return_errors=True)
    assert errors[-1] == pytest.approx(math.sqrt(1 / 9 + 2 * (1 / 2 - 1 / 3) ** 2), abs=1e-6)


def test_sinkhorn_takes_numpy_scalars_and_refuses_bools():
    scores = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sinkhorn(scores, epsilon=np.float32(0.5), n_iters=np.int64(4)),
                               sinkhorn(scores, epsilon=0.5, n_iters=4))
    with pytest.raises(ValueError, match="tol must be None or a non-negative float, got True"):
        sinkhorn(scores, tol=True)


def test_sinkhorn_reads_integer_scores_as_floats():
    scores = torch.tensor([[0, -3, -1], [-2, 0, -5], [-1, -1, 0]])
    q = sinkhorn(scores, epsilon=1.0, n_iters=10)
    assert q.dtype == torch.get_default_dtype()
    torch.testing.assert_close(q, sinkhorn(scores.float(), epsilon=1.0, n_iters=10))
    with pytest.raises(ValueError, match=r"log_scores needs at least one column \(component\), got shape \(3, 0\)"):
        sinkhorn(torch.zeros(3, 0))


def test_sinkhorn_hard_is_one_hot_argmax_of_plan():
    scores = torch.randn(2, 25, 4)
    mask = torch.ones(2, 25, dtype=torch.bool)
    mask[1, 20:] = False
    soft = sinkhorn(scores, epsilon=0.1, n_iters=3, mask=mask)
    hard = sinkhorn(scores, epsilon=0.1, n_iters=3, mask=mask, hard=True)
    assert set(hard.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(hard.sum(-1), mask.float())
    assert torch.equal(hard[mask].argmax(-1), soft[mask].argmax(-1))
    # the plan's argmax is not the scores' argmax in general (equipartition moves rows)
    skewed = torch.zeros(20, 2)
    skewed[:, 0] = torch.linspace(1, 2, 20)
    assert sinkhorn(skewed, epsilon=0.1, n_iters=50, hard=True).sum(0).tolist() == [10.0, 10.0]


def test_sinkhorn_errors_and_validation():
    with pytest.raises(ValueError, match="epsilon must be a positive float, got 0"):
        sinkhorn(torch.zeros(3, 2), epsilon=0)
    with pytest.raises(ValueError, match="n_iters must be a positive int, got 0"):
        sinkhorn(torch.zeros(3, 2), n_iters=0)
    with pytest.raises(ValueError, match=r"log_scores must have \(2, 3\) dimensions, got shape \(3,\)"):
        sinkhorn(torch.zeros(3))
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 3\).*got \(3,\)"):
        sinkhorn(torch.zeros(2, 3, 4), mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="tol must be None or a non-negative float, got -1"):
        sinkhorn(torch.zeros(3, 2), tol=-1)


# ---------------------------------------------------------------------------------------------------------
# estimate_diag_gaussian_parameters
# ---------------------------------------------------------------------------------------------------------


def test_m_step_matches_broadcast_reference_batched_and_masked():
    x = torch.randn(3, 200, 5, dtype=torch.float64) * 2 + 3
    resp = torch.softmax(torch.randn(3, 200, 4, dtype=torch.float64) * 2, -1)
    mask = torch.rand(3, 200) < 0.7
    x_pad = x.clone()
    x_pad[~mask] = float("nan")  # padding may hold anything
    nk, means, variances = estimate_diag_gaussian_parameters(x_pad, resp, reg_covar=1e-3, mask=mask)
    r = resp * mask[..., None]
    nk_ref = r.sum(1)
    means_ref = torch.einsum("bnk,bnd->bkd", r, x) / nk_ref[..., None]
    var_ref = (r[..., None] * (x[:, :, None] - means_ref[:, None]) ** 2).sum(1) / nk_ref[..., None] + 1e-3
    assert nk.shape == (3, 4) and means.shape == variances.shape == (3, 4, 5)
    torch.testing.assert_close(nk, nk_ref)
    torch.testing.assert_close(means, means_ref)
    torch.testing.assert_close(variances, var_ref)


def test_m_step_variances_are_centred_in_float32():
    # tight components far from the origin: E[x^2] - mu^2 would lose every digit in float32
    x = torch.randn(4000, 3, dtype=torch.float64) * 0.01 + 1000.0
    resp = torch.softmax(torch.randn(4000, 2, dtype=torch.float64), -1)
    _, _, ref = estimate_diag_gaussian_parameters(x, resp, reg_covar=0.0)
    _, _, ours = estimate_diag_gaussian_parameters(x.float(), resp.float(), reg_covar=0.0)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-3, atol=0)
    r, xf = resp.float(), x.float()
    nk = r.sum(0)[:, None]
    uncentred = (r.T @ xf**2) / nk - ((r.T @ xf) / nk) ** 2
    assert ((uncentred.double() - ref).abs() / ref).max() > 0.1


def test_m_step_empty_component_stays_finite():
    x = torch.randn(50, 3)
    resp = torch.zeros(50, 3)
    resp[:, 0] = 1.0
    nk, means, variances = estimate_diag_gaussian_parameters(x, resp, reg_covar=1e-6)
    assert torch.isfinite(nk).all() and torch.isfinite(means).all() and torch.isfinite(variances).all()
    assert nk[1] > 0 and torch.allclose(variances[1], torch.full((3,), 1e-6))
    torch.testing.assert_close(means[0], x.mean(0))


def test_m_step_validation():
    with pytest.raises(ValueError, match=r"agree on all but the last dimension"):
        estimate_diag_gaussian_parameters(torch.zeros(5, 2), torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"same number \(>= 2\) of dimensions"):
        estimate_diag_gaussian_parameters(torch.zeros(2, 5, 2), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="reg_covar must be a non-negative float, got -1"):
        estimate_diag_gaussian_parameters(torch.zeros(5, 2), torch.zeros(5, 3), reg_covar=-1)


def test_grouped_m_step_equals_flat_m_step_batched_with_empty_slots():
    g = torch.Generator().manual_seed(3)
    B, K, M, D = 2, 3, 40, 5
    x = torch.randn(B, K, M, D, dtype=torch.float64, generator=g) + 4 * torch.randn(B, K, 1, D, dtype=torch.float64,
                                                                                  generator=g)
    resp = torch.softmax(3 * torch.randn(B, K, M, K, dtype=torch.float64, generator=g), -1)
    resp[:, 1, 25:] = 0.0                          # unfilled slots: zero weight
    centres = torch.randn(B, K, D, dtype=torch.float64, generator=g)
    ours = estimate_grouped_diag_gaussian_parameters(x, resp, centres, reg_covar=1e-3)
    ref = estimate_diag_gaussian_parameters(x.reshape(B, K * M, D), resp.reshape(B, K * M, K), reg_covar=1e-3)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def test_grouped_m_step_variances_are_centred_in_float32():
    # each group tight around its own point far from the origin, centred on that point: no cancellation
    g = torch.Generator().manual_seed(4)
    K, M, D = 2, 3000, 3
    centres = 1000.0 + torch.randn(K, D, dtype=torch.float64, generator=g)
    x = centres[:, None] + 0.01 * torch.randn(K, M, D, dtype=torch.float64, generator=g)
    resp = torch.zeros(K, M, K, dtype=torch.float64)
    resp[0, :, 0] = resp[1, :, 1] = 1.0
    _, _, ref = estimate_grouped_diag_gaussian_parameters(x, resp, centres, reg_covar=0.0)
    _, _, ours = estimate_grouped_diag_gaussian_parameters(x.float(), resp.float(), centres.float(), reg_covar=0.0)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-3, atol=0)


def test_grouped_m_step_validation():
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., K, M, D\)"):
        estimate_grouped_diag_gaussian_parameters(torch.zeros(3, 4, 2), torch.zeros(3, 4, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"centres must have shape \(3, 2\)"):
        estimate_grouped_diag_gaussian_parameters(torch.zeros(3, 4, 2), torch.zeros(3, 4, 3), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="reg_covar must be a non-negative float, got -1"):
        estimate_grouped_diag_gaussian_parameters(torch.zeros(3, 4, 2), torch.zeros(3, 4, 3), torch.zeros(3, 2),
                                                  reg_covar=-1)


# ---------------------------------------------------------------------------------------------------------
# GaussianMixture
# ---------------------------------------------------------------------------------------------------------


def _overlapping_data(rng, n=600, k=3, d=4, spread=2.0):
    centres = rng.normal(size=(k, d)) * spread
    return _mixture_data(rng, n // k, centres), centres


def test_em_follows_sklearn_lower_bound_trajectory(rng):
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    X, _ = _overlapping_data(rng)
    k, n_iter = 3, 15
    means0 = X[rng.choice(len(X), k, replace=False)]
    precisions0 = 1.0 / (rng.uniform(0.5, 2.0, size=(k, X.shape[1])))
    weights0 = np.array([0.2, 0.3, 0.5])
    # the same start and stopping rule for both libraries
    start = dict(means_init=means0, precisions_init=precisions0, weights_init=weights0, reg_covar=1e-4, tol=0,
                 max_iter=n_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sk = SkGaussianMixture(k, covariance_type="diag", **start).fit(X)
        ours = GaussianMixture(k, method="em", **start).fit(X)
    assert len(sk.lower_bounds_) == len(ours.lower_bounds_) == n_iter
    np.testing.assert_allclose(ours.lower_bounds_, sk.lower_bounds_, atol=1e-6, rtol=0)
    assert ours.means_.dtype == torch.float64
    np.testing.assert_allclose(ours.means_.numpy(), sk.means_, atol=1e-6)
    np.testing.assert_allclose(ours.variances_.numpy(), sk.covariances_, atol=1e-6)
    np.testing.assert_allclose(ours.weights_.numpy(), sk.weights_, atol=1e-6)
    np.testing.assert_allclose(ours.score_samples(X).numpy(), sk.score_samples(X), atol=1e-6)


def test_em_lower_bound_never_decreases(rng):
    X, _ = _overlapping_data(rng, spread=1.0)
    gm = GaussianMixture(4, method="em", init="random", tol=1e-8, max_iter=200, seed=3).fit(X)
    lb = np.array(gm.lower_bounds_)
    assert len(lb) > 5
    assert (np.diff(lb) >= -1e-10).all()


def test_sinkhorn_em_recovers_equal_weight_mixture(rng):
    centres = np.array([[0.0, 0.0, 0.0], [6.0, 0.0, 1.0], [0.0, 6.0, -1.0], [5.0, 5.0, 5.0]])
    X = _mixture_data(rng, 400, centres, std=1.0)
    gm = GaussianMixture(4, method="sinkhorn", seed=1).fit(X)
    assert gm.converged_
    means = gm.means_.numpy()
    cost = ((means[:, None] - centres[None]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    assert np.sqrt(cost[rows, cols]).max() < 0.2
    np.testing.assert_allclose(gm.variances_.numpy(), 1.0, atol=0.2)
    torch.testing.assert_close(gm.weights_, torch.full((4,), 0.25, dtype=torch.float64))
    # the recorded lower bound is the mean log p(x) with uniform weights under the parameters entering the
    # last iteration: one more E-step's worth away from the score of the final parameters
    assert gm.score(X) == pytest.approx(gm.lower_bounds_[-1], abs=1e-3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_components": 0}, "n_components must be a positive int, got 0"),
        ({"n_components": 2.5}, "n_components must be a positive int, got 2.5"),
        ({"method": "gibbs"}, r"method must be one of \('sinkhorn', 'em'\), got 'gibbs'"),
        ({"max_iter": 0}, "max_iter must be a positive int, got 0"),
        ({"tol": -1.0}, "tol must be a non-negative float, got -1.0"),
        ({"reg_covar": -1e-3}, "reg_covar must be a non-negative float, got -0.001"),
        ({"init": "kmeans"}, r"init must be one of \('kmeans\+\+', 'random'\), got 'kmeans'"),
        ({"epsilon": 0}, "epsilon must be a positive float, got 0"),
        ({"epsilon": float("inf")}, "epsilon must be a positive float, got inf"),
        ({"reg_covar": float("inf")}, "reg_covar must be a non-negative float, got inf"),
        ({"sinkhorn_iters": 0}, "sinkhorn_iters must be a positive int, got 0"),
        ({"seed": "a"}, "seed must be an int or None, got 'a'"),
    ],
)
def test_parameter_errors_name_parameter_and_value(kwargs, message):
    params = {"n_components": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        GaussianMixture(**params)


def test_data_errors():
    with pytest.raises(ValueError, match="at least n_components=5 samples, got 3"):
        GaussianMixture(5).fit(np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"X must be 2-D \(n_samples, n_features\), got shape \(10,\)"):
        GaussianMixture(2).fit(np.zeros(10))
    with pytest.raises(ValueError, match=r"means_init must have shape \(2, 3\), got \(3, 3\)"):
        GaussianMixture(2, means_init=np.zeros((3, 3))).fit(np.random.default_rng(0).normal(size=(20, 3)))
    with pytest.raises(ValueError, match="at most one of variances_init and precisions_init"):
        GaussianMixture(2, variances_init=np.ones((2, 3)), precisions_init=np.ones((2, 3)))
    with pytest.raises(RuntimeError, match="not fitted"):
        GaussianMixture(2).predict(np.zeros((3, 2)))
    gm = GaussianMixture(2).fit(np.random.default_rng(0).normal(size=(20, 3)))
    with pytest.raises(ValueError, match="X has 2 features but the mixture was fitted with 3"):
        gm.score_samples(np.zeros((4, 2)))
    bad = np.random.default_rng(0).normal(size=(20, 3))
    bad[[1, 5], 2] = [np.nan, np.inf]
    with pytest.raises(ValueError, match=r"X must be finite; it has 2 NaN or infinite entries \(shape \(20, 3\)\)"):
        GaussianMixture(2).fit(bad)
    with pytest.raises(ValueError, match="X must be finite; it has 2 NaN"):
        gm.score_samples(bad)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"variances_init": -np.ones((2, 3))}, r"variances_init must be positive; it has 6 entries <= 0 \(smallest -1\)"),
        ({"precisions_init": np.zeros((2, 3))}, r"precisions_init must be positive; it has 6 .* \(smallest 0\)"),
        ({"precisions_init": [[1, 1, 1], [1, -2, 1]]}, r"precisions_init must be positive; it has 1 .* -2\)"),
        ({"means_init": [[0, 0, np.nan], [1, 1, 1]]}, r"means_init must be finite; it has 1 NaN or infinite"),
        ({"variances_init": [[1, 1, np.inf], [1, 1, 1]]}, "variances_init must be finite; it has 1 NaN"),
        ({"precisions_init": [[1, 1, np.inf], [1, 1, 1]]}, "precisions_init must be finite; it has 1 NaN"),
        ({"weights_init": [np.nan, 1.0]}, "weights_init must be finite; it has 1 NaN or infinite"),
        ({"weights_init": [-1, 0]}, r"weights_init must be in \[0, 1\], got values in \[-1, 0\]"),
        ({"weights_init": [1.5, -0.5]}, r"weights_init must be in \[0, 1\], got values in \[-0.5, 1.5\]"),
        ({"weights_init": [0.5, 0.4]}, r"weights_init must sum to 1 \(within 1e-06\), got sum 0.9"),
        ({"weights_init": np.array([0.5, 0.4], dtype=np.float32)}, r"sum to 1 \(within 1e-06\), got sum 0.9"),
    ],
)
@pytest.mark.parametrize("method", ["em", "sinkhorn"])
def test_invalid_init_parameters_are_refused_before_fitting(kwargs, message, method):
    X = np.random.default_rng(0).normal(size=(20, 3))
    with pytest.raises(ValueError, match=message):
        GaussianMixture(2, method=method, **kwargs).fit(X)


def test_valid_init_weights_within_a_float32_tolerance(rng):
    X, _ = _overlapping_data(rng)
    start = dict(means_init=X[:3], variances_init=np.ones((3, X.shape[1])), max_iter=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        # a zero weight and a float32 sum off by less than 1e-6 are accepted, as by scikit-learn
        gm = GaussianMixture(3, method="em", weights_init=[0.0, 0.25, 0.75], **start).fit(X)
        assert np.isfinite(gm.lower_bounds_[0])
        weights = np.array([0.1, 0.2, 0.7 + 5e-7], dtype=np.float32)
        GaussianMixture(3, method="em", weights_init=weights, **start).fit(X.astype(np.float32))
        # a float32 fit's own weights, written out as float64 (sum off by ~1e-7), start another fit
        fitted = GaussianMixture(3, method="em", **start).fit(X.astype(np.float32)).weights_
        GaussianMixture(3, method="em", weights_init=fitted.double().tolist(), **start).fit(X)


def test_data_without_features_is_refused():
    with pytest.raises(ValueError, match=r"X must have at least one feature, got shape \(5, 0\)"):
        GaussianMixture(2).fit(np.zeros((5, 0)))


@pytest.mark.parametrize("method", ["em", "sinkhorn"])
def test_numpy_and_tensor_inputs_agree(rng, method):
    X, _ = _overlapping_data(rng)
    a = GaussianMixture(3, method=method, seed=0).fit(X)
    b = GaussianMixture(3, method=method, seed=0).fit(torch.from_numpy(X))
    assert a.means_.dtype == torch.float64
    torch.testing.assert_close(a.means_, b.means_)
    assert a.lower_bounds_ == b.lower_bounds_
    c = GaussianMixture(3, method=method, seed=0).fit(X.astype(np.float32))
    assert c.means_.dtype == torch.float32
    torch.testing.assert_close(c.means_.double(), a.means_, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(a.score_samples(X), a.score_samples(torch.from_numpy(X)))


@pytest.mark.parametrize("method", ["em", "sinkhorn"])
def test_predict_proba_predict_score_consistent(rng, method):
    X, _ = _overlapping_data(rng)
    gm = GaussianMixture(3, method=method).fit(X)
    proba = gm.predict_proba(X)
    torch.testing.assert_close(proba.sum(1), torch.ones(len(X), dtype=torch.float64))
    assert torch.equal(gm.predict(X), proba.argmax(1))
    dist = torch.distributions.Independent(torch.distributions.Normal(gm.means_, gm.variances_.sqrt()), 1)
    ref = torch.logsumexp(dist.log_prob(torch.from_numpy(X)[:, None]) + gm.weights_.log(), 1)
    torch.testing.assert_close(gm.score_samples(X), ref)
    assert gm.score(X) == pytest.approx(ref.mean().item())


def test_not_converged_warns():
    X = np.random.default_rng(0).normal(size=(100, 2))
    with pytest.warns(ConvergenceWarning, match=r"did not converge in max_iter=2"):
        gm = GaussianMixture(3, method="em", max_iter=2, tol=0.0).fit(X)
    assert not gm.converged_ and gm.n_iter_ == 2 and len(gm.lower_bounds_) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        gm = GaussianMixture(3, method="em", max_iter=500, tol=1e-3).fit(X)
    assert gm.converged_ and gm.n_iter_ < 500


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_init_is_seeded(rng, init):
    X, _ = _overlapping_data(rng)
    a = GaussianMixture(3, init=init, seed=5, max_iter=3, tol=0.0)
    b = GaussianMixture(3, init=init, seed=5, max_iter=3, tol=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a.fit(X)
        torch.manual_seed(123)  # the global RNG must not matter
        b.fit(X)
    assert torch.equal(a.means_, b.means_)


def test_given_init_parameters_are_the_starting_point(rng):
    X, centres = _overlapping_data(rng, spread=4.0)
    variances = np.ones_like(centres)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm = GaussianMixture(
            3, method="sinkhorn", means_init=centres, variances_init=variances, max_iter=1
        ).fit(X)
    dist = torch.distributions.Independent(
        torch.distributions.Normal(
            torch.from_numpy(centres), torch.ones(3, centres.shape[1], dtype=torch.float64)
        ),
        1,
    )
    expected = torch.logsumexp(dist.log_prob(torch.from_numpy(X)[:, None]) - math.log(3), 1).mean().item()
    assert gm.lower_bounds_[0] == pytest.approx(expected, abs=1e-10)


def test_m_step_centres_only_change_the_expansion_point():
    x = torch.randn(2, 300, 4, dtype=torch.float64) + 5
    resp = torch.softmax(torch.randn(2, 300, 3, dtype=torch.float64), -1)
    expected = estimate_diag_gaussian_parameters(x, resp)
    for centres in (torch.randn(3, 4, dtype=torch.float64) * 10, torch.zeros(2, 3, 4, dtype=torch.float64)):
        got = estimate_diag_gaussian_parameters(x, resp, centres=centres)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"centres must have shape \(2, 3, 4\) or \(3, 4\), got \(3, 5\)"):
        estimate_diag_gaussian_parameters(x, resp, centres=torch.zeros(3, 5))


@pytest.mark.parametrize("method", ["em", "sinkhorn"])
def test_a_fit_whose_variances_collapse_without_reg_covar_is_refused(method, rng):
    X = rng.normal(size=(60, 3))
    X[:, 1] = 2.0                                      # a constant feature: zero variance in every component
    with pytest.raises(ValueError, match=r"fitting the mixture failed: \d+ variances are zero or undefined.*"
                                         r"increase reg_covar \(now 0\)"):
        GaussianMixture(2, method=method, reg_covar=0.0).fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm = GaussianMixture(2, method=method).fit(X)   # the default reg_covar keeps it defined
    assert np.isfinite(gm.score(X)) and bool((gm.variances_[:, 1] > 0).all())


def test_m_step_variances_of_distant_components_are_centred_in_float32():
    # two tight components 2000 apart: every sample must be expanded about its own component's centre, not the
    # other one, or float32 loses the variances (1e-4) against squared offsets of 4e6
    g = torch.Generator().manual_seed(5)
    labels = torch.arange(600) % 2
    centres = torch.tensor([[1000.0] * 3, [-1000.0] * 3], dtype=torch.float64)
    x = centres[labels] + 0.01 * torch.randn(600, 3, dtype=torch.float64, generator=g)
    resp = torch.zeros(600, 2, dtype=torch.float64).scatter_(1, labels[:, None], 1.0)
    resp = 0.999 * resp + 0.0005                    # nearly hard, so each row's argmax is its own component
    _, _, ref = estimate_diag_gaussian_parameters(x, resp, reg_covar=0.0)
    for given in (None, centres.float()):
        _, _, ours = estimate_diag_gaussian_parameters(x.float(), resp.float(), reg_covar=0.0, centres=given)
        torch.testing.assert_close(ours.double(), ref, rtol=1e-3, atol=0)


def test_sinkhorn_column_impossible_for_every_valid_row_ignores_padding():
    # padding rows may hold finite scores in a column that no valid row can reach: it still gets no mass
    scores = torch.randn(10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    mask = torch.arange(10) < 6
    scores[:6, 0] = float("-inf")
    q = sinkhorn(scores, epsilon=1.0, n_iters=200, mask=mask)
    assert torch.isfinite(q).all() and q[:, 0].abs().max() == 0
    torch.testing.assert_close(q[:6], sinkhorn(scores[:6], epsilon=1.0, n_iters=200))
    torch.testing.assert_close(q.sum(0)[1:], torch.full((2,), 3.0, dtype=torch.float64), atol=1e-6, rtol=0)


def test_sinkhorn_column_sum_underflowing_inside_the_iterations_stays_finite():
    # finite but extreme float64 scores: after the first row step a column's sum underflows to 0; its update
    # is then taken in the log domain instead of dividing by zero
    scores = torch.tensor([[-1.0062e41, 1.0959e39, 1.0794e39, float("-inf")],
                           [-9.8234e40, 8.1891e38, 5.5087e38, 6.5895e38],
                           [-9.9849e40, 8.9680e38, -1.3865e39, 4.5657e38]], dtype=torch.float64)
    for n_iters in (3, 10):
        q = sinkhorn(scores, epsilon=1e-3, n_iters=n_iters)
        assert torch.isfinite(q).all() and (q >= 0).all() and q[0, 3] == 0
        torch.testing.assert_close(q.sum(1), torch.ones(3, dtype=torch.float64))


def _separated_unequal_clusters(rng):
    centres = np.array([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    labels = np.repeat([0, 1, 2], [300, 100, 50])
    return rng.normal(size=(450, 2)) * 0.5 + centres[labels], labels


@pytest.mark.parametrize("method", ["em", "sinkhorn"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_initial_parameters_are_the_m_step_of_the_initial_clusters(rng, method, seed):
    # k-means++ finds the three separated clusters; EM starts from their proportions, Sinkhorn EM from 1/K
    X, labels = _separated_unequal_clusters(rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm = GaussianMixture(3, method=method, seed=seed, max_iter=1).fit(X)
    x = torch.from_numpy(X)
    comps = [x[torch.from_numpy(labels == k)] for k in range(3)]
    means = torch.stack([c.mean(0) for c in comps])
    variances = torch.stack([c.var(0, unbiased=False) for c in comps]) + 1e-6
    weights = torch.tensor([len(c) / len(X) for c in comps], dtype=torch.float64)
    if method == "sinkhorn":
        weights = torch.full((3,), 1 / 3, dtype=torch.float64)
    dist = torch.distributions.Independent(torch.distributions.Normal(means, variances.sqrt()), 1)
    expected = torch.logsumexp(dist.log_prob(x[:, None]) + weights.log(), 1).mean().item()
    assert gm.lower_bounds_[0] == pytest.approx(expected, abs=1e-9)


def test_random_init_gives_every_component_a_sample(rng):
    X, _ = _overlapping_data(rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm = GaussianMixture(3, method="em", init="random", seed=0, max_iter=1).fit(X)
    assert float(gm.weights_.min()) > 0.5 / len(X)


def test_weights_init_are_renormalised(rng):
    X, centres = _overlapping_data(rng, spread=4.0)
    weights = np.array([0.2, 0.3, 0.5 - 8e-7])                   # sums to 1 within the 1e-6 tolerance
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm = GaussianMixture(3, method="em", means_init=centres, variances_init=np.ones_like(centres),
                             weights_init=weights, max_iter=1).fit(X)
    dist = torch.distributions.Independent(
        torch.distributions.Normal(torch.from_numpy(centres), torch.ones(centres.shape, dtype=torch.float64)), 1)
    log_w = torch.from_numpy(weights / weights.sum()).log()
    expected = torch.logsumexp(dist.log_prob(torch.from_numpy(X)[:, None]) + log_w, 1).mean().item()
    assert gm.lower_bounds_[0] == pytest.approx(expected, abs=1e-12)


def test_sinkhorn_em_step_uses_its_epsilon_and_iterations(rng):
    X, centres = _overlapping_data(rng, spread=1.0)
    x = torch.from_numpy(X)
    log_prob = diag_gaussian_log_prob(x, torch.from_numpy(centres), torch.ones(centres.shape, dtype=torch.float64))
    for epsilon, iters in ((0.3, 4), (1.0, 1)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            gm = GaussianMixture(3, method="sinkhorn", means_init=centres, variances_init=np.ones_like(centres),
                                 epsilon=epsilon, sinkhorn_iters=iters, max_iter=1).fit(X)
        resp = sinkhorn(log_prob, epsilon=epsilon, n_iters=iters)
        torch.testing.assert_close(gm.means_, (resp.T @ x) / resp.sum(0)[:, None])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_plus_plus_seeds_one_centre_per_separated_cluster(rng, seed):
    # eight separated clusters: k-means++ samples each new centre by its distance to the nearest chosen one, so
    # every cluster gets a centre (Lloyd steps cannot move a second centre out of a cluster)
    from sklearn.metrics import adjusted_rand_score

    centres = np.stack([np.arange(8) * 20.0, (np.arange(8) % 2) * 20.0], 1)
    labels = np.repeat(np.arange(8), 50)
    X = rng.normal(size=(400, 2)) * 0.5 + centres[labels]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm = GaussianMixture(8, method="em", seed=seed, max_iter=1).fit(X)
    assert adjusted_rand_score(labels, gm.predict(X).numpy()) == 1.0


def test_log_prob_reads_integer_inputs_as_floats():
    x, means, variances = torch.tensor([[0, 1], [2, -1]]), torch.tensor([[1, 1], [0, 2]]), torch.tensor([[1, 2], [3, 1]])
    out = diag_gaussian_log_prob(x, means, variances)
    assert out.dtype == torch.get_default_dtype()
    torch.testing.assert_close(out, _broadcast_log_prob(x, means, variances).to(out.dtype))


def test_sinkhorn_batched_errors_are_the_largest_of_the_batch():
    g = torch.Generator().manual_seed(3)
    scores = torch.stack([torch.randn(20, 3, dtype=torch.float64, generator=g) * s for s in (0.5, 4.0)])
    _, batched = sinkhorn(scores, epsilon=1.0, n_iters=4, return_errors=True)
    singles = [sinkhorn(s, epsilon=1.0, n_iters=4, return_errors=True)[1] for s in scores]
    assert batched == pytest.approx(np.maximum(*singles).tolist(), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------
# GaussianMixture: sample, bic, aic
# ---------------------------------------------------------------------------------------------------------


def _with_parameters(means, variances, weights, method="em"):
    """A fitted mixture whose parameters are then replaced by the given float64 ones."""
    means, variances, weights = (torch.as_tensor(np.asarray(v, dtype=np.float64)) for v in (means, variances, weights))
    X = np.random.default_rng(0).normal(size=(20, means.shape[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm = GaussianMixture(means.shape[0], method=method, max_iter=1).fit(X)
    gm.means_, gm.variances_, gm.weights_ = means, variances, weights
    return gm


def _sklearn_with_parameters(gm):
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    sk = SkGaussianMixture(gm.n_components, covariance_type="diag")
    sk.weights_ = gm.weights_.numpy()
    sk.means_ = gm.means_.numpy()
    sk.covariances_ = gm.variances_.numpy()
    sk.precisions_cholesky_ = 1.0 / np.sqrt(sk.covariances_)
    sk.n_features_in_ = gm.means_.shape[1]
    return sk


@pytest.mark.parametrize("method", ["em", "sinkhorn"])
def test_bic_and_aic_agree_with_sklearn_given_the_same_parameters(rng, method):
    X, _ = _overlapping_data(rng)
    gm = GaussianMixture(3, method=method, seed=0).fit(X)
    sk = _sklearn_with_parameters(gm)
    n, k, d = X.shape[0], 3, X.shape[1]
    # scikit-learn always fits the weights; Sinkhorn EM fixes them to 1/K, so K - 1 fewer parameters
    unfitted_weights = 0 if method == "em" else k - 1
    assert sk._n_parameters() == 2 * k * d + k - 1
    assert gm._n_parameters() == sk._n_parameters() - unfitted_weights
    assert gm.bic(X) == pytest.approx(sk.bic(X) - unfitted_weights * math.log(n), rel=1e-6)
    assert gm.aic(X) == pytest.approx(sk.aic(X) - 2 * unfitted_weights, rel=1e-6)
    assert gm.bic(torch.from_numpy(X)) == pytest.approx(gm.bic(X), rel=1e-12)


@pytest.mark.parametrize("method", ["em", "sinkhorn"])
def test_bic_picks_the_number_of_separated_clusters(rng, method):
    centres = np.array([[0.0, 0.0], [8.0, 0.0], [0.0, 8.0]])
    X = _mixture_data(rng, 100, centres)
    bic = {k: GaussianMixture(k, method=method, seed=0).fit(X).bic(X) for k in range(1, 6)}
    assert min(bic, key=bic.get) == 3


def test_sample_follows_the_weights_means_and_variances():
    weights = np.array([0.1, 0.3, 0.6])
    means = np.array([[-5.0, 0.0], [0.0, 3.0], [4.0, -2.0]])
    variances = np.array([[0.25, 1.0], [2.0, 0.5], [1.0, 4.0]])
    gm = _with_parameters(means, variances, weights)
    n = 20000
    X, y = gm.sample(n)
    assert X.shape == (n, 2) and X.dtype == torch.float64 and y.shape == (n,) and y.dtype == torch.int64
    assert (y.diff() >= 0).all()  # grouped by component, as scikit-learn returns them
    counts = torch.bincount(y, minlength=3).numpy()
    # five binomial standard deviations (42 to 69 samples); uniform weights would be off by 2000 to 4667
    np.testing.assert_array_less(np.abs(counts - n * weights), 5 * np.sqrt(n * weights * (1 - weights)))
    for k in range(3):
        xk = X[y == k].numpy()
        nk = len(xk)
        np.testing.assert_array_less(np.abs(xk.mean(0) - means[k]), 5 * np.sqrt(variances[k] / nk))
        np.testing.assert_array_less(np.abs(xk.var(0) - variances[k]), 5 * variances[k] * np.sqrt(2 / nk))


def test_sample_of_sinkhorn_em_is_balanced_and_in_the_fitted_dtype(rng):
    X, _ = _overlapping_data(rng)
    gm = GaussianMixture(3, method="sinkhorn").fit(X.astype(np.float32))
    samples, y = gm.sample(3000)
    assert samples.dtype == torch.float32
    np.testing.assert_array_less(np.abs(torch.bincount(y).numpy() - 1000), 5 * np.sqrt(3000 * 2 / 9))


def test_sample_is_reproducible_for_a_seed_or_a_generator():
    gm = _with_parameters([[0.0], [10.0]], [[1.0], [1.0]], [0.5, 0.5])
    X1, y1 = gm.sample(50)
    X2, y2 = gm.sample(50)  # an int seed: the same draw every call, as scikit-learn's int random_state
    assert torch.equal(X1, X2) and torch.equal(y1, y2)
    gm.seed = 1
    assert not torch.equal(gm.sample(50)[0], X1)
    gm.seed = None
    assert not torch.equal(gm.sample(50)[0], gm.sample(50)[0])
    a, b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    Xa, ya = gm.sample(50, generator=a)
    Xb, yb = gm.sample(50, generator=b)
    assert torch.equal(Xa, Xb) and torch.equal(ya, yb)
    assert not torch.equal(gm.sample(50, generator=a)[0], Xa)  # the generator moves on


def test_sample_bic_aic_errors():
    unfitted = GaussianMixture(2)
    for call in (unfitted.sample, lambda: unfitted.bic(np.zeros((3, 2))), lambda: unfitted.aic(np.zeros((3, 2)))):
        with pytest.raises(RuntimeError, match="not fitted"):
            call()
    gm = _with_parameters([[0.0], [10.0]], [[1.0], [1.0]], [0.5, 0.5])
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(ValueError, match=rf"n_samples must be a positive int, got {bad!r}"):
            gm.sample(bad)
    assert gm.sample(np.int64(2))[0].shape == (2, 1)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        gm.sample(2, generator=0)
    for criterion in (gm.bic, gm.aic):
        with pytest.raises(ValueError, match=r"X must have at least one sample, got shape \(0, 1\)"):
            criterion(np.zeros((0, 1)))
        with pytest.raises(ValueError, match="X has 2 features but the mixture was fitted with 1"):
            criterion(np.zeros((3, 2)))


def _per_group_sinkhorn(scores, groups, num_groups, **kw):
    """Reference for grouped_sinkhorn: sinkhorn on each group's rows alone."""
    out = torch.zeros_like(scores)
    for g in range(num_groups):
        rows = (groups == g).nonzero().squeeze(1)
        if rows.numel():
            out[rows] = sinkhorn(scores[rows], **kw)
    return out


@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_iters", [1, 3, 10])
def test_grouped_sinkhorn_equals_sinkhorn_on_each_group(dtype, n_iters):
    g = torch.Generator().manual_seed(0)
    sizes = [40, 0, 1, 7, 300]                     # an absent group, a group of one row
    groups = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    groups = groups[torch.randperm(groups.numel(), generator=g)]
    scores = (torch.randn(groups.numel(), 3, generator=g, dtype=dtype) * 0.3 - 0.5) / (1 + groups[:, None])
    expected = _per_group_sinkhorn(scores, groups, len(sizes), epsilon=0.05, n_iters=n_iters)
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-12)
    got = grouped_sinkhorn(scores, groups, len(sizes), epsilon=0.05, n_iters=n_iters)
    torch.testing.assert_close(got, expected, **tol)
    # the (K, N) layout, passed as its transpose, gives the same plan
    torch.testing.assert_close(grouped_sinkhorn(scores.T.contiguous().T, groups, len(sizes), epsilon=0.05,
                                                n_iters=n_iters), expected, **tol)


@pytest.mark.usefixtures("cpu_path")
def test_grouped_sinkhorn_solves_unusual_scores_as_sinkhorn_does():
    # a NaN and an impossible column in one group; scores whose column sums underflow inside the iterations
    # in another (the extreme float64 example above): both are solved by sinkhorn, padded and masked
    extreme = torch.tensor([[-1.0062e41, 1.0959e39, 1.0794e39, float("-inf")],
                            [-9.8234e40, 8.1891e38, 5.5087e38, 6.5895e38],
                            [-9.9849e40, 8.9680e38, -1.3865e39, 4.5657e38]], dtype=torch.float64)
    ordinary = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    odd = ordinary.clone()
    odd[0, 1], odd[:, 3] = float("nan"), float("-inf")
    for first in (extreme, odd):
        scores = torch.cat([first, ordinary])
        groups = torch.tensor([1] * first.shape[0] + [0] * 5)
        expected = _per_group_sinkhorn(scores, groups, 2, epsilon=1e-3, n_iters=4)
        torch.testing.assert_close(grouped_sinkhorn(scores, groups, 2, epsilon=1e-3, n_iters=4), expected)
    finite = ordinary * 1e3                          # finite, but a column's mass underflows in float64
    groups = torch.zeros(5, dtype=torch.long)
    torch.testing.assert_close(grouped_sinkhorn(finite, groups, 1, epsilon=1e-3, n_iters=4),
                               sinkhorn(finite, epsilon=1e-3, n_iters=4))


@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_sinkhorn_assignment_is_the_plans_first_argmax(dtype):
    g = torch.Generator().manual_seed(3)
    groups = torch.randint(0, 4, (500,), generator=g)
    scores = torch.rand(500, 5, generator=g, dtype=dtype) * 2 - 1
    for n_iters in (1, 3):
        plan = grouped_sinkhorn(scores, groups, 4, epsilon=0.05, n_iters=n_iters)
        got = grouped_sinkhorn(scores, groups, 4, epsilon=0.05, n_iters=n_iters, assign=True)
        assert got.dtype == torch.long and torch.equal(got, plan.max(dim=1).indices)
    # the padded path (a NaN in one group) and no rows at all
    odd = scores.clone()
    odd[0, 0] = float("nan")
    plan = grouped_sinkhorn(odd, groups, 4, epsilon=0.05, n_iters=3)
    got = grouped_sinkhorn(odd, groups, 4, epsilon=0.05, n_iters=3, assign=True)
    rows = groups != groups[0]
    assert torch.equal(got[rows], plan[rows].max(dim=1).indices)
    none = grouped_sinkhorn(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 2, assign=True)
    assert none.shape == (0,) and none.dtype == torch.long


@pytest.mark.usefixtures("cpu_path")
def test_grouped_sinkhorn_without_rows_and_bad_groups():
    assert grouped_sinkhorn(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 2).shape == (0, 3)
    with pytest.raises(ValueError, match=r"groups must be a long tensor of shape \(4,\), got torch.int32 \(4,\)"):
        grouped_sinkhorn(torch.zeros(4, 3), torch.zeros(4, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match=r"groups must be a long tensor of shape \(4,\), got torch.int64 \(3,\)"):
        grouped_sinkhorn(torch.zeros(4, 3), torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="epsilon must be a positive float, got 0"):
        grouped_sinkhorn(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), 2, epsilon=0)
