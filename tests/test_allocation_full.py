"""Tests of the full allocation solver: limits, ties, HiGHS checks and the policy."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from couponflow.allocation import (
    HOLDOUT,
    NO_OPTION,
    PLAN_COLUMNS,
    TREATMENT,
    UNLIMITED,
    AllocationSpec,
    SendHours,
    SolverParams,
    UserOptions,
    allocate_campaign,
    draw_groups,
    dual_bound,
    plan_rows,
    read_current_allocation,
    solve_allocation,
    solve_allocation_exact,
    write_allocation,
)
from couponflow.allocation.policy import GROUP_EXPLORE, GROUP_HOLDOUT, GROUP_OPTIMIZED
from couponflow.schemas import CONTROL_ARM
from couponflow.settings import Settings
from couponflow.store import get_engine

# The Lagrangian objective must reach this share of the HiGHS optimum or LP bound.
MIN_SHARE_OF_OPTIMUM = 0.995
SEND_AFTER = datetime(2026, 5, 4, 6, 0, tzinfo=UTC)
CHANNELS = ("email", "push", "sms")


def _instance(
    seed: int,
    n_users: int,
    n_offers: int = 4,
    n_channels: int = 3,
    tightness: float = 0.15,
) -> tuple[UserOptions, AllocationSpec]:
    """Build random scores with a binding budget, stock and SMS capacity."""
    rng = np.random.default_rng(seed)
    shape = (n_users, n_offers, n_channels)
    profit = rng.normal(5.0, 30.0, shape).astype(np.float32)
    cost = rng.uniform(1.0, 50.0, shape).astype(np.float32)
    eligible = rng.random(shape) < 0.7
    stock = np.maximum(1, (n_users * rng.uniform(0.05, 0.4, n_offers)).astype(np.int64))
    capacity = np.array([UNLIMITED, n_users // 6, n_users // 12][:n_channels])
    spec = AllocationSpec(
        offer_ids=tuple(f"offer{j}" for j in range(n_offers)),
        budget_cents=int(tightness * cost.mean() * n_users),
        stock=stock,
        channels=CHANNELS[:n_channels],
        capacity=capacity,
        message_cost_cents=np.array([0, 1, 5][:n_channels]),
    )
    return UserOptions(profit, cost, eligible), spec


def _usage(options: UserOptions, spec: AllocationSpec, option: np.ndarray) -> dict:
    users = np.flatnonzero(option != NO_OPTION)
    offer = option[users] // spec.n_channels
    channel = option[users] % spec.n_channels
    cost = options.cost_cents[users, offer, channel].astype(np.float64)
    return {
        "cost": math.fsum(cost),
        "grants": np.bincount(offer, minlength=spec.n_offers),
        "messages": np.bincount(channel, minlength=spec.n_channels),
        "eligible": options.eligible[users, offer, channel],
        "net": options.profit_cents[users, offer, channel]
        - spec.message_cost_cents[channel],
    }


def _assert_feasible(options: UserOptions, spec: AllocationSpec, option: np.ndarray):
    usage = _usage(options, spec, option)
    assert option.shape == (options.n_users,)
    assert usage["cost"] <= spec.budget_cents
    assert (usage["grants"] <= spec.stock).all()
    assert (usage["messages"] <= spec.capacity).all()
    assert usage["eligible"].all()
    assert (usage["net"] > 0).all()


class TestSmallCases:
    def test_zero_budget_grants_nothing(self) -> None:
        options, spec = _instance(0, 200)
        free = UserOptions(
            options.profit_cents, options.cost_cents * 0, options.eligible
        )

        solution = solve_allocation(
            free, spec.with_limits(0, spec.stock, spec.capacity)
        )

        assert solution.n_granted == 0
        assert (solution.option == NO_OPTION).all()

    def test_ten_cents_buy_two_five_cent_grants(self) -> None:
        options = UserOptions(
            profit_cents=np.full((3, 1, 1), 3.0),
            cost_cents=np.full((3, 1, 1), 5.0),
            eligible=np.ones((3, 1, 1), dtype=bool),
        )
        spec = AllocationSpec(
            offer_ids=("five",),
            budget_cents=10,
            stock=np.array([10]),
            channels=("email",),
            capacity=np.array([10]),
            message_cost_cents=np.array([0]),
        )

        solution = solve_allocation(options, spec)

        assert solution.n_granted == 2
        # Equal users: the lower rows keep the grants.
        np.testing.assert_array_equal(solution.option, [0, 0, NO_OPTION])
        assert solution.discount_cost_cents == 10.0

    def test_stock_zero_offer_never_chosen(self) -> None:
        options, spec = _instance(1, 500)
        stock = spec.stock.copy()
        stock[1] = 0

        solution = solve_allocation(
            options, spec.with_limits(10**9, stock, spec.capacity)
        )

        assert solution.n_granted > 0
        assert not (solution.offer == 1).any()

    def test_capacity_and_stock_bind(self) -> None:
        options, spec = _instance(2, 3_000, tightness=10.0)

        solution = solve_allocation(options, spec)

        _assert_feasible(options, spec, solution.option)
        assert solution.channel_messages[2] == spec.capacity[2]
        assert solution.multipliers.nu[2] > 0

    def test_same_input_same_allocation(self) -> None:
        options, spec = _instance(3, 1_000)
        # Duplicated users and offers create exact ties.
        doubled = UserOptions(
            np.concatenate([options.profit_cents] * 2),
            np.concatenate([options.cost_cents] * 2),
            np.concatenate([options.eligible] * 2),
        )

        first = solve_allocation(doubled, spec)
        second = solve_allocation(
            doubled, spec, SolverParams(threads=1, chunk_users=77)
        )

        np.testing.assert_array_equal(first.option, second.option)

    def test_rejects_mismatched_spec(self) -> None:
        options, spec = _instance(4, 10, n_offers=3)
        other = AllocationSpec(
            offer_ids=("a", "b"), budget_cents=5, stock=np.array([1, 1])
        )

        with pytest.raises(ValueError, match="scores cover 3 offers"):
            solve_allocation(options, other)

    def test_rejects_nan_score_of_eligible_option(self) -> None:
        options, spec = _instance(5, 10)
        profit = options.profit_cents.copy()
        profit[4, 1, 2] = np.nan
        eligible = options.eligible.copy()
        eligible[4, 1, 2] = True

        with pytest.raises(ValueError, match="user row 4, option 5"):
            solve_allocation(UserOptions(profit, options.cost_cents, eligible), spec)

    def test_nan_score_of_ineligible_option_ignored(self) -> None:
        options, spec = _instance(6, 300)
        profit = options.profit_cents.copy()
        profit[~options.eligible] = np.nan

        with_nan = solve_allocation(
            UserOptions(profit, options.cost_cents, options.eligible), spec
        )
        plain = solve_allocation(options, spec)

        np.testing.assert_array_equal(with_nan.option, plain.option)

    @pytest.mark.parametrize(
        ("changes", "message"),
        [
            ({"budget_cents": -1}, "budget_cents must be >= 0"),
            ({"budget_cents": 2.5}, "integer number"),
            ({"stock": np.array([1, -1])}, "stock must be >= 0"),
            ({"stock": np.array([1.5, 1.0])}, "must be integers"),
            ({"offer_ids": ("a", "a")}, "unique"),
            ({"capacity": np.array([1, 2])}, r"capacity must have shape \(3,\)"),
        ],
    )
    def test_spec_rejects_invalid_limits(self, changes: dict, message: str) -> None:
        arguments: dict[str, Any] = {
            "offer_ids": ("a", "b"),
            "budget_cents": 10,
            "stock": np.array([1, 2]),
        }
        arguments.update(changes)

        with pytest.raises(ValueError, match=message):
            AllocationSpec(**arguments)


class TestAgainstHighs:
    def test_within_half_percent_of_milp_optimum(self) -> None:
        options, spec = _instance(32, 1_000)

        exact = solve_allocation_exact(options, spec, integral=True, time_limit_s=30)
        solution = solve_allocation(options, spec)

        assert exact.optimal
        assert exact.option is not None
        _assert_feasible(options, spec, exact.option)
        assert solution.objective_cents <= exact.objective_cents + 1e-6
        assert solution.objective_cents >= MIN_SHARE_OF_OPTIMUM * exact.objective_cents

    @pytest.mark.parametrize(("seed", "n_users"), [(11, 2_000), (12, 5_000)])
    def test_within_half_percent_of_lp_bound(self, seed: int, n_users: int) -> None:
        options, spec = _instance(seed, n_users)

        bound = solve_allocation_exact(options, spec, integral=False)
        solution = solve_allocation(options, spec)

        _assert_feasible(options, spec, solution.option)
        assert solution.objective_cents <= bound.objective_cents + 1e-3
        assert solution.objective_cents >= MIN_SHARE_OF_OPTIMUM * bound.objective_cents
        # The dual bound of the solver is itself an upper bound of the LP optimum.
        assert solution.dual_bound_cents >= bound.objective_cents - 1e-3

    def test_sampled_working_set_close_to_lp_bound(self) -> None:
        options, spec = _instance(13, 12_000, n_offers=3)
        params = SolverParams(working_users=2_000, threads=2)

        bound = solve_allocation_exact(options, spec, integral=False)
        solution = solve_allocation(options, spec, params)

        assert solution.working_users == 2_000
        _assert_feasible(options, spec, solution.option)
        assert solution.objective_cents >= MIN_SHARE_OF_OPTIMUM * bound.objective_cents
        certified = dual_bound(options, spec, solution.multipliers)
        assert certified >= bound.objective_cents - 1e-3


@st.composite
def small_problems(draw: st.DrawFn) -> tuple[UserOptions, AllocationSpec]:
    n_users = draw(st.integers(1, 25))
    n_offers = draw(st.integers(1, 4))
    n_channels = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = (n_users, n_offers, n_channels)
    profit = rng.normal(3.0, 10.0, shape).astype(np.float32)
    cost = rng.uniform(0.0, 20.0, shape).astype(np.float32)
    cost[rng.random(shape) < 0.1] = 0.0
    eligible = rng.random(shape) < draw(st.floats(0.0, 1.0))
    spec = AllocationSpec(
        offer_ids=tuple(f"o{j}" for j in range(n_offers)),
        budget_cents=draw(st.integers(0, 300)),
        stock=np.array(
            draw(
                st.lists(st.integers(0, n_users), min_size=n_offers, max_size=n_offers)
            )
        ),
        channels=CHANNELS[:n_channels],
        capacity=np.array(
            draw(
                st.lists(
                    st.integers(0, n_users), min_size=n_channels, max_size=n_channels
                )
            )
        ),
        message_cost_cents=np.array(
            draw(st.lists(st.integers(0, 3), min_size=n_channels, max_size=n_channels))
        ),
    )
    return UserOptions(profit, cost, eligible), spec


class TestProperties:
    @settings(max_examples=60, deadline=None)
    @given(problem=small_problems())
    def test_limits_and_eligibility_hold(self, problem) -> None:
        options, spec = problem

        solution = solve_allocation(options, spec, SolverParams(threads=1))

        _assert_feasible(options, spec, solution.option)
        assert not np.isin(solution.offer, np.flatnonzero(spec.stock == 0)).any()
        assert not np.isin(solution.channel, np.flatnonzero(spec.capacity == 0)).any()
        if spec.budget_cents == 0:
            assert solution.n_granted == 0

    @settings(max_examples=40, deadline=None)
    @given(problem=small_problems(), seed=st.integers(0, 2**32 - 1))
    def test_permutation_gives_same_per_user_result(self, problem, seed: int) -> None:
        options, spec = problem
        order = np.random.default_rng(seed).permutation(options.n_users)

        solution = solve_allocation(options, spec, SolverParams(threads=1))
        permuted = solve_allocation(
            options.take(order), spec, SolverParams(threads=1, chunk_users=7)
        )
        again = solve_allocation(options, spec, SolverParams(threads=1))

        # Continuous random scores make ties between users improbable.
        np.testing.assert_array_equal(permuted.option, solution.option[order])
        np.testing.assert_array_equal(again.option, solution.option)

    @settings(max_examples=30, deadline=None)
    @given(problem=small_problems())
    def test_never_above_milp_optimum(self, problem) -> None:
        options, spec = problem

        solution = solve_allocation(options, spec, SolverParams(threads=1))
        exact = solve_allocation_exact(options, spec, integral=True, time_limit_s=10)

        assert solution.objective_cents <= exact.bound_cents + 1e-6


class TestRandomizedPolicy:
    def test_group_shares_match_fractions(self) -> None:
        ids = [f"user-{i}" for i in range(40_000)]

        group, draw = draw_groups(ids, 0.2, 0.05, seed=3)

        for code, share in ((GROUP_HOLDOUT, 0.2), (GROUP_EXPLORE, 0.05)):
            observed = float((group == code).mean())
            assert abs(observed - share) < 4 * math.sqrt(share * (1 - share) / 40_000)
        assert draw.min() >= 0.0
        assert draw.max() < 1.0
        again, _ = draw_groups(list(reversed(ids)), 0.2, 0.05, seed=3)
        np.testing.assert_array_equal(again[::-1], group)

    def test_choices_respect_limits_and_groups(self) -> None:
        options, spec = _instance(20, 4_000)
        ids = [f"u{i}" for i in range(options.n_users)]

        randomized = allocate_campaign(options, spec, ids, 0.1, 0.05, seed=1)

        _assert_feasible_recorded(options, spec, randomized.option)
        holdout = randomized.group == GROUP_HOLDOUT
        optimized = randomized.group == GROUP_OPTIMIZED
        assert (randomized.option[holdout] == NO_OPTION).all()
        np.testing.assert_array_equal(
            randomized.option[optimized], randomized.policy_option[optimized]
        )
        assert (randomized.propensity > 0).all()
        assert (randomized.propensity <= 1.0 + 1e-12).all()

    def test_exploration_draws_eligible_options(self) -> None:
        options, spec = _instance(21, 3_000, tightness=5.0)
        ids = [f"u{i}" for i in range(options.n_users)]

        randomized = allocate_campaign(options, spec, ids, 0.0, 0.15, seed=2)

        explorers = np.flatnonzero(randomized.group == GROUP_EXPLORE)
        drawn = explorers[randomized.option[explorers] != NO_OPTION]
        offer = randomized.option[drawn] // spec.n_channels
        channel = randomized.option[drawn] % spec.n_channels
        assert drawn.size > 0.9 * explorers.size
        assert options.eligible[drawn, offer, channel].all()
        expected = 0.15 / randomized.n_choices[drawn]
        own = randomized.option[drawn] == randomized.policy_option[drawn]
        np.testing.assert_allclose(
            randomized.propensity[drawn], expected + 0.85 * own, rtol=1e-12
        )

    def test_propensity_matches_frequency_over_seeds(self) -> None:
        # Unlimited limits keep the solver's choice the same for every seed.
        options, spec = _instance(22, 60)
        spec = spec.with_limits(
            10**9,
            np.full(spec.n_offers, UNLIMITED),
            np.full(spec.n_channels, UNLIMITED),
        )
        ids = [f"u{i}" for i in range(options.n_users)]
        seeds = range(300)
        hits = np.zeros(options.n_users)
        logged = np.zeros(options.n_users)

        for seed in seeds:
            randomized = allocate_campaign(options, spec, ids, 0.3, 0.2, seed=seed)
            target = randomized.policy_option
            hit = randomized.option == target
            hits += hit
            logged += np.where(hit, randomized.propensity, 0.0)

        frequency = hits / len(seeds)
        # The logged propensity of the solver's choice is the same on every hit.
        propensity = logged / np.maximum(hits, 1)
        error = frequency - propensity
        assert abs(error.mean()) < 4 * math.sqrt(0.25 / (len(seeds) * options.n_users))
        assert np.abs(error).max() < 5 * math.sqrt(0.25 / len(seeds))

    def test_exploration_over_stock_raises(self) -> None:
        options, spec = _instance(23, 2_000)
        tiny = spec.with_limits(
            spec.budget_cents, np.ones(spec.n_offers, np.int64), spec.capacity
        )
        ids = [f"u{i}" for i in range(options.n_users)]

        with pytest.raises(ValueError, match="lower explore_fraction"):
            allocate_campaign(options, tiny, ids, 0.0, 0.2, seed=0)

    def test_plan_rows_store_round_trip(self, tmp_path) -> None:
        options, spec = _instance(24, 500)
        ids = [f"u{i}" for i in range(options.n_users)]
        randomized = allocate_campaign(options, spec, ids, 0.2, 0.1, seed=5)
        hours = SendHours(
            hour=np.tile(np.array([9, 12, 18], dtype=np.int8), (500, 1)),
            reach=np.full((500, 3), 0.5, dtype=np.float32),
        )

        plan = plan_rows(randomized, options, ids, hours, SEND_AFTER)
        settings_ = Settings(home=tmp_path)
        settings_.ensure_dirs()
        engine = get_engine(settings_.campaign_db_url)
        write_allocation(engine, "full", plan, "models:/m/1", spec.budget_cents, {})
        stored = read_current_allocation(engine, "full")

        assert list(plan.columns) == [*PLAN_COLUMNS, "assignment"]
        assert plan["user_id"].is_unique
        assert set(plan["group_name"]) == {HOLDOUT, TREATMENT}
        holdout = plan["group_name"] == HOLDOUT
        assert (plan.loc[holdout, "arm"] == CONTROL_ARM).all()
        treated = ~holdout
        assert (plan.loc[treated, "policy_arm"] == plan.loc[treated, "arm"]).all()
        withheld = randomized.policy_option[holdout.to_numpy()]
        expected = np.where(
            withheld == NO_OPTION,
            CONTROL_ARM,
            np.asarray(spec.offer_ids, dtype=object)[withheld // spec.n_channels],
        )
        assert plan.loc[holdout, "policy_arm"].tolist() == expected.tolist()
        email = plan["channel"] == "email"
        assert (
            plan.loc[email, "send_at"] == pd.Timestamp("2026-05-04 09:00", tz="UTC")
        ).all()
        assert len(stored) == 500
        pd.testing.assert_series_equal(
            stored.set_index("user_id")["propensity"],
            plan.set_index("user_id")["propensity"].sort_index(),
        )


def _assert_feasible_recorded(options, spec, option) -> None:
    usage = _usage(options, spec, option)
    assert usage["cost"] <= spec.budget_cents
    assert (usage["grants"] <= spec.stock).all()
    assert (usage["messages"] <= spec.capacity).all()
    assert usage["eligible"].all()
