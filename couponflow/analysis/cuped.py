"""CUPED: a difference in means adjusted by a pre-period covariate, for a narrower CI.

Deng, Xu, Kohavi and Walker (2013) call it CUPED; statistically it is regression
adjustment with one covariate measured before the assignment (from memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from couponflow.analysis.stats import FloatArray, Interval, MeanComparison, welch_test

# The covariate the lead fills from the features' spend_30d_cents.
COVARIATE_COLUMN = "pre_spend_cents"


@dataclass(frozen=True)
class CupedComparison:
    """One metric's treated-minus-control difference without and with CUPED.

    ``theta`` multiplies the centred covariate that is subtracted from each user's
    outcome. ``width_reduction`` is ``1 - adjusted width / unadjusted width``.
    """

    metric: str
    theta: float
    covariate_mean: float
    unadjusted: Interval
    adjusted: Interval
    unadjusted_p_value: float
    adjusted_p_value: float
    width_reduction: float


def cuped_theta(outcome: npt.ArrayLike, covariate: npt.ArrayLike) -> FloatArray:
    """Return ``cov(outcome, covariate) / var(covariate)`` along the last axis.

    The caller passes the pooled users of both groups. Where the covariate is
    constant, theta is 0 and the adjustment changes nothing.
    """
    y = np.asarray(outcome, dtype=np.float64)
    x = np.asarray(covariate, dtype=np.float64)
    x_centred = x - x.mean(axis=-1, keepdims=True)
    y_centred = y - y.mean(axis=-1, keepdims=True)
    variance = (x_centred * x_centred).sum(axis=-1)
    covariance = (x_centred * y_centred).sum(axis=-1)
    safe = np.where(variance > 0.0, variance, 1.0)
    return np.where(variance > 0.0, covariance / safe, 0.0)


def cuped_adjust(
    outcome: npt.ArrayLike,
    covariate: npt.ArrayLike,
    theta: npt.ArrayLike,
    covariate_mean: npt.ArrayLike,
) -> FloatArray:
    """Return ``outcome - theta * (covariate - covariate_mean)``.

    ``theta`` and ``covariate_mean`` broadcast against the leading axes, one value
    per row of a 2-D ``outcome``.
    """
    y = np.asarray(outcome, dtype=np.float64)
    x = np.asarray(covariate, dtype=np.float64)
    slope = np.asarray(theta, dtype=np.float64)
    centre = np.asarray(covariate_mean, dtype=np.float64)
    if y.ndim > 1:
        slope = slope[..., np.newaxis]
        centre = centre[..., np.newaxis]
    return y - slope * (x - centre)


def compare_with_cuped(
    metric: str,
    treated_outcome: npt.ArrayLike,
    treated_covariate: npt.ArrayLike,
    control_outcome: npt.ArrayLike,
    control_covariate: npt.ArrayLike,
    alpha: float = 0.05,
) -> tuple[CupedComparison | None, MeanComparison | None, str | None]:
    """Compare the means of one metric with and without the CUPED adjustment.

    Theta and the covariate mean come from both groups pooled. Because the
    covariate is measured before the assignment, the adjusted difference estimates
    the same effect as the unadjusted one. Returns the comparison, the adjusted
    Welch test, or None twice and the reason when a group has fewer than 2 users.
    """
    y_t = np.asarray(treated_outcome, dtype=np.float64)
    x_t = np.asarray(treated_covariate, dtype=np.float64)
    y_c = np.asarray(control_outcome, dtype=np.float64)
    x_c = np.asarray(control_covariate, dtype=np.float64)
    raw, reason = welch_test(y_t, y_c, alpha)
    if raw is None:
        return None, None, reason

    pooled_x = np.concatenate([x_t, x_c])
    theta = float(cuped_theta(np.concatenate([y_t, y_c]), pooled_x))
    centre = float(pooled_x.mean())
    adjusted, _ = welch_test(
        cuped_adjust(y_t, x_t, theta, centre),
        cuped_adjust(y_c, x_c, theta, centre),
        alpha,
    )
    assert adjusted is not None
    adjusted = MeanComparison(
        interval=adjusted.interval,
        standard_error=adjusted.standard_error,
        p_value=adjusted.p_value,
        method="welch-cuped",
    )
    raw_width = raw.interval.width
    reduction = 1.0 - adjusted.interval.width / raw_width if raw_width > 0 else 0.0
    comparison = CupedComparison(
        metric=metric,
        theta=theta,
        covariate_mean=centre,
        unadjusted=raw.interval,
        adjusted=adjusted.interval,
        unadjusted_p_value=raw.p_value,
        adjusted_p_value=adjusted.p_value,
        width_reduction=reduction,
    )
    return comparison, adjusted, None
