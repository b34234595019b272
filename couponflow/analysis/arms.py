"""One coupon arm against its holdout control: every metric with its interval.

Proportions use Newcombe's interval, or the exact methods for small counts. Means use
Welch's interval, with CUPED when a pre-period covariate exists, and ratios use the
delta method. When the holdout share changed, the post-stratified estimate is primary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from couponflow.analysis.cuped import CupedComparison, compare_with_cuped
from couponflow.analysis.guards import SRM_WITHHELD, sample_size_warnings
from couponflow.analysis.stats import (
    Interval,
    MeanComparison,
    ProportionComparison,
    compare_proportions,
    finite_or_none,
    holm_adjust,
    ratio_interval,
    relative_lift_interval,
    welch_test,
)
from couponflow.analysis.stratified import StratifiedEstimate, stratified_difference

KEEP = "keep"
DROP = "drop"
POSITIVE = "positive"
NEGATIVE = "negative"
NOT_SIGNIFICANT = "not significant"
UNDEFINED = "undefined"
DECISION_RULE = (
    "keep an arm unless its incremental profit is significantly negative after the "
    "Holm correction across arms (Holm-adjusted p < alpha and estimate < 0), in "
    "which case drop it. An untrustworthy experiment (sample ratio mismatch) drops "
    "nothing."
)


@dataclass(frozen=True)
class GroupSummary:
    """Outcomes of one group of users; rates and means are None for an empty group.

    ``reasons`` maps the name of every None rate to why it is None.
    """

    users: int
    conversions: int
    conversion_rate: float | None
    redemption_rate: float | None
    revenue_per_user_cents: float | None
    profit_per_user_cents: float | None
    discount_cost_cents: int
    expected_cost_cents: int
    redemptions: int = 0
    revenue_cents: int = 0
    opens: int | None = None
    clicks: int | None = None
    open_rate: float | None = None
    click_rate: float | None = None
    reasons: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ArmResult:
    """One coupon arm of the treatment group against its holdout control.

    Money is in cents, per user unless the name says total (``*_cents`` without
    ``per_user``). ``conversion_rate_difference`` and the ``incremental_*``
    intervals are the primary estimates, made by ``conversion_method`` and
    ``profit_method`` (which also made the revenue ones). ``reasons`` maps the name
    of every None field to why it is None. The p-values are two-sided, and the
    ``*_holm`` ones are adjusted across arms.
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
    conversion_test: ProportionComparison | None = None
    conversion_method: str | None = None
    conversion_p_value: float | None = None
    conversion_p_value_holm: float | None = None
    conversion_relative_lift: Interval | None = None
    incremental_revenue_cents: Interval | None = None
    revenue_relative_lift: Interval | None = None
    profit_method: str | None = None
    profit_p_value: float | None = None
    profit_p_value_holm: float | None = None
    roi_interval: Interval | None = None
    cuped: list[CupedComparison] = field(default_factory=list)
    stratified_conversion: StratifiedEstimate | None = None
    stratified_profit: StratifiedEstimate | None = None
    warnings: list[str] = field(default_factory=list)
    profit_significance: str = UNDEFINED
    decision: str = KEEP

    @property
    def profit_lower_bound_positive(self) -> bool:
        """Whether the CI of the total incremental profit lies above 0."""
        interval = self.incremental_profit_cents
        return interval is not None and interval.low > 0


@dataclass(frozen=True)
class ArmInputs:
    """The joined rows of one arm's treated users and of its control users."""

    arm: str
    treated: pd.DataFrame
    control: pd.DataFrame
    control_source: str


@dataclass(frozen=True)
class AnalysisOptions:
    """Settings shared by every arm of one analysis."""

    alpha: float
    has_covariate: bool
    has_strata: bool
    use_stratified: bool
    logged_columns: frozenset[str]


