"""Tests of the anytime-valid confidence sequences and the daily table they feed."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from couponflow.analysis import analyze_experiment, confidence_sequence
from couponflow.analysis.calibration import peeking_false_positive_rates
from couponflow.analysis.sequential import (
    mixture_p_values,
    normal_mixture_margin,
    optimal_rho_squared,
)
from couponflow.analysis.stats import z_critical

SEED = 11
ALPHA = 0.05
MARGIN_RATE = 0.3


def make_daily_outcomes(days: int, users: int = 4_000) -> tuple[pd.DataFrame, ...]:
    """Build a one-arm experiment whose outcomes arrive over ``days`` UTC days."""
    rng = np.random.default_rng(SEED)
    holdout = rng.random(users) < 0.5
    converted = rng.random(users) < np.where(holdout, 0.1, 0.2)
    user_id = [str(i) for i in range(users)]
    allocation = pd.DataFrame(
        {
            "user_id": user_id,
            "group_name": np.where(holdout, "holdout", "treatment"),
            "arm": np.where(holdout, "control", "C1"),
            "policy_arm": "C1",
            "propensity": 0.5,
            "score_uplift": 0.0,
            "expected_cost_cents": 0,
        }
    )
    day = rng.integers(0, days, users)
    outcomes = pd.DataFrame(
        {
            "campaign_id": "c",
            "user_id": user_id,
            "observed_at": pd.Timestamp("2024-03-01 12:00", tz="UTC")
            + pd.to_timedelta(day, unit="D"),
            "converted": converted,
            "revenue_cents": np.where(converted, 4_000, 0),
        }
    )
    return allocation, outcomes


class TestBoundary:
    def test_rho_minimizes_margin_at_t_opt(self) -> None:
        rho = optimal_rho_squared(5_000, ALPHA)
        best = float(normal_mixture_margin([5_000], rho, ALPHA)[0])
        for factor in (0.5, 0.8, 1.25, 2.0):
            other = float(normal_mixture_margin([5_000], rho * factor, ALPHA)[0])
            assert best < other

    def test_margin_formula(self) -> None:
        rho, t = 0.002, 1_000.0
        expected = math.sqrt(
            2 * (t * rho + 1) / (t * t * rho) * math.log(math.sqrt(t * rho + 1) / ALPHA)
        )
        assert normal_mixture_margin([t], rho, ALPHA)[0] == pytest.approx(expected)

    def test_margin_wider_than_fixed_interval(self) -> None:
        rho = optimal_rho_squared(1_000, ALPHA)
        t = np.array([10.0, 100.0, 1_000.0, 10_000.0])
        margin = normal_mixture_margin(t, rho, ALPHA) * np.sqrt(t)
        assert (margin > z_critical(ALPHA)).all()

    def test_p_value_agrees_with_interval(self) -> None:
        rho = optimal_rho_squared(2_000, ALPHA)
        users = np.full(400, 2_000.0)
        z = np.linspace(-5.0, 5.0, 400)
        margin = normal_mixture_margin(users, rho, ALPHA) * np.sqrt(users)
        p_values = mixture_p_values(z, users, rho)
        assert np.array_equal(p_values < ALPHA, np.abs(z) > margin)
        assert p_values.max() <= 1.0

    def test_invalid_t_opt_raises(self) -> None:
        with pytest.raises(ValueError, match="t_opt must be >= 1"):
            optimal_rho_squared(0.5, ALPHA)


class TestConfidenceSequence:
    def test_cumulative_looks(self) -> None:
        rng = np.random.default_rng(SEED)
        treated, control = rng.normal(1.0, 2.0, 600), rng.normal(0.0, 2.0, 600)
        treated_day, control_day = rng.integers(0, 3, 600), rng.integers(0, 3, 600)
        looks = confidence_sequence(treated, treated_day, control, control_day)

        assert [look.look for look in looks] == ["0", "1", "2"]
        assert [look.treated_users for look in looks] == [
            int((treated_day <= day).sum()) for day in range(3)
        ]
        last = looks[-1]
        assert last.estimate is not None
        assert last.estimate == pytest.approx(treated.mean() - control.mean())
        assert last.fixed_low is not None
        assert last.sequence_low is not None
        assert last.sequence_high is not None
        assert last.fixed_high is not None
        standard_error = math.sqrt(
            treated.var(ddof=1) / 600 + control.var(ddof=1) / 600
        )
        assert last.fixed_high - last.estimate == pytest.approx(
            1.959964 * standard_error
        )
        for look in looks:
            assert look.sequence_low is not None and look.fixed_low is not None
            assert look.sequence_low < look.fixed_low
        p_values = [look.anytime_p_value for look in looks]
        assert p_values == sorted(p_values, key=lambda p: -float(p or 0.0))

    def test_small_look_is_undefined(self) -> None:
        looks = confidence_sequence([1.0, 2.0, 3.0], [0, 1, 1], [1.0, 2.0], [0, 1])
        assert looks[0].estimate is None
        assert looks[0].anytime_p_value is None
        assert looks[1].estimate == pytest.approx(2.0 - 1.5)

    def test_peeking_keeps_false_positives(self) -> None:
        rates = peeking_false_positive_rates(200, 2_000, looks=14, seed=SEED)
        assert rates["sequence_conversion"] <= 0.05
        assert rates["sequence_profit"] <= 0.05
        assert rates["naive_conversion"] > rates["sequence_conversion"]
        assert rates["naive_profit"] > 0.08


class TestDailyTable:
    def test_several_days_give_sequences(self) -> None:
        allocation, outcomes = make_daily_outcomes(days=5)
        result = analyze_experiment(allocation, outcomes, MARGIN_RATE, 0.5)
        assert result.sequential_reason is None
        assert result.observation_days == [f"2024-03-0{day}" for day in range(1, 6)]
        metrics = {item.metric: item for item in result.sequential}
        assert set(metrics) == {
            "conversion_rate_difference",
            "incremental_profit_per_user_cents",
        }
        conversion = metrics["conversion_rate_difference"]
        arm = result.arms[0]
        assert len(conversion.looks) == 5
        assert conversion.looks[-1].treated_users == arm.treated.users
        assert conversion.looks[-1].control_users == arm.control.users
        assert arm.conversion_rate_difference is not None
        assert conversion.looks[-1].estimate == pytest.approx(
            arm.conversion_rate_difference.estimate
        )
        # A 10-point lift on 2000 users per group: the sequence excludes 0 by the end.
        last = conversion.looks[-1]
        assert last.sequence_low is not None
        assert last.sequence_low > 0.0

    def test_one_day_gives_reason(self) -> None:
        allocation, outcomes = make_daily_outcomes(days=1)
        result = analyze_experiment(allocation, outcomes, MARGIN_RATE, 0.5)
        assert result.sequential == []
        assert result.sequential_reason == (
            "every outcome was observed on one day (2024-03-01)"
        )

    def test_missing_outcomes_join_last_day(self) -> None:
        allocation, outcomes = make_daily_outcomes(days=3)
        result = analyze_experiment(allocation, outcomes.iloc[100:], MARGIN_RATE, 0.5)
        conversion = result.sequential[0]
        assert result.users_without_outcome == 100
        assert conversion.looks[-1].treated_users == result.arms[0].treated.users

    def test_without_observed_at(self) -> None:
        allocation, outcomes = make_daily_outcomes(days=3)
        result = analyze_experiment(
            allocation, outcomes.drop(columns="observed_at"), MARGIN_RATE, 0.5
        )
        assert result.sequential == []
        assert result.sequential_reason == "the outcomes have no observed_at column"
