"""Off-policy value of a deterministic targeting policy by inverse propensity weighting.

The logged data come from a randomized (or any known-propensity) assignment, for
example the untouched part of an experiment: each user has the arm it was logged
with, the probability that the logging policy chose that arm, and an outcome.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from couponflow.analysis.stats import z_critical
from couponflow.schemas import CONTROL_ARM


@dataclass(frozen=True)
class Estimate:
    """A policy value (or lift) with its standard error and normal-approximation CI.

    ``matched`` counts the users whose logged arm equals the policy's arm, that is
    the users that carry weight in the estimate.
    """

    value: float
    stderr: float | None
    ci_low: float | None
    ci_high: float | None
    n: int
    matched: int
    alpha: float

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-safe dict."""
        return asdict(self)


def ipw_policy_value(
    policy_arm: npt.ArrayLike,
    logged_arm: npt.ArrayLike,
    propensity: npt.ArrayLike,
    outcome: npt.ArrayLike,
    alpha: float = 0.05,
) -> Estimate:
    """Estimate the mean outcome had every user received ``policy_arm``.

    Horvitz-Thompson form: the mean of ``1[policy == logged] * outcome / propensity``
    over all users. It is unbiased when every propensity is the true logging
    probability and is > 0, at the price of a higher variance than the
    self-normalized estimate.
    """
    policy, logged, prop, y = _validate(policy_arm, logged_arm, propensity, outcome)
    matched = policy == logged
    terms = np.where(matched, y / prop, 0.0)
    return _mean_estimate(terms, int(matched.sum()), alpha)


def self_normalized_ipw_policy_value(
    policy_arm: npt.ArrayLike,
    logged_arm: npt.ArrayLike,
    propensity: npt.ArrayLike,
    outcome: npt.ArrayLike,
    alpha: float = 0.05,
) -> Estimate:
    """Estimate the policy value as the weighted mean outcome of the matched users.

    Divides by the sum of the weights instead of the user count, which trades a
    small bias for a lower variance. The standard error is the delta-method
    (linearization) estimate. Raises ValueError when no user is matched.
    """
    policy, logged, prop, y = _validate(policy_arm, logged_arm, propensity, outcome)
    weights = np.where(policy == logged, 1.0 / prop, 0.0)
    value, influence = _self_normalized(weights, y)
    return _influence_estimate(value, influence, int((weights > 0).sum()), alpha)


def ipw_policy_lift(
    policy_arm: npt.ArrayLike,
    logged_arm: npt.ArrayLike,
    propensity: npt.ArrayLike,
    outcome: npt.ArrayLike,
    control_arm: str = CONTROL_ARM,
    alpha: float = 0.05,
    self_normalized: bool = False,
) -> Estimate:
    """Estimate the policy value minus the value of giving every user ``control_arm``.

    Both values are estimated on the same users, and the standard error comes from
    the per-user difference, so it accounts for the users shared by both. ``matched``
    counts the users that carry weight in either value.
    """
    policy, logged, prop, y = _validate(policy_arm, logged_arm, propensity, outcome)
    policy_matched = policy == logged
    control_matched = logged == control_arm
    if not control_matched.any():
        raise ValueError(
            f"no user was logged with control arm {control_arm!r}; pass the arm "
            "name that the logging policy used for no offer"
        )
    matched = int((policy_matched | control_matched).sum())

    if not self_normalized:
        terms = np.where(policy_matched, y / prop, 0.0) - np.where(
            control_matched, y / prop, 0.0
        )
        return _mean_estimate(terms, matched, alpha)

    policy_value, policy_influence = _self_normalized(
        np.where(policy_matched, 1.0 / prop, 0.0), y
    )
    control_value, control_influence = _self_normalized(
        np.where(control_matched, 1.0 / prop, 0.0), y
    )
    return _influence_estimate(
        policy_value - control_value,
        policy_influence - control_influence,
        matched,
        alpha,
    )


def _validate(
    policy_arm: npt.ArrayLike,
    logged_arm: npt.ArrayLike,
    propensity: npt.ArrayLike,
    outcome: npt.ArrayLike,
) -> tuple[
    npt.NDArray[np.str_],
    npt.NDArray[np.str_],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
]:
    policy = np.asarray(policy_arm).astype(str)
    logged = np.asarray(logged_arm).astype(str)
    prop = np.asarray(propensity, dtype=np.float64)
    y = np.asarray(outcome, dtype=np.float64)
    lengths = {len(policy), len(logged), len(prop), len(y)}
    if len(lengths) != 1:
        raise ValueError(
            "policy_arm, logged_arm, propensity and outcome must have the same "
            f"length, got {len(policy)}, {len(logged)}, {len(prop)} and {len(y)}"
        )
    if len(y) == 0:
        raise ValueError("no logged users: the inputs are empty")
    invalid = ~np.isfinite(prop) | (prop <= 0.0) | (prop > 1.0)
    if invalid.any():
        position = int(np.flatnonzero(invalid)[0])
        raise ValueError(
            f"propensity must be in (0, 1], got {prop[position]} at position "
            f"{position}; drop users the logging policy could never give their arm"
        )
    if not np.isfinite(y).all():
        position = int(np.flatnonzero(~np.isfinite(y))[0])
        raise ValueError(f"outcome must be finite, got {y[position]} at {position}")
    return policy, logged, prop, y


def _mean_estimate(
    terms: npt.NDArray[np.float64], matched: int, alpha: float
) -> Estimate:
    value = float(terms.mean())
    if terms.size < 2:
        return Estimate(value, None, None, None, int(terms.size), matched, alpha)
    stderr = float(terms.std(ddof=1)) / math.sqrt(terms.size)
    z = z_critical(alpha)
    return Estimate(
        value,
        stderr,
        value - z * stderr,
        value + z * stderr,
        terms.size,
        matched,
        alpha,
    )


def _self_normalized(
    weights: npt.NDArray[np.float64], y: npt.NDArray[np.float64]
) -> tuple[float, npt.NDArray[np.float64]]:
    """Return the weighted mean and each user's influence on it (mean zero)."""
    total = float(weights.sum())
    if total == 0.0:
        raise ValueError(
            "no logged user received the policy's arm, so the self-normalized "
            "estimate is undefined; evaluate on more users or use ipw_policy_value"
        )
    value = float((weights * y).sum()) / total
    influence = weights.size * weights * (y - value) / total
    return value, influence


def _influence_estimate(
    value: float, influence: npt.NDArray[np.float64], matched: int, alpha: float
) -> Estimate:
    n = influence.size
    if n < 2:
        return Estimate(value, None, None, None, n, matched, alpha)
    stderr = math.sqrt(float((influence**2).sum())) / n
    z = z_critical(alpha)
    return Estimate(
        value, stderr, value - z * stderr, value + z * stderr, n, matched, alpha
    )
