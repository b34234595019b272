"""Tests of the collaborative-filtering interest score on small synthetic event logs.

Each shopper of the log browses mostly one category, so the factorization has a clear
structure to find. A few hand-made users then probe the edge cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import numpy as np
import pandas as pd
import pytest

from couponflow.interest import (
    INTEREST_COLUMNS,
    compute_interest,
    compute_interest_snapshots,
)
from couponflow.schemas import CATEGORIES, EVENTS, coerce

# user_id, event_type, item_id, category, event_ts
EventRow = tuple[str, str, str | None, str, pd.Timestamp]

AS_OF = pd.Timestamp("2026-03-01T00:00:00Z")
SIGNUP = pd.Timestamp("2025-06-01T00:00:00Z")
SHOPPERS = 60
ITEMS_PER_CATEGORY = 20
DOMINANT_VIEWS = 8
STRAY_VIEWS = 2
SEED = 3


def make_events(rows: Sequence[EventRow]) -> pd.DataFrame:
    """Build an EVENTS frame from (user_id, event_type, item_id, category, ts) rows."""
    frame = pd.DataFrame(
        rows, columns=["user_id", "event_type", "item_id", "category", "event_ts"]
    )
    frame["event_id"] = [f"ev{i}" for i in range(len(frame))]
    frame["price_cents"] = 1_000
    frame["quantity"] = 1
    frame["session_id"] = "s" + frame["user_id"]
    frame["dwell_seconds"] = 10.0
    return coerce(frame, EVENTS)


def item(category: str, number: int) -> str:
    return f"{category}-{number:03d}"


def shopper_rows(seed: int) -> list[EventRow]:
    """Return events of SHOPPERS users who each browse one category mostly."""
    rng = np.random.default_rng(seed)
    rows: list[EventRow] = []
    for number in range(SHOPPERS):
        user = f"shopper-{number:02d}"
        dominant = CATEGORIES[number % len(CATEGORIES)]
        others = [c for c in CATEGORIES if c != dominant]
        picks: list[tuple[str, int]] = []
        for _ in range(DOMINANT_VIEWS):
            picks.append((dominant, int(rng.integers(ITEMS_PER_CATEGORY))))
        for _ in range(STRAY_VIEWS):
            category = others[int(rng.integers(len(others)))]
            picks.append((category, int(rng.integers(ITEMS_PER_CATEGORY))))
        for offset, (category, index) in enumerate(picks):
            ts = AS_OF - pd.Timedelta(days=10, hours=offset)
            rows.append((user, "view", item(category, index), category, ts))
            if offset % 3 == 0:
                rows.append((user, "purchase", item(category, index), category, ts))
    return rows


def make_users(user_ids: list[str], signup: pd.Timestamp = SIGNUP) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": pd.array(user_ids, dtype="string"),
            "signup_ts": pd.Series(
                [signup] * len(user_ids), dtype="datetime64[ns, UTC]"
            ),
            "region": "north",
            "device": "mobile",
        }
    )


def shopper_ids() -> list[str]:
    return [f"shopper-{number:02d}" for number in range(SHOPPERS)]


@pytest.fixture(scope="module")
def base_rows() -> list[EventRow]:
    return shopper_rows(SEED)


def test_sports_viewer_scores_sports_highest(
    base_rows: list[EventRow],
) -> None:
    when = AS_OF - pd.Timedelta(days=2)
    sporty = [("sporty", "view", item("sports", n), "sports", when) for n in (1, 4, 9)]
    events = make_events([*base_rows, *sporty])
    users = make_users([*shopper_ids(), "sporty"])

    interest = compute_interest(events, users, AS_OF).set_index("user_id")

    row = interest.loc["sporty"]
    assert row.idxmax() == "interest_sports"
    for column in INTEREST_COLUMNS:
        if column != "interest_sports":
            assert row["interest_sports"] > row[column], column


def test_output_columns_and_range(
    base_rows: list[EventRow],
) -> None:
    interest = compute_interest(
        make_events(base_rows), make_users(shopper_ids()), AS_OF
    )

    assert list(interest.columns) == ["user_id", *INTEREST_COLUMNS]
    assert interest["user_id"].tolist() == sorted(shopper_ids())
    scores = interest[list(INTEREST_COLUMNS)].to_numpy()
    assert np.isfinite(scores).all()
    assert scores.min() >= 0.0
    assert scores.max() <= 1.0
    # Each shopper's dominant category gets the top score.
    dominant = [CATEGORIES[n % len(CATEGORIES)] for n in range(SHOPPERS)]
    top = [INTEREST_COLUMNS[i].removeprefix("interest_") for i in scores.argmax(axis=1)]
    matches = np.mean([a == b for a, b in zip(top, dominant, strict=True)])
    assert matches >= 0.9


def test_no_history_user_gets_population_mean(
    base_rows: list[EventRow],
) -> None:
    users = make_users([*shopper_ids(), "newcomer"])
    interest = compute_interest(make_events(base_rows), users, AS_OF)

    assert "newcomer" in set(interest["user_id"])
    assert len(interest) == SHOPPERS + 1
    scores = interest.set_index("user_id")[list(INTEREST_COLUMNS)]
    population_mean = scores.drop(index="newcomer").mean()
    np.testing.assert_allclose(
        scores.loc["newcomer"].to_numpy(), population_mean.to_numpy(), rtol=1e-12
    )
    assert scores.loc["newcomer"].max() > 0.0


def test_eligibility_follows_signup(
    base_rows: list[EventRow],
) -> None:
    late = make_users(["late-signup"], signup=AS_OF)
    twice = pd.concat(
        [
            make_users(["two-rows"], signup=AS_OF + pd.Timedelta(days=3)),
            make_users(["two-rows"], signup=SIGNUP),
        ]
    )
    no_signup = make_users(["no-signup"])
    no_signup["signup_ts"] = pd.Series([pd.NaT], dtype="datetime64[ns, UTC]")
    users = pd.concat([make_users(shopper_ids()), late, twice, no_signup])

    interest = compute_interest(make_events(base_rows), users, AS_OF)

    ids = set(interest["user_id"])
    # Signed up exactly at as_of: not yet a user then, as in the user features.
    assert "late-signup" not in ids
    # The earliest of two signups counts.
    assert "two-rows" in ids
    assert "no-signup" not in ids
    assert len(interest) == SHOPPERS + 1


def test_events_at_or_after_as_of_are_ignored(
    base_rows: list[EventRow],
) -> None:
    users = make_users([*shopper_ids(), "later"])
    before = compute_interest(make_events(base_rows), users, AS_OF)
    future = [
        ("later", "purchase", item("home", 1), "home", AS_OF),
        ("shopper-00", "view", item("beauty", 2), "beauty", AS_OF + pd.Timedelta(1)),
    ]
    after = compute_interest(make_events([*base_rows, *future]), users, AS_OF)

    pd.testing.assert_frame_equal(before, after)


def test_same_seed_same_scores(
    base_rows: list[EventRow],
) -> None:
    events = make_events(base_rows)
    users = make_users(shopper_ids())
    first = compute_interest(events, users, AS_OF, seed=4)
    second = compute_interest(events.iloc[::-1], users.iloc[::-1], AS_OF, seed=4)

    pd.testing.assert_frame_equal(first, second)


def test_unusable_events_are_skipped(
    base_rows: list[EventRow],
) -> None:
    when = AS_OF - pd.Timedelta(days=1)
    noise: list[EventRow] = [
        ("odd", "wishlist", item("home", 1), "home", when),
        ("odd", "view", item("toys", 1), "toys", when),
        ("odd", "purchase", None, "grocery", when),
    ]
    users = make_users([*shopper_ids(), "odd", "newcomer"])

    scores = compute_interest(make_events([*base_rows, *noise]), users, AS_OF)

    # Every event of "odd" is skipped, so "odd" counts as a user without history.
    by_user = scores.set_index("user_id")
    np.testing.assert_allclose(
        by_user.loc["odd"].to_numpy(), by_user.loc["newcomer"].to_numpy()
    )


def test_no_events_gives_zero_scores() -> None:
    users = make_users(["a", "b"])
    interest = compute_interest(EVENTS.empty_frame(), users, AS_OF)

    assert interest["user_id"].tolist() == ["a", "b"]
    assert (interest[list(INTEREST_COLUMNS)] == 0.0).all().all()


def test_snapshots_are_point_in_time(
    base_rows: list[EventRow],
) -> None:
    # Half of each shopper's events come at or after the early time.
    early = AS_OF - pd.Timedelta(days=10, hours=4)
    times = [AS_OF, early]
    users = make_users([*shopper_ids(), "newcomer"])
    events = make_events(base_rows)

    snapshots = compute_interest_snapshots(events, users, times, seed=2)

    assert list(snapshots.columns) == ["user_id", "event_timestamp", *INTEREST_COLUMNS]
    assert str(snapshots["event_timestamp"].dtype) == "datetime64[ns, UTC]"
    assert snapshots["event_timestamp"].is_monotonic_increasing
    early_rows = snapshots[snapshots["event_timestamp"] == early]
    late_rows = snapshots[snapshots["event_timestamp"] == AS_OF]
    assert len(early_rows) == SHOPPERS + 1
    assert len(late_rows) == SHOPPERS + 1
    # The earliest snapshot is the fit that compute_interest makes at its time.
    pd.testing.assert_frame_equal(
        early_rows.drop(columns="event_timestamp").reset_index(drop=True),
        compute_interest(events, users, early, seed=2),
    )
    assert not np.allclose(
        early_rows[list(INTEREST_COLUMNS)].to_numpy(),
        late_rows[list(INTEREST_COLUMNS)].to_numpy(),
    )

    # Events at or after the last time change no snapshot.
    future: list[EventRow] = [
        ("newcomer", "purchase", item("home", 1), "home", AS_OF),
        ("shopper-00", "view", item("beauty", 2), "beauty", AS_OF + pd.Timedelta(1)),
    ]
    with_future = make_events([*base_rows, *future])
    again = compute_interest_snapshots(with_future, users, times, seed=2)
    pd.testing.assert_frame_equal(snapshots, again)


def test_warm_snapshot_starts_from_earlier_fit(
    base_rows: list[EventRow],
) -> None:
    early = AS_OF - pd.Timedelta(days=10, hours=4)
    users = make_users(shopper_ids())
    events = make_events(base_rows)
    columns = list(INTEREST_COLUMNS)

    snapshots = compute_interest_snapshots(
        events, users, [early, AS_OF], warm_iterations=1, seed=2
    )
    converged = compute_interest(events, users, AS_OF, seed=2)[columns].to_numpy()
    one_sweep = compute_interest(events, users, AS_OF, iterations=1, seed=2)

    warm = snapshots[snapshots["event_timestamp"] == AS_OF][columns].to_numpy()
    warm_error = np.abs(warm - converged).mean()
    cold_error = np.abs(one_sweep[columns].to_numpy() - converged).mean()
    # One sweep from the earlier snapshot's item factors gets closer to the
    # converged fit than one sweep from random factors.
    assert warm_error < 0.8 * cold_error
    top_match = np.mean(warm.argmax(axis=1) == converged.argmax(axis=1))
    assert top_match >= 0.9


def test_lookback_drops_older_events(
    base_rows: list[EventRow],
) -> None:
    old = AS_OF - pd.Timedelta(days=40)
    lapsed = [("lapsed", "purchase", item("home", n), "home", old) for n in (1, 2)]
    users = make_users([*shopper_ids(), "lapsed", "newcomer"])
    events = make_events([*base_rows, *lapsed])

    windowed = compute_interest(events, users, AS_OF, lookback=timedelta(days=30))
    unbounded = compute_interest(events, users, AS_OF)

    by_user = windowed.set_index("user_id")
    # Outside the 30 days, the purchases of "lapsed" no longer count.
    np.testing.assert_allclose(
        by_user.loc["lapsed"].to_numpy(), by_user.loc["newcomer"].to_numpy()
    )
    everything = unbounded.set_index("user_id")
    assert everything.loc["lapsed"].idxmax() == "interest_home"
    assert not np.allclose(
        everything.loc["lapsed"].to_numpy(), everything.loc["newcomer"].to_numpy()
    )


def test_invalid_input_is_rejected(
    base_rows: list[EventRow],
) -> None:
    events = make_events(base_rows)
    users = make_users(shopper_ids())
    with pytest.raises(ValueError, match="timezone-aware"):
        compute_interest(events, users, AS_OF.tz_localize(None).to_pydatetime())
    with pytest.raises(ValueError, match="missing columns"):
        compute_interest(events.drop(columns="item_id"), users, AS_OF)
    with pytest.raises(ValueError, match="missing columns"):
        compute_interest(events, users.drop(columns="signup_ts"), AS_OF)
    with pytest.raises(ValueError, match="regularization must be > 0"):
        compute_interest(events, users, AS_OF, regularization=0.0)
    with pytest.raises(ValueError, match="lookback must be positive"):
        compute_interest(events, users, AS_OF, lookback=timedelta(0))
    with pytest.raises(ValueError, match="as_of is empty"):
        compute_interest_snapshots(events, users, [])
    with pytest.raises(ValueError, match="warm_iterations must be >= 1"):
        compute_interest_snapshots(events, users, [AS_OF], warm_iterations=0)
