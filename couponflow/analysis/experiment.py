"""Analysis of one campaign's experiment: every coupon arm against the holdout.

The treatment group gets the policy's offers and the randomized holdout gets none.
Each arm is compared with the holdout users the policy would have given that arm.
Guards check the randomization (sample ratio), a change of the split over time and the
sample sizes. Holm's correction covers the several arms, and daily confidence
sequences allow reading the results every day.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from couponflow.analysis.arms import (
    DECISION_RULE,
    DROP,
    KEEP,
    POSITIVE,
    AnalysisOptions,
    ArmInputs,
    ArmResult,
    GroupSummary,
    analyze_arm,
    apply_holm,
    summarize_group,
)
from couponflow.analysis.guards import (
    SRM_P_THRESHOLD,
    SRM_WITHHELD,
    SampleRatioCheck,
    check_sample_ratio,
)
from couponflow.analysis.inputs import (
    ALLOCATION_COLUMNS,
    GROUP_NAMES,
    HOLDOUT,
    OUTCOME_REQUIRED_COLUMNS,
    POLICY_ARM_COLUMN,
    STRATUM_COLUMN,
    TREATMENT,
    join_experiment,
)
from couponflow.analysis.qini import (
    CURVE_POINTS,
    UPLIFT_AT_K,
    UpliftSummary,
    uplift_summary,
)
from couponflow.analysis.sequential import SequentialLook, confidence_sequence
from couponflow.analysis.stats import json_safe, validate_alpha
from couponflow.analysis.stratified import SplitCheck, check_split_change
from couponflow.schemas import CONTROL_ARM

log = logging.getLogger(__name__)

__all__ = [
    "ALLOCATION_COLUMNS",
    "CURVE_POINTS",
    "GROUP_NAMES",
    "HOLDOUT",
    "OUTCOME_REQUIRED_COLUMNS",
    "POLICY_ARM_COLUMN",
    "SRM_P_THRESHOLD",
    "SRM_WITHHELD",
    "TREATMENT",
    "UPLIFT_AT_K",
    "ArmResult",
    "ArmSequence",
    "ExperimentResult",
    "GroupSummary",
    "SampleRatioCheck",
    "UpliftSummary",
    "analyze_experiment",
    "check_sample_ratio",
    "summarize_group",
]

# Metrics followed day by day, and the per-user column behind each.
SEQUENTIAL_METRICS: dict[str, str] = {
    "conversion_rate_difference": "converted",
    "incremental_profit_per_user_cents": "profit_cents",
}


@dataclass(frozen=True)
class ArmSequence:
    """The daily confidence sequence of one metric of one arm, cumulative by day."""

    arm: str
    metric: str
    looks: list[SequentialLook]


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
    split_check: SplitCheck | None = None
    covariate_source: str | None = None
    # Arms whose incremental profit has a p-value, the family Holm corrects over.
    holm_family_size: int = 0
    observation_days: list[str] = field(default_factory=list)
    sequential: list[ArmSequence] = field(default_factory=list)
    sequential_reason: str | None = None
    warnings: list[str] = field(default_factory=list)
    decision_rule: str = DECISION_RULE

    def positive_profit_offers(self) -> list[str]:
        """Return the arms whose Holm-adjusted incremental profit is significantly
        positive, or an empty list when the experiment is not trustworthy."""
        if not self.trustworthy:
            return []
        return [arm.arm for arm in self.arms if arm.profit_significance == POSITIVE]

    def offers_to_keep(self) -> list[str]:
        """Return the arms whose decision is keep (see ``decision_rule``)."""
        return [arm.arm for arm in self.arms if arm.decision == KEEP]

    def offers_to_drop(self) -> list[str]:
        """Return the arms whose decision is drop (see ``decision_rule``)."""
        return [arm.arm for arm in self.arms if arm.decision == DROP]

    def to_dict(self) -> dict[str, Any]:
        """Return the result as nested dicts and lists of JSON-safe scalars."""
        payload = asdict(self)
        payload["positive_profit_offers"] = self.positive_profit_offers()
        payload["offers_to_keep"] = self.offers_to_keep()
        payload["offers_to_drop"] = self.offers_to_drop()
        return json_safe(payload)


def analyze_experiment(
    allocation: pd.DataFrame,
    outcomes: pd.DataFrame,
    margin_rate: float,
    expected_holdout_fraction: float,
    alpha: float = 0.05,
    *,
    covariates: pd.DataFrame | None = None,
) -> ExperimentResult:
    """Compare each coupon arm with the holdout and check the experiment's design.

    ``allocation`` has one row per user (columns ``ALLOCATION_COLUMNS``, optionally
    ``policy_arm``, ``stratum``, ``send_at`` and ``pre_spend_cents``) and
    ``outcomes`` follows the OUTCOMES contract, optionally with ``pre_spend_cents``.
    ``covariates`` (``user_id``, ``pre_spend_cents``) overrides both. Users without
    an outcome row count as not converted with 0 revenue. Raises ValueError or
    KeyError on input that breaks these contracts.
    """
    _validate_parameters(margin_rate, expected_holdout_fraction, alpha)
    joined = join_experiment(allocation, outcomes, covariates)
    frame, notes = joined.frame, joined.notes
    revenue = frame["revenue_cents"].astype(np.float64)
    discount = frame["discount_cents"].astype(np.float64)
    frame["profit_cents"] = margin_rate * revenue - discount

    holdout = frame[frame["group_name"] == HOLDOUT]
    treatment = frame[frame["group_name"] == TREATMENT]
    offered = treatment[treatment["arm"] != CONTROL_ARM]
    sample_ratio = check_sample_ratio(
        len(treatment), len(holdout), expected_holdout_fraction
    )
    split_check = _split_check(frame, joined.stratum_source, notes)
    has_policy_arm = POLICY_ARM_COLUMN in frame.columns
    notes.append(_control_note(has_policy_arm))
    _engagement_notes(offered, joined.logged_columns, notes)

    options = AnalysisOptions(
        alpha=alpha,
        has_covariate=joined.covariate_source is not None,
        has_strata=split_check is not None and split_check.strata > 1,
        use_stratified=split_check is not None and split_check.flagged,
        logged_columns=joined.logged_columns,
    )
    inputs = [
        _arm_inputs(str(arm), offered, holdout, has_policy_arm)
        for arm in sorted(offered["arm"].unique())
    ]
    arms = apply_holm(
        [analyze_arm(item, options) for item in inputs], alpha, sample_ratio.flagged
    )
    sequential, sequential_reason = _sequences(inputs, joined.observation_days, alpha)
    result = ExperimentResult(
        margin_rate=margin_rate,
        alpha=alpha,
        users=len(frame),
        treatment_users=len(treatment),
        holdout_users=len(holdout),
        treatment_users_without_offer=len(treatment) - len(offered),
        users_without_outcome=joined.users_without_outcome,
        outcome_rows_without_allocation=joined.outcome_rows_without_allocation,
        sample_ratio=sample_ratio,
        trustworthy=not sample_ratio.flagged,
        arms=arms,
        uplift=uplift_summary(offered, holdout, has_policy_arm),
        notes=notes,
        split_check=split_check,
        covariate_source=joined.covariate_source,
        holm_family_size=sum(arm.profit_p_value is not None for arm in arms),
        observation_days=joined.observation_days,
        sequential=sequential,
        sequential_reason=sequential_reason,
        warnings=[f"{arm.arm}: {text}" for arm in arms for text in arm.warnings],
    )
    log.info(
        "analyzed %d users in %d arms: srm p=%.3g, split changed=%s, "
        "trustworthy=%s, drop=%s",
        result.users,
        len(arms),
        sample_ratio.p_value,
        bool(split_check and split_check.flagged),
        result.trustworthy,
        result.offers_to_drop(),
    )
    return result


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


def _split_check(
    frame: pd.DataFrame, stratum_source: str | None, notes: list[str]
) -> SplitCheck | None:
    if stratum_source is None:
        notes.append(
            "The allocation has no stratum column and no send_at, so a change of "
            "the holdout share over time cannot be checked."
        )
        return None
    return check_split_change(
        frame[STRATUM_COLUMN], frame["group_name"] == HOLDOUT, stratum_source
    )


def _control_note(has_policy_arm: bool) -> str:
    if has_policy_arm:
        return (
            "Each arm's control is the holdout users whose policy choice was that arm, "
            "so treated and control users are alike. An arm without such holdout "
            "users is compared with the whole holdout."
        )
    return (
        f"The allocation has no {POLICY_ARM_COLUMN} column, so every arm is "
        "compared with the whole holdout. The difference then mixes the coupon's "
        "effect with how the users the policy picked differ from the average."
    )


def _engagement_notes(
    offered: pd.DataFrame, logged: frozenset[str], notes: list[str]
) -> None:
    for column in ("opened", "clicked"):
        if column not in logged:
            notes.append(f"The outcomes have no {column} column, so its rate is n/a.")
        elif len(offered) > 0 and not offered[column].any():
            notes.append(
                f"{column} is False for every treated user, so it may not be logged."
            )


def _arm_inputs(
    arm: str, offered: pd.DataFrame, holdout: pd.DataFrame, has_policy_arm: bool
) -> ArmInputs:
    """Pair the arm's treated users with the holdout users the policy gave the arm."""
    treated = offered[offered["arm"] == arm]
    if not has_policy_arm:
        return ArmInputs(
            arm, treated, holdout, f"whole holdout (no {POLICY_ARM_COLUMN} column)"
        )
    matched = holdout[holdout[POLICY_ARM_COLUMN].astype(str) == arm]
    if len(matched) > 0:
        return ArmInputs(
            arm, treated, matched, f"holdout users whose policy choice was {arm}"
        )
    return ArmInputs(
        arm,
        treated,
        holdout,
        f"whole holdout (no holdout user had policy choice {arm})",
    )


def _sequences(
    inputs: list[ArmInputs], days: list[str], alpha: float
) -> tuple[list[ArmSequence], str | None]:
    """Return each arm's daily confidence sequences, or none and the reason.

    Look ``d`` contains the users whose outcome was observed by the end of UTC day
    ``d``.
    """
    # NOTE: this assumes observed_at is when a user's attribution window closed, as
    # the simulator writes it. If it were the conversion time, early looks would
    # hold the converters first and the cumulative comparison would be biased.
    if not days:
        return [], "the outcomes have no observed_at column"
    if len(days) < 2:
        return [], f"every outcome was observed on one day ({days[0]})"
    sequences = []
    for item in inputs:
        for metric, column in SEQUENTIAL_METRICS.items():
            looks = confidence_sequence(
                item.treated[column].to_numpy(dtype=np.float64),
                item.treated["observed_day"],
                item.control[column].to_numpy(dtype=np.float64),
                item.control["observed_day"],
                alpha,
            )
            sequences.append(ArmSequence(item.arm, metric, looks))
    return sequences, None
