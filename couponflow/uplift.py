"""Uplift metrics (Qini curve and coefficient, AUUC, uplift at k) for randomized data.

Shared by model training and by the analysis of finished experiments.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
ArrayLike = npt.ArrayLike

# Conventions, shared by every function below:
# - Rows are ranked by descending uplift score. Rows with equal scores form one group,
#   and curves only have points at group boundaries, so the result does not depend on
#   the order of the input rows.
# - Where a top set contains no treated rows or no control rows, the uplift there is
#   undefined and is taken as 0 ("no measured uplift"), never NaN.
# - Curve values are rates (incremental outcome per user), not counts, so that they
#   are comparable across sample sizes.


def qini_curve(
    uplift_score: ArrayLike, treated: ArrayLike, outcome: ArrayLike
) -> tuple[FloatArray, FloatArray]:
    """Compute the Qini curve: incremental outcome per treated user against targeting.

    Returns ``(fraction, qini)``. ``fraction`` is the share of all rows targeted at
    each group boundary, starting at 0 and ending at 1. At a boundary with ``n_t``
    treated and ``n_c`` control rows in the top set, whose outcomes sum to ``y_t`` and
    ``y_c``, ``qini = (y_t - y_c * n_t / n_c) / N_t``, where ``N_t`` is the number of
    treated rows in the whole sample. The last value is therefore the average
    treatment effect. It is 0 where ``n_t`` or ``n_c`` is 0, and the whole curve is 0
    when the sample has no treated rows.
    """
    groups = _ranked_groups(uplift_score, treated, outcome)
    total_treated = groups.n_treated[-1]
    both = (groups.n_treated > 0) & (groups.n_control > 0)
    incremental = np.zeros_like(groups.y_treated)
    incremental[both] = (
        groups.y_treated[both]
        - groups.y_control[both] * groups.n_treated[both] / groups.n_control[both]
    )
    qini = incremental / total_treated if total_treated > 0 else incremental
    fraction = groups.n_rows / groups.n_rows[-1]
    return _prepend_origin(fraction), _prepend_origin(qini)


def qini_coefficient(
    uplift_score: ArrayLike, treated: ArrayLike, outcome: ArrayLike
) -> float:
    """Compute the area between the Qini curve and the line of random targeting.

    The random line goes from (0, 0) to (1, average treatment effect), so a random
    score has an expected coefficient of 0 and a useful score a positive one. The
    area is not divided by that of a perfect ranking. The value is 0 when the sample
    has no treated or no control rows.
    """
    fraction, qini = qini_curve(uplift_score, treated, outcome)
    area = _trapezoid_area(fraction, qini)
    random_area = 0.5 * float(qini[-1])
    return area - random_area


def auuc(uplift_score: ArrayLike, treated: ArrayLike, outcome: ArrayLike) -> float:
    """Compute the area under the uplift curve, over the targeted fraction in [0, 1].

    At a group boundary, the uplift curve is ``(y_t / n_t - y_c / n_c) * n / N``: the
    difference of the treated and control outcome rates in the top ``n`` of ``N``
    rows, weighted by the share of rows targeted. It is 0 where ``n_t`` or ``n_c`` is
    0. A random score has an expected AUUC of half the average treatment effect; this
    function does not subtract that baseline.
    """
    groups = _ranked_groups(uplift_score, treated, outcome)
    fraction = groups.n_rows / groups.n_rows[-1]
    rate_difference = _rate_difference(
        groups.n_treated, groups.y_treated, groups.n_control, groups.y_control
    )
    uplift = rate_difference * fraction
    return _trapezoid_area(_prepend_origin(fraction), _prepend_origin(uplift))


def uplift_at_k(
    uplift_score: ArrayLike, treated: ArrayLike, outcome: ArrayLike, k: float
) -> float:
    """Compute the treated-minus-control outcome rate in the top ``k`` share of rows.

    ``k`` is a fraction in (0, 1]. The top set contains exactly ``k * N`` rows: when
    the cut falls inside a group of tied scores, every row of that group counts with
    the same fractional weight. The value is 0 when the top set has no treated or no
    control rows.
    """
    if not 0 < k <= 1:
        raise ValueError(f"k must be a fraction in (0, 1], got {k}")
    groups = _ranked_groups(uplift_score, treated, outcome)
    target = k * groups.n_rows[-1]
    # k * N can miss a whole number by rounding (0.3 * 10 = 3.0000000000000004), which
    # would pull a sliver of the next group into the top set.
    if abs(target - round(target)) < 1e-9:
        target = float(round(target))

    cut = int(np.searchsorted(groups.n_rows, target, side="left"))
    cut = min(cut, len(groups.n_rows) - 1)
    columns = (groups.n_treated, groups.y_treated, groups.n_control, groups.y_control)
    above_rows = groups.n_rows[cut - 1] if cut > 0 else 0.0
    group_rows = groups.n_rows[cut] - above_rows
    weight = (target - above_rows) / group_rows

    totals = []
    for column in columns:
        above = column[cut - 1] if cut > 0 else 0.0
        totals.append(above + weight * (column[cut] - above))
    n_treated, y_treated, n_control, y_control = (np.array([t]) for t in totals)
    return float(_rate_difference(n_treated, y_treated, n_control, y_control)[0])


@dataclass(frozen=True)
class _Groups:
    """Cumulative counts and outcome sums at the end of each group of tied scores."""

    n_rows: FloatArray
    n_treated: FloatArray
    n_control: FloatArray
    y_treated: FloatArray
    y_control: FloatArray


def _ranked_groups(
    uplift_score: ArrayLike, treated: ArrayLike, outcome: ArrayLike
) -> _Groups:
    score, is_treated, value = _validate(uplift_score, treated, outcome)
    # Sorting ties by (treated, outcome) as well fixes the summation order, so that
    # even float sums are bit-for-bit the same for any order of the input rows.
    order = np.lexsort((value, is_treated, -score))
    score = score[order]
    is_treated = is_treated[order]
    value = value[order]

    group_ends = np.flatnonzero(np.diff(score) != 0)
    group_ends = np.append(group_ends, len(score) - 1)
    treated_float = is_treated.astype(np.float64)
    control_float = 1.0 - treated_float
    n_treated = np.cumsum(treated_float)[group_ends]
    n_rows = (group_ends + 1).astype(np.float64)
    return _Groups(
        n_rows=n_rows,
        n_treated=n_treated,
        n_control=n_rows - n_treated,
        y_treated=np.cumsum(value * treated_float)[group_ends],
        y_control=np.cumsum(value * control_float)[group_ends],
    )


def _validate(
    uplift_score: ArrayLike, treated: ArrayLike, outcome: ArrayLike
) -> tuple[FloatArray, npt.NDArray[np.bool_], FloatArray]:
    score = np.asarray(uplift_score, dtype=np.float64)
    treated_raw = np.asarray(treated)
    value = np.asarray(outcome, dtype=np.float64)
    for name, array in (("uplift_score", score), ("treated", treated_raw)):
        if array.ndim != 1:
            raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if value.ndim != 1:
        raise ValueError(f"outcome must be one-dimensional, got shape {value.shape}")
    if not len(score) == len(treated_raw) == len(value):
        raise ValueError(
            "uplift_score, treated and outcome must have the same length, got "
            f"{len(score)}, {len(treated_raw)} and {len(value)}"
        )
    if len(score) == 0:
        raise ValueError("uplift metrics need at least one row, got 0")
    for name, array in (("uplift_score", score), ("outcome", value)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise ValueError(f"{name} contains {bad} NaN or infinite values")

    if treated_raw.dtype == np.bool_:
        is_treated = treated_raw
    else:
        numeric = treated_raw.astype(np.float64)
        if not np.isin(numeric, (0.0, 1.0)).all():
            found = np.unique(numeric[~np.isin(numeric, (0.0, 1.0))])[:5]
            raise ValueError(
                f"treated must be boolean or 0/1, found values such as {found.tolist()}"
            )
        is_treated = numeric == 1.0
    return score, is_treated, value


def _rate_difference(
    n_treated: FloatArray,
    y_treated: FloatArray,
    n_control: FloatArray,
    y_control: FloatArray,
) -> FloatArray:
    both = (n_treated > 0) & (n_control > 0)
    difference = np.zeros_like(y_treated)
    difference[both] = (
        y_treated[both] / n_treated[both] - y_control[both] / n_control[both]
    )
    return difference


def _prepend_origin(values: FloatArray) -> FloatArray:
    return np.concatenate(([0.0], values))


def _trapezoid_area(x: FloatArray, y: FloatArray) -> float:
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))
