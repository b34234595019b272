"""Tests of the experiment analysis: intervals, guards, CUPED, strata, arms, IPW."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from couponflow.analysis import (
    analyze_experiment,
    check_sample_ratio,
    compare_proportions,
    compare_with_cuped,
    fisher_exact_p_value,
    holm_adjust,
    ipw_policy_lift,
    ipw_policy_value,
    newcombe_difference,
    self_normalized_ipw_policy_value,
    stratified_difference,
    welch_difference,
    wilson_interval,
)
from couponflow.analysis.experiment import SRM_WITHHELD
from couponflow.analysis.guards import MIN_USERS_PER_GROUP
from couponflow.analysis.stats import (
    METHOD_EXACT,
    METHOD_SCORE,
    clopper_pearson_interval,
    ratio_interval,
    relative_lift_interval,
)
from couponflow.settings import Settings

# Changes an (allocation, outcomes) pair into an invalid one.
FrameChange = Callable[[pd.DataFrame, pd.DataFrame], tuple[pd.DataFrame, pd.DataFrame]]

SEED = 20240601
MARGIN_RATE = 0.3
HOLDOUT_FRACTION = 0.5
# Conversion probabilities of the synthetic experiment.
BASE_RATE = 0.10
GOOD_ARM_RATE = 0.30
REVENUE_CENTS = 5_000
GOOD_ARM_DISCOUNT_CENTS = 500


def make_experiment(
    users_per_arm: int = 2_000, seed: int = SEED
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Build an allocation and outcomes with a known effect per arm.

    The policy picks arm "C10" or "C20" for half the users each. Arm C10 triples
    conversion at a 500-cent discount per redemption, arm C20 changes nothing.
    """
    rng = np.random.default_rng(seed)
    n = 4 * users_per_arm
    user_id = [str(i) for i in range(n)]
    policy_arm = np.where(np.arange(n) % 2 == 0, "C10", "C20")
    # Exactly half of each policy arm goes to the holdout.
    holdout = np.zeros(n, dtype=bool)
    for start in (0, 1):
        members = rng.permutation(np.arange(start, n, 2))
        holdout[members[: len(members) // 2]] = True
    group = np.where(holdout, "holdout", "treatment")
    arm = np.where(holdout, "control", policy_arm)
    good = arm == "C10"
    converted = rng.random(n) < np.where(good, GOOD_ARM_RATE, BASE_RATE)
    allocation = pd.DataFrame(
        {
            "user_id": user_id,
            "group_name": group,
            "arm": arm,
            "policy_arm": policy_arm,
            "propensity": 0.5,
            "score_uplift": np.where(policy_arm == "C10", 0.2, 0.0)
            + rng.normal(0, 0.05, n),
            "expected_cost_cents": np.where(holdout, 0, 150),
        }
    )
    outcomes = pd.DataFrame(
        {
            "campaign_id": "c1",
            "user_id": user_id,
            "observed_at": pd.Timestamp("2024-06-15", tz="UTC"),
            "converted": converted,
            "redeemed": converted & good,
            "revenue_cents": np.where(converted, REVENUE_CENTS, 0).astype(np.int64),
            "discount_cents": np.where(
                converted & good, GOOD_ARM_DISCOUNT_CENTS, 0
            ).astype(np.int64),
        }
    )
    return allocation, outcomes


def assert_no_nan(value: object) -> None:
    """Fail when a NaN or infinity hides anywhere in a to_dict() payload."""
    json.dumps(value, allow_nan=False)


class TestIntervals:
    # Method 10 of Newcombe (1998), Table II, examples (a), (b) and (f).
    @pytest.mark.parametrize(
        ("counts", "low", "high"),
        [
            ((56, 70, 48, 80), 0.0524, 0.3339),
            ((9, 10, 3, 10), 0.1705, 0.8090),
            ((5, 56, 0, 29), -0.0381, 0.1926),
        ],
    )
    def test_newcombe_matches_published(
        self, counts: tuple[int, int, int, int], low: float, high: float
    ) -> None:
        interval = newcombe_difference(*counts)
        assert interval.low == pytest.approx(low, abs=1e-4)
        assert interval.high == pytest.approx(high, abs=1e-4)

    def test_wilson_stays_inside_unit_interval(self) -> None:
        zero = wilson_interval(0, 20)
        full = wilson_interval(20, 20)
        assert zero.low == 0.0
        assert zero.high > 0.0
        assert full.high == 1.0
        assert full.low < 1.0

    def test_wilson_rejects_empty_sample(self) -> None:
        with pytest.raises(ValueError, match="trials must be > 0"):
            wilson_interval(0, 0)

    def test_welch_matches_scipy(self) -> None:
        rng = np.random.default_rng(SEED)
        a = rng.normal(10.0, 3.0, 80)
        b = rng.normal(8.0, 1.0, 50)
        interval, reason = welch_difference(a, b, alpha=0.05)
        expected = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
        assert reason is None
        assert interval is not None
        assert interval.estimate == pytest.approx(a.mean() - b.mean())
        assert interval.low == pytest.approx(expected.low)
        assert interval.high == pytest.approx(expected.high)

    def test_welch_needs_two_users(self) -> None:
        interval, reason = welch_difference([1.0], [1.0, 2.0])
        assert interval is None
        assert reason is not None
        assert "at least 2 users" in reason


class TestSampleRatio:
    def test_mismatch_600_400_is_flagged(self) -> None:
        check = check_sample_ratio(600, 400, 0.5)
        assert check.chi_square == pytest.approx(40.0)
        assert check.p_value == pytest.approx(2.54e-10, rel=0.01)
        assert check.flagged
        assert check.verdict.startswith(SRM_WITHHELD)

    def test_design_fraction_passes(self) -> None:
        check = check_sample_ratio(900, 100, 0.1)
        assert check.chi_square == pytest.approx(0.0)
        assert not check.flagged

    def test_mismatch_600_400_through_analysis(self) -> None:
        allocation, outcomes = make_experiment(users_per_arm=250)
        holdout = allocation[allocation["group_name"] == "holdout"]
        treatment = allocation[allocation["group_name"] == "treatment"]
        extra = treatment.head(100).assign(user_id=[f"x{i}" for i in range(100)])
        allocation = pd.concat([treatment, extra, holdout.iloc[100:]])
        assert len(allocation) == 1_000

        result = analyze_experiment(allocation, outcomes, MARGIN_RATE, 0.5)

        assert result.sample_ratio.treatment_users == 600
        assert result.sample_ratio.holdout_users == 400
        assert result.sample_ratio.chi_square == pytest.approx(40.0)
        assert result.sample_ratio.p_value == pytest.approx(2.54e-10, rel=0.01)
        assert not result.trustworthy
        assert len(result.arms) == 2
        assert {arm.verdict for arm in result.arms} == {SRM_WITHHELD}
        assert result.positive_profit_offers() == []
        assert result.to_dict()["positive_profit_offers"] == []


class TestAnalyzeExperiment:
    def test_good_arm_is_profitable(self) -> None:
        allocation, outcomes = make_experiment()
        result = analyze_experiment(allocation, outcomes, MARGIN_RATE, HOLDOUT_FRACTION)
        arms = {arm.arm: arm for arm in result.arms}

        assert result.trustworthy
        assert set(arms) == {"C10", "C20"}
        good = arms["C10"]
        assert good.treated.users == 2_000
        assert good.control.users == 2_000
        assert good.control_source == "holdout users whose policy choice was C10"
        difference = good.conversion_rate_difference
        assert difference is not None
        assert difference.low < GOOD_ARM_RATE - BASE_RATE < difference.high
        assert difference.low > 0
        conversions = good.incremental_conversions
        assert conversions is not None
        assert conversions.estimate == pytest.approx(difference.estimate * 2_000)
        profit = good.incremental_profit_cents
        assert profit is not None
        assert profit.low > 0
        assert good.verdict.startswith("profitable")
        assert result.positive_profit_offers() == ["C10"]

    def test_profit_and_roi_arithmetic(self) -> None:
        allocation, outcomes = make_experiment()
        result = analyze_experiment(allocation, outcomes, MARGIN_RATE, HOLDOUT_FRACTION)
        good = next(arm for arm in result.arms if arm.arm == "C10")
        per_user = good.incremental_profit_per_user_cents
        total = good.incremental_profit_cents
        assert per_user is not None
        assert total is not None
        assert good.treated.conversion_rate is not None
        assert good.control.conversion_rate is not None

        treated_profit = (
            MARGIN_RATE * REVENUE_CENTS - GOOD_ARM_DISCOUNT_CENTS
        ) * good.treated.conversion_rate
        control_profit = MARGIN_RATE * REVENUE_CENTS * good.control.conversion_rate
        assert per_user.estimate == pytest.approx(treated_profit - control_profit)
        assert total.estimate == pytest.approx(per_user.estimate * 2_000)
        assert total.low == pytest.approx(per_user.low * 2_000)
        assert good.treated.discount_cost_cents == (
            good.treated.conversions * GOOD_ARM_DISCOUNT_CENTS
        )
        assert good.roi == pytest.approx(
            total.estimate / good.treated.discount_cost_cents
        )
        assert good.treated.redemption_rate == pytest.approx(
            good.treated.conversion_rate
        )

    def test_null_arm_has_no_cost_roi(self) -> None:
        allocation, outcomes = make_experiment()
        result = analyze_experiment(allocation, outcomes, MARGIN_RATE, HOLDOUT_FRACTION)
        null_arm = next(arm for arm in result.arms if arm.arm == "C20")
        assert null_arm.treated.discount_cost_cents == 0
        assert null_arm.roi is None
        assert null_arm.reasons["roi"] == "discount cost is 0"
        assert null_arm.verdict.startswith("inconclusive")

    def test_missing_outcome_counts_as_no_conversion(self) -> None:
        allocation, outcomes = make_experiment(users_per_arm=200)
        treated_c10 = allocation[allocation["arm"] == "C10"]["user_id"]
        dropped = outcomes["user_id"].isin(treated_c10)
        before = analyze_experiment(allocation, outcomes, MARGIN_RATE, 0.5)
        after = analyze_experiment(allocation, outcomes[~dropped], MARGIN_RATE, 0.5)

        good_after = next(arm for arm in after.arms if arm.arm == "C10")
        good_before = next(arm for arm in before.arms if arm.arm == "C10")
        assert before.users_without_outcome == 0
        assert after.users_without_outcome == 200
        assert good_after.treated.users == 200
        assert good_after.treated.conversions == 0
        assert good_after.treated.revenue_per_user_cents == 0.0
        assert good_before.treated.conversions > 0
        assert any("200 of 800 allocated users" in note for note in after.notes)

    def test_user_zero_is_kept(self) -> None:
        allocation, outcomes = make_experiment(users_per_arm=50)
        allocation["user_id"] = allocation["user_id"].astype("string")
        result = analyze_experiment(allocation, outcomes, MARGIN_RATE, 0.5)
        assert result.users == 200
        assert result.users_without_outcome == 0

    def test_without_policy_arm_uses_whole_holdout(self) -> None:
        allocation, outcomes = make_experiment(users_per_arm=200)
        result = analyze_experiment(
            allocation.drop(columns="policy_arm"), outcomes, MARGIN_RATE, 0.5
        )
        for arm in result.arms:
            assert arm.control.users == 400
            assert arm.control_source == "whole holdout (no policy_arm column)"
        assert any("no policy_arm column" in note for note in result.notes)
        assert result.uplift.control_users == 400

    def test_arm_without_matched_holdout_falls_back(self) -> None:
        allocation, outcomes = make_experiment(users_per_arm=200)
        holdout_c20 = (allocation["group_name"] == "holdout") & (
            allocation["policy_arm"] == "C20"
        )
        allocation.loc[holdout_c20, "policy_arm"] = "control"
        result = analyze_experiment(allocation, outcomes, MARGIN_RATE, 0.5)
        arms = {arm.arm: arm for arm in result.arms}
        assert arms["C20"].control.users == 400
        assert arms["C20"].control_source.startswith("whole holdout")
        assert arms["C10"].control.users == 200
        # Holdout users the policy gives nothing stay out of the Qini population.
        assert result.uplift.control_users == 200

    def test_empty_holdout_gives_reasons_not_nan(self) -> None:
        allocation, outcomes = make_experiment(users_per_arm=50)
        allocation = allocation[allocation["group_name"] == "treatment"]
        result = analyze_experiment(allocation, outcomes, MARGIN_RATE, 0.5)
        payload = result.to_dict()

        assert_no_nan(payload)
        assert not result.trustworthy
        for arm in result.arms:
            assert arm.control.users == 0
            assert arm.control.conversion_rate is None
            assert arm.conversion_rate_difference is None
            assert arm.incremental_profit_cents is None
            assert "no holdout users" in arm.reasons["conversion_rate_difference"]
            assert "at least 2 users" in arm.reasons["incremental_profit_cents"]
        assert result.uplift.qini_coefficient is None
        assert "needs treated and control users" in result.uplift.reasons["auuc"]

    def test_to_dict_is_json_safe(self) -> None:
        allocation, outcomes = make_experiment(users_per_arm=100)
        payload = analyze_experiment(allocation, outcomes, MARGIN_RATE, 0.5).to_dict()
        assert_no_nan(payload)
        assert payload["sample_ratio"]["flagged"] is False
        assert isinstance(payload["arms"][0]["treated"]["users"], int)
        assert set(payload["arms"][0]["incremental_profit_cents"]) == {
            "estimate",
            "low",
            "high",
        }

    def test_qini_rewards_informative_score(self) -> None:
        allocation, outcomes = make_experiment()
        informative = analyze_experiment(allocation, outcomes, MARGIN_RATE, 0.5)
        rng = np.random.default_rng(SEED + 1)
        shuffled = allocation.assign(
            score_uplift=rng.permutation(allocation["score_uplift"].to_numpy())
        )
        random = analyze_experiment(shuffled, outcomes, MARGIN_RATE, 0.5)

        uplift = informative.uplift
        assert uplift.treated_users == 4_000
        assert uplift.control_users == 4_000
        assert uplift.qini_coefficient is not None
        assert random.uplift.qini_coefficient is not None
        assert uplift.qini_coefficient > 0.02
        assert uplift.qini_coefficient > random.uplift.qini_coefficient + 0.01
        assert uplift.auuc is not None
        assert uplift.curve_fraction[0] == 0.0
        assert uplift.curve_fraction[-1] == pytest.approx(1.0)
        assert len(uplift.curve_fraction) <= 201
        # The top half by score is the C10 users, whose uplift is 0.2.
        assert uplift.uplift_at_k["top_50_percent"] == pytest.approx(0.2, abs=0.05)

    def test_treatment_without_offer_is_counted(self) -> None:
        allocation, outcomes = make_experiment(users_per_arm=100)
        first_treated = allocation.index[allocation["group_name"] == "treatment"][:10]
        allocation.loc[first_treated, "arm"] = "control"
        result = analyze_experiment(allocation, outcomes, MARGIN_RATE, 0.5)
        assert result.treatment_users_without_offer == 10
        assert sum(arm.treated.users for arm in result.arms) == 190

    @pytest.mark.parametrize(
        ("change", "error", "message"),
        [
            (
                lambda a, o: (a.drop(columns="score_uplift"), o),
                KeyError,
                "score_uplift",
            ),
            (lambda a, o: (a, o.drop(columns="converted")), KeyError, "converted"),
            (lambda a, o: (pd.concat([a, a.head(1)]), o), ValueError, "more than once"),
            (
                lambda a, o: (a, pd.concat([o, o.head(1)])),
                ValueError,
                "more than one outcome row",
            ),
            (
                lambda a, o: (a.assign(group_name="test"), o),
                ValueError,
                "group_name must be one of",
            ),
            (
                lambda a, o: (a, o.assign(campaign_id=["c1", "c2"] * (len(o) // 2))),
                ValueError,
                "one campaign",
            ),
            (
                lambda a, o: (a.assign(campaign_id="c2"), o),
                ValueError,
                "do not match the allocation",
            ),
        ],
    )
    def test_invalid_input_raises(
        self, change: FrameChange, error: type[Exception], message: str
    ) -> None:
        allocation, outcomes = make_experiment(users_per_arm=20)
        allocation, outcomes = change(allocation, outcomes)
        with pytest.raises(error, match=message):
            analyze_experiment(allocation, outcomes, MARGIN_RATE, 0.5)

    def test_invalid_parameters_raise(self) -> None:
        allocation, outcomes = make_experiment(users_per_arm=20)
        with pytest.raises(ValueError, match="margin_rate"):
            analyze_experiment(allocation, outcomes, 1.5, 0.5)
        with pytest.raises(ValueError, match="expected_holdout_fraction"):
            analyze_experiment(allocation, outcomes, MARGIN_RATE, 0.0)
        with pytest.raises(ValueError, match="alpha"):
            analyze_experiment(allocation, outcomes, MARGIN_RATE, 0.5, alpha=1.0)


class TestIpw:
    def test_recovers_known_policy_value(self) -> None:
        rng = np.random.default_rng(SEED)
        n = 20_000
        # Logging policy: arm "a" with probability 0.2, "b" otherwise.
        logged = np.where(rng.random(n) < 0.2, "a", "b")
        propensity = np.where(logged == "a", 0.2, 0.8)
        outcome = rng.random(n) < np.where(logged == "a", 0.5, 0.1)

        plain = ipw_policy_value(np.full(n, "a"), logged, propensity, outcome)
        normalized = self_normalized_ipw_policy_value(
            np.full(n, "a"), logged, propensity, outcome
        )
        for estimate in (plain, normalized):
            assert estimate.ci_low is not None
            assert estimate.ci_high is not None
            assert estimate.ci_low < 0.5 < estimate.ci_high
            assert estimate.matched == int((logged == "a").sum())
        assert normalized.value == pytest.approx(outcome[logged == "a"].mean())

    def test_lift_against_control(self) -> None:
        rng = np.random.default_rng(SEED)
        n = 20_000
        logged = np.where(rng.random(n) < 0.5, "coupon", "control")
        outcome = rng.random(n) < np.where(logged == "coupon", 0.3, 0.1)
        for self_normalized in (False, True):
            lift = ipw_policy_lift(
                np.full(n, "coupon"),
                logged,
                np.full(n, 0.5),
                outcome,
                self_normalized=self_normalized,
            )
            assert lift.ci_low is not None
            assert lift.ci_high is not None
            assert lift.ci_low < 0.2 < lift.ci_high
            assert lift.ci_low > 0.15

    def test_control_policy_has_zero_lift(self) -> None:
        logged = np.array(["control", "coupon", "control", "coupon"])
        lift = ipw_policy_lift(
            np.full(4, "control"), logged, np.full(4, 0.5), [1.0, 0.0, 0.0, 1.0]
        )
        assert lift.value == 0.0
        assert lift.stderr == 0.0

    @pytest.mark.parametrize(
        ("propensity", "message"),
        [([0.5, 0.0], "propensity must be in"), ([0.5, 1.5], "propensity must be in")],
    )
    def test_invalid_propensity_raises(
        self, propensity: list[float], message: str
    ) -> None:
        with pytest.raises(ValueError, match=message):
            ipw_policy_value(["a", "a"], ["a", "b"], propensity, [1.0, 0.0])

    def test_length_mismatch_raises(self) -> None:
        with pytest.raises(ValueError, match="same length"):
            ipw_policy_value(["a"], ["a", "b"], [0.5, 0.5], [1.0, 0.0])

    def test_self_normalized_without_match_raises(self) -> None:
        with pytest.raises(ValueError, match="no logged user received"):
            self_normalized_ipw_policy_value(["a", "a"], ["b", "b"], [0.5, 0.5], [1, 0])


HILLSTROM_ARMS = {
    "Mens E-Mail": "mens",
    "Womens E-Mail": "womens",
    "No E-Mail": "control",
}


@pytest.fixture(scope="module")
def hillstrom() -> pd.DataFrame:
    data_dir = Settings(home=Path("/nonexistent-couponflow-home")).data_dir
    path = data_dir / "hillstrom" / "hillstrom.csv"
    if not path.is_file():
        pytest.skip(f"Hillstrom data not found at {path}")
    frame = pd.read_csv(path)
    frame["arm"] = frame["segment"].map(HILLSTROM_ARMS)
    return frame


@pytest.mark.realdata
class TestIpwHillstrom:
    def test_single_arm_policy_equals_arm_mean(self, hillstrom: pd.DataFrame) -> None:
        shares = hillstrom["arm"].value_counts(normalize=True)
        propensity = hillstrom["arm"].map(shares).to_numpy()
        for arm in ("mens", "womens", "control"):
            for estimator in (ipw_policy_value, self_normalized_ipw_policy_value):
                estimate = estimator(
                    np.full(len(hillstrom), arm),
                    hillstrom["arm"],
                    propensity,
                    hillstrom["visit"],
                )
                expected = hillstrom.loc[hillstrom["arm"] == arm, "visit"].mean()
                assert estimate.value == pytest.approx(expected)

    def test_targeting_policy_on_untouched_half(self, hillstrom: pd.DataFrame) -> None:
        rng = np.random.default_rng(SEED)
        train_mask = rng.random(len(hillstrom)) < 0.5
        train, test = hillstrom[train_mask], hillstrom[~train_mask]

        # Rule learned on one half: per (mens, womens) buyer stratum, the e-mail with
        # the higher visit rate.
        rates = train.groupby(["mens", "womens", "arm"])["visit"].mean().unstack("arm")
        best = rates[["mens", "womens"]].idxmax(axis=1)
        policy = [
            best[(m, w)] for m, w in zip(test["mens"], test["womens"], strict=True)
        ]
        propensity = np.full(len(test), 1 / 3)

        value = ipw_policy_value(policy, test["arm"], propensity, test["visit"])
        lift = ipw_policy_lift(policy, test["arm"], propensity, test["visit"])

        # Stratified direct estimate on the same half, with the strata's shares.
        test_rates = test.groupby(["mens", "womens", "arm"])["visit"].mean()
        shares = test.groupby(["mens", "womens"]).size() / len(test)
        direct = 0.0
        for (mens, womens), arm in zip(best.index, best.to_numpy(), strict=True):
            direct += shares.loc[(mens, womens)] * test_rates.loc[(mens, womens, arm)]
        assert value.stderr is not None
        assert abs(value.value - direct) < 2 * value.stderr
        assert lift.ci_low is not None
        assert lift.ci_low > 0.05
        mens_only = ipw_policy_value(
            np.full(len(test), "mens"), test["arm"], propensity, test["visit"]
        )
        assert value.value >= mens_only.value - 2 * value.stderr


def make_daily_experiment(
    days: int = 4,
    users_per_day: int = 2_000,
    holdout_shares: tuple[float, ...] | None = None,
    day_rate_shift: tuple[float, ...] | None = None,
    seed: int = SEED,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Build an experiment sent over several days, with a pre-period spend.

    One arm, C10, adds 0.05 to conversion at a 300-cent discount per conversion.
    ``day_rate_shift`` adds a per-day amount to every user's conversion rate.
    """
    rng = np.random.default_rng(seed)
    shares = np.array(holdout_shares or (0.5,) * days)
    shift = np.array(day_rate_shift or (0.0,) * days)
    day = np.repeat(np.arange(days), users_per_day)
    n = day.size
    holdout = rng.random(n) < shares[day]
    pre_spend = rng.gamma(2.0, 2_000.0, n)
    rate = 0.05 + shift[day] + np.where(holdout, 0.0, 0.05)
    converted = rng.random(n) < rate
    # Basket grows with past spend, so the covariate predicts revenue.
    basket = 2_000.0 + 0.5 * pre_spend
    revenue = np.where(converted, np.round(basket), 0).astype(np.int64)
    discount = np.where(converted & ~holdout, 300, 0).astype(np.int64)
    send_at = pd.Timestamp("2024-06-01", tz="UTC") + pd.to_timedelta(day, unit="D")
    user_id = [f"u{i}" for i in range(n)]
    allocation = pd.DataFrame(
        {
            "user_id": user_id,
            "group_name": np.where(holdout, "holdout", "treatment"),
            "arm": np.where(holdout, "control", "C10"),
            "policy_arm": "C10",
            "propensity": 1.0 - shares[day],
            "score_uplift": rng.normal(0.0, 0.05, n),
            "expected_cost_cents": np.where(holdout, 0, 15),
            "send_at": send_at,
            "pre_spend_cents": np.round(pre_spend).astype(np.int64),
        }
    )
    outcomes = pd.DataFrame(
        {
            "campaign_id": "c1",
            "user_id": user_id,
            "observed_at": send_at + pd.Timedelta(days=7),
            "converted": converted,
            "redeemed": converted & ~holdout,
            "revenue_cents": revenue,
            "discount_cents": discount,
        }
    )
    return allocation, outcomes


class TestSmallCounts:
    def test_fisher_zero_against_five(self) -> None:
        assert fisher_exact_p_value(0, 500, 5, 500) == pytest.approx(0.062, abs=1e-3)

    def test_zero_against_five_uses_exact(self) -> None:
        comparison = compare_proportions(0, 500, 5, 500)
        assert comparison.method == METHOD_EXACT
        assert comparison.min_expected_cell == pytest.approx(2.5)
        assert comparison.p_value == pytest.approx(0.062, abs=1e-3)
        assert comparison.interval.estimate == pytest.approx(-0.01)
        # Consistent with Fisher's test: the interval contains 0.
        assert comparison.interval.low < 0.0 < comparison.interval.high

    def test_no_conversions_give_zero_and_p_one(self) -> None:
        comparison = compare_proportions(0, 500, 0, 500)
        assert comparison.interval.estimate == 0.0
        assert comparison.p_value == 1.0
        assert comparison.interval.low < 0.0 < comparison.interval.high

    @pytest.mark.parametrize(
        ("counts", "method"),
        [
            ((5, 100, 5, 100), METHOD_SCORE),
            ((4, 100, 5, 100), METHOD_EXACT),
            ((95, 100, 96, 100), METHOD_EXACT),
            ((50, 100, 60, 100), METHOD_SCORE),
        ],
    )
    def test_expected_cell_rule(
        self, counts: tuple[int, int, int, int], method: str
    ) -> None:
        assert compare_proportions(*counts).method == method

    def test_clopper_pearson_matches_scipy(self) -> None:
        interval = clopper_pearson_interval(3, 10)
        expected = stats.binomtest(3, 10).proportion_ci(0.95, method="exact")
        assert interval.low == pytest.approx(expected.low)
        assert interval.high == pytest.approx(expected.high)

    def test_exact_difference_bonferroni_bounds(self) -> None:
        a = clopper_pearson_interval(2, 40, alpha=0.025)
        b = clopper_pearson_interval(7, 50, alpha=0.025)
        interval = compare_proportions(2, 40, 7, 50).interval
        assert interval.low == pytest.approx(a.low - b.high)
        assert interval.high == pytest.approx(a.high - b.low)

    def test_score_p_value_is_chi_square(self) -> None:
        comparison = compare_proportions(50, 500, 80, 500)
        table = [[50, 450], [80, 420]]
        expected = stats.chi2_contingency(table, correction=False).pvalue
        assert comparison.method == METHOD_SCORE
        assert comparison.p_value == pytest.approx(expected)

    def test_analysis_without_conversions_has_no_nan(self) -> None:
        allocation, outcomes = make_experiment(users_per_arm=250)
        outcomes = outcomes.assign(
            converted=False, redeemed=False, revenue_cents=0, discount_cents=0
        )
        result = analyze_experiment(allocation, outcomes, MARGIN_RATE, 0.5)
        assert_no_nan(result.to_dict())
        for arm in result.arms:
            assert arm.conversion_rate_difference is not None
            assert arm.conversion_rate_difference.estimate == 0.0
            assert arm.conversion_p_value == 1.0
            assert arm.conversion_method == METHOD_EXACT
            assert arm.profit_p_value == 1.0
            assert arm.conversion_relative_lift is None
            assert "control mean is 0" in arm.reasons["conversion_relative_lift"]
            assert arm.verdict.startswith("inconclusive")


class TestRatiosAndHolm:
    def test_holm_adjusts_in_input_order(self) -> None:
        adjusted = holm_adjust([0.01, 0.04, None, 0.03, 0.005])
        assert adjusted == pytest.approx([0.03, 0.06, None, 0.06, 0.02])

    def test_holm_caps_at_one(self) -> None:
        assert holm_adjust([0.6, 0.9]) == [1.0, 1.0]

    def test_ratio_delta_method_formula(self) -> None:
        interval, reason = ratio_interval(2.0, 4.0, 0.04, 0.09, 0.01, alpha=0.05)
        variance = (0.04 - 2 * 0.5 * 0.01 + 0.25 * 0.09) / 16.0
        assert reason is None
        assert interval is not None
        assert interval.estimate == 0.5
        assert interval.high - 0.5 == pytest.approx(1.959964 * variance**0.5)

    def test_ratio_with_zero_denominator(self) -> None:
        interval, reason = ratio_interval(1.0, 0.0, 1.0, 1.0, 0.0)
        assert interval is None
        assert reason is not None
        assert "denominator is 0" in reason

    def test_relative_lift_of_rates(self) -> None:
        interval, _ = relative_lift_interval(0.12, 0.0001, 0.10, 0.0001)
        assert interval is not None
        assert interval.estimate == pytest.approx(0.2)
        assert interval.low < 0.2 < interval.high

    def test_holm_and_roi_in_analysis(self) -> None:
        allocation, outcomes = make_experiment()
        result = analyze_experiment(allocation, outcomes, MARGIN_RATE, 0.5)
        arms = {arm.arm: arm for arm in result.arms}
        good = arms["C10"]
        assert result.holm_family_size == 2
        for arm in result.arms:
            assert arm.profit_p_value is not None
            assert arm.profit_p_value_holm is not None
            assert arm.profit_p_value_holm >= arm.profit_p_value
            assert arm.conversion_p_value_holm is not None
        assert "Holm-adjusted p=" in good.verdict
        assert good.profit_significance == "positive"
        assert good.roi_interval is not None
        assert good.roi is not None
        assert good.roi_interval.low < good.roi < good.roi_interval.high
        assert arms["C20"].roi_interval is None
        assert arms["C20"].reasons["roi_interval"] == "discount cost is 0"

    def test_losing_arm_is_dropped(self) -> None:
        allocation, outcomes = make_experiment()
        # Arm C20 now gives a large discount and changes nothing else.
        c20 = outcomes["user_id"].isin(
            allocation["user_id"][allocation["arm"] == "C20"]
        )
        outcomes.loc[c20 & outcomes["converted"], "discount_cents"] = 3_000
        result = analyze_experiment(allocation, outcomes, MARGIN_RATE, 0.5)
        arms = {arm.arm: arm for arm in result.arms}
        assert arms["C20"].profit_significance == "negative"
        assert arms["C20"].decision == "drop"
        assert arms["C20"].verdict.startswith("unprofitable")
        assert arms["C10"].decision == "keep"
        assert result.offers_to_drop() == ["C20"]
        assert result.offers_to_keep() == ["C10"]

    def test_mismatch_drops_nothing(self) -> None:
        allocation, outcomes = make_experiment(users_per_arm=500)
        c20 = outcomes["user_id"].isin(
            allocation["user_id"][allocation["arm"] == "C20"]
        )
        outcomes.loc[c20 & outcomes["converted"], "discount_cents"] = 3_000
        # Keep every treated user but only a fifth of the holdout.
        holdout = allocation["group_name"] == "holdout"
        allocation = allocation[~holdout | (np.arange(len(allocation)) % 5 == 0)]
        result = analyze_experiment(allocation, outcomes, MARGIN_RATE, 0.5)
        assert not result.trustworthy
        assert result.offers_to_drop() == []
        assert {arm.decision for arm in result.arms} == {"keep"}


class TestEngagement:
    def test_open_and_click_rates(self) -> None:
        allocation, outcomes = make_experiment(users_per_arm=500)
        treated = outcomes["user_id"].isin(
            allocation["user_id"][allocation["group_name"] == "treatment"]
        )
        rng = np.random.default_rng(SEED)
        outcomes["opened"] = treated & (rng.random(len(outcomes)) < 0.5)
        outcomes["clicked"] = outcomes["opened"] & (rng.random(len(outcomes)) < 0.2)
        result = analyze_experiment(allocation, outcomes, MARGIN_RATE, 0.5)
        arm = result.arms[0]
        assert arm.treated.open_rate is not None
        assert arm.treated.click_rate is not None
        assert 0.4 < arm.treated.open_rate < 0.6
        assert arm.treated.opens == round(arm.treated.open_rate * arm.treated.users)
        assert arm.control.open_rate is None
        assert "received no offer" in arm.control.reasons["open_rate"]
        assert arm.control.click_rate is None

    def test_missing_columns_say_so(self) -> None:
        allocation, outcomes = make_experiment(users_per_arm=100)
        result = analyze_experiment(allocation, outcomes, MARGIN_RATE, 0.5)
        arm = result.arms[0]
        assert arm.treated.open_rate is None
        assert arm.treated.reasons["open_rate"] == "the outcomes have no opened column"
        assert arm.control.reasons["click_rate"] == (
            "the outcomes have no clicked column"
        )

    def test_revenue_total_and_lift(self) -> None:
        allocation, outcomes = make_experiment()
        result = analyze_experiment(allocation, outcomes, MARGIN_RATE, 0.5)
        good = next(arm for arm in result.arms if arm.arm == "C10")
        per_user = good.incremental_revenue_per_user_cents
        total = good.incremental_revenue_cents
        assert per_user is not None
        assert total is not None
        assert total.estimate == pytest.approx(per_user.estimate * good.treated.users)
        assert good.revenue_relative_lift is not None
        # Conversion triples, so revenue per user does too: a lift of about +200%.
        assert good.revenue_relative_lift.low < 2.0 < good.revenue_relative_lift.high
        # Every conversion has the same basket, so both relative lifts are equal.
        control_revenue = good.control.revenue_per_user_cents
        assert control_revenue is not None
        assert good.conversion_relative_lift is not None
        assert good.conversion_relative_lift.estimate == pytest.approx(
            per_user.estimate / control_revenue, rel=1e-9
        )


class TestCuped:
    def test_narrower_and_unbiased(self) -> None:
        rng = np.random.default_rng(SEED)
        effect = 50.0
        estimates, raw_widths, adjusted_widths = [], [], []
        for _ in range(200):
            x_t, x_c = rng.gamma(2.0, 500.0, 500), rng.gamma(2.0, 500.0, 500)
            y_t = 0.8 * x_t + rng.normal(0, 300, 500) + effect
            y_c = 0.8 * x_c + rng.normal(0, 300, 500)
            comparison, adjusted, reason = compare_with_cuped(
                "revenue", y_t, x_t, y_c, x_c
            )
            assert reason is None
            assert comparison is not None
            assert adjusted is not None
            estimates.append(comparison.adjusted.estimate)
            raw_widths.append(comparison.unadjusted.width)
            adjusted_widths.append(comparison.adjusted.width)
            assert comparison.theta == pytest.approx(0.8, abs=0.15)
        mean = float(np.mean(estimates))
        standard_error = float(np.std(estimates, ddof=1)) / np.sqrt(len(estimates))
        assert abs(mean - effect) < 3 * standard_error
        assert np.mean(adjusted_widths) < 0.6 * np.mean(raw_widths)

    def test_constant_covariate_changes_nothing(self) -> None:
        comparison, _, _ = compare_with_cuped(
            "profit", [1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [1.0, 1.0, 2.0], [5.0] * 3
        )
        assert comparison is not None
        assert comparison.theta == 0.0
        assert comparison.adjusted == comparison.unadjusted

    def test_analysis_uses_allocation_covariate(self) -> None:
        allocation, outcomes = make_daily_experiment(days=1, users_per_day=6_000)
        result = analyze_experiment(allocation, outcomes, MARGIN_RATE, 0.5)
        arm = result.arms[0]
        metrics = {item.metric: item for item in arm.cuped}
        assert result.covariate_source == "allocation"
        assert set(metrics) == {"revenue", "profit"}
        assert arm.profit_method == "welch-cuped"
        for item in metrics.values():
            assert item.adjusted.width < item.unadjusted.width
            assert item.width_reduction > 0.0
        profit = arm.incremental_profit_per_user_cents
        assert profit is not None
        assert profit == metrics["profit"].adjusted

    def test_covariates_argument_overrides(self) -> None:
        allocation, outcomes = make_daily_experiment(days=1, users_per_day=1_000)
        covariates = allocation[["user_id", "pre_spend_cents"]].head(500)
        result = analyze_experiment(
            allocation.drop(columns="pre_spend_cents"),
            outcomes,
            MARGIN_RATE,
            0.5,
            covariates=covariates,
        )
        assert result.covariate_source == "covariates argument"
        assert any("500 of 1000 users have no value" in note for note in result.notes)

    def test_duplicated_covariates_raise(self) -> None:
        allocation, outcomes = make_daily_experiment(days=1, users_per_day=100)
        covariates = allocation[["user_id", "pre_spend_cents"]]
        with pytest.raises(ValueError, match="more than one covariate row"):
            analyze_experiment(
                allocation,
                outcomes,
                MARGIN_RATE,
                0.5,
                covariates=pd.concat([covariates, covariates.head(1)]),
            )

    def test_without_covariate_plain_welch(self) -> None:
        allocation, outcomes = make_experiment(users_per_arm=200)
        result = analyze_experiment(allocation, outcomes, MARGIN_RATE, 0.5)
        assert result.covariate_source is None
        assert all(arm.cuped == [] for arm in result.arms)
        assert {arm.profit_method for arm in result.arms} == {"welch"}


class TestSplitChange:
    def test_changed_split_uses_stratified(self) -> None:
        allocation, outcomes = make_daily_experiment(
            holdout_shares=(0.2, 0.2, 0.5, 0.5),
            day_rate_shift=(0.06, 0.06, 0.0, 0.0),
            users_per_day=5_000,
        )
        result = analyze_experiment(allocation, outcomes, MARGIN_RATE, 0.35)
        arm = result.arms[0]
        split = result.split_check
        assert split is not None
        assert split.flagged
        assert split.stratum_source == "UTC day of send_at"
        assert split.strata == 4
        assert split.holdout_share_by_stratum["2024-06-01"] == pytest.approx(
            0.2, abs=0.02
        )
        assert arm.conversion_method == "stratified"
        assert arm.profit_method == "stratified-cuped"
        assert arm.stratified_conversion is not None
        assert arm.conversion_test is not None
        stratified = arm.stratified_conversion.comparison.interval
        pooled = arm.conversion_test.interval
        # Conversion lift is 0.05 on every day; pooling mixes in the day drift.
        assert stratified.low < 0.05 < stratified.high
        assert abs(stratified.estimate - 0.05) < abs(pooled.estimate - 0.05)
        assert arm.conversion_rate_difference == stratified

    def test_stable_split_keeps_pooled(self) -> None:
        allocation, outcomes = make_daily_experiment(users_per_day=1_000)
        result = analyze_experiment(allocation, outcomes, MARGIN_RATE, 0.5)
        arm = result.arms[0]
        assert result.split_check is not None
        assert not result.split_check.flagged
        assert result.split_check.verdict.startswith("stable")
        assert arm.stratified_profit is not None
        assert arm.profit_method == "welch-cuped"
        assert arm.conversion_method == METHOD_SCORE

    def test_stratum_column_wins(self) -> None:
        allocation, outcomes = make_daily_experiment(users_per_day=500)
        allocation["stratum"] = np.where(np.arange(len(allocation)) % 2 == 0, "a", "b")
        result = analyze_experiment(allocation, outcomes, MARGIN_RATE, 0.5)
        assert result.split_check is not None
        assert result.split_check.stratum_source == "stratum column"
        assert set(result.split_check.users_by_stratum) == {"a", "b"}

    def test_no_strata_says_so(self) -> None:
        allocation, outcomes = make_experiment(users_per_arm=100)
        result = analyze_experiment(allocation, outcomes, MARGIN_RATE, 0.5)
        assert result.split_check is None
        assert any("cannot be checked" in note for note in result.notes)

    def test_stratified_matches_hand_computation(self) -> None:
        estimate, reason = stratified_difference(
            [1.0, 3.0, 10.0, 14.0],
            ["a", "a", "b", "b"],
            [0.0, 2.0, 9.0, 11.0, 13.0, 7.0],
            ["a", "a", "b", "b", "b", "b"],
        )
        # Differences 1 and 4; weights 2*2/4 = 1 and 2*4/6 = 4/3.
        assert reason is None
        assert estimate is not None
        expected = (1.0 * 1.0 + (4.0 / 3.0) * 2.0) / (1.0 + 4.0 / 3.0)
        assert estimate.comparison.interval.estimate == pytest.approx(expected)
        assert estimate.strata_used == 2


class TestMinimumSample:
    def test_small_arm_warns(self) -> None:
        allocation, outcomes = make_experiment(users_per_arm=40)
        result = analyze_experiment(allocation, outcomes, MARGIN_RATE, 0.5)
        arm = result.arms[0]
        assert (
            f"treated group has 40 users, fewer than {MIN_USERS_PER_GROUP}"
            in arm.warnings
        )
        assert any(text.startswith(f"{arm.arm}: ") for text in result.warnings)

    def test_large_arms_do_not_warn(self) -> None:
        allocation, outcomes = make_experiment()
        result = analyze_experiment(allocation, outcomes, MARGIN_RATE, 0.5)
        assert result.warnings == []