def summarize_group(
    users: pd.DataFrame,
    received_offer: bool = True,
    logged_columns: frozenset[str] = frozenset(),
) -> GroupSummary:
    """Count and average the outcomes of ``users`` (joined rows with profit_cents).

    Open and click rates are None when the outcomes have no such column, or when
    the group received no offer and no user in it opened (or clicked) anything.
    """
    count = len(users)
    if count == 0:
        return GroupSummary(0, 0, None, None, None, None, 0, 0)
    conversions = int(users["converted"].sum())
    reasons: dict[str, str] = {}
    engagement: dict[str, int | float | None] = {}
    for column, count_name, rate_name in (
        ("opened", "opens", "open_rate"),
        ("clicked", "clicks", "click_rate"),
    ):
        engagement[count_name] = engagement[rate_name] = None
        if column not in logged_columns:
            reasons[rate_name] = f"the outcomes have no {column} column"
            continue
        total = int(users[column].sum())
        if total == 0 and not received_offer:
            reasons[rate_name] = (
                f"{column} is False for every user of this group, which received "
                "no offer to open or click"
            )
            continue
        engagement[count_name] = total
        engagement[rate_name] = total / count
    return GroupSummary(
        users=count,
        conversions=conversions,
        conversion_rate=conversions / count,
        redemption_rate=float(users["redeemed"].mean()),
        revenue_per_user_cents=float(users["revenue_cents"].mean()),
        profit_per_user_cents=float(users["profit_cents"].mean()),
        discount_cost_cents=int(users["discount_cents"].sum()),
        expected_cost_cents=int(users["expected_cost_cents"].sum()),
        redemptions=int(users["redeemed"].sum()),
        revenue_cents=int(users["revenue_cents"].sum()),
        opens=_optional_int(engagement["opens"]),
        clicks=_optional_int(engagement["clicks"]),
        open_rate=_optional_float(engagement["open_rate"]),
        click_rate=_optional_float(engagement["click_rate"]),
        reasons=reasons,
    )


def analyze_arm(inputs: ArmInputs, options: AnalysisOptions) -> ArmResult:
    """Compute every metric of one arm; Holm and the verdict come later.

    The verdict stays a placeholder until ``apply_holm`` has seen all arms.
    """
    treated_rows, control_rows = inputs.treated, inputs.control
    treated = summarize_group(treated_rows, True, options.logged_columns)
    control = summarize_group(control_rows, False, options.logged_columns)
    reasons: dict[str, str] = {}

    conversion = _conversion_metrics(treated, control, inputs, options, reasons)
    revenue = _mean_metric("revenue_cents", "revenue", inputs, options, reasons)
    profit = _mean_metric("profit_cents", "profit", inputs, options, reasons)

    revenue_interval = revenue.primary.interval if revenue.primary else None
    profit_interval = profit.primary.interval if profit.primary else None
    roi, roi_interval = _roi(treated, treated_rows, profit, options.alpha, reasons)
    warnings = sample_size_warnings(
        treated.users, treated.conversions, control.users, control.conversions
    )
    return ArmResult(
        arm=inputs.arm,
        treated=treated,
        control=control,
        control_source=inputs.control_source,
        conversion_rate_difference=conversion.primary_interval,
        incremental_conversions=(
            conversion.primary_interval.scaled(treated.users)
            if conversion.primary_interval
            else None
        ),
        incremental_revenue_per_user_cents=revenue_interval,
        incremental_profit_per_user_cents=profit_interval,
        incremental_profit_cents=(
            profit_interval.scaled(treated.users) if profit_interval else None
        ),
        roi=roi,
        verdict="pending: Holm correction not applied",
        reasons=reasons,
        conversion_test=conversion.test,
        conversion_method=conversion.method,
        conversion_p_value=conversion.p_value,
        conversion_relative_lift=conversion.relative_lift,
        incremental_revenue_cents=(
            revenue_interval.scaled(treated.users) if revenue_interval else None
        ),
        revenue_relative_lift=revenue.relative_lift,
        profit_method=profit.primary.method if profit.primary else None,
        profit_p_value=profit.primary.p_value if profit.primary else None,
        roi_interval=roi_interval,
        cuped=[item for item in (revenue.cuped, profit.cuped) if item is not None],
        stratified_conversion=conversion.stratified,
        stratified_profit=profit.stratified,
        warnings=warnings,
    )


