"""Compiled CPU kernels for the GMM head's per-step bookkeeping: the own-class gather, the E-step, the memory push.

Between the forward and the M-step the GMM head picks each valid pixel's own-class log-densities out of the
component maps, runs the Sinkhorn E-step per class (scaled scores, a few iterations, the most responsible
component) and files the pixels into their rings (a stable grouping, an evenly spaced choice, the writes and the
ring sums). In torch that is about 150 operations on tensors of a few thousand values at the cpu profile's sizes,
and on a CPU each costs 5-25 µs whatever its size (dispatch, allocation, a pass over memory): together about 1.2 ms
of a 30 ms training step of the cpu profile's deeplabv3plus, a quarter of what the GMM head adds to it. Each
function here does the same work as one pass of plain loops compiled by numba, in tens of microseconds.

The torch code in :mod:`gmmseg_core.heads`, :mod:`gmmseg_core.mixture` and :mod:`gmmseg_core.memory` stays the
reference, and the path on every other device (a GPU runs those operations as a few kernels each) and for
dtypes numpy lacks (half precision). The tests run both paths on the same inputs: the grouping, choices and
writes are identical, the E-step agrees to rounding (it works in float64 where the torch code works in the
scores' dtype, so an exact tie between two components may break the other way).

A kernel is compiled on its first call for each dtype (a few seconds) and cached on disk beside this module
(numba's ``cache=True``), so later processes load it. ``GMMSEG_CPU_KERNELS=0`` in the environment, or the
:func:`disabled` context, makes everything take the torch path.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

_KERNEL_DTYPES = (torch.float32, torch.float64)
_enabled = os.environ.get("GMMSEG_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")
_impl_module = None


def _impl():
    """The compiled kernels' module, or None where numba cannot be imported (said once, in a warning)."""
    global _impl_module
    if _impl_module is None:
        try:
            from gmmseg_core import _cpu_kernels_impl
        except ImportError as err:
            warnings.warn(f"numba could not be imported ({err}); the GMM head's E-step and memory push take their "
                          "slower torch path on the CPU (pip install numba to restore them)", RuntimeWarning,
                          stacklevel=3)
            _impl_module = False
        else:
            _impl_module = _cpu_kernels_impl
    return _impl_module or None


def available(*tensors: Tensor) -> bool:
    """Whether the kernels serve these tensors: enabled, numba importable, all on the CPU, floating ones in
    float32 or float64."""
    if not _enabled:
        return False
    for t in tensors:
        if t.device.type != "cpu" or (t.is_floating_point() and t.dtype not in _KERNEL_DTYPES):
            return False
    return _impl() is not None


