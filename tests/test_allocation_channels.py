"""Scores per channel at each user's send hour, and how exploration is sized."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from couponflow.allocation import (
    UNLIMITED,
    AllocationSpec,
    ChannelRules,
    ChannelScores,
    UserOptions,
    allocate_campaign,
    at_send_hours,
    fit_explore_fraction,
    send_hours_for,
)
from couponflow.allocation.policy import GROUP_EXPLORE
from couponflow.features import DAY_PARTS

CHANNELS = ("email", "push", "sms")


def _scores(p0: float, p1: float, discount: float, basket: float) -> ChannelScores:
    """One user, one offer, three channels with the same response."""
    p = np.array([[[p0] * 3, [p1] * 3]])
    cost = np.full((1, 1, 3), p1 * discount)
    profit = 0.3 * basket * (p1 - p0) - cost
    return ChannelScores(
        offer_ids=("amt-500",),
        channels=CHANNELS,
        p=p,
        profit_cents=profit,
        cost_cents=cost,
        uplift=np.full((1, 1, 3), p1 - p0),
    )


def test_full_reach_keeps_the_scores() -> None:
    scores = _scores(0.1, 0.3, 500.0, 4_000.0)
    timed = at_send_hours(scores, np.ones((1, 3)))
    np.testing.assert_allclose(timed.profit_cents, scores.profit_cents)
    np.testing.assert_allclose(timed.cost_cents, scores.cost_cents)
    np.testing.assert_allclose(timed.p, scores.p)


def test_half_reach_halves_effect() -> None:
    timed = at_send_hours(_scores(0.1, 0.3, 500.0, 4_000.0), np.full((1, 3), 0.5))
    # Uplift 0.2 becomes 0.1, so 0.2 of users convert, each paid a 500-cent discount.
    np.testing.assert_allclose(timed.uplift, 0.1)
    np.testing.assert_allclose(timed.cost_cents, 0.2 * 500.0)
    np.testing.assert_allclose(timed.profit_cents, 0.3 * 4_000.0 * 0.1 - 100.0)
    np.testing.assert_allclose(timed.p[0, 1], 0.2)


def test_zero_reach_leaves_the_discount_on_base_orders() -> None:
    timed = at_send_hours(_scores(0.1, 0.3, 500.0, 4_000.0), np.zeros((1, 3)))
    np.testing.assert_allclose(timed.uplift, 0.0)
    np.testing.assert_allclose(timed.cost_cents, 0.1 * 500.0)
    np.testing.assert_allclose(timed.profit_cents, -50.0)


def test_invalid_reach_raises() -> None:
    scores = _scores(0.1, 0.3, 500.0, 4_000.0)
    with pytest.raises(ValueError, match=r"reach must be \(1, 3\)"):
        at_send_hours(scores, np.ones((1, 2)))
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        at_send_hours(scores, np.full((1, 3), 1.5))


def _hour_features(peaks: list[float | None], evening: list[float]) -> pd.DataFrame:
    frame = pd.DataFrame({"peak_hour": peaks})
    for part in DAY_PARTS:
        frame[f"hour_share_{part}"] = 0.0
    frame["hour_share_evening"] = evening
    return frame


def test_sms_goes_out_only_in_its_hours() -> None:
    users = _hour_features([3, 19], [0.0, 1.0])
    users["hour_share_night"] = [1.0, 0.0]
    hours = send_hours_for(users, ChannelRules())
    email, sms = CHANNELS.index("email"), CHANNELS.index("sms")
    assert hours.hour[0, email] == 3
    assert 8 <= hours.hour[0, sms] <= 20
    assert hours.reach[0, sms] < hours.reach[0, email] == pytest.approx(1.0)
    assert hours.hour[1, email] == hours.hour[1, sms] == 19


def test_user_without_events_gets_the_typical_hour() -> None:
    users = _hour_features([19, 20, None], [1.0, 1.0, 0.0])
    hours = send_hours_for(users, ChannelRules())
    # The two active users are busiest in the evening, so the third is sent then too.
    evening_start, evening_end = DAY_PARTS["evening"]
    assert evening_start <= hours.hour[2, 0] < evening_end


def test_channel_rules_check_their_input() -> None:
    with pytest.raises(ValueError, match="unknown channels"):
        ChannelRules(capacity={"fax": 10})
    with pytest.raises(ValueError, match="whole number"):
        ChannelRules(message_cost_cents={"sms": -1})
    with pytest.raises(ValueError, match="hours 0-23"):
        ChannelRules(allowed_hours={"sms": [25]})
    assert ChannelRules().cost_array().tolist() == [0, 0, 5]


def _options(n_users: int, cost: float) -> tuple[UserOptions, list[str]]:
    shape = (n_users, 2, 3)
    return (
        UserOptions(
            np.full(shape, 100.0, dtype=np.float32),
            np.full(shape, cost, dtype=np.float32),
            np.ones(shape, dtype=bool),
        ),
        [f"u{i}" for i in range(n_users)],
    )


def _spec(budget: int, stock: int = UNLIMITED) -> AllocationSpec:
    return AllocationSpec(
        offer_ids=("a", "b"),
        budget_cents=budget,
        stock=np.array([stock, stock]),
        channels=CHANNELS,
    )


def test_explore_fraction_kept_when_it_fits() -> None:
    options, ids = _options(1_000, 10.0)
    spec = _spec(budget=1_000_000)
    assert fit_explore_fraction(options, spec, ids, 0.1, 0.05, seed=3) == 0.05


def test_explore_fraction_halved_until_its_draws_fit() -> None:
    options, ids = _options(2_000, 10.0)
    # About 100 explorers cost 1,000 cents; a fifth of 2,000 cents fits about 40.
    spec = _spec(budget=2_000)
    fraction = fit_explore_fraction(options, spec, ids, 0.1, 0.05, seed=3)
    assert 0 < fraction < 0.05
    randomized = allocate_campaign(options, spec, ids, 0.1, fraction, seed=3)
    # Every option costs 10 cents, so the draws cost 10 cents per exploring user.
    explored = randomized.option[randomized.group == GROUP_EXPLORE]
    assert 0 < 10 * (explored >= 0).sum() <= 0.2 * spec.budget_cents
    assert randomized.solution.discount_cost_cents <= spec.budget_cents


def test_zero_budget_leaves_no_exploration() -> None:
    options, ids = _options(500, 10.0)
    assert fit_explore_fraction(options, _spec(budget=0), ids, 0.1, 0.05, seed=3) == 0


def test_small_stock_limits_exploration() -> None:
    options, ids = _options(1_000, 0.0)
    fraction = fit_explore_fraction(
        options, _spec(budget=10**9, stock=20), ids, 0.1, 0.2, seed=3
    )
    # A fifth of 20 grants is 4, about 0.4% of 1,000 users split over two offers.
    assert 0 < fraction <= 0.2 / 16
