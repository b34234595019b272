"""Money in integer minor units (cents); rounding is half up, never banker's."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def percent_of_cents(amount_cents: int, basis_points: int) -> int:
    """Return ``basis_points`` / 10000 of ``amount_cents``, rounded half up.

    >>> percent_of_cents(3490, 1500)
    524
    """
    if amount_cents < 0:
        raise ValueError(f"amount_cents must be >= 0, got {amount_cents}")
    if not 0 <= basis_points <= 10_000:
        raise ValueError(f"basis_points must be in [0, 10000], got {basis_points}")
    # Integer arithmetic: (a*b + 5000) // 10000 is half-up rounding for a, b >= 0.
    return (amount_cents * basis_points + 5_000) // 10_000


def percent_of_cents_array(
    amount_cents: npt.NDArray[np.int64], basis_points: npt.NDArray[np.int64] | int
) -> npt.NDArray[np.int64]:
    """Vectorized :func:`percent_of_cents` over int64 arrays."""
    amount = np.asarray(amount_cents, dtype=np.int64)
    bps = np.asarray(basis_points, dtype=np.int64)
    if (amount < 0).any():
        raise ValueError("amount_cents must be >= 0")
    return (amount * bps + 5_000) // 10_000


def format_cents(amount_cents: int, currency: str = "USD") -> str:
    """Format cents for people, for example ``-1234`` as ``-12.34 USD``."""
    sign = "-" if amount_cents < 0 else ""
    units, cents = divmod(abs(int(amount_cents)), 100)
    return f"{sign}{units:,}.{cents:02d} {currency}"
