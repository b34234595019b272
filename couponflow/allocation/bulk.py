"""Bulk transfer of plan rows: COPY on PostgreSQL (psycopg 3), executemany on SQLite."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from couponflow.allocation.campaign import PLAN_COLUMNS
from couponflow.schemas import UTC_TS
from couponflow.store import allocations

# Rows per executemany batch, or per COPY write on PostgreSQL.
INSERT_CHUNK_ROWS = 50_000
# SQLAlchemy's storage format for DateTime on SQLite, which it parses back.
_SQLITE_DATETIME = "%Y-%m-%d %H:%M:%S.%f"
_POSTGRES_DATETIME = "%Y-%m-%d %H:%M:%S.%f+00:00"
STORED_COLUMNS: tuple[str, ...] = ("campaign_id", "version", *PLAN_COLUMNS)


def uses_copy(connection: Connection) -> bool:
    """Return whether the connection is PostgreSQL through psycopg 3, which has COPY."""
    dialect = connection.dialect
    return dialect.name == "postgresql" and dialect.driver == "psycopg"


def check_dialect(connection: Connection) -> None:
    """Raise ``ValueError`` unless the store is SQLite or PostgreSQL via psycopg."""
    if connection.dialect.name == "sqlite" or uses_copy(connection):
        return
    raise ValueError(
        f"campaign store dialect {connection.dialect.name}+"
        f"{connection.dialect.driver} is not supported; use sqlite:/// or "
        "postgresql+psycopg://"
    )


def insert_plan_rows(
    connection: Connection, campaign_id: str, version: int, plan: pd.DataFrame
) -> None:
    """Insert ``plan`` as the rows of one version, inside the caller's transaction."""
    if uses_copy(connection):
        _copy_in(connection, campaign_id, version, plan)
        return
    placeholders = ", ".join("?" for _ in STORED_COLUMNS)
    sql = (
        f"INSERT INTO {allocations.name} ({', '.join(STORED_COLUMNS)}) "
        f"VALUES ({placeholders})"
    )
    for rows in _sqlite_rows(campaign_id, version, plan):
        connection.exec_driver_sql(sql, rows)


def read_rows(connection: Connection, statement: sa.Select) -> pd.DataFrame:
    """Run ``statement`` as a single query and return its rows as a frame.

    ``statement`` must select ``PLAN_COLUMNS`` then ``version``. On PostgreSQL it
    runs as ``COPY (SELECT ...) TO STDOUT``, which is one statement and so one
    snapshot, like the plain SELECT used on SQLite.
    """
    names = [*PLAN_COLUMNS, "version"]
    if not uses_copy(connection):
        return pd.DataFrame(connection.execute(statement).all(), columns=names)

    # Pin the text form of timestamps to ISO dates in UTC for the parser below.
    connection.exec_driver_sql("SET LOCAL TimeZone = 'UTC'")
    connection.exec_driver_sql("SET LOCAL DateStyle = 'ISO, YMD'")
    query = statement.compile(
        dialect=connection.dialect, compile_kwargs={"literal_binds": True}
    )
    buffer = io.BytesIO()
    cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
    with cursor.copy(f"COPY ({query}) TO STDOUT (FORMAT csv)") as copy:
        for block in copy:
            buffer.write(block)
    if buffer.tell() == 0:
        return pd.DataFrame(columns=names)
    buffer.seek(0)
    text_columns = [c for c, dtype in PLAN_COLUMNS.items() if dtype == "string"]
    return pd.read_csv(
        buffer,
        header=None,
        names=names,
        dtype={c: "string" for c in text_columns},
        # Only an empty field is missing, so ids such as "NA" or "null" stay text.
        keep_default_na=False,
        na_values=[""],
    )


def _copy_in(
    connection: Connection, campaign_id: str, version: int, plan: pd.DataFrame
) -> None:
    copy_sql = (
        f"COPY {allocations.name} ({', '.join(STORED_COLUMNS)}) FROM STDIN (FORMAT csv)"
    )
    cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
    with cursor.copy(copy_sql) as copy:
        for chunk in _chunks(plan):
            chunk = chunk.assign(
                campaign_id=campaign_id,
                version=version,
                send_at=_timestamp_text(chunk["send_at"], _POSTGRES_DATETIME),
            )
            buffer = io.StringIO()
            # Missing values are written unquoted and empty, which CSV COPY reads as
            # NULL. No text column may hold an empty string, so none is misread.
            chunk[list(STORED_COLUMNS)].to_csv(buffer, header=False, index=False)
            copy.write(buffer.getvalue())


def _sqlite_rows(
    campaign_id: str, version: int, plan: pd.DataFrame
) -> Iterator[list[tuple[Any, ...]]]:
    for chunk in _chunks(plan):
        columns: list[list[Any]] = [
            [campaign_id] * len(chunk),
            [version] * len(chunk),
        ]
        for name, dtype in PLAN_COLUMNS.items():
            column = chunk[name]
            if dtype == UTC_TS:
                columns.append(_timestamp_text(column, _SQLITE_DATETIME).tolist())
            else:
                values = column.astype(object).where(column.notna(), None)
                columns.append(values.tolist())
        yield list(zip(*columns, strict=True))


def _timestamp_text(column: pd.Series, text_format: str) -> pd.Series:
    """Format UTC timestamps as text, formatting each distinct value once."""
    codes, uniques = pd.factorize(column)
    texts = np.asarray(pd.DatetimeIndex(uniques).strftime(text_format), dtype=object)
    # factorize gives code -1 to missing values; they become None.
    formatted = np.concatenate([texts, np.array([None], dtype=object)])[codes]
    return pd.Series(formatted, index=column.index, dtype=object)


def _chunks(plan: pd.DataFrame) -> Iterator[pd.DataFrame]:
    for start in range(0, len(plan), INSERT_CHUNK_ROWS):
        yield plan.iloc[start : start + INSERT_CHUNK_ROWS]
