"""Tests of the Great Expectations suites and of validate_batch on in-memory batches."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from couponflow.quality import (
    BatchRejected,
    ValidationResult,
    build_suite,
    validate_batch,
)
from couponflow.quality.casting import cast_column
from couponflow.schemas import COUPONS, EVENTS, EXPOSURES, USERS, UTC_TS, coerce

NOW = datetime(2024, 6, 1, tzinfo=UTC)
BETWEEN = "expect_column_values_to_be_between"
IN_SET = "expect_column_values_to_be_in_set"
NOT_NULL = "expect_column_values_to_not_be_null"
FIRST = "expect_column_values_to_be_first_occurrence"
CASTABLE = "expect_column_values_to_be_castable_to_dtype"
ABSENT = "expect_column_values_to_be_absent_from_lake"
# Generous bound for 50,000 rows on a shared CI core; the measured time is about 1 s.
MAX_SECONDS_50K_EVENTS = 15.0


def events_frame(n: int = 6) -> pd.DataFrame:
    """Return ``n`` valid events over two UTC days, in the contract dtypes."""
    types = ["view", "click", "add_to_cart", "purchase", "review"]
    frame = pd.DataFrame(
        {
            "event_id": [f"e{i}" for i in range(n)],
            "user_id": [str(i % 3) for i in range(n)],
            "event_ts": pd.date_range(
                "2024-05-01 06:00", periods=n, freq="7h", tz="UTC"
            ),
            "event_type": [types[i % len(types)] for i in range(n)],
            "item_id": [f"item{i % 4}" for i in range(n)],
            "category": ["home"] * n,
            "price_cents": [1999 + i for i in range(n)],
            "quantity": [1] * n,
            "session_id": [f"s{i // 2}" for i in range(n)],
            "dwell_seconds": [3.5] * n,
        }
    )
    return coerce(frame, EVENTS)


def exposures_frame() -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "campaign_id": ["c1", "c1", "c1", "c1"],
            "user_id": ["0", "1", "2", "1"],
            "arm": ["cpn1", "control", "cpn1", "cpn1"],
            "channel": ["email", None, "sms", "push"],
            "send_at": pd.to_datetime(["2024-05-02"] * 4, utc=True),
            "propensity": [0.5, 1.0, 0.0, 0.5],
            "policy": ["random"] * 4,
        }
    )
    return coerce(frame, EXPOSURES)


def coupons_frame() -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "coupon_id": ["k1", "k2", "k3", "k4"],
            "kind": ["amount_off", "percent_off", "free_shipping", "cashback"],
            "value": [500, 1500, 499, 100],
            "min_spend_cents": [2000, 0, 0, 0],
            "category": ["all", "home", "all", "all"],
            "valid_days": [7, 7, 7, 7],
            "stock": [100, 100, 100, 100],
            "channels": ["email,push", "sms", "fax", "email"],
            "starts_at": pd.to_datetime(["2024-05-01"] * 4, utc=True),
            "ends_at": pd.to_datetime(
                ["2024-07-01", "2024-04-01", "2024-07-01", "2024-07-01"], utc=True
            ),
        }
    )
    return coerce(frame, COUPONS)


def failures_by_row(result: ValidationResult) -> dict[int, set[str]]:
    rows: dict[int, set[str]] = {}
    for record in result.quarantine:
        rows.setdefault(record.row_number, set()).add(record.expectation)
    return rows


def test_clean_batch_fully_accepted() -> None:
    frame = events_frame()
    result = validate_batch(frame, EVENTS, "events-clean", NOW)
    assert result.rows_in == 6
    assert result.rows_accepted == 6
    assert result.rows_quarantined == 0
    assert result.quarantine == []
    assert result.summary["success"] is True
    assert dict(result.accepted.dtypes.astype(str)) == EVENTS.columns
    pd.testing.assert_frame_equal(result.accepted, frame)


def test_bad_rows_quarantined_with_expectation_names() -> None:
    frame = events_frame(8)
    frame.loc[1, "price_cents"] = -5
    frame.loc[2, "event_type"] = "hover"
    frame.loc[3, "user_id"] = pd.NA
    frame.loc[4, "event_ts"] = pd.Timestamp("2030-01-01", tz="UTC")
    frame.loc[6, "event_id"] = "e5"

    result = validate_batch(frame, EVENTS, "events-bad", NOW)

    assert failures_by_row(result) == {
        1: {f"{BETWEEN}(price_cents)"},
        2: {f"{IN_SET}(event_type)"},
        3: {f"{NOT_NULL}(user_id)"},
        4: {f"{BETWEEN}(event_ts)"},
        6: {f"{FIRST}(event_id)"},
    }
    assert result.rows_quarantined == 5
    assert result.rows_accepted == 3
    assert result.rows_in == result.rows_accepted + result.rows_quarantined
    assert sorted(result.accepted["event_id"]) == ["e0", "e5", "e7"]
    assert result.summary["success"] is False


def test_quarantine_record_fields() -> None:
    frame = events_frame()
    frame.loc[1, "price_cents"] = -5
    result = validate_batch(frame, EVENTS, "events-one-bad", NOW)
    (record,) = result.quarantine
    assert record.batch_id == "events-one-bad"
    assert record.table_name == "events"
    assert record.row_number == 1
    assert "price_cents=-5" in record.reason
    assert ">= 0" in record.reason
    assert json.loads(record.row_json)["event_id"] == "e1"
    assert record.quarantined_at.tzinfo is not None


def test_row_with_several_failures_counted_once() -> None:
    frame = events_frame()
    frame.loc[2, "price_cents"] = -1
    frame.loc[2, "event_type"] = "hover"
    result = validate_batch(frame, EVENTS, "events-two-reasons", NOW)
    assert result.rows_quarantined == 1
    assert len(result.quarantine) == 2
    assert failures_by_row(result) == {
        2: {f"{BETWEEN}(price_cents)", f"{IN_SET}(event_type)"}
    }


def test_user_id_zero_accepted() -> None:
    frame = events_frame(3)
    frame["user_id"] = pd.array(["0", "0", "1"], dtype="string")
    result = validate_batch(frame, EVENTS, "events-user-zero", NOW)
    assert result.rows_quarantined == 0
    assert list(result.accepted["user_id"]) == ["0", "0", "1"]


def test_integer_user_id_read_as_string() -> None:
    frame = events_frame(3)
    frame["user_id"] = [0, 1, 2]
    result = validate_batch(frame, EVENTS, "events-int-ids", NOW)
    assert result.rows_quarantined == 0
    assert list(result.accepted["user_id"]) == ["0", "1", "2"]
    assert result.accepted["user_id"].dtype == "string"


def test_empty_batch_rejected_naming_batch() -> None:
    with pytest.raises(BatchRejected, match="events-empty") as caught:
        validate_batch(events_frame().iloc[:0], EVENTS, "events-empty", NOW)
    assert caught.value.batch_id == "events-empty"
    assert "no rows" in caught.value.reason


def test_missing_column_rejected_naming_column() -> None:
    frame = events_frame().drop(columns=["session_id"])
    with pytest.raises(BatchRejected, match="session_id") as caught:
        validate_batch(frame, EVENTS, "events-no-session", NOW)
    assert "events-no-session" in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_uncastable_values_quarantined() -> None:
    frame = events_frame(4).astype({"price_cents": object, "event_ts": object})
    frame.loc[0, "price_cents"] = "1200"
    frame.loc[1, "price_cents"] = "twelve"
    frame.loc[2, "price_cents"] = 12.5
    frame.loc[3, "event_ts"] = "not a time"
    result = validate_batch(frame, EVENTS, "events-casts", NOW)
    assert failures_by_row(result) == {
        1: {f"{CASTABLE}(price_cents)"},
        2: {f"{CASTABLE}(price_cents)"},
        3: {f"{CASTABLE}(event_ts)"},
    }
    assert list(result.accepted["price_cents"]) == [1200]
    assert result.accepted["price_cents"].dtype == "int64"


def test_missing_int_value_quarantined() -> None:
    frame = events_frame(3).astype({"quantity": "Int64"})
    frame.loc[1, "quantity"] = pd.NA
    result = validate_batch(frame, EVENTS, "events-no-quantity", NOW)
    assert failures_by_row(result) == {1: {f"{NOT_NULL}(quantity)"}}


def test_key_already_in_lake_quarantined(tmp_path: Path) -> None:
    table_dir = tmp_path / "events"
    earlier = table_dir / "date=2024-05-01" / "events-earlier.parquet"
    earlier.parent.mkdir(parents=True)
    events_frame(2).to_parquet(earlier, index=False)
    result = validate_batch(
        events_frame(4), EVENTS, "events-later", NOW, lake_table_dir=table_dir
    )
    assert failures_by_row(result) == {
        0: {f"{ABSENT}(event_id)"},
        1: {f"{ABSENT}(event_id)"},
    }
    assert list(result.accepted["event_id"]) == ["e2", "e3"]


def test_own_lake_files_ignored(tmp_path: Path) -> None:
    table_dir = tmp_path / "events"
    own = table_dir / "date=2024-05-01" / "events-retry.parquet"
    own.parent.mkdir(parents=True)
    events_frame(2).to_parquet(own, index=False)
    result = validate_batch(
        events_frame(4), EVENTS, "events-retry", NOW, lake_table_dir=table_dir
    )
    assert result.rows_quarantined == 0


def test_compound_key_duplicate_and_propensity() -> None:
    result = validate_batch(exposures_frame(), EXPOSURES, "exposures-c1", NOW)
    assert failures_by_row(result) == {
        2: {f"{BETWEEN}(propensity)"},
        3: {f"{FIRST}(campaign_id, user_id)"},
    }
    assert list(result.accepted["user_id"]) == ["0", "1"]


def test_coupon_rules() -> None:
    result = validate_batch(coupons_frame(), COUPONS, "coupons-0001", NOW)
    assert failures_by_row(result) == {
        1: {"expect_column_pair_values_a_to_be_greater_than_b(ends_at, starts_at)"},
        2: {"expect_column_values_to_match_regex(channels)"},
        3: {f"{IN_SET}(kind)"},
    }


def test_naive_now_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        validate_batch(events_frame(), EVENTS, "events-naive", datetime(2024, 6, 1))


def test_suite_built_from_schema() -> None:
    suite = build_suite(USERS)
    types = {
        (e.expectation_type, getattr(e, "column", None)) for e in suite.expectations
    }
    assert (NOT_NULL, "user_id") in types
    assert (NOT_NULL, "signup_ts") in types
    assert (NOT_NULL, "region") not in types
    assert (CASTABLE, "device") in types
    assert (BETWEEN, "signup_ts__cast") in types
    assert ("expect_table_columns_to_match_set", None) in types


@pytest.mark.parametrize(
    ("values", "dtype", "expected"),
    [
        (
            pd.Series(["7", "x", 3, 2.5, True], dtype=object),
            "int64",
            [7, None, 3, None, None],
        ),
        (pd.Series([1.0, 2.5, np.nan]), "int64", [1, None, None]),
        (
            pd.Series(["a", 0, 1.5, False], dtype=object),
            "string",
            ["a", "0", None, None],
        ),
        (
            pd.Series(["true", "0", 1, 2], dtype=object),
            "bool",
            [True, False, True, None],
        ),
        (pd.Series(["1.5", True, 2], dtype=object), "float64", [1.5, None, 2.0]),
    ],
)
def test_cast_column_cases(values: pd.Series, dtype: str, expected: list) -> None:
    cast = cast_column(values, dtype)
    assert [None if pd.isna(v) else v for v in cast] == expected


def test_cast_timestamps() -> None:
    values = pd.Series(
        ["2024-05-01T12:00:00+02:00", 1714564800, "garbage"], dtype=object
    )
    cast = cast_column(values, UTC_TS)
    assert str(cast.dtype) == UTC_TS
    assert cast[0] == pd.Timestamp("2024-05-01 10:00", tz="UTC")
    assert pd.isna(cast[1])
    assert pd.isna(cast[2])
    naive = cast_column(pd.Series(pd.to_datetime(["2024-05-01 10:00"])), UTC_TS)
    assert naive[0] == pd.Timestamp("2024-05-01 10:00", tz="UTC")


def test_50k_events_validate_fast() -> None:
    n = 50_000
    rng = np.random.default_rng(7)
    frame = pd.DataFrame(
        {
            "event_id": [f"e{i}" for i in range(n)],
            "user_id": [str(i % 5000) for i in range(n)],
            "event_ts": pd.Timestamp("2024-05-01", tz="UTC")
            + pd.to_timedelta(rng.integers(0, 86_400, n), unit="s"),
            "event_type": rng.choice(["view", "click", "purchase"], n),
            "item_id": [f"item{i % 700}" for i in range(n)],
            "category": ["home"] * n,
            "price_cents": rng.integers(0, 10_000, n),
            "quantity": rng.integers(1, 4, n),
            "session_id": [f"s{i // 8}" for i in range(n)],
            "dwell_seconds": rng.random(n) * 60,
        }
    )
    frame = coerce(frame, EVENTS)
    frame.loc[10, "price_cents"] = -1
    started = time.perf_counter()
    result = validate_batch(frame, EVENTS, "events-50k", NOW)
    seconds = time.perf_counter() - started
    assert result.rows_quarantined == 1
    assert result.rows_accepted == n - 1
    assert seconds < MAX_SECONDS_50K_EVENTS
