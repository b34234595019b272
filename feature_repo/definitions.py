"""Feast definitions: the user entity, three feature views and the model's service.

Source paths come from couponflow settings (COUPONFLOW_HOME, COUPONFLOW_FEATURE_DIR).
"""

from __future__ import annotations

from datetime import timedelta
from typing import NamedTuple

from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.types import Float64, Int64, String

from couponflow.features import FEATURES_FILE, INTEREST_FILE
from couponflow.interest import INTEREST_COLUMNS
from couponflow.schemas import CATEGORIES
from couponflow.settings import Settings, get_settings

PROFILES_FILE = "user_profiles.parquet"

# Training retrieval joins no snapshot older than the ttl before an entity row, so
# a stalled feature pipeline gives missing features rather than stale ones. The
# online store of Feast 0.67 returns values of any age.
USER_FEATURES_TTL = timedelta(days=30)
# NOTE: 90 days assumes the profile model is retrained at least once a quarter.
USER_PROFILE_TTL = timedelta(days=90)
# The interest scores are computed on the same snapshots as the user features.
USER_INTEREST_TTL = USER_FEATURES_TTL


class Definitions(NamedTuple):
    """Every Feast object of the repository, built for one settings object."""

    user: Entity
    user_features_source: FileSource
    user_profile_source: FileSource
    user_interest_source: FileSource
    user_features: FeatureView
    user_profile: FeatureView
    user_interest: FeatureView
    response_model_v1: FeatureService


def build_definitions(settings: Settings) -> Definitions:
    """Build the Feast objects whose sources live in ``settings.feature_dir``."""
    assert settings.feature_dir is not None
    feature_dir = settings.feature_dir.resolve()

    user = Entity(
        name="user",
        join_keys=["user_id"],
        value_type=ValueType.STRING,
        description="A shopper of the online store.",
    )

    user_features_source = FileSource(
        name="user_features_source",
        path=str(feature_dir / FEATURES_FILE),
        timestamp_field="event_timestamp",
        created_timestamp_column="created_timestamp",
        description="Behaviour snapshots from couponflow.features.",
    )
    user_profile_source = FileSource(
        name="user_profile_source",
        path=str(feature_dir / PROFILES_FILE),
        timestamp_field="event_timestamp",
        created_timestamp_column="created_timestamp",
        description="Per-user outputs of the profile model.",
    )
    user_interest_source = FileSource(
        name="user_interest_source",
        path=str(feature_dir / INTEREST_FILE),
        timestamp_field="event_timestamp",
        created_timestamp_column="created_timestamp",
        description="Interest snapshots from couponflow.features.",
    )

    user_features = FeatureView(
        name="user_features",
        entities=[user],
        ttl=USER_FEATURES_TTL,
        schema=[
            Field(name="user_id", dtype=String),
            Field(name="recency_days", dtype=Float64),
            Field(name="frequency_30d", dtype=Int64),
            Field(name="spend_30d_cents", dtype=Int64),
            Field(name="aov_cents", dtype=Int64),
            Field(name="events_30d", dtype=Int64),
            Field(name="sessions_30d", dtype=Int64),
            Field(name="browse_seconds_30d", dtype=Float64),
            Field(name="click_depth", dtype=Float64),
            Field(name="cart_rate", dtype=Float64),
            *[
                Field(name=f"affinity_{category}", dtype=Float64)
                for category in CATEGORIES
            ],
            Field(name="top_category", dtype=String),
            Field(name="peak_hour", dtype=Int64),
            Field(name="hour_share_night", dtype=Float64),
            Field(name="hour_share_morning", dtype=Float64),
            Field(name="hour_share_afternoon", dtype=Float64),
            Field(name="hour_share_evening", dtype=Float64),
            Field(name="days_since_signup", dtype=Float64),
            Field(
                name="orders_90d", dtype=Int64, description="Sessions with a purchase."
            ),
            Field(name="views_per_session_30d", dtype=Float64),
            Field(
                name="view_price_index_90d",
                dtype=Float64,
                description="Viewed prices over the category's typical price; 0: none.",
            ),
            Field(name="uses_app", dtype=Int64, description="1: device is the app."),
        ],
        online=True,
        source=user_features_source,
        description="Point-in-time behaviour of a user over the last 30 and 90 days.",
    )
    user_profile = FeatureView(
        name="user_profile",
        entities=[user],
        ttl=USER_PROFILE_TTL,
        schema=[
            Field(name="user_id", dtype=String),
            Field(name="purchasing_power", dtype=Float64),
            Field(name="segment", dtype=Int64),
            Field(name="interest_tags", dtype=String, description="Comma-joined."),
        ],
        online=True,
        source=user_profile_source,
        description="Purchasing power, segment and interests from the profile model.",
    )
    user_interest = FeatureView(
        name="user_interest",
        entities=[user],
        ttl=USER_INTEREST_TTL,
        schema=[
            Field(name="user_id", dtype=String),
            *[Field(name=column, dtype=Float64) for column in INTEREST_COLUMNS],
        ],
        online=True,
        source=user_interest_source,
        description=(
            "Point-in-time interest in each category, in [0, 1], from matrix "
            "factorization of events. Users without events get the population mean."
        ),
    )

    response_model_v1 = FeatureService(
        name="response_model_v1",
        features=[user_features, user_profile, user_interest],
        description="Inputs of the coupon response model.",
    )
    return Definitions(
        user=user,
        user_features_source=user_features_source,
        user_profile_source=user_profile_source,
        user_interest_source=user_interest_source,
        user_features=user_features,
        user_profile=user_profile,
        user_interest=user_interest,
        response_model_v1=response_model_v1,
    )


# Module-level objects, read by the `feast` command line, with source paths from
# the COUPONFLOW_* environment. couponflow.feature_store builds its own copies
# with build_definitions for the settings it is given.
_definitions = build_definitions(get_settings())
user = _definitions.user
user_features_source = _definitions.user_features_source
user_profile_source = _definitions.user_profile_source
user_interest_source = _definitions.user_interest_source
user_features = _definitions.user_features
user_profile = _definitions.user_profile
user_interest = _definitions.user_interest
response_model_v1 = _definitions.response_model_v1