def apply_holm(arms: list[ArmResult], alpha: float, withheld: bool) -> list[ArmResult]:
    """Return the arms with Holm-adjusted p-values, verdicts and keep/drop decisions.

    The family is the arms with a defined p-value, separately for conversion and
    for incremental profit. Verdicts and decisions follow ``DECISION_RULE``.
    """
    conversion_holm = holm_adjust([arm.conversion_p_value for arm in arms])
    profit_holm = holm_adjust([arm.profit_p_value for arm in arms])
    updated = []
    for arm, conversion_adjusted, profit_adjusted in zip(
        arms, conversion_holm, profit_holm, strict=True
    ):
        significance = _significance(
            arm.incremental_profit_cents, profit_adjusted, alpha
        )
        verdict = _verdict(arm, significance, profit_adjusted, withheld)
        decision = DROP if significance == NEGATIVE and not withheld else KEEP
        updated.append(
            replace(
                arm,
                conversion_p_value_holm=conversion_adjusted,
                profit_p_value_holm=profit_adjusted,
                profit_significance=significance,
                verdict=verdict,
                decision=decision,
            )
        )
    return updated


@dataclass(frozen=True)
class _ConversionMetrics:
    primary_interval: Interval | None
    method: str | None
    p_value: float | None
    test: ProportionComparison | None
    relative_lift: Interval | None
    stratified: StratifiedEstimate | None


@dataclass(frozen=True)
class _MeanMetrics:
    primary: MeanComparison | None
    # Per-user treated values behind the primary estimate, for the ROI covariance.
    treated_values: np.ndarray | None
    cuped: CupedComparison | None
    stratified: StratifiedEstimate | None
    relative_lift: Interval | None


def _conversion_metrics(
    treated: GroupSummary,
    control: GroupSummary,
    inputs: ArmInputs,
    options: AnalysisOptions,
    reasons: dict[str, str],
) -> _ConversionMetrics:
    if control.users == 0 or treated.users == 0:
        reason = (
            "no holdout users to compare with"
            if control.users == 0
            else "no treated users"
        )
        for name in (
            "conversion_rate_difference",
            "incremental_conversions",
            "conversion_test",
            "conversion_relative_lift",
        ):
            reasons[name] = reason
        return _ConversionMetrics(None, None, None, None, None, None)

    test = compare_proportions(
        treated.conversions,
        treated.users,
        control.conversions,
        control.users,
        options.alpha,
    )
    p_t = treated.conversions / treated.users
    p_c = control.conversions / control.users
    lift, lift_reason = relative_lift_interval(
        p_t,
        p_t * (1.0 - p_t) / treated.users,
        p_c,
        p_c * (1.0 - p_c) / control.users,
        options.alpha,
    )
    if lift_reason:
        reasons["conversion_relative_lift"] = lift_reason

    stratified = None
    if options.has_strata:
        stratified, strata_reason = stratified_difference(
            inputs.treated["converted"].to_numpy(dtype=np.float64),
            inputs.treated["stratum"],
            inputs.control["converted"].to_numpy(dtype=np.float64),
            inputs.control["stratum"],
            options.alpha,
        )
        if strata_reason:
            reasons["stratified_conversion"] = strata_reason
    if options.use_stratified and stratified is not None:
        primary = stratified.comparison
        return _ConversionMetrics(
            primary.interval, "stratified", primary.p_value, test, lift, stratified
        )
    return _ConversionMetrics(
        test.interval, test.method, test.p_value, test, lift, stratified
    )


