"""The numba kernels behind :mod:`gmmseg_core.cpu_kernels` (imported only when one first runs).

Each works on numpy views of the head's tensors (no copies) and replaces a sequence of a few dozen torch ops by one
pass of plain loops; see :mod:`gmmseg_core.cpu_kernels` for why, and for the torch code each one equals.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, error_model="numpy")
def own_class_table(y, comp, ignore_index):
    """Valid pixels of the label maps ``y (B, h, w)`` (any strides) and the log-densities of their own class's
    components, from ``comp (B, C, K, h, w)``.

    Returns their number ``n`` and tables of room for every pixel whose first ``n`` rows are filled: the flat
    pixel index ``b h w + r w + c``, the label and the image ``(B h w,)`` int64, and ``logp (B h w, K)`` in
    ``comp``'s dtype.
    """
    n_images, num_classes, num_components, height, width = comp.shape
    size = n_images * height * width
    idx = np.empty(size, np.int64)
    labels = np.empty(size, np.int64)
    image = np.empty(size, np.int64)
    logp = np.empty((size, num_components), comp.dtype)
    n = 0
    for b in range(n_images):
        for r in range(height):
            for q in range(width):
                c = y[b, r, q]
                if 0 <= c < num_classes and c != ignore_index:
                    idx[n] = (b * height + r) * width + q
                    labels[n] = c
                    image[n] = b
                    for k in range(num_components):
                        logp[n, k] = comp[b, c, k, r, q]
                    n += 1
    return n, idx, labels, image, logp


@njit(cache=True, nogil=True, error_model="numpy")
def grouped_sinkhorn(scores, groups, num_groups, epsilon, n_iters, scale, assign, tiny):
    """Sinkhorn over the rows of every group, on scores ``(N, K)`` (any strides), sums in float64.

    With ``scale`` each group's scores are first divided by their largest magnitude (at least ``tiny``).
    Returns a status (0: solved; 1: a score is not finite, a column's mass fell below ``tiny`` or a row's mass
    underflowed, and the caller then solves the problem another way; 2: a group outside ``[0, num_groups)``),
    the plan ``(N, K)`` in the scores' dtype (empty with ``assign``) and each row's first column of largest mass
    (of the last iteration's unnormalised plan with ``assign``, of the plan otherwise).

    It works in the exponential domain: ``exp((x - top) / epsilon)`` once, ``top`` being the largest score of the
    row's group (so at most 1; in float32 for float32 scores while that is a normal number, as torch computes
    it), then every iteration is products and sums. The column duals are rescaled to a largest of 1 per group,
    a factor shared by all of a group's rows that the row normalisation removes.
    """
    n_rows, n_cols = scores.shape
    plan = np.empty((0 if assign else n_rows, n_cols), scores.dtype)
    component = np.zeros(n_rows, np.int64)
    single = scores.itemsize == 4
    e = np.empty((n_rows, n_cols))                   # rows as (N, K): one row's values side by side
    counts = np.zeros(num_groups, np.int64)
    top = np.full(num_groups, -np.inf)
    largest = np.zeros(num_groups)
    for j in range(n_rows):
        g = groups[j]
        if not 0 <= g < num_groups:
            return 2, plan, component
        for k in range(n_cols):
            value = np.float64(scores[j, k])
            if not np.isfinite(value):
                return 1, plan, component
            e[j, k] = value
            top[g] = max(top[g], value)
            largest[g] = max(largest[g], abs(value))
        counts[g] += 1
    # exp((x / d - top / d) / epsilon), d = the group's divisor (1 without scaling)
    factor = np.empty(num_groups)
    for g in range(num_groups):
        factor[g] = 1.0 / (max(largest[g], tiny) if scale else 1.0) / epsilon
    col = np.zeros((num_groups, n_cols))
    for j in range(n_rows):
        g = groups[j]
        for k in range(n_cols):
            logit = (e[j, k] - top[g]) * factor[g]
            value = np.float64(np.exp(np.float32(logit))) if single and logit > -80.0 else np.exp(logit)
            e[j, k] = value
            col[g, k] += value
    mass = np.empty(num_groups)
    for g in range(num_groups):
        mass[g] = max(counts[g], 1) / n_cols
    v = np.ones((num_groups, n_cols))
    lowest = np.inf
    for it in range(n_iters):
        # the column step from the last column sums (absent groups: 1), the duals rescaled per group
        for g in range(num_groups):
            biggest = 0.0
            for k in range(n_cols):
                if counts[g] == 0:
                    col[g, k] = 1.0
                lowest = min(lowest, col[g, k])
                v[g, k] = v[g, k] * mass[g] / col[g, k]
                biggest = max(biggest, v[g, k])
            if not 0.0 < biggest < np.inf:
                return 1, plan, component
            for k in range(n_cols):
                v[g, k] /= biggest
        last = it == n_iters - 1
        col[:, :] = 0.0
        for j in range(n_rows):
            g = groups[j]
            total = 0.0
            for k in range(n_cols):
                total += e[j, k] * v[g, k]
            if not 0.0 < total < np.inf:
                return 1, plan, component
            inverse_total = 1.0 / total
            if not last:
                for k in range(n_cols):
                    col[g, k] += e[j, k] * v[g, k] * inverse_total
            elif assign:
                best, best_mass = 0, e[j, 0] * v[g, 0]
                for k in range(1, n_cols):
                    if e[j, k] * v[g, k] > best_mass:
                        best, best_mass = k, e[j, k] * v[g, k]
                component[j] = best
            else:
                best = 0                      # first largest of the plan as stored (rounding can tie two)
                for k in range(n_cols):
                    plan[j, k] = e[j, k] * v[g, k] * inverse_total
                    if plan[j, k] > plan[j, best]:
                        best = k
                component[j] = best
    return 0 if lowest >= tiny else 1, plan, component


@njit(cache=True, nogil=True, error_model="numpy")
def push_evenly_spaced(labels, component, num_components, keep, use_keep, cap, x, rows, use_rows, resp,
                       use_resp, memory, ptr, count, memory_resp, total, total_sq, use_stats):
    """Push at most ``cap`` evenly spaced rows per ring, in input order within a ring, in place.

    Row ``i`` (kept when ``keep[i]``, with ``use_keep``) goes to ring ``labels[i] * K + component[i]``; its
    values are ``x[rows[i]]`` (``x[i]`` without ``use_rows``), its responsibilities ``resp[i]``. The rows of
    a ring are ordered by a stable counting sort; of its ``n`` rows, ``m = min(n, cap)`` are written, those of
    rank ``floor(j (n - 1) / (m - 1))``, at ``ptr, ptr + 1, ...`` modulo the ring size; ``cap`` must not exceed
    the ring size. With ``use_stats`` the float64 ring sums ``total``, ``total_sq`` ``(G, D)`` move by the
    difference between the new rows and the ones they overwrite. Returns False, writing nothing, when a ring
    index falls outside ``[0, G)``.
    """
    num_groups, size, dim = memory.shape
    n = labels.shape[0]
    counts = np.zeros(num_groups, np.int64)
    for i in range(n):
        g = labels[i] * num_components + component[i]
        if not 0 <= g < num_groups:
            return False
        if not use_keep or keep[i]:
            counts[g] += 1
    start = np.empty(num_groups, np.int64)
    filled = 0
    for g in range(num_groups):
        start[g] = filled
        filled += counts[g]
    order = np.empty(filled, np.int64)
    position = start.copy()
    for i in range(n):
        if not use_keep or keep[i]:
            g = labels[i] * num_components + component[i]
            order[position[g]] = i
            position[g] += 1
    change = np.zeros(dim)
    change_sq = np.zeros(dim)
    for g in range(num_groups):
        n_g = counts[g]
        m = min(n_g, cap)
        if m == 0:
            continue
        if use_stats:
            change[:] = 0.0
            change_sq[:] = 0.0
        for j in range(m):
            if m == n_g:                      # every row kept (no integer division: ~25 cycles each)
                rank = j
            else:
                rank = (j * (n_g - 1)) // (m - 1) if m > 1 else 0
            i = order[start[g] + rank]
            source = rows[i] if use_rows else i
            slot = (ptr[g] + j) % size
            for d in range(dim):
                old = np.float64(memory[g, slot, d])
                memory[g, slot, d] = x[source, d]
                if use_stats:
                    fresh = np.float64(memory[g, slot, d])
                    change[d] += fresh - old
                    change_sq[d] += fresh * fresh - old * old
            if use_resp:
                for k in range(memory_resp.shape[2]):
                    memory_resp[g, slot, k] = resp[i, k]
        if use_stats:
            for d in range(dim):
                total[g, d] += change[d]
                total_sq[g, d] += change_sq[d]
        ptr[g] = (ptr[g] + m) % size
        count[g] = min(count[g] + m, size)
    return True
