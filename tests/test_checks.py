import numpy as np
import pytest

from gmmseg_core._checks import check_int


@pytest.mark.parametrize("value", [1, 7, np.int64(7), np.uint8(7), np.int32(1)])
def test_check_int_returns_a_python_int(value):
    got = check_int("n", value)
    assert got == value and type(got) is int


@pytest.mark.parametrize("value, kw, message", [
    (0, {}, "n must be a positive int, got 0"),
    (-3, {}, "n must be a positive int, got -3"),
    (True, {}, "n must be a positive int, got True"),
    (np.bool_(True), {}, r"n must be a positive int, got (np\.True_|True)"),      # numpy 2 | numpy 1 repr
    (2.5, {}, "n must be a positive int, got 2.5"),
    (3.0, {}, "n must be a positive int, got 3.0"),
    (np.float64(3.0), {}, r"n must be a positive int, got (np\.float64\(3\.0\)|3\.0)"),
    ("3", {}, "n must be a positive int, got '3'"),
    (None, {}, "n must be a positive int, got None"),
    (-1, dict(minimum=0), "n must be an int >= 0, got -1"),
    (1, dict(minimum=2), "n must be an int >= 2, got 1"),
    (0, dict(optional=True), "n must be None or a positive int, got 0"),
    (False, dict(minimum=0, optional=True), "n must be None or an int >= 0, got False"),
])
def test_check_int_names_the_argument_the_value_and_what_was_expected(value, kw, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        check_int("n", value, **kw)


def test_check_int_bounds_and_none():
    assert check_int("n", 0, minimum=0) == 0
    assert check_int("n", 2, minimum=2) == 2
    assert check_int("n", None, optional=True) is None
    assert check_int("n", np.int64(3), optional=True) == 3
