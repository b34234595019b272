"""Data contracts of the raw tables, shared by the simulator, adapters and ingestion.

Money columns are int64 cents; timestamp columns are ``datetime64[ns, UTC]``. Ids are
strings, so that a user whose id is ``"0"`` stays distinct from a missing id.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

EVENT_TYPES: tuple[str, ...] = ("view", "click", "add_to_cart", "purchase", "review")
COUPON_KINDS: tuple[str, ...] = ("amount_off", "percent_off", "free_shipping")
CHANNELS: tuple[str, ...] = ("email", "push", "sms")
CATEGORIES: tuple[str, ...] = (
    "electronics",
    "fashion",
    "home",
    "beauty",
    "grocery",
    "sports",
)
ALL_CATEGORIES = "all"
CONTROL_ARM = "control"
UTC_TS = "datetime64[ns, UTC]"


@dataclass(frozen=True)
class TableSchema:
    """Columns, dtypes and keys of one raw table."""

    name: str
    columns: dict[str, str]
    key: tuple[str, ...]
    required: tuple[str, ...]
    # Column whose UTC date partitions the table in the offline store.
    partition_ts: str

    def empty_frame(self) -> pd.DataFrame:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in self.columns.items()})


USERS = TableSchema(
    name="users",
    columns={
        "user_id": "string",
        "signup_ts": UTC_TS,
        "region": "string",
        "device": "string",
    },
    key=("user_id",),
    required=("user_id", "signup_ts"),
    partition_ts="signup_ts",
)

EVENTS = TableSchema(
    name="events",
    columns={
        "event_id": "string",
        "user_id": "string",
        "event_ts": UTC_TS,
        "event_type": "string",
        "item_id": "string",
        "category": "string",
        "price_cents": "int64",
        "quantity": "int64",
        "session_id": "string",
        "dwell_seconds": "float64",
    },
    key=("event_id",),
    required=("event_id", "user_id", "event_ts", "event_type", "session_id"),
    partition_ts="event_ts",
)

COUPONS = TableSchema(
    name="coupons",
    columns={
        "coupon_id": "string",
        "kind": "string",
        # Cents for amount_off, basis points for percent_off, shipping cents waived
        # for free_shipping.
        "value": "int64",
        "min_spend_cents": "int64",
        "category": "string",
        "valid_days": "int64",
        "stock": "int64",
        # Comma-separated subset of CHANNELS.
        "channels": "string",
        "starts_at": UTC_TS,
        "ends_at": UTC_TS,
    },
    key=("coupon_id",),
    required=("coupon_id", "kind", "value", "min_spend_cents", "starts_at", "ends_at"),
    partition_ts="starts_at",
)

EXPOSURES = TableSchema(
    name="exposures",
    columns={
        "campaign_id": "string",
        "user_id": "string",
        # A coupon id, or CONTROL_ARM.
        "arm": "string",
        "channel": "string",
        "send_at": UTC_TS,
        # Probability that the logging policy chose this arm for this user.
        "propensity": "float64",
        "policy": "string",
    },
    key=("campaign_id", "user_id"),
    required=("campaign_id", "user_id", "arm", "send_at", "propensity"),
    partition_ts="send_at",
)

OUTCOMES = TableSchema(
    name="outcomes",
    columns={
        "campaign_id": "string",
        "user_id": "string",
        "observed_at": UTC_TS,
        "opened": "bool",
        "clicked": "bool",
        "visited": "bool",
        "redeemed": "bool",
        "converted": "bool",
        "revenue_cents": "int64",
        "discount_cents": "int64",
    },
    key=("campaign_id", "user_id"),
    required=("campaign_id", "user_id", "observed_at", "converted", "revenue_cents"),
    partition_ts="observed_at",
)

TABLES: dict[str, TableSchema] = {
    t.name: t for t in (USERS, EVENTS, COUPONS, EXPOSURES, OUTCOMES)
}


def coerce(frame: pd.DataFrame, schema: TableSchema) -> pd.DataFrame:
    """Return ``frame`` with the schema's columns in order and cast to their dtypes.

    Raises ``KeyError`` naming the missing columns. Only for frames this project
    wrote; raw batches from outside go through the quality suite instead.
    """
    missing = [c for c in schema.columns if c not in frame.columns]
    if missing:
        raise KeyError(f"{schema.name}: missing columns {missing}")
    out = frame[list(schema.columns)].copy()
    for column, dtype in schema.columns.items():
        if dtype == UTC_TS:
            out[column] = pd.to_datetime(out[column], utc=True)
        else:
            out[column] = out[column].astype(dtype)  # type: ignore[call-overload]
    return out
