"""Intervals and tests of the experiment analysis: proportions, means, ratios, Holm.

Every function returns plain floats, or None with a reason where a value is undefined,
so that callers never carry a NaN. The ``*_arrays`` forms take NumPy arrays of
summary statistics, so that the calibration benchmark runs the same formulas.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
from scipy import stats

FloatArray = npt.NDArray[np.float64]

# Below this expected count in any cell of the 2x2 table (converted or not, treated
# or control), the normal approximation behind the z-test and the Wilson limits is
# poor, so proportions are compared by the exact methods instead.
EXACT_EXPECTED_CELL_MIN = 5.0
METHOD_SCORE = "newcombe-wilson"
METHOD_EXACT = "exact"
PROPORTION_METHODS: dict[str, str] = {
    METHOD_SCORE: (
        "Newcombe hybrid score interval (method 10 of Newcombe 1998) with the "
        "pooled two-proportion z-test"
    ),
    METHOD_EXACT: (
        "Fisher's exact test (two-sided) with the difference of the two "
        "Clopper-Pearson intervals at level 1 - alpha/2 each (Bonferroni)"
    ),
}


@dataclass(frozen=True)
class Interval:
    """A point estimate with the bounds of its confidence interval."""

    estimate: float
    low: float
    high: float

    @property
    def width(self) -> float:
        """The distance between the bounds."""
        return self.high - self.low

    def scaled(self, factor: float) -> Interval:
        """Return the interval multiplied by ``factor`` (which must be >= 0)."""
        if factor < 0:
            raise ValueError(f"factor must be >= 0, got {factor}")
        return Interval(self.estimate * factor, self.low * factor, self.high * factor)


@dataclass(frozen=True)
class ProportionComparison:
    """Difference of two proportions, its interval and two-sided p-value.

    ``method`` is a key of ``PROPORTION_METHODS``. ``min_expected_cell`` is the
    smallest expected count of the 2x2 table, which chose the method.
    """

    interval: Interval
    p_value: float
    method: str
    min_expected_cell: float


@dataclass(frozen=True)
class MeanComparison:
    """Difference of two means with its interval, standard error and p-value."""

    interval: Interval
    standard_error: float
    p_value: float
    method: str


class WelchArrays(NamedTuple):
    """Element-wise Welch comparison of two groups given by their moments."""

    difference: FloatArray
    standard_error: FloatArray
    low: FloatArray
    high: FloatArray
    p_value: FloatArray


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
    _validate_counts(successes, trials)
    low, high = wilson_arrays(np.array([successes]), np.array([trials]), alpha)
    return Interval(successes / trials, float(low[0]), float(high[0]))


def wilson_arrays(
    successes: npt.ArrayLike, trials: npt.ArrayLike, alpha: float = 0.05
) -> tuple[FloatArray, FloatArray]:
    """Return the Wilson score bounds element-wise; every trial count must be > 0."""
    z = z_critical(alpha)
    x = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    p = x / n
    denominator = 1.0 + z * z / n
    center = (p + z * z / (2.0 * n)) / denominator
    half_width = z * np.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / denominator
    return np.maximum(0.0, center - half_width), np.minimum(1.0, center + half_width)


def clopper_pearson_interval(
    successes: int, trials: int, alpha: float = 0.05
) -> Interval:
    """Return the Clopper-Pearson (exact binomial) interval of ``successes / trials``.

    Each tail has probability at most ``alpha / 2``, so the coverage is at least
    ``1 - alpha`` for every true proportion.
    """
    _validate_counts(successes, trials)
    low, high = clopper_pearson_arrays(np.array([successes]), np.array([trials]), alpha)
    return Interval(successes / trials, float(low[0]), float(high[0]))


def clopper_pearson_arrays(
    successes: npt.ArrayLike, trials: npt.ArrayLike, alpha: float = 0.05
) -> tuple[FloatArray, FloatArray]:
    """Return the Clopper-Pearson bounds element-wise, from beta quantiles."""
    validate_alpha(alpha)
    x = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    # The beta quantile is undefined at a shape of 0, where the bound is 0 or 1.
    low = np.where(
        x > 0, stats.beta.ppf(alpha / 2.0, np.maximum(x, 1.0), n - x + 1.0), 0.0
    )
    high = np.where(
        x < n,
        stats.beta.ppf(1.0 - alpha / 2.0, x + 1.0, np.maximum(n - x, 1.0)),
        1.0,
    )
    return low.astype(np.float64), high.astype(np.float64)


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
    _validate_counts(successes_a, trials_a)
    _validate_counts(successes_b, trials_b)
    difference, low, high = newcombe_arrays(
        np.array([successes_a]),
        np.array([trials_a]),
        np.array([successes_b]),
        np.array([trials_b]),
        alpha,
    )
    return Interval(float(difference[0]), float(low[0]), float(high[0]))


def newcombe_arrays(
    successes_a: npt.ArrayLike,
    trials_a: npt.ArrayLike,
    successes_b: npt.ArrayLike,
    trials_b: npt.ArrayLike,
    alpha: float = 0.05,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Return ``(p_a - p_b, low, high)`` element-wise by Newcombe's method 10.

    Square-and-add of the Wilson bounds of both proportions; every trial count must
    be > 0.
    """
    x_a, n_a, x_b, n_b = _as_float_arrays(successes_a, trials_a, successes_b, trials_b)
    p_a, p_b = x_a / n_a, x_b / n_b
    low_a, high_a = wilson_arrays(x_a, n_a, alpha)
    low_b, high_b = wilson_arrays(x_b, n_b, alpha)
    difference = p_a - p_b
    low = difference - np.sqrt((p_a - low_a) ** 2 + (high_b - p_b) ** 2)
    high = difference + np.sqrt((high_a - p_a) ** 2 + (p_b - low_b) ** 2)
    return difference, low, high


