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

At the cpu profile's sizes (a few thousand pixels) the cost is of another kind: every op costs microseconds
whatever its size, and some take slow paths for a layout (a reduction or an arg-max over a short last or middle
dimension). The operations below avoid those paths, and they keep the
class maps in the logits' NCHW layout so that no transpose is copied forward or backward.

- :class:`L2Normalize`: ``F.normalize(x, dim=-1)``.
- :class:`ChannelLayerNorm`: ``F.layer_norm`` over dimension 1 of an NCHW map (the classes of the logits).
- :func:`~gmmseg_core.mixture.first_max` (defined there, for its Sinkhorn E-step): ``torch.max(t, dim)`` by a
  running comparison over a short dimension.
- :func:`gaussian_terms` and :class:`ComponentLogProbMaps`: the component log-densities as maps in the logits'
  layout, and their reduction over each class's components (the paper's log-sum-exp or the released head's
  maximum), with one backward for both.
"""

from __future__ import annotations

import math

import torch

from gmmseg_core import mixture
from gmmseg_core.mixture import first_max


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


class ChannelLayerNorm(torch.autograd.Function):
    """LayerNorm over dimension 1 of ``x (B, C, ...)`` with a per-channel affine ``weight``, ``bias (C,)``.

    Same values as ``F.layer_norm(x.movedim(1, -1), (C,), weight, bias, eps).movedim(-1, 1)`` (biased variance,
    ``eps`` inside the square root), without its two layout copies: the statistics are reductions over dimension
    1, which on a CPU run across contiguous rows of pixels, where a LayerNorm over rows of a few class scores
    pays a fixed cost per row.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = x.mean(1, keepdim=True)
        centred = x - mean
        rstd = (centred * centred).mean(1, keepdim=True).add_(eps).rsqrt_()
        normed = centred.mul_(rstd)
        ctx.save_for_backward(normed, rstd, weight)
        return torch.addcmul(bias.view(shape), normed, weight.view(shape))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        normed, rstd, weight = ctx.saved_tensors
        shape = (1, -1) + (1,) * (grad.dim() - 2)
        others = [0] + list(range(2, grad.dim()))
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            g = grad * weight.view(shape)
            # dx = rstd (g - mean_c g - normed mean_c(g normed))
            dot = (g * normed).mean(1, keepdim=True)
            grad_x = (g - g.mean(1, keepdim=True)).addcmul_(normed, dot, value=-1.0).mul_(rstd)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed).sum(others)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum(others)
        return grad_x, grad_weight, grad_bias, None


