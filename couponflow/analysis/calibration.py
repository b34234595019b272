"""Simulated experiments that check the analysis methods' error rates and coverage.

Every check draws many experiments at once as NumPy arrays (experiments x users)
and runs the same formulas as the analysis (``stats``, ``cuped``, ``sequential``,
``stratified``). ``benchmarks/calibration.py`` prints the full-size figures; the
tests run small versions.

The simulated user: a pre-period spend ``x = exp(mu + sigma z)`` with standard normal
``z``; a conversion probability ``0.04 + 0.08 Phi(z)`` (uniform on [0.04, 0.12]),
plus ``lift`` when treated; a basket ``B0 exp(tau z + s e)`` with independent
standard normal ``e``; revenue = basket when converted; a discount of
``DISCOUNT_RATE`` of the basket for treated converters. The true effects follow in
closed form from ``E[Phi(Z) exp(tau Z)] = exp(tau^2 / 2) Phi(tau / sqrt(2))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from couponflow.analysis.cuped import cuped_adjust, cuped_theta
from couponflow.analysis.experiment import analyze_experiment
from couponflow.analysis.sequential import (
    mixture_p_values,
    normal_mixture_margin,
    optimal_rho_squared,
)
from couponflow.analysis.stats import (
    FloatArray,
    WelchArrays,
    exact_difference_arrays,
    newcombe_arrays,
    ratio_interval,
    relative_lift_interval,
    two_proportion_p_values,
    welch_arrays,
)
from couponflow.analysis.stratified import stratified_difference

MARGIN_RATE = 0.3
DISCOUNT_RATE = 0.025
BASE_RATE_LOW = 0.04
BASE_RATE_SPAN = 0.08
COVARIATE_MU = 8.0
COVARIATE_SIGMA = 0.8
BASKET_CENTS = 4_000.0
BASKET_TAU = 0.8
BASKET_NOISE = 0.6
LIFT = 0.02
# Experiments drawn per NumPy batch, so that one batch of per-user arrays stays
# around 100 MB.
BATCH_EXPERIMENTS = 250


@dataclass(frozen=True)
class TrueEffects:
    """Closed-form effects of the treatment, per user, in cents where money."""

    conversion_rate_difference: float
    conversion_relative_lift: float
    revenue_per_user_cents: float
    profit_per_user_cents: float
    roi: float


@dataclass(frozen=True)
class Users:
    """Per-user arrays of a batch of experiments, shape (experiments, users)."""

    treated: np.ndarray
    converted: FloatArray
    revenue: FloatArray
    profit: FloatArray
    discount: FloatArray
    covariate: FloatArray


def true_effects(lift: float = LIFT) -> TrueEffects:
    """Return the true effects of a treatment that adds ``lift`` to conversion."""
    noise = math.exp(BASKET_NOISE**2 / 2.0)
    basket = BASKET_CENTS * math.exp(BASKET_TAU**2 / 2.0) * noise
    tilted = basket * float(stats.norm.cdf(BASKET_TAU / math.sqrt(2.0)))
    base_revenue = BASE_RATE_LOW * basket + BASE_RATE_SPAN * tilted
    base_rate = BASE_RATE_LOW + BASE_RATE_SPAN / 2.0
    discount = DISCOUNT_RATE * (base_revenue + lift * basket)
    profit = MARGIN_RATE * lift * basket - discount
    return TrueEffects(
        conversion_rate_difference=lift,
        conversion_relative_lift=lift / base_rate,
        revenue_per_user_cents=lift * basket,
        profit_per_user_cents=profit,
        roi=profit / discount,
    )


def draw_users(
    rng: np.random.Generator,
    treated: np.ndarray,
    lift: float,
    day_rate_shift: FloatArray | None = None,
    discount_rate: float = DISCOUNT_RATE,
) -> Users:
    """Draw the outcomes of users whose assignment is ``treated`` (bool, 2-D).

    ``day_rate_shift`` adds a per-user amount to the conversion probability, to
    simulate a baseline that drifts between days. An A/A experiment passes
    ``lift=0`` and ``discount_rate=0``, so that both groups are treated alike.
    """
    z = rng.standard_normal(treated.shape)
    rate = BASE_RATE_LOW + BASE_RATE_SPAN * stats.norm.cdf(z) + lift * treated
    if day_rate_shift is not None:
        rate = rate + day_rate_shift
    converted = rng.random(treated.shape) < rate
    basket = BASKET_CENTS * np.exp(
        BASKET_TAU * z + BASKET_NOISE * rng.standard_normal(treated.shape)
    )
    revenue = np.where(converted, basket, 0.0)
    discount = np.where(converted & treated, discount_rate * basket, 0.0)
    return Users(
        treated=treated,
        converted=converted.astype(np.float64),
        revenue=revenue,
        profit=MARGIN_RATE * revenue - discount,
        discount=discount,
        covariate=np.exp(COVARIATE_MU + COVARIATE_SIGMA * z),
    )


def fixed_split(experiments: int, users_per_group: int) -> np.ndarray:
    """Return a treated mask with the first half of each row treated."""
    treated = np.zeros((experiments, 2 * users_per_group), dtype=bool)
    treated[:, :users_per_group] = True
    return treated


def aa_false_positive_rates(
    experiments: int, users_per_group: int, alpha: float = 0.05, seed: int = 1
) -> dict[str, float]:
    """Return the share of A/A experiments each test declares significant."""
    rng = np.random.default_rng(seed)
    rejections: dict[str, int] = {}
    for size in _batches(experiments):
        users = draw_users(
            rng, fixed_split(size, users_per_group), lift=0.0, discount_rate=0.0
        )
        p_values = _batch_p_values(users, users_per_group, alpha)
        for name, values in p_values.items():
            rejections[name] = rejections.get(name, 0) + int((values < alpha).sum())
    return {name: count / experiments for name, count in rejections.items()}


def coverage_rates(
    experiments: int, users_per_group: int, alpha: float = 0.05, seed: int = 2
) -> dict[str, float]:
    """Return the share of experiments whose interval covers the true effect.

    Also returns ``cuped_width_ratio`` (mean CUPED width / mean Welch width of
    profit per user) and ``cuped_bias_in_se`` (mean CUPED estimate minus the truth,
    in units of its standard error over all experiments).
    """
    truth = true_effects()
    rng = np.random.default_rng(seed)
    covered: dict[str, int] = {}
    widths = {"welch": 0.0, "cuped": 0.0}
    cuped_estimates: list[FloatArray] = []
    for size in _batches(experiments):
        users = draw_users(rng, fixed_split(size, users_per_group), lift=LIFT)
        intervals = _batch_intervals(users, users_per_group, alpha)
        for name, (low, high) in intervals.items():
            target = _truth_for(name, truth)
            hits = (low <= target) & (target <= high)
            covered[name] = covered.get(name, 0) + int(hits.sum())
        widths["welch"] += float(
            (intervals["profit_welch"][1] - intervals["profit_welch"][0]).sum()
        )
        widths["cuped"] += float(
            (intervals["profit_cuped"][1] - intervals["profit_cuped"][0]).sum()
        )
        cuped_estimates.append(
            (intervals["profit_cuped"][0] + intervals["profit_cuped"][1]) / 2.0
        )
    rates = {name: count / experiments for name, count in covered.items()}
    estimates = np.concatenate(cuped_estimates)
    rates["cuped_width_ratio"] = widths["cuped"] / widths["welch"]
    rates["cuped_bias_in_se"] = float(
        (estimates.mean() - truth.profit_per_user_cents)
        / (estimates.std(ddof=1) / math.sqrt(estimates.size))
    )
    return rates


def peeking_false_positive_rates(
    experiments: int,
    users: int,
    looks: int = 14,
    alpha: float = 0.05,
    seed: int = 3,
) -> dict[str, float]:
    """Return the A/A false-positive rates of looking ``looks`` times.

    Users arrive in random order with a fair coin for their group, and look ``k``
    uses the first ``k / looks`` of them. ``sequence_*`` rejects when the confidence
    sequence excludes 0 at any look; ``naive_*`` when any look's fixed-horizon Welch
    test has p < alpha.
    """
    rng = np.random.default_rng(seed)
    rho_squared = optimal_rho_squared(users, alpha)
    boundaries = np.round(np.linspace(0, users, looks + 1)[1:]).astype(int) - 1
    counts: dict[str, int] = {}
    for size in _batches(experiments):
        treated = rng.random((size, users)) < 0.5
        batch = draw_users(rng, treated, lift=0.0, discount_rate=0.0)
        for metric, values in (
            ("conversion", batch.converted),
            ("profit", batch.profit),
        ):
            moments = _cumulative_group_moments(values, treated, boundaries)
            sequence, naive = _peeking_rejections(moments, rho_squared, alpha)
            counts[f"sequence_{metric}"] = counts.get(f"sequence_{metric}", 0) + int(
                sequence.sum()
            )
            counts[f"naive_{metric}"] = counts.get(f"naive_{metric}", 0) + int(
                naive.sum()
            )
    return {name: count / experiments for name, count in counts.items()}


def split_change_coverage(
    experiments: int, users_per_day: int, alpha: float = 0.05, seed: int = 4
) -> dict[str, float]:
    """Return how often pooled and stratified profit intervals cover the truth
    when the holdout share changes from 20% to 50% while the baseline drifts."""
    truth = true_effects().profit_per_user_cents
    rng = np.random.default_rng(seed)
    holdout_share = np.array([0.2, 0.2, 0.5, 0.5])
    rate_shift = np.array([0.04, 0.04, 0.0, 0.0])
    day = np.repeat(np.arange(holdout_share.size), users_per_day)
    covered = {"pooled": 0, "stratified": 0}
    for _ in range(experiments):
        treated = rng.random(day.size) >= holdout_share[day]
        users = draw_users(
            rng, treated[np.newaxis, :], LIFT, rate_shift[day][np.newaxis, :]
        )
        profit = users.profit[0]
        welch = welch_arrays(
            profit[treated].mean(),
            profit[treated].var(ddof=1),
            treated.sum(),
            profit[~treated].mean(),
            profit[~treated].var(ddof=1),
            (~treated).sum(),
            alpha,
        )
        covered["pooled"] += int(welch.low <= truth <= welch.high)
        estimate, _ = stratified_difference(
            profit[treated], day[treated], profit[~treated], day[~treated], alpha
        )
        assert estimate is not None
        interval = estimate.comparison.interval
        covered["stratified"] += int(interval.low <= truth <= interval.high)
    return {name: count / experiments for name, count in covered.items()}


def exact_small_count_coverage(
    experiments: int,
    users_per_group: int = 300,
    control_rate: float = 0.005,
    treated_rate: float = 0.015,
    alpha: float = 0.05,
    seed: int = 5,
) -> dict[str, float]:
    """Return the coverage of the exact and the Newcombe intervals at small counts."""
    rng = np.random.default_rng(seed)
    x_t = rng.binomial(users_per_group, treated_rate, experiments)
    x_c = rng.binomial(users_per_group, control_rate, experiments)
    n = np.full(experiments, users_per_group)
    truth = treated_rate - control_rate
    rates = {}
    for name, method in (
        ("exact", exact_difference_arrays),
        ("newcombe", newcombe_arrays),
    ):
        _, low, high = method(x_t, n, x_c, n, alpha)
        rates[name] = float(((low <= truth) & (truth <= high)).mean())
    return rates


def end_to_end_aa_rates(
    experiments: int, users_per_arm: int, alpha: float = 0.05, seed: int = 6
) -> dict[str, float]:
    """Run ``analyze_experiment`` on A/A experiments with two arms.

    Returns the share of arms whose unadjusted profit p-value is below alpha, the
    share of experiments where any arm's Holm-adjusted profit p-value is (the
    family-wise rate, at most alpha), and the share with any arm dropped.
    """
    rng = np.random.default_rng(seed)
    n = 4 * users_per_arm
    policy_arm = np.where(np.arange(n) % 2 == 0, "A1", "A2")
    user_id = [str(i) for i in range(n)]
    arm_rejections = family_rejections = drops = 0
    for _ in range(experiments):
        holdout = rng.random(n) < 0.5
        users = draw_users(rng, ~holdout[np.newaxis, :], lift=0.0, discount_rate=0.0)
        allocation = pd.DataFrame(
            {
                "user_id": user_id,
                "group_name": np.where(holdout, "holdout", "treatment"),
                "arm": np.where(holdout, "control", policy_arm),
                "policy_arm": policy_arm,
                "propensity": 0.5,
                "score_uplift": 0.0,
                "expected_cost_cents": 0,
            }
        )
        outcomes = pd.DataFrame(
            {
                "user_id": user_id,
                "converted": users.converted[0] > 0,
                "revenue_cents": np.round(users.revenue[0]).astype(np.int64),
                "discount_cents": 0,
            }
        )
        result = analyze_experiment(allocation, outcomes, MARGIN_RATE, 0.5, alpha)
        raw = [arm.profit_p_value for arm in result.arms]
        adjusted = [arm.profit_p_value_holm for arm in result.arms]
        arm_rejections += sum(p is not None and p < alpha for p in raw)
        family_rejections += any(p is not None and p < alpha for p in adjusted)
        drops += bool(result.offers_to_drop())
    return {
        "arm_profit_welch": arm_rejections / (2 * experiments),
        "family_profit_holm": family_rejections / experiments,
        "any_arm_dropped": drops / experiments,
    }


def _batches(experiments: int) -> list[int]:
    full, rest = divmod(experiments, BATCH_EXPERIMENTS)
    return [BATCH_EXPERIMENTS] * full + ([rest] if rest else [])


def _group_moments(values: FloatArray, n: int) -> tuple[FloatArray, ...]:
    treated, control = values[:, :n], values[:, n:]
    return (
        treated.mean(axis=1),
        treated.var(axis=1, ddof=1),
        control.mean(axis=1),
        control.var(axis=1, ddof=1),
    )


def _welch(values: FloatArray, n: int, alpha: float) -> WelchArrays:
    mean_t, var_t, mean_c, var_c = _group_moments(values, n)
    return welch_arrays(mean_t, var_t, n, mean_c, var_c, n, alpha)


def _cuped_values(users: Users, values: FloatArray) -> FloatArray:
    theta = cuped_theta(values, users.covariate)
    return cuped_adjust(values, users.covariate, theta, users.covariate.mean(axis=1))


def _batch_p_values(users: Users, n: int, alpha: float) -> dict[str, FloatArray]:
    conversions_t = users.converted[:, :n].sum(axis=1)
    conversions_c = users.converted[:, n:].sum(axis=1)
    return {
        "conversion_z_test": two_proportion_p_values(
            conversions_t, n, conversions_c, n
        ),
        "revenue_welch": _welch(users.revenue, n, alpha).p_value,
        "profit_welch": _welch(users.profit, n, alpha).p_value,
        "profit_cuped": _welch(_cuped_values(users, users.profit), n, alpha).p_value,
    }


def _batch_intervals(
    users: Users, n: int, alpha: float
) -> dict[str, tuple[FloatArray, FloatArray]]:
    conversions_t = users.converted[:, :n].sum(axis=1)
    conversions_c = users.converted[:, n:].sum(axis=1)
    _, low, high = newcombe_arrays(conversions_t, n, conversions_c, n, alpha)
    intervals = {"conversion_newcombe": (low, high)}
    for name, values in (
        ("revenue_welch", users.revenue),
        ("profit_welch", users.profit),
        ("profit_cuped", _cuped_values(users, users.profit)),
    ):
        result = _welch(values, n, alpha)
        intervals[name] = (result.low, result.high)
    intervals["roi_delta"] = _roi_intervals(users, n, alpha)
    intervals["conversion_relative_lift_delta"] = _lift_intervals(
        conversions_t, conversions_c, n, alpha
    )
    return intervals


def _roi_intervals(users: Users, n: int, alpha: float) -> tuple[FloatArray, FloatArray]:
    mean_t, var_t, mean_c, var_c = _group_moments(users.profit, n)
    discount = users.discount[:, :n]
    profit_t = users.profit[:, :n]
    lows, highs = [], []
    for row in range(users.profit.shape[0]):
        covariance = float(np.cov(profit_t[row], discount[row])[0, 1]) / n
        interval, _ = ratio_interval(
            float(mean_t[row] - mean_c[row]),
            float(discount[row].mean()),
            float(var_t[row] / n + var_c[row] / n),
            float(discount[row].var(ddof=1)) / n,
            covariance,
            alpha,
        )
        lows.append(interval.low if interval else math.inf)
        highs.append(interval.high if interval else -math.inf)
    return np.array(lows), np.array(highs)


def _lift_intervals(
    conversions_t: FloatArray, conversions_c: FloatArray, n: int, alpha: float
) -> tuple[FloatArray, FloatArray]:
    lows, highs = [], []
    for x_t, x_c in zip(conversions_t, conversions_c, strict=True):
        p_t, p_c = x_t / n, x_c / n
        interval, _ = relative_lift_interval(
            p_t, p_t * (1 - p_t) / n, p_c, p_c * (1 - p_c) / n, alpha
        )
        lows.append(interval.low if interval else math.inf)
        highs.append(interval.high if interval else -math.inf)
    return np.array(lows), np.array(highs)


def _truth_for(name: str, truth: TrueEffects) -> float:
    if name.startswith("conversion_relative"):
        return truth.conversion_relative_lift
    if name.startswith("conversion"):
        return truth.conversion_rate_difference
    if name.startswith("revenue"):
        return truth.revenue_per_user_cents
    if name.startswith("roi"):
        return truth.roi
    return truth.profit_per_user_cents


def _cumulative_group_moments(
    values: FloatArray, treated: np.ndarray, boundaries: np.ndarray
) -> dict[str, FloatArray]:
    moments = {}
    for group, mask in (("t", treated), ("c", ~treated)):
        weight = mask.astype(np.float64)
        n = np.cumsum(weight, axis=1)[:, boundaries]
        total = np.cumsum(values * weight, axis=1)[:, boundaries]
        squares = np.cumsum(values * values * weight, axis=1)[:, boundaries]
        mean = total / n
        moments[f"n_{group}"] = n
        moments[f"mean_{group}"] = mean
        moments[f"var_{group}"] = np.maximum(squares - n * mean * mean, 0.0) / (n - 1.0)
    return moments


def _peeking_rejections(
    moments: dict[str, FloatArray], rho_squared: float, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    n_t, n_c = moments["n_t"], moments["n_c"]
    difference = moments["mean_t"] - moments["mean_c"]
    variance = moments["var_t"] / n_t + moments["var_c"] / n_c
    standard_error = np.sqrt(variance)
    users = n_t + n_c
    half_width = (
        standard_error
        * np.sqrt(users)
        * normal_mixture_margin(users, rho_squared, alpha)
    )
    sequence = (np.abs(difference) > half_width).any(axis=1)
    # The p-value form must agree with the interval form; a mismatch is a bug.
    p_values = mixture_p_values(difference / standard_error, users, rho_squared)
    assert np.array_equal(sequence, (p_values < alpha).any(axis=1))
    naive = welch_arrays(
        moments["mean_t"],
        moments["var_t"],
        n_t,
        moments["mean_c"],
        moments["var_c"],
        n_c,
        alpha,
    ).p_value
    return np.asarray(sequence), np.asarray((naive < alpha).any(axis=1))