def exact_difference_arrays(
    successes_a: npt.ArrayLike,
    trials_a: npt.ArrayLike,
    successes_b: npt.ArrayLike,
    trials_b: npt.ArrayLike,
    alpha: float = 0.05,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Return ``(p_a - p_b, low, high)`` from two Clopper-Pearson intervals.

    Each proportion gets its Clopper-Pearson interval at level ``1 - alpha / 2``, and
    the bounds are ``[low_a - high_b, high_a - low_b]``. Both proportions lie in
    their intervals with probability at least ``1 - alpha`` (Bonferroni), so the
    coverage is at least ``1 - alpha`` for every pair of true proportions. The price
    is a wider interval than the score methods give.
    """
    x_a, n_a, x_b, n_b = _as_float_arrays(successes_a, trials_a, successes_b, trials_b)
    low_a, high_a = clopper_pearson_arrays(x_a, n_a, alpha / 2.0)
    low_b, high_b = clopper_pearson_arrays(x_b, n_b, alpha / 2.0)
    return x_a / n_a - x_b / n_b, low_a - high_b, high_a - low_b


def two_proportion_p_values(
    successes_a: npt.ArrayLike,
    trials_a: npt.ArrayLike,
    successes_b: npt.ArrayLike,
    trials_b: npt.ArrayLike,
) -> FloatArray:
    """Return the two-sided pooled z-test p-values of ``p_a = p_b``, element-wise.

    The square of this z is Pearson's chi-square without continuity correction.
    Where both groups are all successes or all failures the p-value is 1.
    """
    x_a, n_a, x_b, n_b = _as_float_arrays(successes_a, trials_a, successes_b, trials_b)
    pooled = (x_a + x_b) / (n_a + n_b)
    variance = pooled * (1.0 - pooled) * (1.0 / n_a + 1.0 / n_b)
    difference = x_a / n_a - x_b / n_b
    degenerate = variance <= 0.0
    z = np.abs(difference) / np.sqrt(np.where(degenerate, 1.0, variance))
    return np.where(degenerate, 1.0, 2.0 * stats.norm.sf(z)).astype(np.float64)


def fisher_exact_p_value(
    successes_a: int, trials_a: int, successes_b: int, trials_b: int
) -> float:
    """Return the two-sided p-value of Fisher's exact test of ``p_a = p_b``.

    SciPy sums the probabilities of every table at most as likely as the observed
    one, given both margins. For 0/500 against 5/500 this is about 0.062.
    """
    _validate_counts(successes_a, trials_a)
    _validate_counts(successes_b, trials_b)
    table = [
        [successes_a, trials_a - successes_a],
        [successes_b, trials_b - successes_b],
    ]
    return float(stats.fisher_exact(table, alternative="two-sided").pvalue)


def min_expected_cell(
    successes_a: int, trials_a: int, successes_b: int, trials_b: int
) -> float:
    """Return the smallest expected count of the 2x2 table under independence."""
    total = trials_a + trials_b
    successes = successes_a + successes_b
    failures = total - successes
    return min(
        trials * margin / total
        for trials in (trials_a, trials_b)
        for margin in (successes, failures)
    )


def compare_proportions(
    successes_a: int,
    trials_a: int,
    successes_b: int,
    trials_b: int,
    alpha: float = 0.05,
) -> ProportionComparison:
    """Compare ``p_a`` with ``p_b`` by the method that fits the counts.

    When any expected cell count is below ``EXACT_EXPECTED_CELL_MIN`` the exact
    methods are used, otherwise the score methods (see ``PROPORTION_METHODS``).
    Two groups without any success give a difference of 0 and a p-value of 1.
    """
    _validate_counts(successes_a, trials_a)
    _validate_counts(successes_b, trials_b)
    smallest = min_expected_cell(successes_a, trials_a, successes_b, trials_b)
    exact = smallest < EXACT_EXPECTED_CELL_MIN
    method = exact_difference_arrays if exact else newcombe_arrays
    difference, low, high = method(
        [successes_a], [trials_a], [successes_b], [trials_b], alpha
    )
    if exact:
        p_value = fisher_exact_p_value(successes_a, trials_a, successes_b, trials_b)
    else:
        p_value = float(
            two_proportion_p_values(
                [successes_a], [trials_a], [successes_b], [trials_b]
            )[0]
        )
    return ProportionComparison(
        interval=Interval(float(difference[0]), float(low[0]), float(high[0])),
        p_value=min(1.0, p_value),
        method=METHOD_EXACT if exact else METHOD_SCORE,
        min_expected_cell=float(smallest),
    )


def welch_difference(
    values_a: npt.ArrayLike, values_b: npt.ArrayLike, alpha: float = 0.05
) -> tuple[Interval | None, str | None]:
    """Return the Welch interval of ``mean(a) - mean(b)``, or None and the reason.

    The interval is undefined when either sample has fewer than 2 values. When both
    samples have zero variance, the interval collapses to the observed difference.
    """
    comparison, reason = welch_test(values_a, values_b, alpha)
    return (comparison.interval if comparison else None), reason


def welch_test(
    values_a: npt.ArrayLike, values_b: npt.ArrayLike, alpha: float = 0.05
) -> tuple[MeanComparison | None, str | None]:
    """Compare two means by Welch's t-test; return None and the reason if undefined.

    The p-value is two-sided. With zero variance in both samples it is 1 for equal
    means and 0 otherwise.
    """
    validate_alpha(alpha)
    a = np.asarray(values_a, dtype=np.float64)
    b = np.asarray(values_b, dtype=np.float64)
    if a.size < 2 or b.size < 2:
        return None, (
            "Welch interval needs at least 2 users per group, got "
            f"{a.size} and {b.size}"
        )
    result = welch_arrays(
        np.array([a.mean()]),
        np.array([a.var(ddof=1)]),
        np.array([a.size]),
        np.array([b.mean()]),
        np.array([b.var(ddof=1)]),
        np.array([b.size]),
        alpha,
    )
    interval = Interval(
        float(result.difference[0]), float(result.low[0]), float(result.high[0])
    )
    return (
        MeanComparison(
            interval=interval,
            standard_error=float(result.standard_error[0]),
            p_value=float(result.p_value[0]),
            method="welch",
        ),
        None,
    )


def welch_arrays(
    mean_a: npt.ArrayLike,
    variance_a: npt.ArrayLike,
    n_a: npt.ArrayLike,
    mean_b: npt.ArrayLike,
    variance_b: npt.ArrayLike,
    n_b: npt.ArrayLike,
    alpha: float = 0.05,
) -> WelchArrays:
    """Return Welch intervals and p-values element-wise from group moments.

    Variances are sample variances (ddof=1), and every count must be >= 2. The
    degrees of freedom are Welch-Satterthwaite's.
    """
    validate_alpha(alpha)
    count_a = np.asarray(n_a, dtype=np.float64)
    count_b = np.asarray(n_b, dtype=np.float64)
    share_a = np.asarray(variance_a, dtype=np.float64) / count_a
    share_b = np.asarray(variance_b, dtype=np.float64) / count_b
    difference = np.asarray(mean_a, dtype=np.float64) - np.asarray(
        mean_b, dtype=np.float64
    )
    variance = share_a + share_b
    degenerate = variance <= 0.0
    safe_variance = np.where(degenerate, 1.0, variance)
    dof_denominator = share_a**2 / (count_a - 1.0) + share_b**2 / (count_b - 1.0)
    dof = safe_variance**2 / np.where(degenerate, 1.0, dof_denominator)
    dof = np.where(degenerate, 1.0, dof)
    standard_error = np.sqrt(np.where(degenerate, 0.0, variance))
    t = stats.t.ppf(1.0 - alpha / 2.0, dof)
    statistic = np.abs(difference) / np.sqrt(safe_variance)
    p_value = np.where(
        degenerate,
        np.where(difference == 0.0, 1.0, 0.0),
        2.0 * stats.t.sf(statistic, dof),
    )
    return WelchArrays(
        difference=difference,
        standard_error=standard_error,
        low=difference - t * standard_error,
        high=difference + t * standard_error,
        p_value=p_value.astype(np.float64),
    )


def normal_comparison(
    estimate: float, standard_error: float, alpha: float, method: str
) -> MeanComparison:
    """Return the normal-approximation interval and two-sided p-value of an estimate."""
    z = z_critical(alpha)
    if standard_error <= 0.0:
        p_value = 1.0 if estimate == 0.0 else 0.0
    else:
        p_value = float(2.0 * stats.norm.sf(abs(estimate) / standard_error))
    return MeanComparison(
        interval=Interval(
            estimate, estimate - z * standard_error, estimate + z * standard_error
        ),
        standard_error=max(0.0, standard_error),
        p_value=p_value,
        method=method,
    )


def ratio_interval(
    numerator: float,
    denominator: float,
    numerator_variance: float,
    denominator_variance: float,
    covariance: float,
    alpha: float = 0.05,
) -> tuple[Interval | None, str | None]:
    """Return the delta-method interval of ``numerator / denominator``.

    The variances and the covariance are those of the two estimates, not of single
    users. First-order Taylor expansion of the ratio: Var(N/D) is about
    (Var N - 2 R Cov(N, D) + R^2 Var D) / D^2 with R = N / D. Returns None and the
    reason when the denominator is 0.
    """
    if denominator == 0.0:
        return None, "the denominator is 0, so the ratio is undefined"
    ratio = numerator / denominator
    variance = (
        numerator_variance
        - 2.0 * ratio * covariance
        + ratio * ratio * denominator_variance
    ) / (denominator * denominator)
    z = z_critical(alpha)
    half_width = z * math.sqrt(max(0.0, variance))
    return Interval(ratio, ratio - half_width, ratio + half_width), None


def relative_lift_interval(
    mean_treated: float,
    variance_treated: float,
    mean_control: float,
    variance_control: float,
    alpha: float = 0.05,
) -> tuple[Interval | None, str | None]:
    """Return the delta-method interval of ``mean_treated / mean_control - 1``.

    The variances are those of the two means (independent groups). Returns None and
    the reason when the control mean is 0.
    """
    if mean_control == 0.0:
        return None, "the control mean is 0, so the relative lift is undefined"
    ratio, reason = ratio_interval(
        mean_treated, mean_control, variance_treated, variance_control, 0.0, alpha
    )
    assert ratio is not None, reason
    return Interval(ratio.estimate - 1.0, ratio.low - 1.0, ratio.high - 1.0), None


def holm_adjust(p_values: Sequence[float | None]) -> list[float | None]:
    """Return Holm's step-down adjusted p-values, in the input order.

    The family is the p-values that are not None; None stays None. Rejecting every
    adjusted p-value below alpha keeps the family-wise error rate at most alpha.
    """
    defined = [
        (value, index) for index, value in enumerate(p_values) if value is not None
    ]
    adjusted: list[float | None] = [None] * len(p_values)
    family = len(defined)
    running_max = 0.0
    for rank, (value, index) in enumerate(sorted(defined)):
        running_max = max(running_max, min(1.0, (family - rank) * value))
        adjusted[index] = running_max
    return adjusted


def finite_or_none(value: float | None) -> float | None:
    """Return ``value`` as a float, or None when it is None, NaN or infinite."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def json_safe(value: Any) -> Any:
    """Return ``value`` with NumPy scalars as Python ones and NaN or inf as None.

    Dicts, lists, tuples and sets are converted recursively (sets sorted).
    """
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, frozenset | set):
        return [json_safe(item) for item in sorted(value)]
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if isinstance(value, np.bool_ | bool):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return finite_or_none(float(value))
    return value


def _validate_counts(successes: int, trials: int) -> None:
    if trials <= 0:
        raise ValueError(f"trials must be > 0, got {trials}")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be in [0, {trials}], got {successes}")


def _as_float_arrays(*values: npt.ArrayLike) -> tuple[FloatArray, ...]:
    return tuple(np.asarray(value, dtype=np.float64) for value in values)
