"""Promotion gate of the response model: off-policy value of each model's greedy policy.

A challenger replaces the champion only when its greedy policy's off-policy profit per
holdout user is higher and its holdout Qini is not lower.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import mlflow
import numpy as np
import numpy.typing as npt
import pandas as pd

from couponflow.allocation.scoring import expected_basket_cents, score_users
from couponflow.analysis.ipw import Estimate
from couponflow.analysis.ope import (
    action_indices,
    deterministic_policy,
    dr_value,
    estimate_value_difference,
    snips_value,
)
from couponflow.money import percent_of_cents_array
from couponflow.schemas import CONTROL_ARM
from training.response import ResponseModel, evaluate, validate_offers

log = logging.getLogger(__name__)

Estimator = Literal["snips", "dr"]
ESTIMATORS: tuple[Estimator, ...] = ("snips", "dr")
DEFAULT_ESTIMATOR: Estimator = "dr"
GATE_ARTIFACT = "promotion_gate.json"
HOLDOUT_COLUMNS: tuple[str, ...] = (
    "arm",
    "propensity",
    "converted",
    "revenue_cents",
    "aov_cents",
)


@dataclass(frozen=True)
class PolicyEvaluation:
    """Off-policy profit per holdout user, in cents, of one model's greedy policy.

    ``arm_counts`` counts the holdout users to whom the policy gives each arm.
    """

    snips: Estimate
    dr: Estimate
    arm_counts: dict[str, int]

    def estimate(self, estimator: Estimator) -> Estimate:
        """Return the estimate of ``estimator`` ("snips" or "dr")."""
        return self.snips if estimator == "snips" else self.dr


@dataclass(frozen=True)
class PromotionDecision:
    """The comparison of a challenger with the champion, and the decision taken.

    ``difference`` is the challenger's value minus the champion's by ``estimator``,
    paired on the same holdout rows. The champion fields are None when there was no
    champion.
    """

    promoted: bool
    reason: str
    estimator: Estimator
    margin_rate: float
    holdout_rows: int
    challenger: PolicyEvaluation
    challenger_qini: float
    champion: PolicyEvaluation | None
    champion_qini: float | None
    difference: Estimate | None

    def to_dict(self) -> dict[str, Any]:
        """Return the decision as JSON-ready data, with NaN written as None."""
        return _finite_or_none(asdict(self))


def greedy_policy_arms(
    model: ResponseModel,
    holdout_frame: pd.DataFrame,
    coupons: pd.DataFrame,
    margin_rate: float,
) -> tuple[npt.NDArray[np.str_], npt.NDArray[np.float64]]:
    """Choose for each user the arm with the highest predicted incremental profit.

    The profit of a coupon is that of :func:`score_offers` on the user's expected
    basket (``aov_cents``, or the median basket for users without a purchase), and
    control's profit is 0, so a user gets control unless some coupon's predicted
    profit is > 0. Returns the chosen arms and the reward model of the gate: the
    predicted profit in cents of every arm, ``margin_rate * basket * P(convert)``
    minus the expected discount, with columns ordered as control then ``coupons``.
    """
    offers = validate_offers(
        coupons, model.offer_kinds, model.categories, drop_repeated=True
    )
    frame = holdout_frame.reset_index(drop=True)
    probabilities, scores = score_users(model, frame, offers, margin_rate)
    basket = expected_basket_cents(frame)

    control_profit = margin_rate * basket * probabilities[:, 0]
    reward_model = np.column_stack(
        [control_profit, control_profit[:, None] + scores.profit_cents]
    )
    arms = np.array([CONTROL_ARM, *offers["coupon_id"].astype(str)])
    best = np.argmax(scores.profit_cents, axis=1) + 1
    has_profit = scores.profit_cents.max(axis=1) > 0
    chosen = np.where(has_profit, best, 0)
    return arms[chosen], reward_model


def realized_profit_cents(
    holdout_frame: pd.DataFrame, coupons: pd.DataFrame, margin_rate: float
) -> npt.NDArray[np.float64]:
    """Return each holdout user's profit: margin_rate * revenue minus discount paid.

    The discount is the ``discount_cents`` column when the frame has one. Otherwise
    it is estimated from the coupon's terms on the revenue of a converted user,
    with the rule of :func:`score_offers`. NOTE: that estimate counts every
    conversion under a category coupon as redeemed, so it overstates their cost.
    """
    frame = holdout_frame.reset_index(drop=True)
    revenue = frame["revenue_cents"].to_numpy(dtype=np.int64)
    if "discount_cents" in frame.columns:
        discount = frame["discount_cents"].to_numpy(dtype=np.int64)
    else:
        discount = _estimated_discount_cents(frame, coupons, revenue)
    return margin_rate * revenue.astype(np.float64) - discount


def evaluate_greedy_policy(
    model: ResponseModel,
    holdout_frame: pd.DataFrame,
    coupons: pd.DataFrame,
    margin_rate: float,
    alpha: float = 0.05,
) -> PolicyEvaluation:
    """Estimate the profit per user of the model's greedy policy on the holdout.

    SNIPS and DR (with the model's own predicted profits as the reward model) on
    the logged arms and propensities. Intervals are normal approximations.
    """
    inputs = _policy_inputs(model, holdout_frame, coupons, margin_rate)
    return _evaluation(inputs, inputs.reward_model, alpha)


def decide_promotion(
    challenger: ResponseModel,
    champion: ResponseModel | None,
    holdout_frame: pd.DataFrame,
    coupons: pd.DataFrame,
    margin_rate: float,
    estimator: Estimator = DEFAULT_ESTIMATOR,
    alpha: float = 0.05,
) -> PromotionDecision:
    """Compare the challenger with the champion on the randomized holdout.

    The challenger is promoted when there is no champion, or when its greedy
    policy's ``estimator`` value is strictly higher than the champion's and its
    holdout Qini (see :func:`training.response.evaluate`) is not lower. Both DR
    values use one reward model, the mean of the two models' predicted profits, so
    that the users to whom both policies give the same arm add nothing to the
    difference. Without a champion, the challenger's own predictions serve.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    _check_holdout(holdout_frame)
    frame = holdout_frame.reset_index(drop=True)
    challenger_inputs = _policy_inputs(challenger, frame, coupons, margin_rate)
    challenger_qini = float(evaluate(challenger, frame, coupons)["qini"])

    if champion is None:
        challenger_evaluation = _evaluation(
            challenger_inputs, challenger_inputs.reward_model, alpha
        )
        return PromotionDecision(
            promoted=True,
            reason="promoted: there is no champion yet",
            estimator=estimator,
            margin_rate=margin_rate,
            holdout_rows=len(frame),
            challenger=challenger_evaluation,
            challenger_qini=challenger_qini,
            champion=None,
            champion_qini=None,
            difference=None,
        )

    champion_inputs = _policy_inputs(champion, frame, coupons, margin_rate)
    champion_qini = float(evaluate(champion, frame, coupons)["qini"])
    # Two different reward models would add their disagreement to the difference
    # even on users where both policies agree, so both sides share their mean.
    shared_model = (challenger_inputs.reward_model + champion_inputs.reward_model) / 2
    challenger_evaluation = _evaluation(challenger_inputs, shared_model, alpha)
    champion_evaluation = _evaluation(champion_inputs, shared_model, alpha)
    difference = estimate_value_difference(
        challenger_inputs.target,
        champion_inputs.target,
        challenger_inputs.logged_action,
        challenger_inputs.propensity,
        challenger_inputs.reward,
        method=estimator,
        reward_model=shared_model,
        alpha=alpha,
    )
    promoted, reason = promotion_rule(
        challenger_evaluation.estimate(estimator).value,
        champion_evaluation.estimate(estimator).value,
        challenger_qini,
        champion_qini,
        estimator,
    )
    log.info("promotion gate on %d holdout rows: %s", len(frame), reason)
    return PromotionDecision(
        promoted=promoted,
        reason=reason,
        estimator=estimator,
        margin_rate=margin_rate,
        holdout_rows=len(frame),
        challenger=challenger_evaluation,
        challenger_qini=challenger_qini,
        champion=champion_evaluation,
        champion_qini=champion_qini,
        difference=difference,
    )


def promotion_rule(
    challenger_value: float,
    champion_value: float,
    challenger_qini: float,
    champion_qini: float,
    estimator: Estimator = DEFAULT_ESTIMATOR,
) -> tuple[bool, str]:
    """Return whether the challenger wins, and the reason in one sentence.

    It wins when its off-policy value is strictly higher and its Qini is not lower.
    A NaN value or Qini never wins.
    """
    name = estimator.upper()
    value_wins = challenger_value > champion_value
    qini_holds = challenger_qini >= champion_qini
    value_text = (
        f"{name} profit {challenger_value:.2f} cents per user "
        f"{'>' if value_wins else 'is not above'} the champion's {champion_value:.2f}"
    )
    qini_text = (
        f"holdout Qini {challenger_qini:.5f} "
        f"{'>=' if qini_holds else 'is below'} the champion's {champion_qini:.5f}"
    )
    if value_wins and qini_holds:
        return True, f"promoted: {value_text}, and {qini_text}"
    failed = []
    if not value_wins:
        failed.append(value_text)
    if not qini_holds:
        failed.append(qini_text)
    return False, "kept champion: " + ", and ".join(failed)


def log_promotion_decision(decision: PromotionDecision) -> None:
    """Log the decision to the active MLflow run: metrics, tags and a JSON artifact.

    Metric keys start with ``gate_`` (for example ``gate_challenger_dr`` and
    ``gate_champion_dr_ci_low``), the tags are ``gate_decision``, ``gate_reason``
    and ``gate_estimator``, and the artifact is GATE_ARTIFACT.
    """
    metrics: dict[str, float] = {"gate_holdout_rows": float(decision.holdout_rows)}
    metrics |= _estimate_metrics("gate_challenger_snips", decision.challenger.snips)
    metrics |= _estimate_metrics("gate_challenger_dr", decision.challenger.dr)
    if decision.champion is not None:
        metrics |= _estimate_metrics("gate_champion_snips", decision.champion.snips)
        metrics |= _estimate_metrics("gate_champion_dr", decision.champion.dr)
    if decision.difference is not None:
        metrics |= _estimate_metrics("gate_difference", decision.difference)
    mlflow.log_metrics(metrics)
    mlflow.set_tags(
        {
            "gate_decision": "promoted" if decision.promoted else "kept_champion",
            # MLflow tag values are limited to 8000 characters (MLflow 3.x).
            "gate_reason": decision.reason[:8000],
            "gate_estimator": decision.estimator,
        }
    )
    mlflow.log_dict(decision.to_dict(), GATE_ARTIFACT)


@dataclass(frozen=True)
class _PolicyInputs:
    target: npt.NDArray[np.float64]
    reward_model: npt.NDArray[np.float64]
    logged_action: npt.NDArray[np.int64]
    propensity: npt.NDArray[np.float64]
    reward: npt.NDArray[np.float64]
    arm_counts: dict[str, int]


def _policy_inputs(
    model: ResponseModel,
    holdout_frame: pd.DataFrame,
    coupons: pd.DataFrame,
    margin_rate: float,
) -> _PolicyInputs:
    _check_holdout(holdout_frame)
    frame = holdout_frame.reset_index(drop=True)
    offers = validate_offers(
        coupons, model.offer_kinds, model.categories, drop_repeated=True
    )
    actions = [CONTROL_ARM, *offers["coupon_id"].astype(str)]
    chosen_arms, reward_model = greedy_policy_arms(model, frame, offers, margin_rate)
    chosen = action_indices(chosen_arms, actions)
    counts = np.bincount(chosen, minlength=len(actions))
    return _PolicyInputs(
        target=deterministic_policy(chosen, len(actions)),
        reward_model=reward_model,
        logged_action=action_indices(frame["arm"].astype(str), actions),
        propensity=frame["propensity"].to_numpy(dtype=np.float64, na_value=np.nan),
        reward=realized_profit_cents(frame, offers, margin_rate),
        arm_counts={arm: int(n) for arm, n in zip(actions, counts, strict=True)},
    )


def _evaluation(
    inputs: _PolicyInputs, reward_model: npt.NDArray[np.float64], alpha: float
) -> PolicyEvaluation:
    logged = (inputs.logged_action, inputs.propensity, inputs.reward)
    return PolicyEvaluation(
        snips=snips_value(inputs.target, *logged, alpha=alpha),
        dr=dr_value(inputs.target, *logged, reward_model, alpha=alpha),
        arm_counts=inputs.arm_counts,
    )


def _estimated_discount_cents(
    frame: pd.DataFrame, coupons: pd.DataFrame, revenue: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    offers = validate_offers(coupons, drop_repeated=True).set_index("coupon_id")
    arms = frame["arm"].astype(str).to_numpy()
    converted = frame["converted"].to_numpy(dtype=bool)
    discount = np.zeros(len(frame), dtype=np.int64)
    for coupon_id, offer in offers.iterrows():
        rows = (arms == coupon_id) & converted
        if not rows.any():
            continue
        value = int(offer["value"])
        if offer["kind"] == "percent_off":
            discount[rows] = percent_of_cents_array(revenue[rows], value)
        elif offer["kind"] == "amount_off":
            usable = revenue[rows] >= int(offer["min_spend_cents"])
            discount[rows] = np.where(usable, np.minimum(value, revenue[rows]), 0)
        else:
            discount[rows] = value
    return discount


def _check_holdout(holdout_frame: pd.DataFrame) -> None:
    missing = [c for c in HOLDOUT_COLUMNS if c not in holdout_frame.columns]
    if missing:
        raise ValueError(
            f"holdout_frame is missing columns {missing}; the promotion gate needs "
            "the randomized holdout's logged arm, its propensity, the outcomes and "
            "the user features"
        )
    if holdout_frame.empty:
        raise ValueError("holdout_frame is empty; the promotion gate needs its rows")


def _estimate_metrics(prefix: str, estimate: Estimate) -> dict[str, float]:
    values = {
        prefix: estimate.value,
        f"{prefix}_stderr": estimate.stderr,
        f"{prefix}_ci_low": estimate.ci_low,
        f"{prefix}_ci_high": estimate.ci_high,
    }
    return {
        key: float(value)
        for key, value in values.items()
        if value is not None and math.isfinite(value)
    }


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
