"""Analysis of one campaign's experiment: every coupon arm against the holdout.

The treatment group gets the policy's offers and the randomized holdout gets none.
Each arm is compared with the holdout users the policy would have given that arm,
a sample-ratio check guards the randomization, and the Qini coefficient scores the
uplift model on the randomized comparison.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy import stats

from couponflow import uplift
from couponflow.analysis.stats import (
    Interval,
    finite_or_none,
    newcombe_difference,
    validate_alpha,
    welch_difference,
)
from couponflow.schemas import CONTROL_ARM

log = logging.getLogger(__name__)

HOLDOUT = "holdout"
TREATMENT = "treatment"
GROUP_NAMES: tuple[str, ...] = (HOLDOUT, TREATMENT)
ALLOCATION_COLUMNS: tuple[str, ...] = (
    "user_id",
    "group_name",
    "arm",
    "propensity",
    "score_uplift",
    "expected_cost_cents",
)
# The holdout users' policy choice; without it every arm is compared with the whole
# holdout.
POLICY_ARM_COLUMN = "policy_arm"
OUTCOME_REQUIRED_COLUMNS: tuple[str, ...] = ("user_id", "converted", "revenue_cents")
# A p-value this small is far below what chance produces in one check, even when many
# campaigns are checked, while a real assignment bug usually gives a far smaller one.
SRM_P_THRESHOLD = 0.001
SRM_WITHHELD = "withheld: sample ratio mismatch"
# Points kept of the Qini curve, enough for a smooth plot at report size.
CURVE_POINTS = 201
# Top shares of users, by descending score, at which uplift_at_k is reported.
UPLIFT_AT_K: tuple[float, ...] = (0.1, 0.3, 0.5)


@dataclass(frozen=True)
class GroupSummary:
    """Outcomes of one group of users; rates and means are None for an empty group."""

    users: int
    conversions: int
    conversion_rate: float | None
    redemption_rate: float | None
    revenue_per_user_cents: float | None
    profit_per_user_cents: float | None
    discount_cost_cents: int
    expected_cost_cents: int


@dataclass(frozen=True)
class SampleRatioCheck:
    """Chi-square goodness of fit of the treatment/holdout counts to the design."""

    treatment_users: int
    holdout_users: int
    expected_holdout_fraction: float
    observed_holdout_fraction: float
    chi_square: float
    p_value: float
    threshold: float
    flagged: bool
    verdict: str


@dataclass(frozen=True)
class ArmResult:
    """One coupon arm of the treatment group against its holdout control.

    Money is in cents, per user unless the name says total. ``reasons`` maps the
    name of every None field to why it is None.
    """

    arm: str
    treated: GroupSummary
    control: GroupSummary
    control_source: str
    conversion_rate_difference: Interval | None
    incremental_conversions: Interval | None
    incremental_revenue_per_user_cents: Interval | None
    incremental_profit_per_user_cents: Interval | None
    incremental_profit_cents: Interval | None
    roi: float | None
    verdict: str
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def profit_lower_bound_positive(self) -> bool:
        """Whether the CI of the total incremental profit lies above 0."""
        interval = self.incremental_profit_cents
        return interval is not None and interval.low > 0


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


@dataclass(frozen=True)
class ExperimentResult:
    """Everything the report, MLflow and the next campaign read about one experiment."""

    margin_rate: float
    alpha: float
    users: int
    treatment_users: int
    holdout_users: int
    treatment_users_without_offer: int
    users_without_outcome: int
    outcome_rows_without_allocation: int
    sample_ratio: SampleRatioCheck
    trustworthy: bool
    arms: list[ArmResult]
    uplift: UpliftSummary
    notes: list[str]

    def positive_profit_offers(self) -> list[str]:
        """Return the arms whose incremental profit CI lies above 0, if trustworthy.

        An untrustworthy experiment returns an empty list, so that no next campaign
        acts on its numbers.
        """
        if not self.trustworthy:
            return []
        return [arm.arm for arm in self.arms if arm.profit_lower_bound_positive]

    def to_dict(self) -> dict[str, Any]:
        """Return the result as nested dicts and lists of JSON-safe scalars."""
        payload = asdict(self)
        payload["positive_profit_offers"] = self.positive_profit_offers()
        return _json_safe(payload)


def analyze_experiment(
    allocation: pd.DataFrame,
    outcomes: pd.DataFrame,
    margin_rate: float,
    expected_holdout_fraction: float,
    alpha: float = 0.05,
) -> ExperimentResult:
    """Compare each coupon arm with the holdout and check the experiment's design.

    ``allocation`` has one row per user (columns ``ALLOCATION_COLUMNS``, optionally
    ``policy_arm``) and ``outcomes`` follows the OUTCOMES contract. Users without an
    outcome row count as not converted with 0 revenue. Raises ValueError or KeyError
    on input that breaks these contracts.
    """
    _validate_parameters(margin_rate, expected_holdout_fraction, alpha)
    frame, notes, missing_outcomes, orphan_outcomes = _join_outcomes(
        allocation, outcomes
    )
    revenue = frame["revenue_cents"].astype(np.float64)
    discount = frame["discount_cents"].astype(np.float64)
    frame["profit_cents"] = margin_rate * revenue - discount

    holdout = frame[frame["group_name"] == HOLDOUT]
    treatment = frame[frame["group_name"] == TREATMENT]
    offered = treatment[treatment["arm"] != CONTROL_ARM]
    sample_ratio = check_sample_ratio(
        len(treatment), len(holdout), expected_holdout_fraction
    )
    has_policy_arm = POLICY_ARM_COLUMN in frame.columns
    if has_policy_arm:
        notes.append(
            "Each arm's control is the holdout users whose policy choice was that arm, "
            "so treated and control users are alike. An arm without such holdout "
            "users is compared with the whole holdout."
        )
    else:
        notes.append(
            f"The allocation has no {POLICY_ARM_COLUMN} column, so every arm is "
            "compared with the whole holdout. The difference then mixes the coupon's "
            "effect with how the users the policy picked differ from the average."
        )

    arms = [
        _analyze_arm(
            str(arm),
            offered[offered["arm"] == arm],
            _control_for(str(arm), holdout, has_policy_arm),
            margin_rate,
            alpha,
            sample_ratio.flagged,
        )
        for arm in sorted(offered["arm"].unique())
    ]
    uplift = _uplift_summary(offered, holdout, has_policy_arm)
    result = ExperimentResult(
        margin_rate=margin_rate,
        alpha=alpha,
        users=len(frame),
        treatment_users=len(treatment),
        holdout_users=len(holdout),
        treatment_users_without_offer=len(treatment) - len(offered),
        users_without_outcome=missing_outcomes,
        outcome_rows_without_allocation=orphan_outcomes,
        sample_ratio=sample_ratio,
        trustworthy=not sample_ratio.flagged,
        arms=arms,
        uplift=uplift,
        notes=notes,
    )
    log.info(
        "analyzed %d users in %d arms: srm p=%.3g, trustworthy=%s",
        result.users,
        len(arms),
        sample_ratio.p_value,
        result.trustworthy,
    )
    return result


def check_sample_ratio(
    treatment_users: int, holdout_users: int, expected_holdout_fraction: float
) -> SampleRatioCheck:
    """Test the treatment/holdout counts against the designed holdout fraction.

    Flags a sample-ratio mismatch when the chi-square p-value is below
    ``SRM_P_THRESHOLD``. Raises ValueError when there are no users at all.
    """
    if not 0.0 < expected_holdout_fraction < 1.0:
        raise ValueError(
            "expected_holdout_fraction must be in (0, 1), got "
            f"{expected_holdout_fraction}"
        )
    total = treatment_users + holdout_users
    if total <= 0:
        raise ValueError("no treatment or holdout users: the allocation is empty")
    expected = [
        total * (1.0 - expected_holdout_fraction),
        total * expected_holdout_fraction,
    ]
    chi_square, p_value = stats.chisquare([treatment_users, holdout_users], expected)
    flagged = bool(p_value < SRM_P_THRESHOLD)
    if flagged:
        verdict = (
            f"{SRM_WITHHELD}: {holdout_users} of {total} users are in the holdout, "
            f"designed {expected_holdout_fraction:.1%} (p={p_value:.2g}); find the "
            "assignment or logging bug before reading any result"
        )
        log.warning(
            "sample ratio mismatch: holdout %d of %d, designed %.3f, p=%.3g",
            holdout_users,
            total,
            expected_holdout_fraction,
            p_value,
        )
    else:
        verdict = (
            f"passed: {holdout_users} of {total} users in the holdout, designed "
            f"{expected_holdout_fraction:.1%} (p={p_value:.2g})"
        )
    return SampleRatioCheck(
        treatment_users=treatment_users,
        holdout_users=holdout_users,
        expected_holdout_fraction=expected_holdout_fraction,
        observed_holdout_fraction=holdout_users / total,
        chi_square=float(chi_square),
        p_value=float(p_value),
        threshold=SRM_P_THRESHOLD,
        flagged=flagged,
        verdict=verdict,
    )


def summarize_group(users: pd.DataFrame) -> GroupSummary:
    """Count and average the outcomes of ``users`` (joined rows with profit_cents)."""
    count = len(users)
    conversions = int(users["converted"].sum())
    if count == 0:
        return GroupSummary(0, 0, None, None, None, None, 0, 0)
    return GroupSummary(
        users=count,
        conversions=conversions,
        conversion_rate=conversions / count,
        redemption_rate=float(users["redeemed"].mean()),
        revenue_per_user_cents=float(users["revenue_cents"].mean()),
        profit_per_user_cents=float(users["profit_cents"].mean()),
        discount_cost_cents=int(users["discount_cents"].sum()),
        expected_cost_cents=int(users["expected_cost_cents"].sum()),
    )


def _validate_parameters(
    margin_rate: float, expected_holdout_fraction: float, alpha: float
) -> None:
    if not 0.0 <= margin_rate <= 1.0:
        raise ValueError(f"margin_rate must be in [0, 1], got {margin_rate}")
    if not 0.0 < expected_holdout_fraction < 1.0:
        raise ValueError(
            "expected_holdout_fraction must be in (0, 1), got "
            f"{expected_holdout_fraction}"
        )
    validate_alpha(alpha)


def _join_outcomes(
    allocation: pd.DataFrame, outcomes: pd.DataFrame
) -> tuple[pd.DataFrame, list[str], int, int]:
    """Left-join outcomes onto the allocation; return frame, notes and counts.

    The counts are the allocated users without an outcome row and the outcome rows
    of users outside the allocation.
    """
    missing = [c for c in ALLOCATION_COLUMNS if c not in allocation.columns]
    if missing:
        raise KeyError(f"allocation frame: missing columns {missing}")
    missing = [c for c in OUTCOME_REQUIRED_COLUMNS if c not in outcomes.columns]
    if missing:
        raise KeyError(f"outcomes frame: missing columns {missing}")

    columns = list(ALLOCATION_COLUMNS)
    if POLICY_ARM_COLUMN in allocation.columns:
        columns.append(POLICY_ARM_COLUMN)
    left = allocation[columns].copy()
    left["user_id"] = left["user_id"].astype(str)
    _validate_allocation(left)

    right = outcomes.copy()
    right["user_id"] = right["user_id"].astype(str)
    _validate_campaigns(allocation, right)
    duplicated = right["user_id"][right["user_id"].duplicated()]
    if not duplicated.empty:
        raise ValueError(
            f"outcomes frame: user_id {duplicated.iloc[0]!r} has more than one "
            "outcome row; deduplicate outcomes per user before the analysis"
        )

    notes: list[str] = []
    for column in ("redeemed", "discount_cents"):
        if column not in right.columns:
            right[column] = 0
            notes.append(
                f"The outcomes have no {column} column, so it counts as 0 for everyone."
            )
    right = right[
        ["user_id", "converted", "redeemed", "revenue_cents", "discount_cents"]
    ]
    frame = left.merge(right, on="user_id", how="left", indicator=True)
    without_outcome = int((frame["_merge"] == "left_only").sum())
    orphans = int((~right["user_id"].isin(left["user_id"])).sum())
    frame = frame.drop(columns="_merge")

    # A missing outcome row means no conversion and no revenue in the window.
    for column in ("converted", "redeemed"):
        frame[column] = frame[column].astype("boolean").fillna(False).astype(bool)
    frame["revenue_cents"] = frame["revenue_cents"].fillna(0).astype(np.int64)
    frame["discount_cents"] = frame["discount_cents"].fillna(0).astype(np.int64)
    frame["expected_cost_cents"] = frame["expected_cost_cents"].astype(np.int64)
    notes.append(
        f"{without_outcome} of {len(frame)} allocated users have no outcome row, so "
        "they count as not converted, not redeemed, with 0 revenue and 0 discount."
    )
    if orphans:
        notes.append(
            f"{orphans} outcome rows belong to users outside the allocation and are "
            "ignored."
        )
    return frame, notes, without_outcome, orphans


def _validate_campaigns(allocation: pd.DataFrame, outcomes: pd.DataFrame) -> None:
    if "campaign_id" not in outcomes.columns:
        return
    campaigns = sorted(outcomes["campaign_id"].astype(str).unique())
    if len(campaigns) > 1:
        raise ValueError(
            f"outcomes frame contains several campaigns {campaigns[:5]}; pass the "
            "outcomes of one campaign"
        )
    if "campaign_id" in allocation.columns and campaigns:
        allocated = sorted(allocation["campaign_id"].astype(str).unique())
        if allocated != campaigns:
            raise ValueError(
                f"outcomes of campaign {campaigns[0]!r} do not match the allocation "
                f"of campaign(s) {allocated[:5]}; pass both frames of one campaign"
            )


def _validate_allocation(allocation: pd.DataFrame) -> None:
    duplicated = allocation["user_id"][allocation["user_id"].duplicated()]
    if not duplicated.empty:
        raise ValueError(
            f"allocation frame: user_id {duplicated.iloc[0]!r} appears more than "
            "once; pass one allocation version"
        )
    unknown = sorted(set(allocation["group_name"].astype(str)) - set(GROUP_NAMES))
    if unknown:
        raise ValueError(
            f"allocation frame: group_name must be one of {list(GROUP_NAMES)}, got "
            f"{unknown[:5]}"
        )


def _control_for(
    arm: str, holdout: pd.DataFrame, has_policy_arm: bool
) -> tuple[pd.DataFrame, str]:
    if has_policy_arm:
        matched = holdout[holdout[POLICY_ARM_COLUMN].astype(str) == arm]
        if len(matched) > 0:
            return matched, f"holdout users whose policy choice was {arm}"
        return holdout, f"whole holdout (no holdout user had policy choice {arm})"
    return holdout, f"whole holdout (no {POLICY_ARM_COLUMN} column)"


def _analyze_arm(
    arm: str,
    treated_rows: pd.DataFrame,
    control: tuple[pd.DataFrame, str],
    margin_rate: float,
    alpha: float,
    withheld: bool,
) -> ArmResult:
    control_rows, control_source = control
    treated = summarize_group(treated_rows)
    control_summary = summarize_group(control_rows)
    reasons: dict[str, str] = {}

    rate_difference: Interval | None = None
    incremental_conversions: Interval | None = None
    if control_summary.users == 0:
        reasons["conversion_rate_difference"] = "no holdout users to compare with"
        reasons["incremental_conversions"] = "no holdout users to compare with"
    else:
        rate_difference = newcombe_difference(
            treated.conversions,
            treated.users,
            control_summary.conversions,
            control_summary.users,
            alpha,
        )
        incremental_conversions = rate_difference.scaled(treated.users)

    revenue, revenue_reason = welch_difference(
        treated_rows["revenue_cents"], control_rows["revenue_cents"], alpha
    )
    if revenue_reason:
        reasons["incremental_revenue_per_user_cents"] = revenue_reason
    profit, profit_reason = welch_difference(
        treated_rows["profit_cents"], control_rows["profit_cents"], alpha
    )
    profit_total = profit.scaled(treated.users) if profit else None
    if profit_reason:
        reasons["incremental_profit_per_user_cents"] = profit_reason
        reasons["incremental_profit_cents"] = profit_reason

    roi: float | None = None
    if profit_total is None:
        reasons["roi"] = "incremental profit is undefined"
    elif treated.discount_cost_cents == 0:
        reasons["roi"] = "discount cost is 0"
    else:
        roi = finite_or_none(profit_total.estimate / treated.discount_cost_cents)

    return ArmResult(
        arm=arm,
        treated=treated,
        control=control_summary,
        control_source=control_source,
        conversion_rate_difference=rate_difference,
        incremental_conversions=incremental_conversions,
        incremental_revenue_per_user_cents=revenue,
        incremental_profit_per_user_cents=profit,
        incremental_profit_cents=profit_total,
        roi=roi,
        verdict=_verdict(profit_total, reasons, withheld),
        reasons=reasons,
    )


def _verdict(
    profit_total: Interval | None, reasons: dict[str, str], withheld: bool
) -> str:
    if withheld:
        return SRM_WITHHELD
    if profit_total is None:
        return f"withheld: {reasons['incremental_profit_cents']}"
    if profit_total.low > 0:
        return "profitable: the incremental profit CI lies above 0"
    if profit_total.high < 0:
        return "unprofitable: the incremental profit CI lies below 0"
    return "inconclusive: the incremental profit CI contains 0"


def _uplift_summary(
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


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.bool_ | bool):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return finite_or_none(float(value))
    return value
