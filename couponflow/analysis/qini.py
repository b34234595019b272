"""Qini coefficient, AUUC and Qini curve of the uplift score on the randomized users."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pandas as pd

from couponflow import uplift
from couponflow.analysis.inputs import POLICY_ARM_COLUMN
from couponflow.analysis.stats import finite_or_none
from couponflow.schemas import CONTROL_ARM

# Points kept of the Qini curve, enough for a smooth plot at report size.
CURVE_POINTS = 201
# Top shares of users, by descending score, at which uplift_at_k is reported.
UPLIFT_AT_K: tuple[float, ...] = (0.1, 0.3, 0.5)


@dataclass(frozen=True)
class UpliftSummary:
    """Qini coefficient and AUUC of ``score_uplift`` on the randomized comparison."""

    population: str
    users: int
    treated_users: int
    control_users: int
    qini_coefficient: float | None
    auuc: float | None
    # Treated-minus-control conversion rate among the top k share of users by score.
    uplift_at_k: dict[str, float]
    # Fraction of users targeted (by descending score), and the Qini value there:
    # incremental conversions per treated user of the whole sample.
    curve_fraction: list[float]
    curve_gain: list[float]
    reasons: dict[str, str] = field(default_factory=dict)


def uplift_summary(
    offered: pd.DataFrame, holdout: pd.DataFrame, has_policy_arm: bool
) -> UpliftSummary:
    """Score ``score_uplift`` on offered treatment users against the holdout.

    Treatment users without an offer are left out because they received nothing. With
    ``policy_arm`` the holdout is limited to users the policy would have given an
    offer, so both sides come from the same randomized population.
    """
    if has_policy_arm:
        control = holdout[holdout[POLICY_ARM_COLUMN].astype(str) != CONTROL_ARM]
        population = (
            "treatment users with an offer against holdout users the policy would "
            "have given an offer"
        )
    else:
        control = holdout
        population = "treatment users with an offer against the whole holdout"
    users = pd.concat([offered, control], ignore_index=True)
    treated = np.concatenate(
        [np.ones(len(offered), dtype=bool), np.zeros(len(control), dtype=bool)]
    )
    empty = UpliftSummary(
        population=population,
        users=len(users),
        treated_users=len(offered),
        control_users=len(control),
        qini_coefficient=None,
        auuc=None,
        uplift_at_k={},
        curve_fraction=[],
        curve_gain=[],
    )
    if len(offered) == 0 or len(control) == 0:
        reason = "needs treated and control users, got " + (
            f"{len(offered)} and {len(control)}"
        )
        empty.reasons.update(
            qini_coefficient=reason, auuc=reason, uplift_at_k=reason, curve=reason
        )
        return empty

    score = users["score_uplift"].to_numpy(dtype=np.float64)
    outcome = users["converted"].to_numpy(dtype=np.float64)
    fraction, gain = _curve_points(*uplift.qini_curve(score, treated, outcome))
    at_k = {
        f"top_{round(100 * k)}_percent": uplift.uplift_at_k(score, treated, outcome, k)
        for k in UPLIFT_AT_K
    }
    return UpliftSummary(
        population=population,
        users=len(users),
        treated_users=len(offered),
        control_users=len(control),
        qini_coefficient=finite_or_none(
            uplift.qini_coefficient(score, treated, outcome)
        ),
        auuc=finite_or_none(uplift.auuc(score, treated, outcome)),
        uplift_at_k={key: value for key, value in at_k.items() if math.isfinite(value)},
        curve_fraction=fraction,
        curve_gain=gain,
    )


def _curve_points(
    x: npt.NDArray[np.float64], y: npt.NDArray[np.float64]
) -> tuple[list[float], list[float]]:
    """Return at most ``CURVE_POINTS`` finite points of a curve, ends included."""
    if x.size == 0:
        return [], []
    keep = np.unique(np.linspace(0, x.size - 1, min(CURVE_POINTS, x.size)).astype(int))
    points = [
        (float(a), float(b))
        for a, b in zip(x[keep], y[keep], strict=True)
        if math.isfinite(a) and math.isfinite(b)
    ]
    return [a for a, _ in points], [b for _, b in points]
