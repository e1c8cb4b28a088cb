"""Type predicates shared by the argument checks of every module (numpy scalars count, bools do not)."""

from __future__ import annotations

import math

import numpy as np


def is_int(value) -> bool:
    """True for a Python or numpy integer, False for a bool or anything else."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_real(value) -> bool:
    """True for a Python or numpy integer or float (NaN and infinities included), False for a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def is_finite_real(value) -> bool:
    """``is_real`` and finite."""
    return is_real(value) and math.isfinite(value)