def _pixel_blocks(batch, pixels, row_elements, device):
    """``(b0, b1, p0, p1)`` blocks of a ``(batch, pixels)`` grid of rows, each ~``mixture._BLOCK_ELEMENTS`` values
    on a CPU (one block elsewhere): whole images together while they fit, else row ranges of one image."""
    if device.type != "cpu":
        yield 0, batch, 0, pixels
        return
    rows = max(1, mixture._BLOCK_ELEMENTS // row_elements)
    if rows >= pixels:
        per_block = rows // pixels
        for b0 in range(0, batch, per_block):
            yield b0, min(b0 + per_block, batch), 0, pixels
        return
    for b in range(batch):
        for p0 in range(0, pixels, rows):
            yield b, b + 1, p0, min(p0 + rows, pixels)


def gaussian_terms(means, variances):
    """The products' right-hand sides for :class:`ComponentLogProbMaps`, from means and variances ``(M, D)``.

    Returns ``shift (D,)`` (the mean of the means), ``lhs (M, 2D+1)`` = ``[mu / var, -1 / (2 var), const]`` with
    ``mu`` the means minus ``shift``, and ``rhs (M, 2D)`` = ``[mu / var, 1 / var]``. They depend on
    the Gaussians only, so a head computes them once per M-step rather than once per forward.
    """
    shift, mc_prec, prec, const = mixture._centred_terms(means, variances)
    lhs = torch.cat([mc_prec, -0.5 * prec, const.unsqueeze(1)], 1)
    rhs = torch.cat([mc_prec, prec], 1)
    return shift, lhs, rhs


class ComponentLogProbMaps(torch.autograd.Function):
    """Component log-densities of every pixel as maps ``(B, C*K, P)``, and optionally their reduction over each
    class's ``K`` components ``(B, C, P)``: the maximum, or the log-sum-exp.

    Inputs ``x (B, P, D)`` (the embeddings of ``P`` pixels per image, as rows), ``terms`` (:func:`gaussian_terms`
    of the means and variances ``(C*K, D)``), ``K``, ``reduce`` (``"max"``, ``"logsumexp"`` or None) and
    optionally ``score_offset``, a constant added to the reduction (the head's ``-log K`` for a mixture with
    uniform weights; added here, it costs neither a pass nor an autograd node). Same
    values as ``diag_gaussian_log_prob(x.reshape(-1, D), means, variances)`` transposed per image to
    ``(B, C*K, P)``, and as its ``view(B, C, K, P).amax(2)`` or
    ``torch.logsumexp(..., 2)``. That is the layout of the class logits ``(B, C, h, w)``: the reduction over the
    components yields them directly, over contiguous rows of pixels, and the component cross-entropy reads the
    maps as an ``(B, C*K, h, w)`` input. Computed per block of pixels as one ``(C*K, 2D+1) @ (2D+1, n)`` product
    of ``[mu / var, -1 / (2 var), const]`` with ``[x - s; (x - s)^2; 1]`` (``s`` the mean of the means, as in
    :mod:`gmmseg_core.mixture`).

    Gradients flow to ``x`` only: the head's Gaussians are fitted by EM, not by gradients (``terms`` that require
    a gradient are an error). The gradient of the reduction is added to the maps' gradient block by block, inside
    the product's backward, rather than in a dense sum: a maximum's to its first maximal entry (as ``torch.max``
    picks it), a log-sum-exp's through the component weights ``exp(comp - lse)``, kept from the forward as the
    exponentials and their per-class totals (one product instead of autograd's recomputed exponentials, and no pass
    over the maps to normalise them).
    """

    @staticmethod
    def forward(ctx, x, terms, num_components, reduce, score_offset=0.0):
        ctx.set_materialize_grads(False)
        shift, lhs, rhs = terms
        if any(t.requires_grad for t in terms):
            raise RuntimeError("ComponentLogProbMaps gives no gradient to the means and variances; use "
                               "mixture.diag_gaussian_log_prob for that")
        if reduce not in ("max", "logsumexp", None):
            raise ValueError(f"reduce must be 'max', 'logsumexp' or None, got {reduce!r}")
        batch, pixels, dim = x.shape
        comp = torch.empty(batch, lhs.shape[0], pixels, dtype=x.dtype, device=x.device)
        buf = None
        for b0, b1, p0, p1 in _pixel_blocks(batch, pixels, 2 * dim + 1, x.device):
            if buf is None:                 # [x - s, (x - s)^2, 1] per pixel
                buf = torch.empty(b1 - b0, p1 - p0, 2 * dim + 1, dtype=x.dtype, device=x.device)
                buf.select(-1, 2 * dim).fill_(1.0)                                 # the constant's column, kept
            f = buf[: b1 - b0, : p1 - p0]
            centred = torch.sub(x[b0:b1, p0:p1], shift, out=f[..., :dim])
            torch.mul(centred, centred, out=f[..., dim:2 * dim])
            if b1 - b0 == 1:
                torch.mm(lhs, f[0].T, out=comp[b0, :, p0:p1])
            else:
                torch.matmul(lhs, f.transpose(1, 2), out=comp[b0:b1])
        per_class = comp.view(batch, -1, num_components, pixels)
        scores = kept = total = None
        if reduce == "max":
            scores, kept = first_max(per_class, 2)                              # kept: the maxima's entries
        elif reduce == "logsumexp":
            top = per_class.amax(dim=2, keepdim=True)
            # Exponents below log(tiny) are raised to it: their terms (at most tiny each, beside the largest
            # one's 1) change no sum, and exp takes a path several times slower on a CPU where it underflows. The
            # shift is 0 where the maximum is not finite (as logsumexp); adding back the maximum itself keeps a
            # class whose components are all -inf at -inf.
            shifted = torch.sub(per_class, top.nan_to_num(0.0, 0.0, 0.0))
            kept = shifted.clamp_(min=math.log(torch.finfo(x.dtype).tiny)).exp_()
            total = kept.sum(dim=2, keepdim=True)
            scores = total.log().add_(top).squeeze(2)
            kept = kept.view_as(comp)       # kept: the component weights times their class's total (see backward)
        if scores is not None and score_offset != 0.0:
            scores = scores.add_(score_offset)                                  # a fresh tensor either way
        ctx.num_components, ctx.reduce = num_components, reduce
        ctx.save_for_backward(x, shift, rhs, kept, total)
        return comp, scores

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_comp, grad_scores):
        x, shift, rhs, kept, total = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or (grad_comp is None and grad_scores is None):
            return None, None, None, None, None
        batch, pixels, dim = x.shape
        n_comp, K = rhs.shape[0], ctx.num_components
        grad_x = torch.empty_like(x)
        merge = grad_scores is not None
        buf = None
        for b0, b1, p0, p1 in _pixel_blocks(batch, pixels, max(2 * dim, n_comp), x.device):
            if merge:                       # the reduction's gradient added to (a copy of) the maps' block
                if buf is None:
                    buf = torch.empty(b1 - b0, n_comp, p1 - p0, dtype=x.dtype, device=x.device)
                g = buf[: b1 - b0, :, : p1 - p0]
                per_class = g.view(b1 - b0, -1, K, p1 - p0)
                upstream = grad_scores[b0:b1, :, p0:p1].unsqueeze(2)
                if ctx.reduce == "max":
                    if grad_comp is None:
                        g.zero_()
                    else:
                        g.copy_(grad_comp[b0:b1, :, p0:p1])
                    per_class.scatter_add_(2, kept[b0:b1, :, p0:p1].unsqueeze(2), upstream)
                else:
                    # the weights exp(comp - lse) are kept / total: the small upstream is divided instead
                    upstream = upstream / total[b0:b1, :, :, p0:p1]
                    weights = kept[b0:b1, :, p0:p1].view_as(per_class)
                    if grad_comp is None:
                        torch.mul(weights, upstream, out=per_class)
                    else:
                        torch.addcmul(grad_comp[b0:b1, :, p0:p1].view_as(per_class), weights, upstream,
                                      out=per_class)
            else:
                g = grad_comp[b0:b1, :, p0:p1]
            both = torch.matmul(g.transpose(1, 2), rhs)                         # (b, n, 2D)
            centred = x[b0:b1, p0:p1] - shift
            torch.addcmul(both[..., :dim], centred, both[..., dim:], value=-1.0, out=grad_x[b0:b1, p0:p1])
        return grad_x, None, None, None, None
