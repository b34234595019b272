"""Tests of the experiment analysis: intervals, sample-ratio guard, arms, IPW."""

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
    ipw_policy_lift,
    ipw_policy_value,
    newcombe_difference,
    self_normalized_ipw_policy_value,
    welch_difference,
    wilson_interval,
)
from couponflow.analysis.experiment import SRM_WITHHELD
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