def _mean_metric(
    column: str,
    metric: str,
    inputs: ArmInputs,
    options: AnalysisOptions,
    reasons: dict[str, str],
) -> _MeanMetrics:
    """Compare one per-user money column; the primary estimate follows the options.

    Priority: the stratified estimate when the split changed, of CUPED-adjusted
    values when a covariate exists; else CUPED; else plain Welch.
    """
    per_user = f"incremental_{metric}_per_user_cents"
    totals = f"incremental_{metric}_cents"
    y_t = inputs.treated[column].to_numpy(dtype=np.float64)
    y_c = inputs.control[column].to_numpy(dtype=np.float64)
    raw, reason = welch_test(y_t, y_c, options.alpha)
    if raw is None:
        reasons[per_user] = reasons[totals] = str(reason)
        return _MeanMetrics(None, None, None, None, None)

    primary, values_t, values_c = raw, y_t, y_c
    cuped: CupedComparison | None = None
    if options.has_covariate:
        x_t = inputs.treated["pre_spend_cents"].to_numpy(dtype=np.float64)
        x_c = inputs.control["pre_spend_cents"].to_numpy(dtype=np.float64)
        cuped, adjusted, _ = compare_with_cuped(
            metric, y_t, x_t, y_c, x_c, options.alpha
        )
        assert cuped is not None and adjusted is not None
        primary = adjusted
        values_t = y_t - cuped.theta * (x_t - cuped.covariate_mean)
        values_c = y_c - cuped.theta * (x_c - cuped.covariate_mean)

    stratified = None
    if options.has_strata:
        method = "stratified-cuped" if options.has_covariate else "stratified"
        stratified, strata_reason = stratified_difference(
            values_t,
            inputs.treated["stratum"],
            values_c,
            inputs.control["stratum"],
            options.alpha,
            method,
        )
        if strata_reason:
            reasons[f"stratified_{metric}"] = strata_reason
    if options.use_stratified and stratified is not None:
        primary = stratified.comparison

    lift, lift_reason = relative_lift_interval(
        float(y_t.mean()),
        float(y_t.var(ddof=1)) / y_t.size,
        float(y_c.mean()),
        float(y_c.var(ddof=1)) / y_c.size,
        options.alpha,
    )
    if lift_reason:
        reasons[f"{metric}_relative_lift"] = lift_reason
    return _MeanMetrics(primary, values_t, cuped, stratified, lift)


def _roi(
    treated: GroupSummary,
    treated_rows: pd.DataFrame,
    profit: _MeanMetrics,
    alpha: float,
    reasons: dict[str, str],
) -> tuple[float | None, Interval | None]:
    """Return ROI = incremental profit / discount cost and its delta-method CI.

    Per treated user both are means, so ROI = (profit difference) / (mean discount).
    The covariance term uses the treated users' per-user profit and discount.
    """
    # NOTE: for a stratified primary estimate the covariance term still comes from
    # the pooled treated users, an approximation that ignores the stratum weights.
    if profit.primary is None or profit.treated_values is None:
        reasons["roi"] = reasons["roi_interval"] = "incremental profit is undefined"
        return None, None
    if treated.discount_cost_cents == 0:
        reasons["roi"] = reasons["roi_interval"] = "discount cost is 0"
        return None, None
    discount = treated_rows["discount_cents"].to_numpy(dtype=np.float64)
    n = discount.size
    covariance = (
        float(np.cov(profit.treated_values, discount, ddof=1)[0, 1]) / n
        if n > 1
        else 0.0
    )
    interval, reason = ratio_interval(
        profit.primary.interval.estimate,
        float(discount.mean()),
        profit.primary.standard_error**2,
        float(discount.var(ddof=1)) / n if n > 1 else 0.0,
        covariance,
        alpha,
    )
    if interval is None:
        reasons["roi"] = reasons["roi_interval"] = str(reason)
        return None, None
    return finite_or_none(interval.estimate), interval


def _significance(
    profit_total: Interval | None, adjusted_p: float | None, alpha: float
) -> str:
    if profit_total is None or adjusted_p is None:
        return UNDEFINED
    if adjusted_p >= alpha:
        return NOT_SIGNIFICANT
    return POSITIVE if profit_total.estimate > 0 else NEGATIVE


def _verdict(
    arm: ArmResult, significance: str, adjusted_p: float | None, withheld: bool
) -> str:
    if withheld:
        return SRM_WITHHELD
    if significance == UNDEFINED:
        return f"withheld: {arm.reasons.get('incremental_profit_cents', 'undefined')}"
    method = arm.profit_method or "welch"
    detail = f"Holm-adjusted p={_format_p(adjusted_p)}, {method}"
    if significance == POSITIVE:
        return f"profitable: incremental profit is above 0 ({detail})"
    if significance == NEGATIVE:
        return f"unprofitable: incremental profit is below 0 ({detail})"
    return f"inconclusive: incremental profit is not significant ({detail})"


def _format_p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _optional_int(value: int | float | None) -> int | None:
    return None if value is None else int(value)


def _optional_float(value: int | float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)
