"""Confidence intervals for the experiment analysis: Wilson, Newcombe and Welch.

Every function returns plain Python floats, or None with a reason where the interval
is undefined, so that callers never carry a NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import stats


@dataclass(frozen=True)
class Interval:
    """A point estimate with the bounds of its confidence interval."""

    estimate: float
    low: float
    high: float

    def scaled(self, factor: float) -> Interval:
        """Return the interval multiplied by ``factor`` (which must be >= 0)."""
        if factor < 0:
            raise ValueError(f"factor must be >= 0, got {factor}")
        return Interval(self.estimate * factor, self.low * factor, self.high * factor)


def z_critical(alpha: float) -> float:
    """Return the two-sided standard normal critical value for level ``alpha``."""
    validate_alpha(alpha)
    return float(stats.norm.ppf(1.0 - alpha / 2.0))


def validate_alpha(alpha: float) -> None:
    """Raise ValueError unless ``alpha`` lies strictly between 0 and 1."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def wilson_interval(successes: int, trials: int, alpha: float = 0.05) -> Interval:
    """Return the Wilson score interval of ``successes / trials``.

    Raises ValueError when ``trials`` is 0 or ``successes`` is outside [0, trials].
    """
    if trials <= 0:
        raise ValueError(f"trials must be > 0, got {trials}")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be in [0, {trials}], got {successes}")
    z = z_critical(alpha)
    p = successes / trials
    denominator = 1.0 + z * z / trials
    center = (p + z * z / (2.0 * trials)) / denominator
    half_width = (
        z * math.sqrt(p * (1.0 - p) / trials + z * z / (4.0 * trials * trials))
    ) / denominator
    return Interval(p, max(0.0, center - half_width), min(1.0, center + half_width))


def newcombe_difference(
    successes_a: int,
    trials_a: int,
    successes_b: int,
    trials_b: int,
    alpha: float = 0.05,
) -> Interval:
    """Return the interval of ``p_a - p_b`` by Newcombe's hybrid score method.

    This is method 10 of Newcombe (1998, Statistics in Medicine 17:873-890): it
    combines the Wilson intervals of both proportions, and unlike the Wald interval
    it stays inside [-1, 1] and keeps its coverage near 0 and 1.
    """
    a = wilson_interval(successes_a, trials_a, alpha)
    b = wilson_interval(successes_b, trials_b, alpha)
    difference = a.estimate - b.estimate
    lower = difference - math.sqrt(
        (a.estimate - a.low) ** 2 + (b.high - b.estimate) ** 2
    )
    upper = difference + math.sqrt(
        (a.high - a.estimate) ** 2 + (b.estimate - b.low) ** 2
    )
    return Interval(difference, lower, upper)


def welch_difference(
    values_a: npt.ArrayLike, values_b: npt.ArrayLike, alpha: float = 0.05
) -> tuple[Interval | None, str | None]:
    """Return the Welch interval of ``mean(a) - mean(b)``, or None and the reason.

    The interval is undefined when either sample has fewer than 2 values. When both
    samples have zero variance, the interval collapses to the observed difference.
    """
    validate_alpha(alpha)
    a = np.asarray(values_a, dtype=np.float64)
    b = np.asarray(values_b, dtype=np.float64)
    if a.size < 2 or b.size < 2:
        return None, (
            "Welch interval needs at least 2 users per group, got "
            f"{a.size} and {b.size}"
        )

    difference = float(a.mean() - b.mean())
    var_a = float(a.var(ddof=1)) / a.size
    var_b = float(b.var(ddof=1)) / b.size
    standard_error = math.sqrt(var_a + var_b)
    if standard_error == 0.0:
        return Interval(difference, difference, difference), None

    # Welch-Satterthwaite degrees of freedom.
    dof = (var_a + var_b) ** 2 / (var_a**2 / (a.size - 1) + var_b**2 / (b.size - 1))
    t = float(stats.t.ppf(1.0 - alpha / 2.0, dof))
    return (
        Interval(
            difference, difference - t * standard_error, difference + t * standard_error
        ),
        None,
    )


def finite_or_none(value: float | None) -> float | None:
    """Return ``value`` as a float, or None when it is None, NaN or infinite."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None