@contextmanager
def disabled():
    """Within this context every caller takes its torch path (for comparisons and tests)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


# Placeholders for the optional arguments of push_evenly_spaced (numba compiles one version per argument type, so
# each keeps the type of what it stands for), by the memory's item size.
_UNUSED = {size: dict(bool=np.zeros(0, np.bool_), long=np.zeros(0, np.int64), rows=np.zeros((0, 0), dtype),
                      rings=np.zeros((0, 0, 0), dtype), sums=np.zeros((0, 0)))
           for size, dtype in ((4, np.float32), (8, np.float64))}


def _array(t: Tensor):
    """A numpy view of ``t`` made contiguous (a copy only when it is not)."""
    return t.detach().contiguous().numpy()


def own_class_table(comp: Tensor, y: Tensor, ignore_index: int):
    """Valid pixels and their own class's component log-densities, as ``GMMHead._assignments`` gathers them.

    Parameters
    ----------
    comp : Tensor (B, C, K, h, w)
        Component log-densities.
    y : LongTensor (B, h, w)
        Every feature pixel's label (any strides); valid ones are in ``[0, C)`` and differ from
        ``ignore_index``.

    Returns
    -------
    idx, labels, image : LongTensor (n,)
        Flat pixel index of every valid pixel, its label and its image.
    logp : Tensor (n, K)
    """
    n, idx, labels, image, logp = _impl().own_class_table(y.detach().numpy(), _array(comp), int(ignore_index))
    return (torch.from_numpy(idx[:n]), torch.from_numpy(labels[:n]), torch.from_numpy(image[:n]),
            torch.from_numpy(logp[:n]))


def grouped_sinkhorn(log_scores: Tensor, groups: Tensor, num_groups: int, epsilon: float, n_iters: int,
                     scale: bool = False, assign: bool = False):
    """:func:`gmmseg_core.mixture.grouped_sinkhorn` of finite scores, optionally each group's scores divided by
    their largest magnitude first (the GMM head's E-step).

    Parameters
    ----------
    log_scores : Tensor (N, K)
        Any strides.
    groups : LongTensor (N,)
    num_groups, epsilon, n_iters, assign
        As for :func:`gmmseg_core.mixture.grouped_sinkhorn`.
    scale : bool
        Divide each group's scores by their largest absolute value (at least the dtype's smallest normal number).

    Returns
    -------
    (plan, component) or None
        The plan ``(N, K)`` (contiguous; None with ``assign``) and every row's first most responsible
        column ``(N,)``. None when a score is not finite or a column's mass underflows the dtype, the cases
        where the torch code falls back to :func:`gmmseg_core.mixture.sinkhorn` on padded groups.

    Raises
    ------
    ValueError
        For a group outside ``[0, num_groups)``.
    """
    tiny = torch.finfo(log_scores.dtype).tiny
    status, plan, component = _impl().grouped_sinkhorn(log_scores.detach().numpy(), _array(groups), int(num_groups),
                                                       float(epsilon), int(n_iters), bool(scale), bool(assign), tiny)
    if status == 2:
        raise ValueError(f"groups must lie in [0, {num_groups}), got values from {int(groups.min())} to "
                         f"{int(groups.max())}")
    if status == 1:
        return None
    return (None if assign else torch.from_numpy(plan)), torch.from_numpy(component)


def push_evenly_spaced(memory: Tensor, ptr: Tensor, count: Tensor, x: Tensor, rows: Tensor | None,
                       labels: Tensor, component: Tensor, num_components: int, keep: Tensor | None, cap: int,
                       resp: Tensor | None = None, memory_resp: Tensor | None = None,
                       stats: tuple[Tensor, Tensor] | None = None) -> None:
    """``GMMHead._push``: :func:`gmmseg_core.memory.select_evenly_spaced` then
    :func:`gmmseg_core.memory.ring_push`, in place.

    Parameters
    ----------
    memory : Tensor (G, M, D); ptr, count : LongTensor (G,)
    x : Tensor (N, D)
        Row table; pixel ``i`` is ``x[rows[i]]``, or ``x[i]`` when ``rows`` is None.
    rows : LongTensor (n,) or None
    labels, component : LongTensor (n,)
        Pixel ``i`` goes to ring ``labels[i] * num_components + component[i]``.
    keep : BoolTensor (n,) or None
        Only these pixels are pushed (None: all).
    cap : int
        Most rows a ring takes in one push, at most ``M``.
    resp : Tensor (n, K), optional
        Written into ``memory_resp (G, M, K)`` at the same slots.
    stats : (sum, sum of squares), float64 (G, D), optional
        Running ring sums (see :func:`gmmseg_core.memory.ring_push`).

    Raises
    ------
    ValueError
        For a ring index ``labels * num_components + component`` outside ``[0, G)`` (nothing is written), a
        ``cap`` outside ``[1, M]`` or a buffer that is not contiguous.
    """
    if not 0 < cap <= memory.shape[1]:
        raise ValueError(f"cap must be in [1, {memory.shape[1]}] (the ring size), got {cap}")
    buffers = [memory, ptr, count] + ([] if memory_resp is None else [memory_resp]) + list(stats or ())
    if not all(b.is_contiguous() for b in buffers):     # written in place through numpy views
        raise ValueError("the memory buffers must be contiguous")
    unused = _UNUSED[memory.numpy().dtype.itemsize]
    written = _impl().push_evenly_spaced(
        _array(labels), _array(component), int(num_components),
        unused["bool"] if keep is None else _array(keep), keep is not None, int(cap),
        _array(x), unused["long"] if rows is None else _array(rows), rows is not None,
        unused["rows"] if resp is None else _array(resp), resp is not None,
        memory.numpy(), ptr.numpy(), count.numpy(), unused["rings"] if memory_resp is None else memory_resp.numpy(),
        unused["sums"] if stats is None else stats[0].numpy(), unused["sums"] if stats is None else stats[1].numpy(),
        stats is not None)
    if not written:
        raise ValueError(f"ring indices labels * {num_components} + component must lie in [0, {memory.shape[0]})")
