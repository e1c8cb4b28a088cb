"""Hand-written autograd operations of the GMM head's training pass.

Each is a ``torch.autograd.Function`` with the same values and gradients as a short expression of plain torch
ops (named in its docstring and checked against it in the tests), written by hand because autograd's version of
that expression makes several extra passes over tensors of ``pixels x C x K`` values. On a CPU each such pass
costs a few milliseconds at the released configuration's scale (73,728 pixels x 95 components), so they add up
to a large share of the head's step; the blocked loops below keep a block of rows in cache while all the
elementwise work on it is done.

Not everything gains from this. A hand-written component cross-entropy (log-sum-exp per row, then
``softmax - onehot`` block by block) was measured and dropped: once the Gaussians are fitted, log-densities
spread over tens of nats, ``exp`` then produces denormal numbers, and torch's fused log-softmax kernels handle
those about three times faster than ``exp_`` on a block (73,728 x 95 values on a CPU: 114 ms against 323 ms).

- :class:`L2Normalize`: ``F.normalize(x, dim=-1)``.
- :class:`ComponentLogProbMax`: the component log-densities and their maximum over each class's components
  (the released head's class score), with one backward for both.
"""

from __future__ import annotations

import torch

from gmmseg_core import mixture


class L2Normalize(torch.autograd.Function):
    """``x / max(||x||, eps)`` over the last dimension with a three-op backward; ``eps = 1e-12``, or the smallest
    normal number of a dtype where 1e-12 rounds to 0 (float16: a zero row would become 0 / 0 = NaN).

    Same values as ``F.normalize(x, dim=-1)`` (which gives NaN for float16's zero rows); autograd's backward of
    that expression takes about five times as long (norm, clamp, division and their masks are differentiated one
    by one). The row-wise dot product goes through ``linalg.vecdot``; ``(grad * out).sum(-1)`` takes the same time
    on torch 2.14 (73,728 x 64 on a CPU: 10-13 ms for the whole backward with either).
    """

    @staticmethod
    def forward(ctx, x):
        eps = max(1e-12, torch.finfo(x.dtype).tiny)
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(eps)
        out = x / norm
        ctx.save_for_backward(out, norm)
        return out

    @staticmethod
    def backward(ctx, grad):
        out, norm = ctx.saved_tensors
        radial = torch.linalg.vecdot(grad, out).unsqueeze(-1)
        return torch.addcmul(grad, out, radial, value=-1.0).div_(norm)


class ComponentLogProbMax(torch.autograd.Function):
    """``comp = diag_gaussian_log_prob(x, means, variances)`` and ``comp.view(N, C, K).amax(-1)``.

    Inputs ``x (N, D)``, ``means`` and ``variances (C*K, D)`` and ``K``; outputs ``comp (N, C*K)`` and the
    maxima ``(N, C)``. Gradients flow to ``x`` only (the head's Gaussians are fitted by EM, not by gradients;
    asking for theirs is an error). The released head uses both outputs: the maxima are its class scores, and
    its component loss reads ``comp``. Autograd would meet the two gradients in a dense ``(N, C*K)`` sum; here
    the gradient of each maximum is added to its entry block by block, inside the log-likelihood's blocked
    backward. It goes to the first maximal entry, as ``torch.max`` picks it; ties between real-valued
    log-densities do not occur in practice.
    """

    @staticmethod
    def forward(ctx, x, means, variances, num_components):
        ctx.set_materialize_grads(False)
        comp = mixture._log_prob_table(x, means, variances)
        values, index = comp.view(x.shape[0], -1, num_components).max(dim=-1)
        ctx.save_for_backward(x, means, variances, index)
        return comp, values

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_comp, grad_values):
        x, means, variances, index = ctx.saved_tensors
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise RuntimeError("ComponentLogProbMax gives no gradient to the means and variances; use "
                               "mixture.diag_gaussian_log_prob and amax for that")
        if not ctx.needs_input_grad[0] or (grad_comp is None and grad_values is None):
            return None, None, None, None
        shift = means.mean(0)
        prec = variances.reciprocal()
        n_classes = index.shape[1]

        def add_max_gradient(start, stop, block):      # block (n, C*K): the gradient of the maxima at their entries
            if grad_values is not None:
                block.view(stop - start, n_classes, -1).scatter_add_(
                    -1, index[start:stop].unsqueeze(-1), grad_values[start:stop].unsqueeze(-1))

        grad_x = mixture._grad_x_blocked(grad_comp, x, shift, (means - shift) * prec, prec,
                                         add_to_block=add_max_gradient)
        return grad_x, None, None, None
