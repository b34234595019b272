"""Tests of eligibility rules, exposure history, send hours and channel expansion."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from couponflow.allocation import (
    EligibilityRules,
    SendHours,
    activity_from_features,
    build_eligibility,
    channel_reach,
    choose_send_hours,
    expand_over_channels,
    exposure_history,
)
from couponflow.schemas import CONTROL_ARM

NOW = datetime(2026, 5, 4, 8, 0, tzinfo=UTC)
CHANNELS = ("email", "push", "sms")


def _users(n_users: int = 1, **columns) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "days_since_signup": [100.0] * n_users,
            "events_30d": [10] * n_users,
            "exposures_in_window": [0] * n_users,
            "days_since_last_exposure": [np.inf] * n_users,
            "affinity_fashion": [0.5] * n_users,
        }
    )
    for name, values in columns.items():
        frame[name] = values
    return frame


def _offers(**columns) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "coupon_id": ["c1"],
            "category": ["all"],
            "channels": ["email,push,sms"],
            "starts_at": [pd.Timestamp(NOW - timedelta(days=1))],
            "ends_at": [pd.Timestamp(NOW + timedelta(days=7))],
        }
    )
    for name, values in columns.items():
        frame[name] = values
    return frame


def _send_at(n_users: int = 1, at: datetime = NOW) -> np.ndarray:
    stamp = np.datetime64(at.replace(tzinfo=None), "ns")
    return np.full((n_users, len(CHANNELS)), stamp)


class TestBuildEligibility:
    def test_plain_offer_allowed_everywhere(self) -> None:
        mask = build_eligibility(_users(), _offers(), _send_at())

        assert mask.shape == (1, 1, 3)
        assert mask.all()

    def test_new_users_only(self) -> None:
        users = _users(3, days_since_signup=[5.0, 45.0, np.nan])

        mask = build_eligibility(users, _offers(new_users_only=[True]), _send_at(3))

        # An unknown signup date does not count as new.
        assert mask[:, 0, 0].tolist() == [True, False, False]

    def test_category_needs_affinity(self) -> None:
        users = _users(3, affinity_fashion=[0.5, 0.01, np.nan])

        mask = build_eligibility(users, _offers(category=["fashion"]), _send_at(3))

        assert mask[:, 0, 0].tolist() == [True, False, False]

    def test_category_without_affinity_column_raises(self) -> None:
        with pytest.raises(ValueError, match="affinity_home"):
            build_eligibility(_users(), _offers(category=["home"]), _send_at())

    def test_minimum_history_rule_and_override(self) -> None:
        users = _users(3, events_30d=[0, 1, 4])

        default = build_eligibility(users, _offers(), _send_at(3))
        active = build_eligibility(
            users, _offers(), _send_at(3), EligibilityRules(min_events_30d=1)
        )
        strict = build_eligibility(users, _offers(min_events_30d=[3]), _send_at(3))

        # By default a user without recent events may get an offer.
        assert default[:, 0, 0].tolist() == [True, True, True]
        assert active[:, 0, 0].tolist() == [False, True, True]
        assert strict[:, 0, 0].tolist() == [False, False, True]

    def test_frequency_cap_global_and_per_user(self) -> None:
        users = _users(3, exposures_in_window=[2, 3, 3])
        rules = EligibilityRules(frequency_cap=3)

        capped = build_eligibility(users, _offers(), _send_at(3), rules)
        per_user = build_eligibility(
            users.assign(frequency_cap=[1, 5, np.nan]), _offers(), _send_at(3), rules
        )

        assert capped[:, 0, 0].tolist() == [True, False, False]
        assert per_user[:, 0, 0].tolist() == [False, True, False]

    def test_cooldown_after_last_exposure(self) -> None:
        users = _users(3, days_since_last_exposure=[0.5, 2.0, np.nan])

        mask = build_eligibility(
            users, _offers(), _send_at(3), EligibilityRules(cooldown_days=1.0)
        )

        assert mask[:, 0, 0].tolist() == [False, True, True]

    def test_listed_and_reachable_channels(self) -> None:
        users = _users(2, reachable_sms=[True, False])

        mask = build_eligibility(users, _offers(channels=["email, sms"]), _send_at(2))

        assert mask[0, 0].tolist() == [True, False, True]
        assert mask[1, 0].tolist() == [True, False, False]

    def test_offer_expiring_before_delivery_excluded(self) -> None:
        lag = EligibilityRules().delivery_lag["email"]
        ends = NOW + lag
        offers = _offers(ends_at=[pd.Timestamp(ends)])
        send_at = _send_at(2)
        send_at[1, :] = np.datetime64((NOW + timedelta(seconds=1)).replace(tzinfo=None))

        mask = build_eligibility(_users(2), offers, send_at)

        # Delivered exactly at ends_at is still valid; one second later is not.
        assert mask[:, 0, 0].tolist() == [True, False]
        # Push arrives sooner, so it still makes it for the second user.
        assert mask[1, 0, 1]

    def test_offer_not_started_at_delivery_excluded(self) -> None:
        offers = _offers(starts_at=[pd.Timestamp(NOW + timedelta(hours=2))])

        mask = build_eligibility(_users(), offers, _send_at())

        assert not mask.any()

    @pytest.mark.parametrize(
        ("users", "offers", "send_at", "message"),
        [
            (_users().drop(columns="events_30d"), _offers(), _send_at(), "events_30d"),
            (_users(), _offers().drop(columns="ends_at"), _send_at(), "ends_at"),
            (_users(), _offers(), _send_at(2), "send_at must have shape"),
        ],
    )
    def test_rejects_invalid_input(self, users, offers, send_at, message) -> None:
        with pytest.raises(ValueError, match=message):
            build_eligibility(users, offers, send_at)


def _newcomers(n_users: int = 1, **columns) -> pd.DataFrame:
    """Users without history: no events in 30 days and no category affinity."""
    users = _users(n_users, events_30d=[0] * n_users, affinity_fashion=[0.0] * n_users)
    for name, values in columns.items():
        users[name] = values
    return users


class TestInterestFallback:
    def test_newcomer_matches_on_interest(self) -> None:
        users = _newcomers(3, interest_fashion=[0.4, 0.02, np.nan])

        mask = build_eligibility(users, _offers(category=["fashion"]), _send_at(3))

        # High interest matches, low interest and a missing score do not.
        assert mask[:, 0, 0].tolist() == [True, False, False]

    def test_min_interest_sets_threshold(self) -> None:
        users = _newcomers(2, interest_fashion=[0.4, 0.2])
        rules = EligibilityRules(min_interest=0.3)

        mask = build_eligibility(
            users, _offers(category=["fashion"]), _send_at(2), rules
        )

        assert mask[:, 0, 0].tolist() == [True, False]

    def test_user_with_history_keeps_affinity(self) -> None:
        users = _users(
            4,
            events_30d=[10, 10, 0, 0],
            affinity_fashion=[0.5, 0.01, 0.3, 0.0],
            affinity_home=[0.5, 0.99, 0.7, 1.0],
            interest_fashion=[0.0, 0.9, 0.0, 0.9],
        )

        mask = build_eligibility(users, _offers(category=["fashion"]), _send_at(4))

        # Recent events, or an affinity from older events, mean history: the
        # affinity decides, whatever the interest.
        assert mask[:, 0, 0].tolist() == [True, False, True, False]

    def test_without_interest_columns_nothing_changes(self) -> None:
        users = _newcomers(2, interest_home=[0.9, 0.9])

        mask = build_eligibility(users, _offers(category=["fashion"]), _send_at(2))

        # interest_home does not apply to a fashion offer.
        assert not mask.any()

    def test_all_category_offer_ignores_interest(self) -> None:
        users = _newcomers(2, interest_fashion=[0.9, 0.0])

        mask = build_eligibility(users, _offers(), _send_at(2))

        assert mask.all()

    def test_newcomer_passes_every_other_rule(self) -> None:
        users = _newcomers(7, interest_fashion=[0.5] * 7)
        users["exposures_in_window"] = [0, 3, 0, 0, 0, 0, 0]
        users["days_since_last_exposure"] = [np.inf, np.inf, 0.5, np.inf, 3.0, 2.0, 2.0]
        users["days_since_signup"] = [100.0, 100.0, 100.0, 100.0, 100.0, 5.0, 45.0]
        users["reachable_sms"] = [True, True, True, False, True, True, True]
        fashion = _offers(category=["fashion"])

        plain = build_eligibility(users, fashion, _send_at(7))
        new_only = build_eligibility(
            users, _offers(category=["fashion"], new_users_only=[True]), _send_at(7)
        )
        active_only = build_eligibility(
            users, _offers(category=["fashion"], min_events_30d=[1]), _send_at(7)
        )
        not_started = build_eligibility(
            users,
            _offers(
                category=["fashion"],
                starts_at=[pd.Timestamp(NOW + timedelta(hours=2))],
            ),
            _send_at(7),
        )

        # Frequency cap (user 1) and cool-down (user 2) bar the newcomer.
        assert plain[:, 0, 0].tolist() == [True, False, False, True, True, True, True]
        # Unreachable on sms (user 3).
        assert plain[3, 0].tolist() == [True, True, False]
        # New-users-only: signed up 5 days ago (user 5), not 45 or 100.
        assert new_only[:, 0, 0].tolist() == [
            False,
            False,
            False,
            False,
            False,
            True,
            False,
        ]
        # An offer that requires recent events, or is not valid yet, bars everyone.
        assert not active_only.any()
        assert not not_started.any()


class TestExposureHistory:
    def test_counts_window_and_recency(self) -> None:
        exposures = pd.DataFrame(
            {
                "user_id": ["a", "a", "a", "b", "c", "a"],
                "arm": ["c1", "c2", "c1", CONTROL_ARM, "c1", "c1"],
                "send_at": pd.to_datetime(
                    [
                        NOW - timedelta(days=1),
                        NOW - timedelta(days=3),
                        NOW - timedelta(days=20),
                        NOW - timedelta(days=1),
                        NOW - timedelta(hours=12),
                        NOW + timedelta(days=1),
                    ],
                    utc=True,
                ),
            }
        )

        history = exposure_history(exposures, ["a", "b", "c", "d"], NOW, window_days=7)

        assert history["exposures_in_window"].tolist() == [2, 0, 1, 0]
        since = history["days_since_last_exposure"].tolist()
        assert since[0] == pytest.approx(1.0)
        # Control rows sent nothing, and future rows do not count.
        assert since[1] == np.inf
        assert since[2] == pytest.approx(0.5)
        assert since[3] == np.inf

    def test_rejects_naive_time(self) -> None:
        frame = pd.DataFrame(columns=["user_id", "arm", "send_at"])
        with pytest.raises(ValueError, match="timezone-aware"):
            exposure_history(frame, ["a"], datetime(2026, 1, 1), 7)


class TestSendHours:
    def test_best_hour_per_channel(self) -> None:
        activity = np.full((2, 24), 0.1, dtype=np.float32)
        activity[0, 7] = 1.0
        activity[0, 21] = 0.9
        activity[1, 22] = 1.0
        reach = channel_reach(
            {"email": 0.2, "push": 0.5, "sms": 0.9},
            send_hours={"sms": range(9, 21)},
        )

        hours = choose_send_hours(activity, reach)

        assert hours.hour[0].tolist() == [7, 7, 9]
        assert hours.hour[1].tolist() == [22, 22, 9]
        assert hours.reach[0, 0] == pytest.approx(0.2)
        assert hours.reach[1, 2] == pytest.approx(0.09)

    def test_send_times_after_start(self) -> None:
        hours = SendHours(
            hour=np.array([[7, 9, 12]], dtype=np.int8),
            reach=np.ones((1, 3), dtype=np.float32),
        )

        times = hours.send_times(NOW)

        expected = ["2026-05-05T07:00", "2026-05-04T09:00", "2026-05-04T12:00"]
        assert times.dtype == np.dtype("datetime64[ns]")
        np.testing.assert_array_equal(
            times[0], np.array(expected, dtype="datetime64[ns]")
        )

    def test_activity_from_features(self) -> None:
        features = pd.DataFrame(
            {
                "hour_share_night": [0.0, 0.0],
                "hour_share_morning": [0.6, 0.0],
                "hour_share_afternoon": [0.4, 0.0],
                "hour_share_evening": [0.0, 0.0],
                "peak_hour": [14, -1],
            }
        )

        activity = activity_from_features(features)

        assert activity.shape == (2, 24)
        assert activity[0].argmax() == 14
        assert activity[0].max() == pytest.approx(1.0)
        assert activity[0, 2] == 0.0
        # A user without events is equally active at every hour.
        assert (activity[1] == 1.0).all()

    def test_expand_scales_by_reach(self) -> None:
        profit = np.array([[10.0, -4.0]])
        cost = np.array([[2.0, 1.0]])
        reach = np.array([[1.0, 0.5, 0.0]])

        profit3, cost3 = expand_over_channels(profit, cost, reach, chunk_users=1)

        assert profit3.dtype == np.float32
        assert profit3.shape == (1, 2, 3)
        np.testing.assert_allclose(profit3[0], [[10.0, 5.0, 0.0], [-4.0, -2.0, 0.0]])
        np.testing.assert_allclose(cost3[0, 0], [2.0, 1.0, 0.0])

    @pytest.mark.parametrize(
        ("activity", "reach", "message"),
        [
            (np.ones((2, 23)), np.ones((3, 24)), "activity must be"),
            (np.ones((2, 24)), np.ones((2, 24)), "reach_by_hour must be"),
            (np.full((2, 24), 2.0), np.ones((3, 24)), r"\[0, 1\]"),
        ],
    )
    def test_rejects_invalid_input(self, activity, reach, message) -> None:
        with pytest.raises(ValueError, match=message):
            choose_send_hours(activity, reach)
