"""Tests of couponflow.features on small lakes written through couponflow.lake."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from distributed import Client

from couponflow import lake
from couponflow.dask_cluster import dask_client
from couponflow.features import (
    FEATURE_COLUMNS,
    FEATURES_FILE,
    INTEREST_FEATURE_COLUMNS,
    INTEREST_FILE,
    INTEREST_LOOKBACK,
    RECENCY_SENTINEL_DAYS,
    compute_user_features,
    compute_user_interest,
    write_user_features,
    write_user_interest,
)
from couponflow.interest import INTEREST_COLUMNS, compute_interest_snapshots
from couponflow.schemas import CATEGORIES, EVENT_TYPES, EVENTS, USERS, coerce
from couponflow.settings import Settings

START = datetime(2025, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    settings = Settings(home=tmp_path_factory.mktemp("dask"), dask_workers=2)
    with dask_client(settings) as dask:
        yield dask


def make_users(user_ids: list[str], signups: list[datetime]) -> pd.DataFrame:
    frame = pd.DataFrame(
        {"user_id": user_ids, "signup_ts": signups, "region": "eu", "device": "web"}
    )
    return coerce(frame, USERS)


def make_events(rows: list[dict[str, object]]) -> pd.DataFrame:
    """Build an events table from partial rows; unset columns get plain defaults."""
    defaults: dict[str, object] = {
        "event_type": "view",
        "item_id": "item-1",
        "category": "home",
        "price_cents": 1_000,
        "quantity": 1,
        "session_id": "s-1",
        "dwell_seconds": 10.0,
    }
    full = [
        {"event_id": f"e-{number}", **defaults, **row}
        for number, row in enumerate(rows)
    ]
    return coerce(pd.DataFrame(full), EVENTS)


def random_events(
    user_ids: list[str], days: int, per_user_day: float, seed: int
) -> pd.DataFrame:
    """Return random events from START over ``days`` days, with some nulls."""
    rng = np.random.default_rng(seed)
    count = int(len(user_ids) * days * per_user_day)
    users = rng.choice(user_ids, count)
    offsets = rng.integers(0, days * 86_400, count)
    stamps = pd.Timestamp(START) + pd.to_timedelta(offsets, unit="s")
    categories = rng.choice([*CATEGORIES, "toys"], count).astype(object)
    categories[rng.random(count) < 0.05] = None
    frame = pd.DataFrame(
        {
            "event_id": [f"r-{number}" for number in range(count)],
            "user_id": users,
            "event_ts": stamps,
            "event_type": rng.choice(EVENT_TYPES, count),
            "item_id": rng.integers(0, 50, count).astype(str),
            "category": categories,
            "price_cents": rng.integers(50, 30_000, count),
            "quantity": rng.integers(1, 4, count),
            # Sessions of six hours, so that some cross midnight.
            "session_id": [
                f"{user}-{offset // 21_600}"
                for user, offset in zip(users, offsets, strict=True)
            ],
            "dwell_seconds": rng.exponential(20.0, count),
        }
    )
    return coerce(frame, EVENTS)


def write_lake(
    settings: Settings, users: pd.DataFrame, events: pd.DataFrame, batch: str = "b1"
) -> None:
    lake.write_lake_partitions(settings, USERS, f"users-{batch}", users)
    lake.write_lake_partitions(settings, EVENTS, f"events-{batch}", events)


def reference_features(
    users: pd.DataFrame, events: pd.DataFrame, as_of: list[datetime]
) -> pd.DataFrame:
    """Compute the features one (user, as-of) at a time, the slow and obvious way."""
    rows = []
    for moment in as_of:
        stamp = pd.Timestamp(moment)
        window = events[
            (events["event_ts"] < stamp)
            & (events["event_ts"] >= stamp - timedelta(days=90))
        ]
        typical_log_price = (
            _priced_views(window).groupby("category")["log_price"].mean()
        )
        for user in users.itertuples():
            if not user.signup_ts < stamp:
                continue
            own = events[(events["user_id"] == user.user_id)]
            before = own[own["event_ts"] < stamp]
            short = before[before["event_ts"] >= stamp - timedelta(days=30)]
            long = before[before["event_ts"] >= stamp - timedelta(days=90)]
            own_views = _priced_views(long)
            deviation = own_views["log_price"] - own_views["category"].map(
                typical_log_price
            )
            rows.append(
                {
                    "user_id": user.user_id,
                    "event_timestamp": stamp,
                    **_reference_row(before, short, long, stamp),
                    "days_since_signup": (stamp - user.signup_ts).total_seconds()
                    / 86_400,
                    "view_price_index_90d": float(np.exp(deviation.mean()))
                    if len(own_views)
                    else 0.0,
                    "uses_app": int(user.device == "app"),
                }
            )
    return pd.DataFrame(rows)


def _priced_views(events: pd.DataFrame) -> pd.DataFrame:
    """Return the views with a known category and a positive price, and their log."""
    views = events[
        (events["event_type"] == "view")
        & events["category"].isin(CATEGORIES)
        & (events["price_cents"] > 0)
    ]
    return views.assign(log_price=np.log(views["price_cents"].astype(float)))


def _reference_row(
    before: pd.DataFrame, short: pd.DataFrame, long: pd.DataFrame, stamp: pd.Timestamp
) -> dict[str, object]:
    if before.empty:
        recency = RECENCY_SENTINEL_DAYS
    else:
        age = (stamp - before["event_ts"].max()).total_seconds() / 86_400
        recency = min(age, RECENCY_SENTINEL_DAYS)

    short_buys = short[short["event_type"] == "purchase"]
    long_buys = long[long["event_type"] == "purchase"]
    long_spend = int((long_buys["price_cents"] * long_buys["quantity"]).sum())
    orders = long_buys["session_id"].nunique()
    sessions = short["session_id"].nunique()
    views = int((short["event_type"] == "view").sum())
    known = long[long["category"].isin(CATEGORIES)]
    hours = long["event_ts"].dt.hour

    row: dict[str, object] = {
        "recency_days": recency,
        "frequency_30d": len(short_buys),
        "spend_30d_cents": int(
            (short_buys["price_cents"] * short_buys["quantity"]).sum()
        ),
        # Spend per order (session with a purchase), half up: floor(x + 0.5).
        "aov_cents": int(np.floor(long_spend / orders + 0.5)) if orders else 0,
        "orders_90d": orders,
        "views_per_session_30d": views / sessions if sessions else 0.0,
        "events_30d": len(short),
        "sessions_30d": sessions,
        "browse_seconds_30d": float(short["dwell_seconds"].sum()),
        "click_depth": (short["event_type"] == "click").sum() / sessions
        if sessions
        else 0.0,
        "cart_rate": (short["event_type"] == "add_to_cart").sum() / views
        if views
        else 0.0,
    }

    for category in CATEGORIES:
        share = (known["category"] == category).sum() / len(known) if len(known) else 0
        row[f"affinity_{category}"] = float(share)
    if len(known):
        counts = known["category"].value_counts()
        tied = [c for c in CATEGORIES if counts.get(c, 0) == counts.max()]
        row["top_category"] = tied[0]
    else:
        row["top_category"] = "none"

    if len(long):
        per_hour = hours.value_counts()
        row["peak_hour"] = min(
            h for h in per_hour.index if per_hour[h] == per_hour.max()
        )
    else:
        row["peak_hour"] = -1
    for name, (first, last) in {
        "night": (0, 6),
        "morning": (6, 12),
        "afternoon": (12, 18),
        "evening": (18, 24),
    }.items():
        inside = ((hours >= first) & (hours < last)).sum()
        row[f"hour_share_{name}"] = float(inside / len(long)) if len(long) else 0.0
    return row


def without_created(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns="created_timestamp").reset_index(drop=True)


def test_features_match_reference(tmp_path: Path, client: Client) -> None:
    settings = Settings(home=tmp_path)
    user_ids = [str(number) for number in range(12)]
    signups = [START - timedelta(days=30)] * 10 + [START + 50 * DAY, START + 200 * DAY]
    users = make_users(user_ids, signups)
    users.loc[users.index % 3 == 0, "device"] = "app"
    events = random_events(user_ids[:-1], days=120, per_user_day=0.6, seed=7)
    write_lake(settings, users, events)
    as_of = [
        START + 40 * DAY,
        START + 95 * DAY + timedelta(hours=13),
        START + 121 * DAY,
    ]

    actual = compute_user_features(settings, as_of, client=client)
    expected = reference_features(users, events, as_of)

    actual = actual.sort_values(["event_timestamp", "user_id"], ignore_index=True)
    expected = expected.sort_values(["event_timestamp", "user_id"], ignore_index=True)
    assert list(actual.columns) == list(FEATURE_COLUMNS)
    assert len(actual) == len(expected)
    compared = expected.astype({k: FEATURE_COLUMNS[k] for k in expected.columns})
    pd.testing.assert_frame_equal(
        actual[list(compared.columns)], compared, check_exact=False, rtol=1e-9
    )


def test_dtypes_follow_contract(tmp_path: Path, client: Client) -> None:
    settings = Settings(home=tmp_path)
    users = make_users(["0"], [START])
    write_lake(
        settings, users, make_events([{"user_id": "0", "event_ts": START + DAY}])
    )

    frame = compute_user_features(settings, [START + 2 * DAY], client=client)

    assert {column: str(frame[column].dtype) for column in frame} == {
        column: str(pd.api.types.pandas_dtype(dtype))
        for column, dtype in FEATURE_COLUMNS.items()
    }


def test_event_at_or_after_as_of_is_ignored(tmp_path: Path, client: Client) -> None:
    settings = Settings(home=tmp_path)
    users = make_users(["0", "1"], [START, START])
    as_of = START + 10 * DAY
    events = make_events(
        [
            {"user_id": "0", "event_ts": as_of - timedelta(hours=5)},
            {"user_id": "1", "event_ts": as_of - 3 * DAY, "event_type": "purchase"},
        ]
    )
    write_lake(settings, users, events)
    before = compute_user_features(settings, [as_of], client=client)

    later = make_events(
        [
            {"user_id": "0", "event_ts": as_of, "event_type": "purchase"},
            {"user_id": "0", "event_ts": as_of + timedelta(seconds=1)},
            {"user_id": "1", "event_ts": as_of + 2 * DAY, "category": "beauty"},
        ]
    )
    lake.write_lake_partitions(settings, EVENTS, "events-later", later)
    after = compute_user_features(settings, [as_of], client=client)

    pd.testing.assert_frame_equal(without_created(after), without_created(before))
    assert before["events_30d"].tolist() == [1, 1]


def test_known_user_values(tmp_path: Path, client: Client) -> None:
    settings = Settings(home=tmp_path)
    as_of = START + 40 * DAY
    users = make_users(["7"], [START - 10 * DAY])
    events = make_events(
        [
            # Outside the 30-day window, inside the 90-day one.
            {
                "user_id": "7",
                "event_ts": as_of - 50 * DAY + timedelta(hours=2),
                "event_type": "purchase",
                "price_cents": 100,
                "quantity": 1,
                "category": "fashion",
                "session_id": "a",
            },
            {
                "user_id": "7",
                "event_ts": as_of - 2 * DAY + timedelta(hours=20),
                "event_type": "purchase",
                "price_cents": 50,
                "quantity": 2,
                "category": "fashion",
                "session_id": "b",
            },
            {
                "user_id": "7",
                "event_ts": as_of - 2 * DAY + timedelta(hours=20, minutes=5),
                "event_type": "click",
                "category": "home",
                "session_id": "b",
                "dwell_seconds": 30.0,
            },
            {
                "user_id": "7",
                "event_ts": as_of - DAY + timedelta(hours=8),
                "event_type": "view",
                "category": "home",
                "session_id": "c",
                "dwell_seconds": None,
            },
            {
                "user_id": "7",
                "event_ts": as_of - timedelta(hours=12),
                "event_type": "add_to_cart",
                "category": None,
                "session_id": "c",
            },
        ]
    )
    write_lake(settings, users, events)

    row = compute_user_features(settings, [as_of], client=client).iloc[0]

    assert row["recency_days"] == pytest.approx(0.5)
    assert row["frequency_30d"] == 1
    assert row["spend_30d_cents"] == 100
    assert row["aov_cents"] == 100
    assert row["events_30d"] == 4
    assert row["sessions_30d"] == 2
    assert row["browse_seconds_30d"] == pytest.approx(50.0)
    assert row["click_depth"] == pytest.approx(0.5)
    assert row["cart_rate"] == pytest.approx(1.0)
    assert row["affinity_fashion"] == pytest.approx(0.5)
    assert row["affinity_home"] == pytest.approx(0.5)
    # Ties go to the category listed first in CATEGORIES.
    assert row["top_category"] == "fashion"
    # One event each at 02:00, 20:00, 20:05, 08:00 and 12:00 UTC.
    assert row["peak_hour"] == 20
    assert row["hour_share_night"] == pytest.approx(0.2)
    assert row["hour_share_morning"] == pytest.approx(0.2)
    assert row["hour_share_afternoon"] == pytest.approx(0.2)
    assert row["hour_share_evening"] == pytest.approx(0.4)
    assert row["days_since_signup"] == pytest.approx(50.0)
    assert row["orders_90d"] == 2
    # One view in the 30 days' two sessions, the only one of its category.
    assert row["views_per_session_30d"] == pytest.approx(0.5)
    assert row["view_price_index_90d"] == pytest.approx(1.0)
    assert row["uses_app"] == 0


def test_aov_is_spend_per_order(tmp_path: Path, client: Client) -> None:
    settings = Settings(home=tmp_path)
    users = make_users(["0"], [START])
    buy = {"user_id": "0", "event_type": "purchase", "session_id": "order-1"}
    events = make_events(
        [
            {**buy, "event_ts": START + DAY, "price_cents": 300, "quantity": 2},
            {**buy, "event_ts": START + DAY, "price_cents": 400, "quantity": 1},
            {**buy, "event_ts": START + 3 * DAY, "price_cents": 500, "session_id": "b"},
        ]
    )
    write_lake(settings, users, events)

    row = compute_user_features(settings, [START + 5 * DAY], client=client).iloc[0]

    assert row["orders_90d"] == 2
    assert row["frequency_30d"] == 3
    assert row["aov_cents"] == 750


def test_view_price_index_per_category(tmp_path: Path, client: Client) -> None:
    settings = Settings(home=tmp_path)
    users = make_users(["cheap", "dear", "other", "quiet"], [START] * 4)
    users.loc[users["user_id"] == "dear", "device"] = "app"
    view = {"event_type": "view", "event_ts": START + DAY}
    events = make_events(
        [
            {**view, "user_id": "cheap", "category": "home", "price_cents": 500},
            {**view, "user_id": "dear", "category": "home", "price_cents": 2_000},
            {**view, "user_id": "other", "category": "electronics", "price_cents": 9e3},
            # Neither a view of an unknown category nor an unpriced view counts.
            {**view, "user_id": "other", "category": "toys", "price_cents": 10},
            {**view, "user_id": "other", "category": "home", "price_cents": 0},
            {"user_id": "quiet", "event_ts": START + DAY, "event_type": "click"},
        ]
    )
    write_lake(settings, users, events)

    frame = compute_user_features(settings, [START + 2 * DAY], client=client)
    index = frame.set_index("user_id")["view_price_index_90d"]

    # The typical home price is the geometric mean of 500 and 2000, 1000.
    assert index["cheap"] == pytest.approx(0.5)
    assert index["dear"] == pytest.approx(2.0)
    assert index["other"] == pytest.approx(1.0)
    assert index["quiet"] == 0.0
    assert frame.set_index("user_id")["uses_app"].to_dict() == {
        "cheap": 0,
        "dear": 1,
        "other": 0,
        "quiet": 0,
    }


def test_aov_rounds_half_up(tmp_path: Path, client: Client) -> None:
    settings = Settings(home=tmp_path)
    users = make_users(["0"], [START])
    buy = {"user_id": "0", "event_type": "purchase", "quantity": 1}
    events = make_events(
        [
            {**buy, "event_ts": START + DAY, "price_cents": 100, "session_id": "a"},
            {**buy, "event_ts": START + 2 * DAY, "price_cents": 101, "session_id": "b"},
        ]
    )
    write_lake(settings, users, events)

    frame = compute_user_features(settings, [START + 3 * DAY], client=client)

    assert frame["aov_cents"].tolist() == [101]


def test_user_without_events_gets_zeros(tmp_path: Path, client: Client) -> None:
    settings = Settings(home=tmp_path)
    users = make_users(["0", "quiet"], [START, START])
    write_lake(
        settings, users, make_events([{"user_id": "0", "event_ts": START + DAY}])
    )

    frame = compute_user_features(settings, [START + 5 * DAY], client=client)
    row = frame.set_index("user_id").loc["quiet"]

    assert row["recency_days"] == RECENCY_SENTINEL_DAYS
    for column in ("frequency_30d", "spend_30d_cents", "aov_cents", "sessions_30d"):
        assert row[column] == 0, column
    assert row["click_depth"] == 0.0
    assert row["cart_rate"] == 0.0
    assert all(row[f"affinity_{category}"] == 0.0 for category in CATEGORIES)
    assert row["top_category"] == "none"
    assert row["peak_hour"] == -1
    assert row["hour_share_evening"] == 0.0
    assert row["days_since_signup"] == pytest.approx(5.0)


def test_only_users_signed_up_before_as_of(tmp_path: Path, client: Client) -> None:
    settings = Settings(home=tmp_path)
    as_of = START + 10 * DAY
    users = make_users(["early", "exact", "late"], [START, as_of, as_of + DAY])
    write_lake(settings, users, make_events([{"user_id": "late", "event_ts": START}]))

    frame = compute_user_features(settings, [as_of, as_of + 2 * DAY], client=client)

    rows = set(zip(frame["user_id"], frame["event_timestamp"], strict=True))
    later = pd.Timestamp(as_of + 2 * DAY)
    assert rows == {
        ("early", pd.Timestamp(as_of)),
        ("early", later),
        ("exact", later),
        ("late", later),
    }


def test_empty_lake_gives_empty_frame(tmp_path: Path, client: Client) -> None:
    frame = compute_user_features(Settings(home=tmp_path), [START], client=client)

    assert frame.empty
    assert list(frame.columns) == list(FEATURE_COLUMNS)


def test_as_of_must_be_aware_and_given(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)

    with pytest.raises(ValueError, match="timezone-naive"):
        compute_user_features(settings, [datetime(2025, 1, 1)])
    with pytest.raises(ValueError, match="as_of is empty"):
        compute_user_features(settings, [])


def test_default_client_is_started(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, dask_workers=1)
    write_lake(
        settings,
        make_users(["0"], [START]),
        make_events([{"user_id": "0", "event_ts": START + DAY}]),
    )

    frame = compute_user_features(settings, [START + 2 * DAY])

    assert frame["events_30d"].tolist() == [1]


def test_write_replaces_file(tmp_path: Path, client: Client) -> None:
    settings = Settings(home=tmp_path)
    write_lake(
        settings,
        make_users(["0", "1"], [START, START]),
        make_events([{"user_id": "0", "event_ts": START + DAY}]),
    )
    first = compute_user_features(settings, [START + 2 * DAY], client=client)
    second = compute_user_features(
        settings, [START + 2 * DAY, START + 3 * DAY], client=client
    )

    path = write_user_features(settings, first)
    assert path == tmp_path / "features" / FEATURES_FILE
    write_user_features(settings, second)

    stored = pd.read_parquet(path)
    assert len(stored) == len(second) == 4
    assert sorted(p.name for p in path.parent.iterdir()) == [FEATURES_FILE]


def test_write_rejects_missing_columns(tmp_path: Path) -> None:
    frame = pd.DataFrame({"user_id": ["0"]})

    with pytest.raises(ValueError, match="missing columns"):
        write_user_features(Settings(home=tmp_path), frame)
    assert not (tmp_path / "features" / FEATURES_FILE).exists()


def test_interest_snapshots_from_lake(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    user_ids = [str(number) for number in range(30)]
    signups = [START - DAY] * 29 + [START + 15 * DAY]
    users = make_users(user_ids, signups)
    events = random_events(user_ids[:28], days=20, per_user_day=2.0, seed=4)
    write_lake(settings, users, events)
    as_of = [START + 10 * DAY, START + 20 * DAY]

    frame = compute_user_interest(settings, as_of)

    assert list(frame.columns) == list(INTEREST_FEATURE_COLUMNS)
    for column, dtype in INTEREST_FEATURE_COLUMNS.items():
        assert str(frame[column].dtype) == dtype, column
    assert frame["created_timestamp"].notna().all()
    counts = frame.groupby("event_timestamp")["user_id"].count()
    # The last user signed up between the two times.
    assert counts.tolist() == [29, 30]
    expected = compute_interest_snapshots(
        events, users, as_of, lookback=INTEREST_LOOKBACK
    )
    pd.testing.assert_frame_equal(
        frame.drop(columns="created_timestamp"),
        expected.astype({"user_id": "string"}),
    )


def test_interest_ignores_events_past_lookback(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    # At noon, so that the lapsed user's event lies in a day partition that is read
    # but before the lookback.
    as_of = START + 10 * DAY + timedelta(hours=12)
    long_ago = as_of - INTEREST_LOOKBACK - timedelta(hours=6)
    user_ids = [str(number) for number in range(20)]
    users = make_users([*user_ids, "lapsed", "recent", "quiet"], [long_ago - DAY] * 23)
    events = pd.concat(
        [
            random_events(user_ids, days=10, per_user_day=2.0, seed=5),
            make_events(
                [
                    {"user_id": "lapsed", "event_ts": long_ago, "category": "home"},
                    {"user_id": "recent", "event_ts": START, "category": "home"},
                ]
            ),
        ],
        ignore_index=True,
    )
    write_lake(settings, users, events)

    frame = compute_user_interest(settings, [as_of]).set_index("user_id")

    scores = frame[list(INTEREST_COLUMNS)]
    # The lapsed user's only event is older than the lookback: the population mean,
    # as for a user without events.
    np.testing.assert_allclose(scores.loc["lapsed"], scores.loc["quiet"])
    assert not np.allclose(scores.loc["recent"], scores.loc["quiet"])


def test_write_interest_replaces_file(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    write_lake(
        settings,
        make_users(["0", "1"], [START, START]),
        make_events([{"user_id": "0", "event_ts": START + DAY}]),
    )
    first = compute_user_interest(settings, [START + 2 * DAY])
    second = compute_user_interest(settings, [START + 2 * DAY, START + 3 * DAY])

    path = write_user_interest(settings, first)
    assert path == tmp_path / "features" / INTEREST_FILE
    write_user_interest(settings, second)

    stored = pd.read_parquet(path)
    assert len(stored) == len(second) == 4
    assert sorted(p.name for p in path.parent.iterdir()) == [INTEREST_FILE]


def test_write_interest_rejects_missing_columns(tmp_path: Path) -> None:
    frame = pd.DataFrame({"user_id": ["0"]})

    with pytest.raises(ValueError, match="missing columns"):
        write_user_interest(Settings(home=tmp_path), frame)
    assert not (tmp_path / "features" / INTEREST_FILE).exists()
