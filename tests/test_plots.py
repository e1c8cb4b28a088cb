"""Plot helpers: the inputs the notebooks can hand them, empty ones included."""

import numpy as np
import pytest

from gmmseg_core.plots import image_grid, pad_curves


def test_pad_curves_carries_the_last_value_forward_and_refuses_no_curves():
    out = pad_curves([[1.0, 2.0], [3.0], []])
    np.testing.assert_array_equal(out[:2], [[1.0, 2.0], [3.0, 3.0]])
    assert np.isnan(out[2]).all()
    with pytest.raises(ValueError, match="pad_curves needs at least one curve, got none"):
        pad_curves([])


def test_image_grid_refuses_no_panels():
    for rows in ([], [[]]):
        with pytest.raises(ValueError, match=r"image_grid needs at least one panel, got none \(e.g. a notebook "
                                             r"asked for 0 examples\)"):
            image_grid(rows)
