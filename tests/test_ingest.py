"""Tests of ingestion: lake partitions, quarantine, ledger, skips and re-ingests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from couponflow import lake, store
from couponflow.ingest import BatchRejected, ingest_batch, ingest_pending
from couponflow.schemas import EVENTS, USERS, coerce
from couponflow.settings import Settings

NOW = datetime(2024, 6, 1, tzinfo=UTC)
POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def events_frame(n: int = 6, first: int = 0) -> pd.DataFrame:
    """Return ``n`` valid events spread over two UTC days, ids from ``first``."""
    ids = range(first, first + n)
    frame = pd.DataFrame(
        {
            "event_id": [f"e{i}" for i in ids],
            "user_id": [str(i % 3) for i in ids],
            "event_ts": pd.date_range(
                "2024-05-01 06:00", periods=n, freq="7h", tz="UTC"
            ),
            "event_type": ["view"] * n,
            "item_id": ["item1"] * n,
            "category": ["home"] * n,
            "price_cents": [1999] * n,
            "quantity": [1] * n,
            "session_id": [f"s{i // 2}" for i in ids],
            "dwell_seconds": [3.5] * n,
        }
    )
    return coerce(frame, EVENTS)


def users_frame() -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "user_id": ["0", "1", "2"],
            "signup_ts": pd.to_datetime(["2024-01-01"] * 3, utc=True),
            "region": ["north", "south", None],
            "device": ["ios", "web", "android"],
        }
    )
    return coerce(frame, USERS)


def table_rows(settings: Settings, table: sa.Table) -> list[dict]:
    engine = store.get_engine(settings.campaign_db_url)
    with engine.connect() as connection:
        return [dict(r) for r in connection.execute(sa.select(table)).mappings()]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path)


def test_clean_batch_lands_in_date_partitions(settings: Settings) -> None:
    path = lake.write_raw_batch(settings, "events", "events-0001", events_frame())
    report = ingest_batch(settings, "events", path, now=NOW)

    assert report.rows_in == 6
    assert report.rows_accepted == 6
    assert report.rows_quarantined == 0
    assert report.skipped is False
    partitions = sorted(p.parent.name for p in lake.lake_files(settings, "events"))
    assert partitions == ["date=2024-05-01", "date=2024-05-02"]
    stored = lake.read_lake_table(settings, "events").sort_values("event_id")
    assert list(stored["event_id"]) == [f"e{i}" for i in range(6)]
    (ledger,) = table_rows(settings, store.ingest_ledger)
    assert ledger["batch_id"] == "events-0001"
    assert ledger["rows_accepted"] == 6
    assert len(ledger["sha256"]) == 64


def test_bad_rows_go_to_quarantine_table(settings: Settings) -> None:
    frame = events_frame()
    frame.loc[1, "price_cents"] = -5
    frame.loc[2, "user_id"] = pd.NA
    path = lake.write_raw_batch(settings, "events", "events-bad", frame)
    report = ingest_batch(settings, "events", path, now=NOW)

    assert report.rows_quarantined == 2
    assert report.rows_accepted == 4
    assert report.rows_in == report.rows_accepted + report.rows_quarantined
    rows = table_rows(settings, store.quarantine)
    assert sorted(r["row_number"] for r in rows) == [1, 2]
    assert {r["expectation"] for r in rows} == {
        "expect_column_values_to_be_between(price_cents)",
        "expect_column_values_to_not_be_null(user_id)",
    }
    assert all(r["batch_id"] == "events-bad" for r in rows)
    assert len(lake.read_lake_table(settings, "events")) == 4
    (ledger,) = table_rows(settings, store.ingest_ledger)
    assert ledger["rows_quarantined"] == 2


def test_same_file_skipped(settings: Settings) -> None:
    frame = events_frame()
    frame.loc[0, "price_cents"] = -5
    path = lake.write_raw_batch(settings, "events", "events-0001", frame)
    first = ingest_batch(settings, "events", path, now=NOW)
    second = ingest_batch(settings, "events", path, now=NOW)

    assert first.skipped is False
    assert second.skipped is True
    assert second.rows_accepted == first.rows_accepted
    assert len(lake.read_lake_table(settings, "events")) == 5
    assert len(table_rows(settings, store.quarantine)) == 1
    assert len(table_rows(settings, store.ingest_ledger)) == 1


def test_changed_file_replaces_earlier_rows(settings: Settings) -> None:
    frame = events_frame()
    frame.loc[0, "price_cents"] = -5
    path = lake.write_raw_batch(settings, "events", "events-0001", frame)
    ingest_batch(settings, "events", path, now=NOW)

    fixed = events_frame(4)
    fixed.loc[3, "event_type"] = "hover"
    lake.write_raw_batch(settings, "events", "events-0001", fixed)
    report = ingest_batch(settings, "events", path, now=NOW)

    assert report.skipped is False
    assert report.rows_accepted == 3
    stored = lake.read_lake_table(settings, "events")
    assert sorted(stored["event_id"]) == ["e0", "e1", "e2"]
    rows = table_rows(settings, store.quarantine)
    assert [r["row_number"] for r in rows] == [3]
    (ledger,) = table_rows(settings, store.ingest_ledger)
    assert ledger["rows_in"] == 4


def test_unreadable_file_rejected(settings: Settings) -> None:
    path = lake.raw_batch_path(settings, "events", "events-broken")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not parquet")
    with pytest.raises(BatchRejected, match="events-broken"):
        ingest_batch(settings, "events", path, now=NOW)
    assert table_rows(settings, store.ingest_ledger) == []
    assert lake.lake_files(settings, "events") == []


def test_empty_batch_rejected_writes_nothing(settings: Settings) -> None:
    path = lake.write_raw_batch(
        settings, "events", "events-empty", events_frame().iloc[:0]
    )
    with pytest.raises(BatchRejected, match="events-empty") as caught:
        ingest_batch(settings, "events", path, now=NOW)
    assert "no rows" in str(caught.value)
    assert table_rows(settings, store.ingest_ledger) == []
    assert table_rows(settings, store.quarantine) == []


def test_pending_order_and_cross_batch_duplicates(settings: Settings) -> None:
    lake.write_raw_batch(settings, "events", "events-2024-05-01", events_frame(4))
    # Overlaps the first batch in e2 and e3.
    lake.write_raw_batch(
        settings, "events", "events-2024-05-02", events_frame(4, first=2)
    )
    lake.write_raw_batch(settings, "users", "users-0001", users_frame())

    reports = ingest_pending(settings, now=NOW)

    assert [(r.table, r.batch_id) for r in reports] == [
        ("users", "users-0001"),
        ("events", "events-2024-05-01"),
        ("events", "events-2024-05-02"),
    ]
    assert reports[2].rows_quarantined == 2
    expectations = {r["expectation"] for r in table_rows(settings, store.quarantine)}
    assert expectations == {"expect_column_values_to_be_absent_from_lake(event_id)"}
    stored = lake.read_lake_table(settings, "events")
    assert sorted(stored["event_id"]) == [f"e{i}" for i in range(6)]
    rerun = ingest_pending(settings, tables=["events"], now=NOW)
    assert [r.skipped for r in rerun] == [True, True]


def test_batch_id_shared_across_tables_rejected(settings: Settings) -> None:
    users = lake.write_raw_batch(settings, "users", "batch-0001", users_frame())
    events = lake.write_raw_batch(settings, "events", "batch-0001", events_frame())
    ingest_batch(settings, "users", users, now=NOW)
    with pytest.raises(ValueError, match="unique across tables"):
        ingest_batch(settings, "events", events, now=NOW)


@pytest.fixture
def postgres_settings(tmp_path: Path) -> Iterator[Settings]:
    admin = sa.create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
    try:
        with admin.connect():
            pass
    except sa.exc.OperationalError as error:
        admin.dispose()
        pytest.skip(f"PostgreSQL at {POSTGRES_URL} is unreachable: {error.orig}")
    schema = f"test_ingest_{uuid.uuid4().hex[:12]}"
    with admin.begin() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    try:
        yield Settings(home=tmp_path, campaign_db_url=url)
    finally:
        store.get_engine(url).dispose()
        with admin.begin() as connection:
            connection.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def test_ingest_on_postgresql(postgres_settings: Settings) -> None:
    frame = events_frame()
    frame.loc[4, "event_type"] = "hover"
    path = lake.write_raw_batch(postgres_settings, "events", "events-pg", frame)
    first = ingest_batch(postgres_settings, "events", path, now=NOW)
    second = ingest_batch(postgres_settings, "events", path, now=NOW)

    assert first.rows_quarantined == 1
    assert second.skipped is True
    rows = table_rows(postgres_settings, store.quarantine)
    assert [r["row_number"] for r in rows] == [4]
    assert rows[0]["quarantined_at"].tzinfo is not None
    (ledger,) = table_rows(postgres_settings, store.ingest_ledger)
    assert ledger["rows_accepted"] == 5
