"""Type predicates and the integer argument check shared by every module (numpy scalars count, bools do not)."""

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


def check_int(name: str, value, minimum: int = 1, optional: bool = False) -> int | None:
    """``value`` as a Python int, for an argument that must be an integer >= ``minimum``.

    Parameters
    ----------
    name : str
        The argument's name, for the message.
    value
        A Python or numpy integer (a bool is not one), or None when ``optional``.
    minimum : int
        The smallest value allowed; 1 (the default) asks for a positive int.
    optional : bool
        None is allowed too (and returned as it is).

    Raises
    ------
    ValueError
        Naming ``name``, the bad value and what was expected, e.g. ``"n_bins must be a positive int, got 0"`` or
        ``"seed must be an int >= 0, got '3'"``.
    """
    if optional and value is None:
        return None
    if not (is_int(value) and value >= minimum):
        expected = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {'None or ' if optional else ''}{expected}, got {value!r}")
    return int(value)
