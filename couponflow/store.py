"""The campaign store: quarantine, ingestion ledger, allocations, grants, redemptions.

SQLite under the couponflow home by default; PostgreSQL when
``COUPONFLOW_CAMPAIGN_DB_URL`` names one. Tables are created on first use.
"""

from __future__ import annotations

from functools import lru_cache

import sqlalchemy as sa
from sqlalchemy.engine import Engine

metadata = sa.MetaData()

quarantine = sa.Table(
    "quarantine",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("batch_id", sa.String(200), nullable=False, index=True),
    sa.Column("table_name", sa.String(50), nullable=False),
    sa.Column("row_number", sa.Integer, nullable=False),
    sa.Column("expectation", sa.String(200), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("row_json", sa.Text, nullable=False),
    sa.Column("quarantined_at", sa.DateTime(timezone=True), nullable=False),
)

ingest_ledger = sa.Table(
    "ingest_ledger",
    metadata,
    sa.Column("batch_id", sa.String(200), primary_key=True),
    sa.Column("table_name", sa.String(50), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("rows_in", sa.Integer, nullable=False),
    sa.Column("rows_accepted", sa.Integer, nullable=False),
    sa.Column("rows_quarantined", sa.Integer, nullable=False),
    sa.Column("ingested_at", sa.DateTime(timezone=True), nullable=False),
)

# One row per (campaign, version); `is_current` marks the version readers see. The
# flip of `is_current` and the insert of the new version's rows share one
# transaction, so a reader sees the whole previous version or the whole new one.
allocation_versions = sa.Table(
    "allocation_versions",
    metadata,
    sa.Column("campaign_id", sa.String(100), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("is_current", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("model_uri", sa.String(300), nullable=False),
    sa.Column("budget_cents", sa.BigInteger, nullable=False),
    sa.Column("params_json", sa.Text, nullable=False),
)

allocations = sa.Table(
    "allocations",
    metadata,
    sa.Column("campaign_id", sa.String(100), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("user_id", sa.String(100), primary_key=True),
    # "holdout" for the randomized holdout, "treatment" for the rest.
    sa.Column("group_name", sa.String(20), nullable=False),
    # A coupon id, or "control" when the user gets nothing.
    sa.Column("arm", sa.String(100), nullable=False),
    # The arm the policy chose before the holdout draw (the withheld coupon for a
    # holdout user), so each arm is compared with holdout users like its own.
    sa.Column("policy_arm", sa.String(100), nullable=False),
    sa.Column("channel", sa.String(20), nullable=True),
    sa.Column("send_at", sa.DateTime(timezone=True), nullable=True),
    # Probability that the policy gives this user this arm.
    sa.Column("propensity", sa.Float, nullable=False),
    # Model's predicted uplift in conversion probability for the arm the policy
    # would choose (also stored for holdout users, for Qini on the holdout).
    sa.Column("score_uplift", sa.Float, nullable=False),
    sa.Column("expected_profit_cents", sa.BigInteger, nullable=False),
    sa.Column("expected_cost_cents", sa.BigInteger, nullable=False),
)

grants = sa.Table(
    "grants",
    metadata,
    sa.Column("grant_id", sa.String(64), primary_key=True),
    sa.Column("campaign_id", sa.String(100), nullable=False),
    sa.Column("user_id", sa.String(100), nullable=False),
    sa.Column("coupon_id", sa.String(100), nullable=False),
    sa.Column("granted_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("campaign_id", "user_id", name="uq_grant_campaign_user"),
)

redemptions = sa.Table(
    "redemptions",
    metadata,
    sa.Column("grant_id", sa.String(64), primary_key=True),
    sa.Column("redeemed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("order_cents", sa.BigInteger, nullable=False),
    sa.Column("discount_cents", sa.BigInteger, nullable=False),
)

coupon_stock = sa.Table(
    "coupon_stock",
    metadata,
    sa.Column("campaign_id", sa.String(100), primary_key=True),
    sa.Column("coupon_id", sa.String(100), primary_key=True),
    sa.Column("remaining", sa.BigInteger, nullable=False),
)


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    """Return an engine for ``url`` with every table created."""
    kwargs: dict[str, object] = {"future": True}
    if url.startswith("sqlite"):
        # Waits up to 30 s on a locked database instead of failing at once.
        kwargs["connect_args"] = {"timeout": 30}
    else:
        kwargs["pool_pre_ping"] = True
    engine = sa.create_engine(url, **kwargs)
    metadata.create_all(engine)
    return engine
