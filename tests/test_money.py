"""Money is integer cents, with half-up rounding."""

from __future__ import annotations

import numpy as np
import pytest

from couponflow.money import format_cents, percent_of_cents, percent_of_cents_array


def test_fifteen_percent_of_3490_cents() -> None:
    discount = percent_of_cents(3490, 1500)
    assert discount == 524
    assert 3490 - discount == 2966
    assert isinstance(discount, int)


@pytest.mark.parametrize(
    ("amount", "bps", "expected"),
    [(1, 5000, 1), (3, 5000, 2), (5, 1000, 1), (4, 1000, 0), (0, 2500, 0), (999, 0, 0)],
)
def test_percent_rounds_half_up(amount: int, bps: int, expected: int) -> None:
    assert percent_of_cents(amount, bps) == expected


def test_percent_array_matches_scalar() -> None:
    amounts = np.array([3490, 1, 3, 12345, 0], dtype=np.int64)
    result = percent_of_cents_array(amounts, 1500)
    assert result.dtype == np.int64
    assert result.tolist() == [percent_of_cents(int(a), 1500) for a in amounts]


def test_percent_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="amount_cents must be >= 0"):
        percent_of_cents(-5, 1000)
    with pytest.raises(ValueError, match="basis_points"):
        percent_of_cents(100, 10_001)


def test_format_cents() -> None:
    assert format_cents(-123456) == "-1,234.56 USD"
    assert format_cents(5) == "0.05 USD"
