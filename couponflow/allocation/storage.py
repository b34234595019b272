"""Versioned campaign plans in the campaign store, each made current atomically."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from couponflow.allocation.bulk import check_dialect, insert_plan_rows, read_rows
from couponflow.allocation.campaign import HOLDOUT, PLAN_COLUMNS, TREATMENT
from couponflow.allocation.solver import validate_budget
from couponflow.schemas import CHANNELS, UTC_TS
from couponflow.store import allocation_versions, allocations

log = logging.getLogger(__name__)


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
        check_dialect(connection)
        if connection.dialect.name == "postgresql":
            # Serializes writers of one campaign, so two cannot pick the same version.
            connection.execute(
                sa.text("SELECT pg_advisory_xact_lock(:key)"),
                {"key": _lock_key(campaign_id)},
            )
        version = _insert_version_row(
            connection, campaign_id, model_uri, budget, params_json
        )
        insert_plan_rows(connection, campaign_id, version, plan)
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
    """Return the current version's plan rows sorted by user_id, with its version.

    One SELECT joins the rows to the current version, so the result is a single
    consistent version even while a writer replaces it. Returns an empty frame
    when the campaign has no version.
    """
    with engine.begin() as connection:
        check_dialect(connection)
        sqlite = connection.dialect.name == "sqlite"
        frame = read_rows(connection, _current_rows_statement(campaign_id, sqlite))
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


def _current_rows_statement(campaign_id: str, sqlite: bool) -> sa.Select:
    rows = allocations.alias("plan")
    versions = allocation_versions.alias("versions")
    # Byte order of UTF-8 is code-point order: SQLite's BINARY collation, and "C"
    # on PostgreSQL whatever the database's default collation.
    user_order = rows.c.user_id if sqlite else rows.c.user_id.collate("C")
    columns: list[Any] = [rows.c[name] for name in PLAN_COLUMNS]
    if sqlite:
        # pandas parses the whole column at once, much faster than row by row.
        send_at = list(PLAN_COLUMNS).index("send_at")
        columns[send_at] = sa.type_coerce(rows.c.send_at, sa.String).label("send_at")
    return (
        sa.select(*columns, rows.c.version)
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
        .order_by(user_order)
    )


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
    channels = frame["channel"].dropna()
    if not channels.isin(CHANNELS).all():
        bad = sorted(set(channels) - set(CHANNELS))
        raise ValueError(f"channel must be one of {CHANNELS} or missing, got {bad}")
    propensity = frame["propensity"]
    if ((propensity <= 0) | (propensity > 1)).any():
        raise ValueError("propensity must be in (0, 1] for every row")
    return _coerce_plan(frame)


def _coerce_plan(frame: pd.DataFrame) -> pd.DataFrame:
    plan = frame[list(PLAN_COLUMNS)].copy()
    for column, dtype in PLAN_COLUMNS.items():
        if dtype == UTC_TS:
            # SQLite stores naive text, which is UTC because every stored time is.
            plan[column] = pd.to_datetime(plan[column], utc=True, format="ISO8601")
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
