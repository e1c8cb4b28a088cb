r"""Diagonal-Gaussian mixture math on torch tensors.

Everything here is plain ``torch`` (no ``torch.nn``), runs on any device and in float32 or float64.

Log-likelihoods as matrix products
----------------------------------
For a component with mean :math:`\mu` and diagonal variance :math:`\sigma^2`,

.. math::

    \log \mathcal N(x; \mu, \sigma^2) = -\tfrac12 \Big[ D \log 2\pi + \sum_d \log \sigma_d^2
        + \sum_d \frac{x_d^2}{\sigma_d^2} - 2 \sum_d \frac{x_d \mu_d}{\sigma_d^2}
        + \sum_d \frac{\mu_d^2}{\sigma_d^2} \Big].

Expanding the quadratic turns the ``(N, M)`` table of all samples against all components into two matrix
products, ``x @ (mu / var)^T - x^2 @ (1 / (2 var))^T``, plus a per-component constant, so no ``(N, M, D)``
tensor is ever formed (twice the arithmetic of one ``(N, D) @ (D, M)`` product; 2.2-2.7x its time on a 2-core
CPU, ``benchmarks/RESULTS.md``). The expansion
subtracts large, nearly equal numbers when the data sit far from the origin (``x^2 / var`` and
``2 x mu / var`` are both huge when ``x`` is near ``mu`` and ``|mu|`` is large), which in float32 destroys
the result. Both the data and the means are therefore shifted by the mean of the means first; the
log-density is invariant to a common shift, and after it the cancelling terms are of the size of the spread
of the components rather than their distance to the origin.

Sinkhorn E-step
---------------
Sinkhorn EM replaces the E-step posterior by the solution of an entropic optimal-transport problem with
equipartition: the responsibilities ``Q`` (``N x K``) maximise ``<Q, S> + epsilon * H(Q)`` for the scores
``S = log N(x_i; mu_k, var_k)``, subject to every row summing to 1 (each sample is one unit of mass) and every
column to ``N / K`` (each component receives an equal share). The solution has the form
``Q = diag(u) exp(S / epsilon) diag(v)``, and the Sinkhorn-Knopp iterations alternate column and row
rescaling. :func:`sinkhorn` keeps ``log u`` and ``log v`` and only exponentiates shifted quantities (a row
softmax of ``S / epsilon + log v``), so any finite score is safe; the released GMMSeg code exponentiates
``S / 0.05`` directly, which overflows for large scores. It ends every iteration with the row step, so the
returned rows are exact distributions (responsibilities) and the columns carry the remaining error.
With ``epsilon = 1`` and uniform weights this is the E-step of Sinkhorn EM (Mena et al., 2020). GMMSeg uses
``epsilon = 0.05`` on scores divided by their largest magnitude, i.e. ``0.05 * max |S|`` on the raw scale: once
``max |S|`` reaches 20 nats that is at least 1, as soft as the EM posterior, not a hard assignment (the released
code takes the argmax of the plan afterwards).

:func:`grouped_sinkhorn` solves one such problem per group of rows (a segmentation head's classes) in one call,
on the unpadded rows: a matrix product with the groups' one-hot matrix gives every group's column sums at once.

Equal column masses are a property of the converged plan. A fixed, small number of iterations (GMMSeg: 3)
balances components that overlap, but when the components are well separated (score gaps of many
``epsilon``) each iteration moves little mass and the columns stay near the unconstrained posterior's. Inside
EM the balancing continues from one iteration to the next as the components move, so fitted mixtures end
much closer to equal shares than one E-step on fixed components would (``return_errors=True`` reports the
remaining column error of a call).

M-step
------
:func:`estimate_diag_gaussian_parameters` computes the weighted counts, means and variances from
responsibilities. The variances are computed about the means (``sum r (x - mu)^2 / n_k``), not as
``E[x^2] - mu^2``, which would cancel catastrophically for components far from the origin. To keep this to
matrix products, every sample is expressed about the centre of its most responsible component and the
offsets between centres and means are added exactly (``_centred_moments``). When the samples are already
stored in one group per component (as in a segmentation head's per-component memory),
:func:`estimate_grouped_diag_gaussian_parameters` expands each group about its own component's centre, which
needs neither the argmax nor the one-hot products (about 4x faster for a small memory on a CPU).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from gmmseg_core import cpu_kernels
from gmmseg_core._checks import check_int, is_finite_real, is_int, is_real
from gmmseg_core.memory import ranks_in_group

__all__ = [
    "diag_gaussian_log_prob",
    "sinkhorn",
    "grouped_sinkhorn",
    "estimate_diag_gaussian_parameters",
    "estimate_grouped_diag_gaussian_parameters",
    "GaussianMixture",
    "ConvergenceWarning",
]

try:  # scikit-learn is a dependency; keep the same warning class so filters written for it apply here
    from sklearn.exceptions import ConvergenceWarning
except ImportError:  # pragma: no cover - scikit-learn is installed with the package

    class ConvergenceWarning(UserWarning):
        """Raised when an iterative fit stops before its tolerance is reached."""


_LOG_2PI = math.log(2.0 * math.pi)
# Size (in elements) of the row blocks of the CPU paths: large enough for efficient products, small enough
# to stay in cache and be reused by the allocator.
_BLOCK_ELEMENTS = 1 << 18


def _row_block(x, row_elements):
    """Rows per block for a row-blocked loop over ``x``: all of them off the CPU, else ~``_BLOCK_ELEMENTS`` values."""
    return x.shape[0] if x.device.type != "cpu" else max(1, _BLOCK_ELEMENTS // row_elements)


def _check_tensor(name, value, ndim=None):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")


def diag_gaussian_log_prob(x, means, variances):
    r"""Log-density of every sample under every diagonal Gaussian.

    Computed as two matrix products after centring (see the module docstring); never forms ``(N, M, D)``.
    Differentiable in all three arguments, with a hand-written backward of matrix products; the forward
    works on blocks of rows with one small buffer.

    Parameters
    ----------
    x : Tensor, shape (N, D)
        Samples.
    means : Tensor, shape (M, D)
        Component means.
    variances : Tensor, shape (M, D)
        Component variances (positive).

    Returns
    -------
    Tensor, shape (N, M)
        ``log N(x_n; means_m, diag(variances_m))``, in the promoted floating dtype of the inputs.
    """
    _check_tensor("x", x, 2)
    _check_tensor("means", means, 2)
    _check_tensor("variances", variances, 2)
    if variances.shape != means.shape:
        raise ValueError(
            f"variances must have the shape of means {tuple(means.shape)}, got {tuple(variances.shape)}"
        )
    if x.shape[1] != means.shape[1]:
        raise ValueError(
            f"x and means must have the same number of features, got x {tuple(x.shape)} "
            f"and means {tuple(means.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(x.dtype, means.dtype), variances.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    x, means, variances = x.to(dtype), means.to(dtype), variances.to(dtype)
    if torch.is_grad_enabled() and (x.requires_grad or means.requires_grad or variances.requires_grad):
        return _DiagGaussianLogProb.apply(x, means, variances)
    return _log_prob_table(x, means, variances)


def _centred_terms(means, variances):
    """The expansion's terms of Gaussians ``(M, D)``: ``shift (D,)``, the mean of the means (the log-density is
    shift invariant; centring keeps the expansion small), ``mu / var`` and ``1 / var (M, D)`` with ``mu`` the
    centred means, and ``const (M,)``, everything that does not depend on ``x``."""
    shift = means.mean(0)
    mu = means - shift
    precisions = variances.reciprocal()
    mu_prec = mu * precisions
    const = -0.5 * (means.shape[1] * _LOG_2PI + variances.log().sum(1) + (mu * mu_prec).sum(1))
    return shift, mu_prec, precisions, const


def _log_prob_table(x, means, variances):
    """Forward of :func:`diag_gaussian_log_prob` on validated inputs of one dtype, without autograd."""
    n_features = x.shape[1]
    dtype = x.dtype
    shift, mu_prec, precisions, const = _centred_terms(means, variances)
    # Per block of rows, two (n, D+1) @ (D+1, M) products on one reused buffer. The trailing column of ones
    # carries the constant (cheaper than a broadcast bias) and survives the in-place squaring. Blocks keep
    # the buffer small: a fresh (N, D) temporary per call costs more in page faults than the products
    # themselves on a CPU.
    n_samples, n_comp = x.shape[0], means.shape[0]
    lin = torch.cat([mu_prec.T, const.unsqueeze(0)], 0)  # (D+1, M)
    quad = torch.cat([-0.5 * precisions.T, torch.zeros(1, n_comp, dtype=dtype, device=x.device)], 0)
    out = torch.empty(n_samples, n_comp, dtype=dtype, device=x.device)
    block = _row_block(x, n_features + 1)
    buf = torch.empty(min(block, n_samples), n_features + 1, dtype=dtype, device=x.device)
    for start in range(0, n_samples, block):
        stop = min(start + block, n_samples)
        b = buf[: stop - start]
        torch.sub(x[start:stop], shift, out=b[:, :n_features])
        b[:, n_features] = 1.0
        torch.mm(b, lin, out=out[start:stop])
        out[start:stop].addmm_(b.square_(), quad)
    return out


class _DiagGaussianLogProb(torch.autograd.Function):
    """Autograd wrapper: the blocked forward, and a backward made of matrix products.

    With ``xc = x - s``, ``mc = mu - s`` (``s`` the mean of the means; the result does not depend on it, so
    no gradient flows through it), ``p = 1 / var`` and ``G`` the incoming gradient (N, M)::

        dx   = G @ (mc p) - xc * (G @ p)
        dmu  = p * (G^T xc - mc * sum_n G)
        dvar = p / 2 * (p * sum_n G (xc - mc)^2 - sum_n G)
    """

    @staticmethod
    def forward(ctx, x, means, variances):
        ctx.save_for_backward(x, means, variances)
        return _log_prob_table(x, means, variances)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, means, variances = ctx.saved_tensors
        shift = means.mean(0)
        mc = means - shift
        prec = variances.reciprocal()
        grad_x = grad_means = grad_variances = None
        if ctx.needs_input_grad[0]:
            grad_x = _grad_x_blocked(grad, x, shift, mc * prec, prec)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            total = grad.sum(0).unsqueeze(1)  # (M, 1)
            xc = x - shift
            g_xc = grad.T @ xc  # (M, D)
            if ctx.needs_input_grad[1]:
                grad_means = prec * (g_xc - mc * total)
            if ctx.needs_input_grad[2]:
                g_sq = grad.T @ (xc * xc) - 2.0 * mc * g_xc + mc * mc * total
                grad_variances = 0.5 * prec * (prec * g_sq - total)
        return grad_x, grad_means, grad_variances


def _grad_x_blocked(grad, x, shift, mc_prec, prec):
    """``grad @ (mc p) - (x - shift) * (grad @ p)`` ``(N, D)`` by blocks of rows on CPU.

    One product with the two right-hand sides side by side, ``(n, M) @ (M, 2D)``, then a fused multiply-add
    into the output; small reused buffers instead of four fresh ``(N, D)`` temporaries (page faults cost as
    much as the products on a CPU).
    """
    n_samples, n_features = x.shape
    rhs = torch.cat([mc_prec, prec], 1)  # (M, 2D)
    block = _row_block(x, 2 * n_features)
    out = torch.empty_like(x)
    rows = min(block, n_samples)
    both = torch.empty(rows, 2 * n_features, dtype=x.dtype, device=x.device)
    centred = torch.empty(rows, n_features, dtype=x.dtype, device=x.device)
    for start in range(0, n_samples, block):
        stop = min(start + block, n_samples)
        b, c = both[: stop - start], centred[: stop - start]
        torch.mm(grad[start:stop], rhs, out=b)
        torch.sub(x[start:stop], shift, out=c)
        torch.addcmul(b[:, :n_features], c, b[:, n_features:], value=-1.0, out=out[start:stop])
    return out


def first_max(t, dim):
    """``t.max(dim)``: the maxima and the first index of each, by a running comparison over the slices along
    ``dim``.

    For a short dimension (a few components) this is several times faster on a CPU than ``max``, whose search
    over a middle dimension, or over a last one of a few values, takes a slow path; each slice here is a large
    map. The index is updated by ``where`` on fresh tensors: an in-place ``masked_fill_`` into a zeroed index
    took about three times as long on a CPU. A NaN gives a NaN maximum, as ``max`` does (its index may differ).
    """
    values, index = t.select(dim, 0), None
    for k in range(1, t.shape[dim]):
        candidate = t.select(dim, k)
        greater = candidate > values                        # strictly greater: ties keep the first index
        values = torch.maximum(values, candidate)
        index = greater.long() if index is None else torch.where(greater, k, index)
    if index is None:                                       # a single slice: itself, at index 0
        return values.clone(), torch.zeros(values.shape, dtype=torch.long, device=values.device)
    return values, index


def _floor(dtype):
    # Far below any meaningful log-score yet finite after adding three of them together.
    return torch.finfo(dtype).min / 16


def sinkhorn(log_scores, epsilon=0.05, n_iters=3, tol=None, hard=False, mask=None, return_errors=False):
    r"""Log-domain Sinkhorn-Knopp with uniform marginals (equipartition over the columns).

    Returns the entropic optimal-transport plan ``Q = diag(u) exp(log_scores / epsilon) diag(v)`` whose rows
    sum to 1 and whose columns sum to ``n / K``, ``n`` being the number of valid rows. Each iteration
    rescales the columns, then the rows, so the returned rows are exact probability distributions
    (responsibilities) and the column marginals carry the remaining error, which stays large after a few
    iterations when the columns' scores are far apart (see the module docstring). With enough iterations and the
    same problem, ``Q / n`` equals the plan of ``ot.sinkhorn(a, b, M, reg, method="sinkhorn_log")`` for
    ``a = 1/n``, ``b = 1/K``, ``M = -log_scores`` and ``reg = epsilon``.

    Parameters
    ----------
    log_scores : Tensor, shape (N, K) or (B, N, K)
        Scores, typically component log-likelihoods; integer scores are read as the default float dtype. Any
        finite values are safe from overflow: each row is shifted by its maximum before the division by
        ``epsilon``, and only shifted quantities are exponentiated. The start from the raw scores (see below)
        puts ``(row max - overall max) / epsilon`` into the row duals, so in float32 score spreads beyond
        about ``1e5 * epsilon`` blur the smaller rows' preferences (use float64, or scale the scores as the
        GMM head does). ``-inf`` marks an impossible assignment; a column that is ``-inf`` for every valid row
        receives no mass (its marginal then cannot be met and stays in the error). A valid row with no finite
        score, with a ``+inf`` or with a NaN anywhere gets uniform responsibilities (and still counts in the
        column marginals); NaN is not reported, which would cost a host synchronisation per call on an
        accelerator.
    epsilon : float, default 0.05
        Entropic regularisation; smaller is closer to a hard assignment.
    n_iters : int, default 3
        Number of (column, row) iterations; the maximum number when ``tol`` is given.
    tol : float, optional
        Stop as soon as the column-marginal error (see ``return_errors``) falls below ``tol``.
    hard : bool, default False
        Return the one-hot of each row's argmax of the plan instead of the plan.
    mask : Tensor of bool, shape (N,) or (B, N), optional
        Valid rows. Invalid (padding) rows get all zeros and do not count in ``n``.
    return_errors : bool, default False
        Also return the error after each iteration: the L2 norm of ``colsum(Q) / n - 1 / K`` (the same
        quantity as POT's ``err`` for the normalised plan ``Q / n``), maximum over the batch.

    Returns
    -------
    Q : Tensor, same shape and dtype as ``log_scores``
        The plan (or its hard version).
    errors : list of float
        Only when ``return_errors`` is true.
    """
    _check_tensor("log_scores", log_scores, (2, 3))
    if not (is_finite_real(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a positive float, got {epsilon!r}")
    n_iters = check_int("n_iters", n_iters)
    if tol is not None and not (is_real(tol) and tol >= 0):
        raise ValueError(f"tol must be None or a non-negative float, got {tol!r}")
    epsilon = float(epsilon)
    if log_scores.shape[-1] == 0:
        raise ValueError(f"log_scores needs at least one column (component), got shape {tuple(log_scores.shape)}")
    batched = log_scores.dim() == 3
    scores = log_scores if batched else log_scores.unsqueeze(0)
    n_batch, n_rows, n_cols = scores.shape
    if mask is not None:
        _check_tensor("mask", mask)
        if tuple(mask.shape) != tuple(log_scores.shape[:-1]):
            raise ValueError(
                f"mask must have shape {tuple(log_scores.shape[:-1])} (the rows of log_scores), "
                f"got {tuple(mask.shape)}"
            )
        valid = (mask if batched else mask.unsqueeze(0)).to(device=scores.device, dtype=torch.bool)
    else:
        valid = torch.ones(n_batch, n_rows, dtype=torch.bool, device=scores.device)

    if n_rows == 0:       # no rows: an empty plan, with the errors of a problem whose rows are all masked
        q = torch.zeros_like(log_scores)
        return (q, [0.0] * (1 if tol is not None else n_iters)) if return_errors else q
    out_dtype = log_scores.dtype if log_scores.dtype.is_floating_point else torch.get_default_dtype()
    work_dtype = out_dtype if out_dtype in (torch.float32, torch.float64) else torch.float32
    floor = _floor(work_dtype)
    with torch.no_grad():
        # Work in the (B, K, N) layout: the reductions over the K components then run across contiguous
        # rows of N values, several times faster on a CPU than reductions over a trailing axis of size K.
        s = scores.to(work_dtype).transpose(-1, -2).contiguous()  # (B, K, N)
        row_max = s.amax(-2, keepdim=True)  # (B, 1, N)
        logits = torch.nan_to_num((s - row_max) / epsilon, nan=floor, neginf=floor).clamp(min=floor)
        n_valid = valid.sum(1).to(work_dtype)  # (B,)
        has_rows = (n_valid > 0).unsqueeze(-1)  # (B, 1)
        n_safe = n_valid.clamp(min=1.0).unsqueeze(-1)  # (B, 1)
        log_col_mass = (n_safe / n_cols).log()  # (B, 1)
        # Start from the raw scores (row duals 0 up to one constant per problem), as POT and the released code
        # do: the row maxima removed above come back as the initial row duals.
        row_max = torch.where(valid, row_max.squeeze(-2), float("-inf"))  # (B, N)
        top = row_max.amax(1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, 0.0)
        log_u = torch.nan_to_num((row_max - top) / epsilon, nan=floor, neginf=floor).clamp(min=floor)
        log_u = torch.where(valid, log_u, float("-inf"))
        col = torch.logsumexp(logits + log_u.unsqueeze(-2), dim=-1)  # (B, K), exact first column step
        # A column that no valid row can reach (all -inf) stays empty: its dual would otherwise grow by the
        # floor's size and hand it a full share. Unless every column is such (then rows fall back to uniform).
        reachable = ((s > float("-inf")) & valid.unsqueeze(-2)).any(-1)  # (B, K)
        dead = ~reachable & reachable.any(-1, keepdim=True)
        live = has_rows & ~dead  # (B, K): the column duals that are updated
        log_v = torch.where(live, log_col_mass - col, 0.0).masked_fill(dead, float("-inf"))
        row_weight = valid.unsqueeze(-2).to(work_dtype)  # (B, 1, N)
        tiny = torch.finfo(work_dtype).tiny
        errors = []
        need_error = tol is not None or return_errors
        for it in range(n_iters):
            # Row step: with the row duals eliminated, the plan is a softmax over the components of
            # logits + v. The next column step only needs its column sums: v <- v + log(n / K) - log(colsum),
            # a plain sum rather than a logsumexp.
            z = logits + log_v.unsqueeze(-1)  # (B, K, N)
            plan = torch.softmax(z, dim=-2) * row_weight  # invalid rows 0
            last = it == n_iters - 1
            if last and not need_error:
                break
            colsum = plan.sum(-1)  # (B, K)
            if need_error:
                err = torch.linalg.vector_norm(colsum / n_safe - 1.0 / n_cols, dim=-1)
                errors.append(float(torch.where(has_rows.squeeze(-1), err, 0.0).max()))
                if last or (tol is not None and errors[-1] < tol):
                    break
            underflow = (colsum < tiny) & live
            if bool(underflow.any()):  # a column with (numerically) no mass: exact log-domain sum
                log_plan = torch.log_softmax(z, dim=-2).masked_fill(~valid.unsqueeze(-2), float("-inf"))
                log_c = torch.where(
                    underflow, torch.logsumexp(log_plan, dim=-1), colsum.clamp(min=tiny).log()
                )
            else:
                log_c = colsum.log()
            log_v = torch.where(live, log_v + log_col_mass - log_c, log_v)
        if hard:
            best = z.transpose(-1, -2).contiguous().argmax(-1)  # (B, N)
            # scatter rather than one_hot, which checks the index range on the host (a GPU synchronisation)
            q = torch.zeros(*best.shape, n_cols, dtype=work_dtype, device=best.device)
            q.scatter_(-1, best.unsqueeze(-1), valid.unsqueeze(-1).to(work_dtype))
        else:
            q = plan.transpose(-1, -2).contiguous()
        q = q.to(out_dtype)
    if not batched:
        q = q.squeeze(0)
    return (q, errors) if return_errors else q


def grouped_sinkhorn(log_scores, groups, num_groups, epsilon=0.05, n_iters=3, assign=False):
    r"""One Sinkhorn problem per group of rows, all solved at once: row ``i`` of the result is the row of
    ``sinkhorn(log_scores[groups == groups[i]], epsilon, n_iters)`` that belongs to it.

    A segmentation head solves one problem per class over that class's pixels, whose numbers differ by orders
    of magnitude within a batch. Padding every class to the largest one (``sinkhorn`` with a ``mask``) spends
    most of its work on padding; here the rows stay unpadded in a ``(K, N)`` layout and the per-group sums
    (column sums, and the column duals spread back to the rows) are products with the ``(G, N)`` one-hot matrix
    of the groups, which on a CPU is faster than a scatter. The steps are those of :func:`sinkhorn` for finite
    scores; they skip its safeguards for infinite or NaN scores and for columns whose mass underflows, so when
    either case arises the groups are solved by :func:`sinkhorn` (padded and masked) instead.

    On a CPU the same steps run as one compiled loop (:mod:`gmmseg_core.cpu_kernels`; in the exponential domain,
    sums in float64), equal to these torch operations to rounding and several times faster at a few thousand
    rows, where each of the ~40 operations below costs microseconds whatever its size.

    Parameters
    ----------
    log_scores : Tensor, shape (N, K)
    groups : LongTensor, shape (N,)
        Group of every row, in ``[0, num_groups)``.
    num_groups : int
    epsilon, n_iters
        As for :func:`sinkhorn`.
    assign : bool
        Return every row's most responsible column instead of the plan (a hard assignment, as the released
        GMMSeg code takes after its Sinkhorn steps). It is read from the last iteration's log-domain scores,
        before the row normalisation that would not change their order, which that normalisation then skips.

    Returns
    -------
    Tensor, shape (N, K), or LongTensor (N,) with ``assign``
        Rows sum to 1; within each group the columns sum to ``n_g / K`` as far as ``n_iters`` iterations get.
        On a CPU a contiguous tensor; elsewhere the transpose (a view) of a contiguous ``(K, N)`` tensor,
        unless the groups were solved by :func:`sinkhorn`, and passing ``log_scores`` in that layout (``t.T``
        for a contiguous ``(K, N)`` tensor ``t``) spares the copy into it. With ``assign``, the first column of
        largest mass per row.

    Raises
    ------
    ValueError
        For ``groups`` that are not a long tensor of one group per row, and on a CPU for a group outside
        ``[0, num_groups)``.
    """
    _check_tensor("log_scores", log_scores, 2)
    _check_tensor("groups", groups, 1)
    if groups.shape[0] != log_scores.shape[0] or groups.dtype != torch.long:
        raise ValueError(f"groups must be a long tensor of shape ({log_scores.shape[0]},), got {groups.dtype} "
                         f"{tuple(groups.shape)}")
    num_groups = check_int("num_groups", num_groups)
    if not (is_finite_real(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a positive float, got {epsilon!r}")
    n_iters = check_int("n_iters", n_iters)
    n_rows, n_cols = log_scores.shape
    if n_rows == 0 or n_cols == 0 or log_scores.dtype not in (torch.float32, torch.float64):
        return _padded_grouped_sinkhorn(log_scores, groups, num_groups, epsilon, n_iters, assign)
    if cpu_kernels.available(log_scores, groups):
        solved = cpu_kernels.grouped_sinkhorn(log_scores, groups, num_groups, epsilon, n_iters, assign=assign)
        if solved is not None:
            return solved[1] if assign else solved[0]
    with torch.no_grad():
        if not math.isfinite(float(log_scores.sum())):          # a NaN or an infinity anywhere (or an overflow)
            return _padded_grouped_sinkhorn(log_scores, groups, num_groups, epsilon, n_iters, assign)
        dtype, device = log_scores.dtype, log_scores.device
        onehot = torch.zeros(num_groups, n_rows, dtype=dtype, device=device).scatter_(0, groups.unsqueeze(0), 1.0)
        counts = onehot.sum(1)                                                   # (G,)
        absent = counts == 0
        s = log_scores.T.contiguous()       # (K, N); contiguous, or every later op inherits the transposed strides
        row_max = s.amax(0)                                                      # (N,)
        logits = (s - row_max).div_(epsilon)
        top = torch.full((num_groups,), float("-inf"), dtype=dtype, device=device)
        top.scatter_reduce_(0, groups, row_max, "amax")
        log_mass = (counts.clamp(min=1.0) / n_cols).log_()                       # (G,)
        # As sinkhorn: start from the raw scores (the row maxima come back as the initial row duals), each group
        # shifted by its largest score. Every exponent is then <= 0 (a group's largest exactly 0), so a plain sum
        # serves for the first column step (sinkhorn's log-sum-exp) unless a column's sum underflows: with scores
        # scaled to [-1, 1], as the GMM head scales them, epsilon = 0.05 keeps every exponent above -80, where
        # float32 is still normal. Absent groups get column sums of 1: finite duals, multiplied by zeros.
        col = (s - top.index_select(0, groups)).div_(epsilon).exp_().mm(onehot.T).masked_fill_(absent, 1.0)
        lowest = col.amin()
        log_v = log_mass - col.log_()                                            # (K, G)
        for it in range(n_iters):
            z = torch.addmm(logits, log_v, onehot)                               # (K, N): row's group's duals added
            if it == n_iters - 1 and assign:
                break
            plan = torch.softmax(z, dim=0)
            if it == n_iters - 1:
                break
            colsum = plan.mm(onehot.T).masked_fill_(absent, 1.0)                 # (K, G)
            lowest = torch.minimum(lowest, colsum.amin())
            log_v = (log_v + log_mass).sub_(colsum.log_())
        # One check for the whole run (one host synchronisation): a column sum that underflowed, at the start or
        # in an iteration (NaN after it included), sends the groups to sinkhorn's exact log-domain steps.
        if not float(lowest) >= torch.finfo(dtype).tiny:
            return _padded_grouped_sinkhorn(log_scores, groups, num_groups, epsilon, n_iters, assign)
        return first_max(z, 0)[1] if assign else plan.T


def _padded_grouped_sinkhorn(log_scores, groups, num_groups, epsilon, n_iters, assign=False):
    """:func:`grouped_sinkhorn` by :func:`sinkhorn` on the groups padded to the largest one and masked."""
    if assign:
        plan = _padded_grouped_sinkhorn(log_scores, groups, num_groups, epsilon, n_iters)
        return first_max(plan, 1)[1]
    n_rows, n_cols = log_scores.shape
    if n_rows == 0:
        return sinkhorn(log_scores, epsilon=epsilon, n_iters=n_iters)
    counts, rank = ranks_in_group(groups, num_groups)
    width = int(counts.max())
    row = groups * width + rank                                 # row of the padded (G, largest, K) table
    padded = log_scores.new_zeros(num_groups * width, n_cols).index_copy_(0, row, log_scores)
    mask = torch.zeros(padded.shape[0], dtype=torch.bool, device=log_scores.device).index_fill_(0, row, True)
    q = sinkhorn(padded.view(num_groups, -1, n_cols), epsilon=epsilon, n_iters=n_iters,
                 mask=mask.view(num_groups, -1))
    return q.view(-1, n_cols).index_select(0, row)


def _centred_moments(x, resp, nk, centres):
    r"""Weighted means (..., K, D) and ``sum_n r_nk (x_n - mu_k)^2`` (..., K, D), one pass over ``x``.

    Each sample is expressed about the centre of its most responsible component, ``x_n = c_{l(n)} + e_n``.
    With the responsibilities grouped by label, ``A_jk = sum_{l(n)=j} r_nk e_n`` and
    ``C_jk = sum_{l(n)=j} r_nk``, and ``d_jk = c_j - mu_k``:

    .. math::

        \mu_k = \frac{1}{n_k} \sum_j (A_{jk} + C_{jk} c_j), \qquad
        \sum_n r_{nk} (x_n - \mu_k)^2 = \sum_n r_{nk} e_n^2 + 2 \sum_j d_{jk} A_{jk}
            + \sum_j C_{jk} d_{jk}^2 .

    Exact for any centres; accurate (no large terms cancelling) when the centres lie near the samples of
    their component, e.g. the previous means. All sums are matrix products over blocks of rows, and no
    ``(..., N, K, D)`` tensor is formed.
    """
    n_samples, n_features = x.shape[-2:]
    n_components = resp.shape[-1]
    batch = x.shape[:-2]
    row_elements = max(1, x[..., :1, :].numel() + resp[..., :1, :].numel() * n_components)
    if x.device.type != "cpu" and n_samples * row_elements <= 1 << 27:
        block = n_samples  # accelerators prefer few large kernels
    else:
        block = max(1, _BLOCK_ELEMENTS // row_elements)
    own = torch.zeros_like(centres)  # (..., K, D): sum_n r_nk e_n^2
    grouped = x.new_zeros(*batch, n_components * n_components, n_features)  # (..., J*K, D)
    counts = x.new_zeros(*batch, n_components * n_components)  # (..., J*K)
    for start in range(0, n_samples, block):
        stop = min(start + block, n_samples)
        r = resp[..., start:stop, :]  # (..., n, K)
        label = r.argmax(-1, keepdim=True)  # (..., n, 1)
        one_hot = torch.zeros_like(r).scatter_(-1, label, 1.0)  # (..., n, K)
        xb = x[..., start:stop, :]
        # e = x - c_{l(n)}; the product with a one-hot row is exact, and fuses the gather with the subtraction
        e = torch.addmm(xb, one_hot, centres, alpha=-1) if xb.dim() == 2 else xb - one_hot @ centres
        by_label = (one_hot.unsqueeze(-1) * r.unsqueeze(-2)).flatten(-2)  # (..., n, J*K)
        grouped += by_label.transpose(-1, -2) @ e
        counts += by_label.sum(-2)
        own += r.transpose(-1, -2) @ e.square_()
    grouped = grouped.unflatten(-2, (n_components, n_components))  # (..., J, K, D)
    counts = counts.unflatten(-1, (n_components, n_components)).unsqueeze(-1)  # (..., J, K, 1)
    return _moments_from_groups(grouped, counts, own, nk, centres)


def _moments_from_groups(grouped, counts, own, nk, centres):
    """Means (..., K, D) and squared deviations (..., K, D) from the sums of ``_centred_moments``.

    ``grouped`` (..., J, K, D) is ``A_jk``, ``counts`` (..., J, K, 1) is ``C_jk``, ``own`` (..., K, D) is
    ``sum_n r_nk e_n^2`` and ``centres`` (..., J, D) the expansion points ``c_j``.
    """
    means = (grouped + counts * centres.unsqueeze(-2)).sum(-3) / nk.unsqueeze(-1)
    d = centres.unsqueeze(-2) - means.unsqueeze(-3)  # (..., J, K, D): c_j - mu_k
    return means, own + (2.0 * d * grouped + counts * d * d).sum(-3)


def _m_step_dtype(x, resp, reg_covar):
    """Check ``reg_covar`` and return the floating dtype both M-steps compute in."""
    if not (isinstance(reg_covar, (int, float)) and reg_covar >= 0):
        raise ValueError(f"reg_covar must be a non-negative float, got {reg_covar!r}")
    dtype = torch.promote_types(x.dtype, resp.dtype)
    return dtype if dtype.is_floating_point else torch.get_default_dtype()


def estimate_diag_gaussian_parameters(x, resp, reg_covar=1e-6, mask=None, *, centres=None):
    r"""M-step: weighted counts, means and centred diagonal variances.

    Parameters
    ----------
    x : Tensor, shape (..., N, D)
        Samples; leading batch dimensions (e.g. one per class) are allowed.
    resp : Tensor, shape (..., N, K)
        Non-negative responsibilities (rows usually sum to 1). Same leading dimensions as ``x``.
    reg_covar : float, default 1e-6
        Added to every variance.
    mask : Tensor of bool, shape (..., N), optional
        Valid rows; invalid rows (padding) contribute nothing, whatever ``x`` holds there.
    centres : Tensor, shape (..., K, D) or (K, D), optional
        Reference points near each component, typically the current means (keyword only). The result is
        the same in exact arithmetic; they only set where the sums are expanded, and giving them saves one
        pass over ``x``. Default: the weighted means themselves (two passes).

    Returns
    -------
    nk : Tensor, shape (..., K)
        Soft counts ``sum_n resp``, plus ``10 * eps`` so empty components stay finite.
    means : Tensor, shape (..., K, D)
        ``sum_n resp x / nk`` (an empty component gets mean 0).
    variances : Tensor, shape (..., K, D)
        ``sum_n resp (x - mean)^2 / nk + reg_covar``, computed about the means without an
        ``(..., N, K, D)`` tensor: every sample is centred on its most responsible component's centre, and
        the offsets between centres and means enter exactly (see ``_centred_moments``).
    """
    _check_tensor("x", x)
    _check_tensor("resp", resp)
    if x.dim() < 2 or resp.dim() != x.dim():
        raise ValueError(
            f"x (..., N, D) and resp (..., N, K) must have the same number (>= 2) of dimensions, "
            f"got x {tuple(x.shape)} and resp {tuple(resp.shape)}"
        )
    if x.shape[:-1] != resp.shape[:-1]:
        raise ValueError(
            f"x and resp must agree on all but the last dimension, got x {tuple(x.shape)} "
            f"and resp {tuple(resp.shape)}"
        )
    dtype = _m_step_dtype(x, resp, reg_covar)
    x, resp = x.to(dtype), resp.to(dtype)
    if mask is not None:
        _check_tensor("mask", mask)
        if tuple(mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"mask must have shape {tuple(x.shape[:-1])}, got {tuple(mask.shape)}")
        keep = mask.to(device=x.device, dtype=torch.bool).unsqueeze(-1)
        x = torch.where(keep, x, 0.0)  # padding may hold anything, even NaN
        resp = torch.where(keep, resp, 0.0)
    nk = resp.sum(-2) + 10 * torch.finfo(dtype).eps  # (..., K)
    if centres is None:  # a first pass for centres that sit inside their components
        centres = (resp.transpose(-1, -2) @ x) / nk.unsqueeze(-1)
    else:
        _check_tensor("centres", centres)
        shape = (*x.shape[:-2], resp.shape[-1], x.shape[-1])
        if centres.shape[-2:] != shape[-2:] or centres.dim() > len(shape):
            raise ValueError(f"centres must have shape {shape} or {shape[-2:]}, got {tuple(centres.shape)}")
        centres = centres.to(device=x.device, dtype=dtype).expand(shape)
    means, sq_dev = _centred_moments(x, resp, nk, centres)
    variances = sq_dev / nk.unsqueeze(-1) + reg_covar
    return nk, means, variances


def estimate_grouped_diag_gaussian_parameters(x, resp, centres, reg_covar=1e-6):
    r"""M-step for samples stored in one group per component, each group expanded about its component's centre.

    The same estimates as :func:`estimate_diag_gaussian_parameters` over all ``K * M`` samples (exact for any
    centres); the grouping only decides where the sums are expanded (group ``j`` about ``centres[j]``), so
    they are accurate when the samples of group ``j`` lie near that centre, e.g. when they were filed under
    their most responsible component and the centres are the current means. Per group, two batched matrix
    products over its ``M`` rows; no argmax, one-hot or gather.

    Parameters
    ----------
    x : Tensor, shape (..., K, M, D)
        Samples, ``M`` per group; group ``j`` holds samples filed under component ``j``.
    resp : Tensor, shape (..., K, M, K)
        Non-negative responsibilities of every sample for every component (0 for empty slots).
    centres : Tensor, shape (..., K, D)
        Expansion point of each group, typically the current means.
    reg_covar : float, default 1e-6
        Added to every variance.

    Returns
    -------
    nk : Tensor, shape (..., K)
        Soft counts, plus ``10 * eps`` so empty components stay finite.
    means : Tensor, shape (..., K, D)
    variances : Tensor, shape (..., K, D)
    """
    _check_tensor("x", x)
    _check_tensor("resp", resp)
    _check_tensor("centres", centres)
    if x.dim() < 3 or resp.shape[:-1] != x.shape[:-1] or resp.shape[-1] != x.shape[-3]:
        raise ValueError(
            f"x must have shape (..., K, M, D) and resp (..., K, M, K) with the same K, M and leading "
            f"dimensions, got x {tuple(x.shape)} and resp {tuple(resp.shape)}"
        )
    if centres.shape != x.shape[:-2] + x.shape[-1:]:
        raise ValueError(
            f"centres must have shape {tuple(x.shape[:-2] + x.shape[-1:])} (..., K, D), got {tuple(centres.shape)}"
        )
    dtype = _m_step_dtype(x, resp, reg_covar)
    x, resp, centres = x.to(dtype), resp.to(dtype), centres.to(dtype)
    nk = resp.sum((-3, -2)) + 10 * torch.finfo(dtype).eps  # (..., K)
    e = x - centres.unsqueeze(-2)  # (..., J, M, D): every sample about its group's centre
    r_t = resp.transpose(-1, -2)  # (..., J, K, M)
    grouped = r_t @ e  # (..., J, K, D)
    counts = resp.sum(-2).unsqueeze(-1)  # (..., J, K, 1)
    own = (r_t @ e.square_()).sum(-3)  # (..., K, D)
    means, sq_dev = _moments_from_groups(grouped, counts, own, nk, centres)
    return nk, means, sq_dev / nk.unsqueeze(-1) + reg_covar


# ----------------------------------------------------------------------------------------------------------
# Estimator
# ----------------------------------------------------------------------------------------------------------


def _sq_distances(x, centers):
    """Squared Euclidean distances (N, K) through one matrix product (x is expected roughly centred)."""
    d2 = (x * x).sum(1, keepdim=True) - 2.0 * (x @ centers.T) + (centers * centers).sum(1)
    return d2.clamp_(min=0.0)


def _kmeans_plusplus(x, n_clusters, generator):
    """Greedy k-means++ seeding (as scikit-learn's ``kmeans_plusplus``): returns centres (K, D)."""
    n_samples = x.shape[0]
    n_trials = 2 + int(math.log(n_clusters))
    first = int(torch.randint(n_samples, (1,), generator=generator))
    centers = [x[first]]
    closest = _sq_distances(x, x[first : first + 1]).squeeze(1)  # (N,)
    for _ in range(1, n_clusters):
        total = closest.sum()
        if float(total) <= 0:  # fewer distinct points than clusters: any point will do
            probs = torch.full((n_samples,), 1.0 / n_samples, dtype=torch.float64)
        else:
            probs = (closest / total).to(device="cpu", dtype=torch.float64)
        cand = torch.multinomial(probs, n_trials, replacement=True, generator=generator).to(x.device)
        new_closest = torch.minimum(closest.unsqueeze(1), _sq_distances(x, x[cand]))  # (N, T)
        best = int(new_closest.sum(0).argmin())
        closest = new_closest[:, best]
        centers.append(x[cand[best]])
    return torch.stack(centers)


def _lloyd(x, centers, n_steps):
    """A few Lloyd iterations from ``centers``; returns the final labels (N,)."""
    labels = _sq_distances(x, centers).argmin(1)
    for _ in range(n_steps):
        counts = torch.bincount(labels, minlength=centers.shape[0]).to(x.dtype)
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        centers = torch.where(counts.unsqueeze(1) > 0, sums / counts.clamp(min=1).unsqueeze(1), centers)
        new_labels = _sq_distances(x, centers).argmin(1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return labels


class GaussianMixture:
    r"""Diagonal-covariance Gaussian mixture fitted by EM or Sinkhorn EM, scikit-learn style, on torch.

    ``method="em"`` is classic EM with learned mixing weights (the same iteration and lower bound as
    ``sklearn.mixture.GaussianMixture(covariance_type="diag")``). ``method="sinkhorn"`` is Sinkhorn EM:
    the mixing weights are fixed to ``1 / K`` and the E-step responsibilities are the entropic optimal
    transport plan of :func:`sinkhorn`, which pushes every component towards ``N / K`` of the mass (exactly
    once its ``sinkhorn_iters`` iterations converge; see the module docstring).

    Parameters
    ----------
    n_components : int
        Number of components ``K``.
    method : {"sinkhorn", "em"}, default "sinkhorn"
        E-step: equipartitioned Sinkhorn responsibilities with uniform weights, or the EM posterior with
        learned weights.
    max_iter : int, default 100
        Maximum number of E/M iterations.
    tol : float, default 1e-4
        Convergence threshold on the change of the per-sample lower bound between iterations.
    reg_covar : float, default 1e-6
        Added to every variance. With 0, a fit in which a variance collapses to zero (duplicate samples, a
        constant feature) raises ``ValueError``, as in scikit-learn.
    init : {"kmeans++", "random"}, default "kmeans++"
        ``"kmeans++"``: seeded k-means++ centres refined by a few Lloyd steps; ``"random"``: ``K`` distinct
        samples drawn at random as centres. Either way the samples are assigned to the nearest centre and
        the initial parameters are the M-step of that hard assignment (as scikit-learn does).
    seed : int or None, default 0
        Seed of the initialisation and of :meth:`sample`'s default generator (a private ``torch.Generator``
        each time; the global RNG is untouched).
    device : str or torch.device, optional
        Where to fit. Default: the device of a tensor ``X``, the CPU for other inputs.
    epsilon : float, default 1.0
        Entropic regularisation of the Sinkhorn E-step. On raw log-likelihoods ``1.0`` gives the Sinkhorn
        EM of Mena et al. (the EM posterior, rebalanced towards equal component masses); smaller values sharpen
        the responsibilities towards balanced hard assignments.
    sinkhorn_iters : int, default 10
        Sinkhorn iterations per E-step.
    means_init, variances_init, precisions_init, weights_init : array-like, optional
        Starting parameters, shapes (K, D), (K, D), (K, D), (K,). ``precisions_init`` is ``1 / variances``
        (scikit-learn's convention for ``covariance_type="diag"``); give at most one of the two. Missing
        ones come from ``init`` (without ``weights_init``, EM starts from the proportions of the initial
        assignment, or from uniform weights when both means and variances are given). ``weights_init`` is
        only used by ``method="em"``. As in scikit-learn, all must be finite, variances and precisions
        positive, and the weights in [0, 1] with a sum of 1 (within ``1e-6`` whatever their dtype, where
        scikit-learn allows only ``1e-8`` for float64: they are renormalised anyway); :meth:`fit` checks them
        before any computation.
    verbose : bool, default False
        Show a tqdm progress bar with the lower bound.

    Attributes
    ----------
    means_ : Tensor, shape (K, D)
    variances_ : Tensor, shape (K, D)
    weights_ : Tensor, shape (K,)
        Learned for EM; ``1 / K`` (fixed) for Sinkhorn EM.
    lower_bounds_ : list of float
        One value per iteration: the mean log-likelihood ``mean_n log sum_k w_k N(x_n; mu_k, var_k)`` of
        the training data under the parameters *entering* that iteration, computed in its E-step (the
        quantity scikit-learn records for EM). For Sinkhorn EM ``w_k = 1 / K``. EM never decreases it;
        Sinkhorn EM optimises a constrained objective and usually, but not provably, increases it.
    lower_bound_ : float
        The last entry of ``lower_bounds_``.
    converged_ : bool
        Whether the change of the lower bound fell below ``tol`` within ``max_iter`` iterations.
    n_iter_ : int
        Number of iterations run.

    Notes
    -----
    Results (``predict``, ``score_samples``, ...) are torch tensors on the fitting device. ``float64``
    input is fitted in float64, everything else in float32. As in scikit-learn, :meth:`sample` draws from the
    fitted mixture and :meth:`bic` / :meth:`aic` score it for model selection; their parameter count
    (:meth:`_n_parameters`) leaves out the mixing weights of Sinkhorn EM, which are fixed, not fitted.
    """

    _METHODS = ("sinkhorn", "em")
    _INITS = ("kmeans++", "random")

    def __init__(
        self,
        n_components,
        method="sinkhorn",
        max_iter=100,
        tol=1e-4,
        reg_covar=1e-6,
        init="kmeans++",
        seed=0,
        device=None,
        epsilon=1.0,
        sinkhorn_iters=10,
        means_init=None,
        variances_init=None,
        precisions_init=None,
        weights_init=None,
        verbose=False,
    ):
        check_int("n_components", n_components)
        if method not in self._METHODS:
            raise ValueError(f"method must be one of {self._METHODS}, got {method!r}")
        check_int("max_iter", max_iter)
        if not (is_real(tol) and tol >= 0):
            raise ValueError(f"tol must be a non-negative float, got {tol!r}")
        if not (is_finite_real(reg_covar) and reg_covar >= 0):
            raise ValueError(f"reg_covar must be a non-negative float, got {reg_covar!r}")
        if init not in self._INITS:
            raise ValueError(f"init must be one of {self._INITS}, got {init!r}")
        if seed is not None and not is_int(seed):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        if not (is_finite_real(epsilon) and epsilon > 0):
            raise ValueError(f"epsilon must be a positive float, got {epsilon!r}")
        check_int("sinkhorn_iters", sinkhorn_iters)
        if variances_init is not None and precisions_init is not None:
            raise ValueError("give at most one of variances_init and precisions_init, got both")
        self.n_components = int(n_components)
        self.method = method
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.reg_covar = float(reg_covar)
        self.init = init
        self.seed = seed
        self.device = device
        self.epsilon = float(epsilon)
        self.sinkhorn_iters = int(sinkhorn_iters)
        self.means_init = means_init
        self.variances_init = variances_init
        self.precisions_init = precisions_init
        self.weights_init = weights_init
        self.verbose = verbose

    def __repr__(self):
        return (
            f"GaussianMixture(n_components={self.n_components}, method={self.method!r}, "
            f"max_iter={self.max_iter}, tol={self.tol}, reg_covar={self.reg_covar}, init={self.init!r})"
        )

    # -- data handling -------------------------------------------------------------------------------
    def _to_tensor(self, X, dtype=None, device=None):
        if isinstance(X, torch.Tensor):
            t = X.detach()
        else:
            t = torch.as_tensor(np.asarray(X))
        if dtype is None:
            dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        if device is None:
            device = self.device if self.device is not None else t.device
        return t.to(device=device, dtype=dtype)

    def _check_X(self, X, fitting=False):
        if fitting:
            t = self._to_tensor(X)
        else:
            self._check_fitted()
            t = self._to_tensor(X, dtype=self.means_.dtype, device=self.means_.device)
        if t.dim() != 2:
            raise ValueError(f"X must be 2-D (n_samples, n_features), got shape {tuple(t.shape)}")
        if t.shape[1] == 0:
            raise ValueError(f"X must have at least one feature, got shape {tuple(t.shape)}")
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise ValueError(f"X must be finite; it has {bad} NaN or infinite entries (shape {tuple(t.shape)})")
        if fitting and t.shape[0] < self.n_components:
            raise ValueError(
                f"X must have at least n_components={self.n_components} samples, got {t.shape[0]}"
            )
        if not fitting and t.shape[1] != self.means_.shape[1]:
            raise ValueError(
                f"X has {t.shape[1]} features but the mixture was fitted with {self.means_.shape[1]}"
            )
        return t

    def _check_fitted(self):
        if not hasattr(self, "means_"):
            raise RuntimeError("this GaussianMixture is not fitted yet; call fit(X) first")

    def _check_init_param(self, value, name, shape, device, positive=False):
        """``value`` as a tensor in its own precision, checked: shape, finite, and positive if asked."""
        t = self._to_tensor(value, device=device)
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise ValueError(f"{name} must be finite; it has {bad} NaN or infinite entries (shape {shape})")
        if positive and bool((t <= 0).any()):
            raise ValueError(
                f"{name} must be positive; it has {int((t <= 0).sum())} entries <= 0 "
                f"(smallest {float(t.min()):.6g})"
            )
        return t

    def _check_weights_init(self, device):
        """``weights_init`` in [0, 1] and summing to 1 within 1e-6 (scikit-learn allows 1e-8 for float64; the
        weights are renormalised anyway, and a float32 fit's weights written out as float64 are off by ~1e-7)."""
        t = self._check_init_param(self.weights_init, "weights_init", (self.n_components,), device)
        low, high = float(t.min()), float(t.max())
        if low < 0 or high > 1:
            raise ValueError(f"weights_init must be in [0, 1], got values in [{low:.6g}, {high:.6g}]")
        atol = 1e-6
        total = float(t.double().sum())
        if abs(1.0 - total) > atol:
            raise ValueError(f"weights_init must sum to 1 (within {atol:g}), got sum {total:.10g}")
        return t

    # -- fitting -------------------------------------------------------------------------------------
    def _generator(self):
        """A fresh CPU ``torch.Generator`` seeded with ``seed`` (from the operating system when it is None)."""
        generator = torch.Generator()
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator

    def _initial_labels(self, X):
        generator = self._generator()
        xc = X - X.mean(0)
        if self.init == "kmeans++":
            centers = _kmeans_plusplus(xc, self.n_components, generator)
            return _lloyd(xc, centers, n_steps=10)
        idx = torch.randperm(X.shape[0], generator=generator)[: self.n_components].to(X.device)
        return _sq_distances(xc, xc[idx]).argmin(1)

    def _initialize(self, X):
        n_features = X.shape[1]
        shape = (self.n_components, n_features)
        # the given parameters are checked before anything is computed
        given_means = given_variances = given_weights = None
        if self.means_init is not None:
            given_means = self._check_init_param(self.means_init, "means_init", shape, X.device).to(X.dtype)
        if self.variances_init is not None:
            given_variances = self._check_init_param(
                self.variances_init, "variances_init", shape, X.device, positive=True
            ).to(X.dtype)
        elif self.precisions_init is not None:
            given_variances = self._check_init_param(
                self.precisions_init, "precisions_init", shape, X.device, positive=True
            ).to(X.dtype).reciprocal()
        if self.weights_init is not None:
            given_weights = self._check_weights_init(X.device).to(X.dtype)
            given_weights = given_weights / given_weights.sum()
        uniform = torch.full((self.n_components,), 1.0 / self.n_components, dtype=X.dtype, device=X.device)
        weights = uniform  # when only means and variances are given
        if given_means is None or given_variances is None:
            labels = self._initial_labels(X)
            resp = X.new_zeros(labels.shape[0], self.n_components).scatter_(1, labels.unsqueeze(1), 1.0)
            nk, means, variances = estimate_diag_gaussian_parameters(X, resp, self.reg_covar)
            self._check_variances(variances)
            weights = nk / nk.sum()
        if given_means is not None:
            means = given_means
        if given_variances is not None:
            variances = given_variances
        if given_weights is not None:
            weights = given_weights
        if self.method == "sinkhorn":
            weights = uniform
        return means, variances, weights

    def _check_variances(self, variances):
        """Refuse an M-step whose variances are not all positive (only possible with ``reg_covar=0``): the
        log-densities would be NaN from then on, as scikit-learn refuses such a fit too."""
        if not bool((variances > 0).all()):
            raise ValueError(
                f"fitting the mixture failed: {int((~(variances > 0)).sum())} variances are zero or undefined, "
                "as happens for components of collapsed samples (duplicates, a constant feature); increase "
                f"reg_covar (now {self.reg_covar:g}), decrease n_components or scale the data"
            )

    def _e_step(self, X, means, variances, weights):
        """Return (per-sample log p(x) (N,), responsibilities (N, K))."""
        log_prob = diag_gaussian_log_prob(X, means, variances)  # (N, K)
        weighted = log_prob + weights.log()
        log_norm = torch.logsumexp(weighted, dim=1)
        if self.method == "em":
            resp = torch.exp(weighted - log_norm.unsqueeze(1))
        else:
            resp = sinkhorn(log_prob, epsilon=self.epsilon, n_iters=self.sinkhorn_iters)
        return log_norm, resp

    def fit(self, X, y=None):
        """Fit the mixture to ``X``.

        Parameters
        ----------
        X : Tensor or array-like, shape (N, D)
        y : ignored

        Returns
        -------
        self
        """
        X = self._check_X(X, fitting=True)
        with torch.no_grad():
            means, variances, weights = self._initialize(X)
            lower_bound = -math.inf
            self.lower_bounds_ = []
            self.converged_ = False
            iterations = range(1, self.max_iter + 1)
            if self.verbose:
                from tqdm.auto import tqdm

                iterations = tqdm(iterations, desc=f"GaussianMixture({self.method})")
            n_iter = 0
            for _ in iterations:
                n_iter += 1
                prev_lower_bound = lower_bound
                log_norm, resp = self._e_step(X, means, variances, weights)
                nk, means, variances = estimate_diag_gaussian_parameters(
                    X, resp, self.reg_covar, centres=means
                )
                self._check_variances(variances)
                if self.method == "em":
                    weights = nk / nk.sum()
                lower_bound = float(log_norm.mean())
                self.lower_bounds_.append(lower_bound)
                if self.verbose:
                    iterations.set_postfix(lower_bound=f"{lower_bound:.5f}")
                if abs(lower_bound - prev_lower_bound) < self.tol:
                    self.converged_ = True
                    break
            if self.verbose:
                iterations.close()
        self.means_, self.variances_, self.weights_ = means, variances, weights
        self.lower_bound_ = lower_bound
        self.n_iter_ = n_iter
        self.n_features_in_ = X.shape[1]
        if not self.converged_:
            warnings.warn(
                f"GaussianMixture(method={self.method!r}) did not converge in max_iter={self.max_iter} "
                f"iterations (last lower-bound change {lower_bound - prev_lower_bound:.3g}, "
                f"tol={self.tol}); "
                "increase max_iter or tol",
                ConvergenceWarning,
                stacklevel=2,
            )
        return self

    # -- inference -----------------------------------------------------------------------------------
    def _weighted_log_prob(self, X):
        X = self._check_X(X)
        with torch.no_grad():
            return diag_gaussian_log_prob(X, self.means_, self.variances_) + self.weights_.log()

    def score_samples(self, X):
        """Log-density ``log p(x)`` of each sample.

        Parameters
        ----------
        X : Tensor or array-like, shape (N, D)

        Returns
        -------
        Tensor, shape (N,)
        """
        return torch.logsumexp(self._weighted_log_prob(X), dim=1)

    def score(self, X, y=None):
        """Mean log-density per sample (float)."""
        return float(self.score_samples(X).mean())

    def predict_proba(self, X):
        """Posterior component probabilities ``p(k | x)`` under the fitted weights.

        For Sinkhorn EM this is the per-sample Bayes posterior with uniform weights (the transport plan
        couples samples and is only used while fitting).

        Parameters
        ----------
        X : Tensor or array-like, shape (N, D)

        Returns
        -------
        Tensor, shape (N, K)
        """
        return torch.softmax(self._weighted_log_prob(X), dim=1)

    def predict(self, X):
        """Most probable component of each sample: Tensor (N,) of int64."""
        return self._weighted_log_prob(X).argmax(1)

    def fit_predict(self, X, y=None):
        """``fit(X)`` then ``predict(X)``."""
        return self.fit(X).predict(X)

    # -- sampling and model selection ----------------------------------------------------------------
    def sample(self, n_samples=1, generator=None):
        """Draw samples from the fitted mixture, as scikit-learn's ``sample``.

        The number of samples of each component is multinomial with the fitted ``weights_`` (uniform for
        Sinkhorn EM), and each sample is ``means_[k] + sqrt(variances_[k]) * noise`` with standard normal noise.

        Parameters
        ----------
        n_samples : int, default 1
            Number of samples ``N`` (at least 1).
        generator : torch.Generator, optional
            Source of the randomness; the samples are drawn on its device. Default: a fresh CPU generator seeded
            with ``seed``, so that every call of an estimator with an int ``seed`` returns the same samples (as
            scikit-learn's with an int ``random_state``); with ``seed=None`` every call draws anew.

        Returns
        -------
        X : Tensor, shape (N, D)
            The samples, grouped by component (those of component 0 first), in the dtype and on the device of
            ``means_``.
        y : Tensor of int64, shape (N,)
            The component of each sample (non-decreasing), on the device of ``means_``.
        """
        self._check_fitted()
        if not (is_int(n_samples) and n_samples >= 1):
            raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
        if generator is None:
            generator = self._generator()
        elif not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        device = generator.device
        means, variances = self.means_.to(device), self.variances_.to(device)
        weights = self.weights_.to(device=device, dtype=torch.float64)
        drawn = torch.multinomial(weights, int(n_samples), replacement=True, generator=generator)
        counts = torch.bincount(drawn, minlength=self.n_components)
        y = torch.repeat_interleave(torch.arange(self.n_components, device=device), counts)
        noise = torch.randn(int(n_samples), means.shape[1], generator=generator, dtype=means.dtype, device=device)
        X = torch.addcmul(means[y], noise, variances[y].sqrt())
        return X.to(self.means_.device), y.to(self.means_.device)

    def _n_parameters(self):
        """Number of free parameters of the fitted model, as scikit-learn counts them for ``covariance_type="diag"``.

        ``K * D`` means and ``K * D`` variances, plus ``K - 1`` mixing weights for ``method="em"``, which
        estimates them (they sum to 1). Sinkhorn EM fixes the weights to ``1 / K`` instead of estimating them, so
        they add nothing to its count (scikit-learn, which always fits them, would count ``K - 1`` more).

        Returns
        -------
        int
        """
        self._check_fitted()
        n_components, n_features = self.means_.shape
        n_weights = n_components - 1 if self.method == "em" else 0
        return 2 * n_components * n_features + n_weights

    def _total_log_likelihood(self, X):
        """``sum_n log p(x_n)`` (float, summed in float64) and ``N`` of ``X`` (N, D) with at least one sample."""
        log_p = self.score_samples(X)
        if log_p.shape[0] == 0:
            raise ValueError(f"X must have at least one sample, got shape (0, {self.means_.shape[1]})")
        return float(log_p.double().sum()), log_p.shape[0]

    def bic(self, X):
        """Bayesian information criterion on ``X``: ``-2 sum_n log p(x_n) + p log N`` (lower is better).

        ``p`` is the parameter count of :meth:`_n_parameters` (no mixing weights for Sinkhorn EM).

        Parameters
        ----------
        X : Tensor or array-like, shape (N, D)
            At least one sample.

        Returns
        -------
        float
        """
        log_likelihood, n_samples = self._total_log_likelihood(X)
        return -2.0 * log_likelihood + self._n_parameters() * math.log(n_samples)

    def aic(self, X):
        """Akaike information criterion on ``X`` (N, D): ``-2 sum_n log p(x_n) + 2 p`` (lower is better), a float;
        ``X`` and ``p`` as in :meth:`bic`. It penalises size less than BIC once ``N >= 8`` (``log N > 2``)."""
        log_likelihood, _ = self._total_log_likelihood(X)
        return -2.0 * log_likelihood + 2.0 * self._n_parameters()
