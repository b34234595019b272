"""Tests of offer scoring, the budget solver, baselines, campaign plans and storage."""

from __future__ import annotations

import math
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from couponflow.allocation import (
    HOLDOUT,
    NO_OFFER,
    PLAN_COLUMNS,
    TREATMENT,
    OfferScores,
    Solution,
    assign_campaign,
    current_version,
    likeliest_buyers,
    oracle,
    random_targeting,
    read_current_allocation,
    score_offers,
    solve_budget,
    solve_budget_lp,
    write_allocation,
)
from couponflow.allocation.scoring import (
    BasketPrior,
    expected_basket_cents,
    fit_basket_prior,
    score_users,
    shrunk_basket_cents,
)
from couponflow.schemas import CONTROL_ARM, COUPONS, coerce
from couponflow.settings import Settings
from couponflow.store import get_engine, metadata

POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
SEND_AT = datetime(2026, 5, 4, 9, 0, tzinfo=UTC)
# The Lagrangian allocation must reach this share of the LP relaxation's bound.
MIN_SHARE_OF_LP_BOUND = 0.99


def _offers() -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "coupon_id": ["pct10", "five_off", "ship"],
            "kind": ["percent_off", "amount_off", "free_shipping"],
            "value": [1_000, 500, 499],
            "min_spend_cents": [0, 3_000, 0],
            "category": ["all", "all", "all"],
            "valid_days": [7, 7, 7],
            "stock": [100, 100, 100],
            "channels": ["email", "email", "email"],
            "starts_at": [SEND_AT] * 3,
            "ends_at": [SEND_AT + timedelta(days=7)] * 3,
        }
    )
    return coerce(frame, COUPONS)


def _random_instance(
    seed: int, n_users: int, n_offers: int
) -> tuple[np.ndarray, np.ndarray, int]:
    rng = np.random.default_rng(seed)
    profit = rng.normal(5.0, 30.0, (n_users, n_offers))
    cost = rng.uniform(1.0, 50.0, (n_users, n_offers))
    # 10% to 80% of the summed cost of profitable pairs, divided by the offer count.
    share = rng.uniform(0.1, 0.8)
    budget = int(share * cost[profit > 0].sum() / n_offers)
    return profit, cost, budget


def _scores_for(
    profit: np.ndarray, cost: np.ndarray, uplift: np.ndarray
) -> OfferScores:
    n_offers = profit.shape[1]
    return OfferScores(
        offer_ids=tuple(f"coupon{j}" for j in range(n_offers)),
        profit_cents=profit,
        cost_cents=cost,
        uplift=uplift,
        discount_cents=np.zeros(profit.shape, dtype=np.int64),
    )


def _plan_frame(n_users: int, marker: int) -> pd.DataFrame:
    """Build a valid plan whose expected_profit_cents all equal ``marker``."""
    return pd.DataFrame(
        {
            "user_id": pd.array([str(i) for i in range(n_users)], dtype="string"),
            "group_name": pd.array([TREATMENT] * n_users, dtype="string"),
            "arm": pd.array([f"coupon-v{marker}"] * n_users, dtype="string"),
            "policy_arm": pd.array([f"coupon-v{marker}"] * n_users, dtype="string"),
            "channel": pd.array(["email"] * n_users, dtype="string"),
            "send_at": pd.Series([SEND_AT] * n_users, dtype="datetime64[ns, UTC]"),
            "propensity": np.full(n_users, 0.9),
            "score_uplift": np.full(n_users, 0.01),
            "expected_profit_cents": np.full(n_users, marker, dtype=np.int64),
            "expected_cost_cents": np.full(n_users, 2 * marker, dtype=np.int64),
        }
    )


@pytest.fixture
def sqlite_engine(tmp_path) -> Engine:
    settings = Settings(home=tmp_path)
    settings.ensure_dirs()
    return get_engine(settings.campaign_db_url)


@pytest.fixture
def postgres_engine() -> Iterator[Engine]:
    """Yield an engine on a private schema of the test database, dropped afterwards."""
    admin = sa.create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
    try:
        with admin.connect():
            pass
    except sa.exc.OperationalError as error:
        admin.dispose()
        pytest.skip(f"PostgreSQL at {POSTGRES_URL} is unreachable: {error.orig}")
    schema = f"couponflow_test_{uuid.uuid4().hex[:12]}"
    with admin.begin() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    engine = sa.create_engine(
        POSTGRES_URL, connect_args={"options": f"-csearch_path={schema}"}
    )
    try:
        metadata.create_all(engine)
        yield engine
    finally:
        engine.dispose()
        with admin.begin() as connection:
            connection.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


