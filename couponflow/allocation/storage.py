"""Versioned campaign plans in the campaign store, each made current atomically."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from couponflow.allocation.campaign import HOLDOUT, PLAN_COLUMNS, TREATMENT
from couponflow.allocation.solver import validate_budget
from couponflow.schemas import UTC_TS
from couponflow.store import allocation_versions, allocations

log = logging.getLogger(__name__)

# Rows per executemany batch, or per COPY write on PostgreSQL.
INSERT_CHUNK_ROWS = 50_000


def write_allocation(
    engine: Engine,
    campaign_id: str,
    frame: pd.DataFrame,
    model_uri: str,
    budget_cents: int,
    params: Mapping[str, Any],
) -> int:
    """Store ``frame`` as the next version of ``campaign_id`` and make it current.

    The version row, every plan row and the flip of ``is_current`` share one
    transaction, so a reader sees either the whole previous version or the whole new
    one. Older versions stay in the store. Returns the new version number (1 for a
    campaign's first plan). Raises ``ValueError`` on an invalid plan or parameters.
    """
    _validate_campaign_id(campaign_id)
    plan = _validate_plan(frame)
    budget = validate_budget(budget_cents)
    try:
        params_json = json.dumps(dict(params), sort_keys=True)
    except TypeError as error:
        raise ValueError(
            f"params must be JSON-serializable for params_json: {error}"
        ) from error

    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Serializes writers of one campaign, so two cannot pick the same version.
            connection.execute(
                sa.text("SELECT pg_advisory_xact_lock(:key)"),
                {"key": _lock_key(campaign_id)},
            )
        version = _insert_version_row(
            connection, campaign_id, model_uri, budget, params_json
        )
        _insert_plan_rows(connection, campaign_id, version, plan)
        connection.execute(
            sa.update(allocation_versions)
            .where(allocation_versions.c.campaign_id == campaign_id)
            .values(is_current=allocation_versions.c.version == version)
        )
    log.info(
        "stored allocation %s version %d with %d rows", campaign_id, version, len(plan)
    )
    return version


def read_current_allocation(engine: Engine, campaign_id: str) -> pd.DataFrame:
    """Return the current version's plan rows sorted by user_id, with a version column.

    One SELECT joins the rows to the current version, so the result is a single
    consistent version even while a writer replaces it. Returns an empty frame
    when the campaign has no version.
    """
    rows = allocations.alias("plan")
    versions = allocation_versions.alias("versions")
    statement = (
        sa.select(*(rows.c[name] for name in PLAN_COLUMNS), rows.c.version)
        .select_from(
            rows.join(
                versions,
                sa.and_(
                    rows.c.campaign_id == versions.c.campaign_id,
                    rows.c.version == versions.c.version,
                ),
            )
        )
        .where(versions.c.campaign_id == campaign_id, versions.c.is_current)
        .order_by(rows.c.user_id)
    )
    with engine.connect() as connection:
        result = connection.execute(statement).all()
    frame = pd.DataFrame(result, columns=[*PLAN_COLUMNS, "version"])
    return _coerce_plan(frame).assign(version=frame["version"].astype("int64"))


def current_version(engine: Engine, campaign_id: str) -> int | None:
    """Return the current version number of ``campaign_id``, or None if it has none."""
    statement = sa.select(allocation_versions.c.version).where(
        allocation_versions.c.campaign_id == campaign_id,
        allocation_versions.c.is_current,
    )
    with engine.connect() as connection:
        version = connection.execute(statement).scalar_one_or_none()
    return None if version is None else int(version)


def _insert_version_row(
    connection: Connection,
    campaign_id: str,
    model_uri: str,
    budget: int,
    params_json: str,
) -> int:
    # INSERT ... SELECT computes the next number in the same statement that takes
    # the write lock, so on SQLite a second writer waits instead of reusing it.
    versions = allocation_versions
    next_version = sa.select(
        sa.literal(campaign_id),
        sa.func.coalesce(sa.func.max(versions.c.version), 0) + 1,
        sa.false(),
        sa.literal(datetime.now(UTC), sa.DateTime(timezone=True)),
        sa.literal(model_uri),
        sa.literal(budget, sa.BigInteger),
        sa.literal(params_json),
    ).where(versions.c.campaign_id == campaign_id)
    connection.execute(
        versions.insert().from_select(
            [
                "campaign_id",
                "version",
                "is_current",
                "created_at",
                "model_uri",
                "budget_cents",
                "params_json",
            ],
            next_version,
        )
    )
    statement = sa.select(sa.func.max(versions.c.version)).where(
        versions.c.campaign_id == campaign_id
    )
    return int(connection.execute(statement).scalar_one())


def _insert_plan_rows(
    connection: Connection, campaign_id: str, version: int, plan: pd.DataFrame
) -> None:
    if (
        connection.dialect.name == "postgresql"
        and connection.dialect.driver == "psycopg"
    ):
        _copy_plan_rows(connection, campaign_id, version, plan)
        return
    insert = allocations.insert()
    for records in _plan_records(campaign_id, version, plan):
        connection.execute(insert, records)


def _copy_plan_rows(
    connection: Connection, campaign_id: str, version: int, plan: pd.DataFrame
) -> None:
    columns = ["campaign_id", "version", *PLAN_COLUMNS]
    copy_sql = f"COPY allocations ({', '.join(columns)}) FROM STDIN (FORMAT csv)"
    # The driver connection is the one SQLAlchemy runs this transaction on.
    cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
    with cursor.copy(copy_sql) as copy:
        for start in range(0, len(plan), INSERT_CHUNK_ROWS):
            chunk = plan.iloc[start : start + INSERT_CHUNK_ROWS]
            chunk = chunk.assign(campaign_id=campaign_id, version=version)[columns]
            buffer = io.StringIO()
            # Missing values are written unquoted and empty, which CSV COPY reads as
            # NULL. Empty strings cannot occur because user_id and arm are validated.
            chunk.to_csv(buffer, header=False, index=False)
            copy.write(buffer.getvalue())


def _plan_records(
    campaign_id: str, version: int, plan: pd.DataFrame
) -> Iterator[list[dict[str, Any]]]:
    names = list(PLAN_COLUMNS)
    for start in range(0, len(plan), INSERT_CHUNK_ROWS):
        chunk = plan.iloc[start : start + INSERT_CHUNK_ROWS]
        columns = [_python_values(chunk[name]) for name in names]
        yield [
            {
                "campaign_id": campaign_id,
                "version": version,
                **dict(zip(names, row, strict=True)),
            }
            for row in zip(*columns, strict=True)
        ]


def _python_values(column: pd.Series) -> list[Any]:
    """Return the column as Python values with None for missing ones."""
    if isinstance(column.dtype, pd.DatetimeTZDtype):
        return [None if pd.isna(v) else v.to_pydatetime() for v in column]
    values = column.astype(object).where(column.notna(), None)
    return values.tolist()


def _validate_plan(frame: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in PLAN_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(
            f"allocation frame is missing columns {missing}; build it with "
            "assign_campaign"
        )
    for column in ("user_id", "group_name", "arm", "propensity", "score_uplift"):
        if frame[column].isna().any():
            raise ValueError(f"allocation frame has missing values in {column}")
    if (frame["user_id"] == "").any() or (frame["arm"] == "").any():
        raise ValueError("allocation frame has empty user_id or arm strings")
    if frame["user_id"].duplicated().any():
        duplicated = frame.loc[frame["user_id"].duplicated(), "user_id"].iloc[0]
        raise ValueError(f"allocation frame has user_id {duplicated!r} more than once")
    groups = sorted(set(frame["group_name"]) - {HOLDOUT, TREATMENT})
    if groups:
        raise ValueError(
            f"group_name must be {HOLDOUT!r} or {TREATMENT!r}, got {groups}"
        )
    propensity = frame["propensity"]
    if ((propensity <= 0) | (propensity > 1)).any():
        raise ValueError("propensity must be in (0, 1] for every row")
    return _coerce_plan(frame)


def _coerce_plan(frame: pd.DataFrame) -> pd.DataFrame:
    plan = frame[list(PLAN_COLUMNS)].copy()
    for column, dtype in PLAN_COLUMNS.items():
        if dtype == UTC_TS:
            # SQLite returns naive datetimes; every stored time is UTC.
            plan[column] = pd.to_datetime(plan[column], utc=True)
        else:
            plan[column] = plan[column].astype(pd.api.types.pandas_dtype(dtype))
    return plan


def _validate_campaign_id(campaign_id: str) -> None:
    max_length = getattr(allocation_versions.c.campaign_id.type, "length", None)
    if not isinstance(campaign_id, str) or not campaign_id:
        raise ValueError(f"campaign_id must be a non-empty string, got {campaign_id!r}")
    if max_length is not None and len(campaign_id) > max_length:
        raise ValueError(
            f"campaign_id must be at most {max_length} characters, got "
            f"{len(campaign_id)}"
        )


def _lock_key(campaign_id: str) -> int:
    # A signed 64-bit key, as pg_advisory_xact_lock(bigint) takes.
    digest = hashlib.sha256(f"couponflow.allocation:{campaign_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)