class TestScoreOffers:
    def test_profit_cost_and_uplift_per_kind(self) -> None:
        p = np.array([[0.10, 0.20, 0.30, 0.15], [0.40, 0.50, 0.60, 0.45]])
        aov = np.array([5_000, 2_000], dtype=np.int64)

        scores = score_offers(p, aov, _offers(), margin_rate=0.3)

        assert scores.offer_ids == ("pct10", "five_off", "ship")
        expected_discount = np.array([[500, 500, 499], [200, 0, 499]])
        np.testing.assert_array_equal(scores.discount_cents, expected_discount)
        # User 0: margin 0.3 * 5000 = 1500 cents per conversion.
        assert scores.profit_cents[0, 0] == pytest.approx(1500 * 0.10 - 0.20 * 500)
        assert scores.cost_cents[0, 0] == pytest.approx(0.20 * 500)
        assert scores.uplift[0, 1] == pytest.approx(0.20)
        assert scores.profit_cents[0, 2] == pytest.approx(1500 * 0.05 - 0.15 * 499)

    def test_amount_off_below_min_spend_has_no_effect(self) -> None:
        p = np.array([[0.40, 0.50, 0.60, 0.45]])
        aov = np.array([2_000], dtype=np.int64)

        scores = score_offers(p, aov, _offers(), margin_rate=0.3)

        assert scores.uplift[0, 1] == 0.0
        assert scores.profit_cents[0, 1] == 0.0
        assert scores.cost_cents[0, 1] == 0.0

    def test_percent_off_rounds_half_up(self) -> None:
        offers = _offers().iloc[[0]].assign(value=1_500)
        p = np.array([[0.1, 0.2]])

        scores = score_offers(p, np.array([3_490], dtype=np.int64), offers, 0.3)

        # 15% of 3490 cents is 523.5, rounded half up to 524.
        assert scores.discount_cents[0, 0] == 524

    @pytest.mark.parametrize(
        ("p", "aov", "message"),
        [
            (np.full((2, 3), 0.1), np.array([1, 2]), "offer columns"),
            (np.full((2, 4), 1.5), np.array([1, 2]), r"\[0, 1\]"),
            (np.full((2, 4), 0.1), np.array([1.0, 2.0]), "integer cents"),
            (np.full((2, 4), 0.1), np.array([1, 2, 3]), "shape"),
            (np.full((2, 4), 0.1), np.array([-1, 2]), ">= 0"),
        ],
    )
    def test_rejects_invalid_input(self, p, aov, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            score_offers(p, aov, _offers(), margin_rate=0.3)

    def test_scores_reject_mismatched_shapes(self) -> None:
        with pytest.raises(ValueError, match="uplift has shape"):
            _scores_for(np.ones((3, 2)), np.ones((3, 2)), np.ones((2, 2)))
        with pytest.raises(ValueError, match="offer_ids"):
            OfferScores(["a"], np.ones((3, 2)), np.ones((3, 2)), np.ones((3, 2)))

    def test_rejects_unknown_kind(self) -> None:
        offers = _offers().assign(kind=["percent_off", "bogus", "free_shipping"])
        with pytest.raises(ValueError, match="unknown coupon kind"):
            score_offers(np.full((1, 4), 0.1), np.array([100]), offers, 0.3)

    def test_min_spend_applies_to_every_kind(self) -> None:
        offers = _offers().assign(min_spend_cents=[6_000, 6_000, 6_000])
        p = np.array([[0.10, 0.20, 0.30, 0.15], [0.10, 0.20, 0.30, 0.15]])
        aov = np.array([5_999, 6_000], dtype=np.int64)

        scores = score_offers(p, aov, offers, margin_rate=0.3)

        discount = scores.discount_cents
        assert discount is not None
        np.testing.assert_array_equal(discount[0], [0, 0, 0])
        np.testing.assert_array_equal(scores.uplift[0], [0.0, 0.0, 0.0])
        np.testing.assert_array_equal(scores.cost_cents[0], [0.0, 0.0, 0.0])
        np.testing.assert_array_equal(discount[1], [600, 500, 499])
        assert scores.profit_cents[1, 2] == pytest.approx(
            0.3 * 6_000 * 0.05 - 0.15 * 499
        )

    def test_zero_basket_pays_only_fixed_discounts(self) -> None:
        p = np.array([[0.10, 0.20, 0.30, 0.15]])

        scores = score_offers(p, np.array([0], dtype=np.int64), _offers(), 0.3)

        # 10% of nothing is nothing, five_off needs 3000 cents, shipping still costs.
        np.testing.assert_array_equal(scores.discount_cents, [[0, 0, 499]])
        assert scores.profit_cents[0, 0] == 0.0
        assert scores.uplift[0, 1] == 0.0
        assert scores.profit_cents[0, 2] == pytest.approx(-0.15 * 499)

    def test_category_coupon_is_charged_on_every_conversion(self) -> None:
        offers = _offers().assign(category=["beauty", "beauty", "beauty"])
        p = np.array([[0.10, 0.20, 0.30, 0.15], [0.10, 0.20, 0.30, 0.15]])
        aov = np.array([5_000, 5_000], dtype=np.int64)

        scores = score_offers(p, aov, offers, margin_rate=0.3)

        # Users without beauty affinity pay the same expected discount: see the
        # NOTE in score_offers for why the category is not weighted.
        np.testing.assert_array_equal(scores.cost_cents[0], scores.cost_cents[1])
        assert scores.cost_cents[0, 0] == pytest.approx(0.20 * 500)


class TestExpectedBasket:
    PRIOR = BasketPrior(
        log_mean=math.log(5_000), between_variance=0.25, order_variance=0.25
    )

    def test_prior_shrinks_by_order_count(self) -> None:
        users = pd.DataFrame({"aov_cents": [4_000, 0, 8_000], "orders_90d": [1, 0, 3]})

        basket = shrunk_basket_cents(users, self.PRIOR)

        # One order: weight 0.25 / (0.25 + 0.25) = 1/2 on log(4000) + 0.125, so
        # exp(0.5 * (log 4000 + 0.125) + 0.5 * log 5000 + 0.125 / 2) = 5067.6.
        # No order: the prior's mean, exp(log 5000 + 0.25 / 2) = 5665.7.
        # Three orders: weight 3/4 on log(8000) + 0.25 / 6, variance 1/16: 7571.9.
        assert basket.dtype == np.int64
        assert basket.tolist() == [5_068, 5_666, 7_572]

    def test_more_orders_move_estimate_toward_aov(self) -> None:
        users = pd.DataFrame(
            {"aov_cents": [10_000, 10_000, 10_000], "orders_90d": [1, 4, 400]}
        )

        basket = shrunk_basket_cents(users, self.PRIOR)

        assert basket[0] < basket[1] < basket[2]
        assert basket[2] == pytest.approx(10_000, rel=0.01)

    def test_fit_recovers_variances(self) -> None:
        # Log baskets of 30 one-order buyers at m +- a and 30 four-order buyers at
        # m +- b have sample variances V1 = 0.6 and V4 = 0.3. So
        # between + order = 0.6 and between + order / 4 = 0.3 give 0.2 and 0.4.
        m = math.log(4_000)
        a = math.sqrt(0.6 * 29 / 30)
        b = math.sqrt(0.3 * 29 / 30)
        signs = np.tile([1.0, -1.0], 15)
        users = pd.DataFrame(
            {
                "aov_cents": np.exp(np.concatenate([m + a * signs, m + b * signs])),
                "orders_90d": [1] * 30 + [4] * 30,
            }
        )

        prior = fit_basket_prior(users)

        assert prior is not None
        assert prior.between_variance == pytest.approx(0.2)
        assert prior.order_variance == pytest.approx(0.4)
        # Mean of log(aov) + order / (2 n): m + (0.2 + 0.05) / 2.
        assert prior.log_mean == pytest.approx(m + 0.125)

    def test_too_few_buyers_give_no_prior(self) -> None:
        users = pd.DataFrame(
            {"aov_cents": [0, 1_000, 3_000, 0], "orders_90d": [0, 1, 2, 0]}
        )

        assert fit_basket_prior(users) is None

    def test_basket_is_aov_or_median_of_buyers(self) -> None:
        users = pd.DataFrame({"aov_cents": [0, 1_000, 3_000, 0, 2_000]})

        basket = expected_basket_cents(users)

        assert basket.dtype == np.int64
        assert basket.tolist() == [2_000, 1_000, 3_000, 2_000, 2_000]

    def test_nobody_bought(self) -> None:
        users = pd.DataFrame({"aov_cents": [0, 0], "orders_90d": [0, 0]})

        assert expected_basket_cents(users).tolist() == [0, 0]
        assert shrunk_basket_cents(users, self.PRIOR).tolist() == [5_666, 5_666]

    @pytest.mark.parametrize(
        ("users", "message"),
        [
            (pd.DataFrame({"orders_90d": [1]}), "no aov_cents column"),
            (pd.DataFrame({"aov_cents": [1]}), "no orders_90d column"),
            (
                pd.DataFrame({"aov_cents": [-1], "orders_90d": [1]}),
                "aov_cents must be >= 0",
            ),
            (
                pd.DataFrame({"aov_cents": [1], "orders_90d": [-1]}),
                "orders_90d must be >= 0",
            ),
        ],
    )
    def test_rejects_invalid_users(self, users: pd.DataFrame, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            shrunk_basket_cents(users, self.PRIOR)

    def test_expected_basket_rejects_invalid_users(self) -> None:
        with pytest.raises(ValueError, match="no aov_cents column"):
            expected_basket_cents(pd.DataFrame({"orders_90d": [1]}))
        with pytest.raises(ValueError, match="aov_cents must be >= 0"):
            expected_basket_cents(pd.DataFrame({"aov_cents": [5, -1]}))

    def test_prior_rejects_nonpositive_variance(self) -> None:
        with pytest.raises(ValueError, match="order_variance must be finite and > 0"):
            BasketPrior(log_mean=8.0, between_variance=0.2, order_variance=0.0)

    def test_score_users_scores_on_expected_basket(self) -> None:
        users = pd.DataFrame({"aov_cents": [5_000, 0, 3_000]})
        model = _FixedModel(np.array([[0.10, 0.20, 0.30, 0.15]] * 3))

        p, scores = score_users(model, users, _offers(), 0.3)

        np.testing.assert_array_equal(p, model.p)
        # The user without a purchase gets the buyers' median basket, 4000 cents.
        assert scores.discount_cents is not None
        np.testing.assert_array_equal(scores.discount_cents[:, 0], [500, 400, 300])
        assert scores.profit_cents[1, 0] == pytest.approx(
            0.3 * 4_000 * 0.10 - 0.20 * 400
        )

    def test_score_users_needs_aov_column(self) -> None:
        model = _FixedModel(np.full((1, 4), 0.1))
        with pytest.raises(ValueError, match="no aov_cents column"):
            score_users(model, pd.DataFrame({"orders_90d": [1]}), _offers(), 0.3)


class _FixedModel:
    """A conversion model that returns the same probabilities for any input."""

    def __init__(self, p: np.ndarray) -> None:
        self.p = p

    def predict_conversion(
        self, users: pd.DataFrame, offers: pd.DataFrame
    ) -> np.ndarray:
        assert len(users) == self.p.shape[0]
        assert len(offers) == self.p.shape[1] - 1
        return self.p


class TestSolveBudget:
    def test_zero_budget_allocates_nothing(self) -> None:
        profit, cost, _ = _random_instance(0, 200, 3)

        solution = solve_budget(profit, cost, 0)

        assert solution.n_granted == 0
        assert solution.total_cost_cents == 0.0
        assert solution.budget_used_fraction is None

    def test_ten_cents_buys_two_five_cent_grants(self) -> None:
        profit = np.array([[3.0], [3.0], [3.0]])
        cost = np.array([[5.0], [5.0], [5.0]])

        solution = solve_budget(profit, cost, 10)

        assert solution.n_granted == 2
        # Equal ratios: the lower user indices win.
        np.testing.assert_array_equal(solution.choice, [0, 0, NO_OFFER])
        assert solution.total_cost_cents == 10.0
        assert solution.budget_used_fraction == 1.0

    @pytest.mark.parametrize(
        ("seed", "n_users", "n_offers"),
        [(1, 200, 3), (2, 500, 5), (3, 1_000, 4), (4, 2_000, 5), (5, 300, 1)],
    )
    def test_close_to_lp_bound(self, seed: int, n_users: int, n_offers: int) -> None:
        profit, cost, budget = _random_instance(seed, n_users, n_offers)

        solution = solve_budget(profit, cost, budget)
        bound = solve_budget_lp(profit, cost, budget)

        assert solution.total_cost_cents <= budget
        assert bound.total_cost_cents <= budget * (1 + 1e-9)
        assert solution.total_profit_cents <= bound.objective_cents + 1e-6
        assert (
            solution.total_profit_cents >= MIN_SHARE_OF_LP_BOUND * bound.objective_cents
        )

    def test_large_budget_takes_every_best_offer(self) -> None:
        profit, cost, _ = _random_instance(6, 300, 4)

        solution = solve_budget(profit, cost, 10**12)

        best = np.where(profit.max(axis=1) > 0, profit.argmax(axis=1), NO_OFFER)
        np.testing.assert_array_equal(solution.choice, best)
        assert solution.lam == 0.0

    def test_same_input_same_answer(self) -> None:
        profit, cost, budget = _random_instance(7, 1_000, 4)
        # Duplicated offer columns and users create exact ties.
        profit = np.hstack([profit, profit])
        cost = np.hstack([cost, cost])
        profit = np.vstack([profit, profit])
        cost = np.vstack([cost, cost])

        first = solve_budget(profit, cost, budget)
        second = solve_budget(profit.copy(), cost.copy(), budget)

        np.testing.assert_array_equal(first.choice, second.choice)
        # Ties between identical offer columns go to the lower index.
        assert first.choice.max() < 4

    def test_every_grant_has_positive_profit(self) -> None:
        profit, cost, budget = _random_instance(8, 1_000, 3)

        solution = solve_budget(profit, cost, budget)

        users = np.flatnonzero(solution.choice != NO_OFFER)
        assert (profit[users, solution.choice[users]] > 0).all()

    @pytest.mark.parametrize(
        ("profit", "cost", "budget", "message"),
        [
            (np.ones((2, 2)), np.ones((2, 2)), -5, "budget_cents must be >= 0"),
            (np.ones((2, 2)), np.ones((2, 2)), 10.5, "integer number of cents"),
            (np.ones((2, 2)), -np.ones((2, 2)), 10, "cost must be >= 0"),
            (np.ones((2, 2)), np.ones((3, 2)), 10, "shape"),
            (np.full((2, 2), np.nan), np.ones((2, 2)), 10, "finite"),
        ],
    )
    def test_rejects_invalid_input(self, profit, cost, budget, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            solve_budget(profit, cost, budget)


class TestBaselines:
    def test_all_policies_stay_within_budget(self) -> None:
        profit, cost, budget = _random_instance(9, 1_000, 3)
        p = np.random.default_rng(9).uniform(0, 1, (1_000, 4))

        solutions = [
            random_targeting(profit, cost, budget, seed=1),
            likeliest_buyers(p, profit, cost, budget, rank_by="base"),
            likeliest_buyers(p, profit, cost, budget, rank_by="max"),
            oracle(profit, cost, budget),
        ]

        for solution in solutions:
            assert isinstance(solution, Solution)
            assert solution.total_cost_cents <= budget
            assert solution.n_granted > 0
        oracle_profit = solutions[-1].total_profit_cents
        for baseline in solutions[:-1]:
            assert baseline.total_profit_cents < oracle_profit

    def test_likeliest_buyer_goes_first(self) -> None:
        p = np.array([[0.1, 0.2], [0.9, 0.95], [0.5, 0.6]])
        profit = np.array([[1.0], [-2.0], [1.0]])
        cost = np.array([[5.0], [5.0], [5.0]])

        solution = likeliest_buyers(p, profit, cost, 5)

        # The surest buyer gets the coupon even though it loses money.
        np.testing.assert_array_equal(solution.choice, [NO_OFFER, 0, NO_OFFER])

    def test_random_targeting_is_seeded(self) -> None:
        profit, cost, budget = _random_instance(10, 500, 3)

        first = random_targeting(profit, cost, budget, seed=3)
        second = random_targeting(profit, cost, budget, seed=3)

        np.testing.assert_array_equal(first.choice, second.choice)

    def test_zero_budget_grants_nothing(self) -> None:
        profit, cost, _ = _random_instance(11, 100, 2)

        solution = random_targeting(profit, cost, 0, seed=0)

        assert solution.n_granted == 0
        assert solution.budget_used_fraction is None


class TestAssignCampaign:
    def _solved(
        self, n_users: int, seed: int = 0
    ) -> tuple[list[str], Solution, OfferScores]:
        rng = np.random.default_rng(seed)
        profit = rng.normal(5.0, 10.0, (n_users, 2))
        cost = rng.uniform(1.0, 20.0, (n_users, 2))
        uplift = rng.uniform(0.0, 0.1, (n_users, 2))
        budget = int(cost.sum() / 4)
        ids = [str(i) for i in range(n_users)]
        return (
            ids,
            solve_budget(profit, cost, budget),
            _scores_for(profit, cost, uplift),
        )

    def test_columns_and_dtypes(self) -> None:
        ids, solution, scores = self._solved(50)

        plan = assign_campaign(ids, solution, scores, 0.1, 1, SEND_AT, "email")

        assert list(plan.columns) == list(PLAN_COLUMNS)
        for column, dtype in PLAN_COLUMNS.items():
            assert str(plan[column].dtype) == dtype, column
        assert plan["send_at"].iloc[0] == pd.Timestamp(SEND_AT)

    def test_propensity_and_arm_per_case(self) -> None:
        ids, solution, scores = self._solved(2_000)
        fraction = 0.2

        plan = assign_campaign(ids, solution, scores, fraction, 5, SEND_AT, "push")

        offered = solution.choice != NO_OFFER
        holdout = (plan["group_name"] == HOLDOUT).to_numpy()
        control = (plan["arm"] == CONTROL_ARM).to_numpy()
        propensity = plan["propensity"].to_numpy()
        assert (control[holdout]).all()
        assert not control[offered & ~holdout].any()
        assert propensity[offered & ~holdout] == pytest.approx(1 - fraction)
        assert propensity[offered & holdout] == pytest.approx(fraction)
        assert (propensity[~offered] == 1.0).all()
        assert (plan["expected_cost_cents"].to_numpy()[control] == 0).all()
        chosen = [scores.offer_ids[j] for j in solution.choice[offered & ~holdout]]
        assert plan["arm"].to_numpy()[offered & ~holdout].tolist() == chosen

    def test_holdout_keeps_score_uplift(self) -> None:
        ids, solution, scores = self._solved(2_000)

        plan = assign_campaign(ids, solution, scores, 0.3, 2, SEND_AT, "email")

        holdout_offered = (plan["group_name"] == HOLDOUT).to_numpy() & (
            solution.choice != NO_OFFER
        )
        users = np.flatnonzero(holdout_offered)
        assert users.size > 0
        expected = scores.uplift[users, solution.choice[users]]
        np.testing.assert_allclose(plan["score_uplift"].to_numpy()[users], expected)

    def test_same_seed_same_holdout(self) -> None:
        ids, solution, scores = self._solved(5_000)

        first = assign_campaign(ids, solution, scores, 0.1, 42, SEND_AT, "email")
        second = assign_campaign(ids, solution, scores, 0.1, 42, SEND_AT, "email")
        other = assign_campaign(ids, solution, scores, 0.1, 43, SEND_AT, "email")

        pd.testing.assert_series_equal(first["group_name"], second["group_name"])
        assert not first["group_name"].equals(other["group_name"])

    def test_holdout_share_matches_fraction(self) -> None:
        ids, solution, scores = self._solved(20_000)

        plan = assign_campaign(ids, solution, scores, 0.1, 7, SEND_AT, "email")

        share = float((plan["group_name"] == HOLDOUT).mean())
        # Four standard errors of a binomial share at n = 20000.
        assert abs(share - 0.1) < 4 * np.sqrt(0.1 * 0.9 / 20_000)

    def test_user_zero_allocated_like_others(self) -> None:
        profit = np.array([[4.0], [4.0], [4.0]])
        cost = np.array([[5.0], [5.0], [5.0]])
        scores = _scores_for(profit, cost, np.full((3, 1), 0.02))
        solution = solve_budget(profit, cost, 15)

        plan = assign_campaign(
            ["0", "1", "2"], solution, scores, 0.0, 0, SEND_AT, "sms"
        )

        assert plan["user_id"].tolist() == ["0", "1", "2"]
        assert plan["arm"].tolist() == ["coupon0"] * 3
        assert (plan["propensity"] == 1.0).all()

    def test_channel_map_per_coupon(self) -> None:
        profit = np.array([[4.0, 1.0], [1.0, 4.0], [-1.0, -1.0]])
        cost = np.ones((3, 2))
        scores = _scores_for(profit, cost, np.zeros((3, 2)))
        solution = solve_budget(profit, cost, 10)
        channels = {"coupon0": "sms", "coupon1": "push"}

        plan = assign_campaign(
            ["a", "b", "c"], solution, scores, 0.0, 0, SEND_AT, channels
        )

        assert plan["channel"].tolist()[:2] == ["sms", "push"]
        assert plan["channel"].isna().tolist() == [False, False, True]
        with pytest.raises(ValueError, match="no channel for coupons"):
            assign_campaign(["a", "b", "c"], solution, scores, 0.0, 0, SEND_AT, {})

    def test_expected_cents_round_half_up(self) -> None:
        profit = np.array([[2.5], [-2.5], [3.49]])
        cost = np.array([[0.5], [1.5], [2.5]])
        scores = _scores_for(profit, cost, np.zeros((3, 1)))
        solution = Solution(
            choice=np.zeros(3, dtype=np.int64),
            total_profit_cents=3.49,
            total_cost_cents=4.5,
            lam=0.0,
            budget_cents=10,
            budget_used_fraction=0.45,
            policy="test",
        )

        plan = assign_campaign(
            ["a", "b", "c"], solution, scores, 0.0, 0, SEND_AT, "email"
        )

        assert plan["expected_profit_cents"].tolist() == [3, -2, 3]
        assert plan["expected_cost_cents"].tolist() == [1, 2, 3]

    @pytest.mark.parametrize(
        ("changes", "message"),
        [
            ({"holdout_fraction": 1.0}, "holdout_fraction"),
            ({"holdout_fraction": -0.1}, "holdout_fraction"),
            ({"send_at": datetime(2026, 5, 4, 9, 0)}, "timezone-aware"),
            ({"channel": "fax"}, "channel"),
            ({"user_ids": ["a", "b"]}, "user_ids"),
            ({"user_ids": ["a", "b", "a"]}, "unique"),
            ({"user_ids": ["a", "", "c"]}, "non-empty"),
        ],
    )
    def test_rejects_invalid_input(self, changes: dict, message: str) -> None:
        profit = np.ones((3, 1))
        arguments: dict[str, Any] = {
            "user_ids": ["a", "b", "c"],
            "solution": solve_budget(profit, profit, 3),
            "scores": _scores_for(profit, profit, np.zeros((3, 1))),
            "holdout_fraction": 0.1,
            "seed": 0,
            "send_at": SEND_AT,
            "channel": "email",
        }
        arguments.update(changes)
        with pytest.raises(ValueError, match=message):
            assign_campaign(**arguments)


class TestStorage:
    def test_round_trip_and_versions(self, sqlite_engine: Engine) -> None:
        campaign = "spring"
        assert current_version(sqlite_engine, campaign) is None
        assert read_current_allocation(sqlite_engine, campaign).empty

        first = write_allocation(
            sqlite_engine, campaign, _plan_frame(30, 1), "models:/m/1", 500, {"h": 0.1}
        )
        second = write_allocation(
            sqlite_engine, campaign, _plan_frame(20, 2), "models:/m/2", 700, {"h": 0.1}
        )

        assert (first, second) == (1, 2)
        assert current_version(sqlite_engine, campaign) == 2
        stored = read_current_allocation(sqlite_engine, campaign)
        assert (stored["version"] == 2).all()
        expected = _plan_frame(20, 2).sort_values("user_id", ignore_index=True)
        pd.testing.assert_frame_equal(stored.drop(columns="version"), expected)
        with sqlite_engine.connect() as connection:
            kept = connection.execute(
                sa.text("SELECT COUNT(*) FROM allocations WHERE version = 1")
            ).scalar_one()
        assert kept == 30

    def test_campaigns_are_independent(self, sqlite_engine: Engine) -> None:
        write_allocation(sqlite_engine, "a", _plan_frame(5, 1), "m", 1, {})
        write_allocation(sqlite_engine, "b", _plan_frame(7, 1), "m", 1, {})
        write_allocation(sqlite_engine, "b", _plan_frame(8, 2), "m", 1, {})

        assert current_version(sqlite_engine, "a") == 1
        assert len(read_current_allocation(sqlite_engine, "a")) == 5
        assert current_version(sqlite_engine, "b") == 2

    def test_failed_write_keeps_previous_version(self, sqlite_engine: Engine) -> None:
        write_allocation(sqlite_engine, "c", _plan_frame(10, 1), "m", 1, {})
        with sqlite_engine.begin() as connection:
            # A real constraint failure in the middle of the insert.
            connection.execute(
                sa.text(
                    "CREATE TRIGGER reject_user_7 BEFORE INSERT ON allocations "
                    "WHEN NEW.user_id = '7' AND NEW.version = 2 "
                    "BEGIN SELECT RAISE(ABORT, 'rejected user 7'); END"
                )
            )

        with pytest.raises(sa.exc.DatabaseError, match="rejected user 7"):
            write_allocation(sqlite_engine, "c", _plan_frame(12, 2), "m", 1, {})

        assert current_version(sqlite_engine, "c") == 1
        assert len(read_current_allocation(sqlite_engine, "c")) == 10
        with sqlite_engine.connect() as connection:
            leftover = connection.execute(
                sa.text("SELECT COUNT(*) FROM allocations WHERE version = 2")
            ).scalar_one()
        assert leftover == 0

    def test_rejects_invalid_plan(self, sqlite_engine: Engine) -> None:
        plan = _plan_frame(3, 1)
        with pytest.raises(ValueError, match="missing columns"):
            write_allocation(sqlite_engine, "d", plan.drop(columns="arm"), "m", 1, {})
        with pytest.raises(ValueError, match="propensity"):
            write_allocation(
                sqlite_engine, "d", plan.assign(propensity=0.0), "m", 1, {}
            )
        with pytest.raises(ValueError, match="JSON"):
            write_allocation(sqlite_engine, "d", plan, "m", 1, {"x": object()})
        with pytest.raises(ValueError, match="channel"):
            write_allocation(sqlite_engine, "d", plan.assign(channel="fax"), "m", 1, {})
        with pytest.raises(ValueError, match="budget_cents"):
            write_allocation(sqlite_engine, "d", plan, "m", -1, {})
        assert current_version(sqlite_engine, "d") is None

    def test_reader_never_sees_partial_sqlite(self, sqlite_engine: Engine) -> None:
        _assert_readers_see_whole_versions(sqlite_engine)

    def test_reader_never_sees_partial_postgres(self, postgres_engine: Engine) -> None:
        _assert_readers_see_whole_versions(postgres_engine)

    def test_missing_channel_and_send_at_kept(self, sqlite_engine: Engine) -> None:
        plan = _plan_frame(5, 1)
        plan.loc[0, "channel"] = pd.NA
        plan.loc[1, "send_at"] = pd.NaT

        write_allocation(sqlite_engine, "e", plan, "m", 1, {})

        stored = read_current_allocation(sqlite_engine, "e").drop(columns="version")
        pd.testing.assert_frame_equal(stored, plan)

    def test_postgres_round_trip(self, postgres_engine: Engine) -> None:
        plan = _plan_frame(40, 3)
        plan.loc[0, "channel"] = pd.NA
        plan.loc[1, "send_at"] = pd.NaT
        plan.loc[2, "user_id"] = "NA"

        version = write_allocation(postgres_engine, "pg", plan, "m", 9, {"a": 1})

        stored = read_current_allocation(postgres_engine, "pg")
        assert version == 1
        expected = plan.sort_values("user_id", ignore_index=True)
        pd.testing.assert_frame_equal(stored.drop(columns="version"), expected)


def _assert_readers_see_whole_versions(engine: Engine) -> None:
    """Poll the current plan while versions of different sizes are written."""
    campaign = f"race-{uuid.uuid4().hex[:8]}"
    sizes = {version: 400 + 300 * version for version in range(1, 7)}
    errors: list[BaseException] = []

    def write_versions() -> None:
        try:
            for version, size in sizes.items():
                write_allocation(
                    engine, campaign, _plan_frame(size, version), "m", 1, {}
                )
        except Exception as error:
            # Collected here and raised by the test thread after join().
            errors.append(error)

    def read_once() -> None:
        frame = read_current_allocation(engine, campaign)
        if frame.empty:
            assert not seen, "a campaign with a version must never read as empty"
            return
        versions = frame["version"].unique()
        assert len(versions) == 1, f"mixed versions {versions}"
        version = int(versions[0])
        assert len(frame) == sizes[version]
        assert (frame["expected_profit_cents"] == version).all()
        seen.append(version)

    writer = threading.Thread(target=write_versions)
    writer.start()
    seen: list[int] = []
    while writer.is_alive():
        read_once()
    writer.join()
    read_once()

    assert not errors, errors
    assert seen == sorted(seen)
    assert seen[-1] == max(sizes)
    # The reader polled while versions were being replaced, not only at the end.
    assert len(set(seen)) >= 2
