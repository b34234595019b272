"""Tests of couponflow.feature_store against real Feast stores in tmp_path."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from feast import FeatureView, Field
from feast.types import Float64
from feast.value_type import ValueType

from couponflow import feature_store, lake
from couponflow.features import (
    FEATURE_COLUMNS,
    INTEREST_LOOKBACK,
    compute_user_features,
    compute_user_interest,
    write_user_features,
    write_user_interest,
)
from couponflow.interest import INTEREST_COLUMNS, compute_interest
from couponflow.schemas import CATEGORIES, EVENT_TYPES, EVENTS, USERS, coerce
from couponflow.settings import Settings

START = datetime(2025, 3, 1, tzinfo=UTC)
DAY = timedelta(days=1)
AS_OF = [START + 10 * DAY, START + 20 * DAY, START + 30 * DAY]
FEATURE_NAMES = [
    name
    for name in FEATURE_COLUMNS
    if name not in ("user_id", "event_timestamp", "created_timestamp")
]
PROFILE_NAMES = ["purchasing_power", "segment", "interest_tags"]
INTEREST_NAMES = list(INTEREST_COLUMNS)
VIEW_NAMES = ["user_features", "user_interest", "user_profile"]
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def synthetic_lake(settings: Settings) -> None:
    """Write users 0-5 (5 without events) and random events over 30 days.

    Each category has ten items, so that the interest factorization has items of
    every category to score.
    """
    rng = np.random.default_rng(3)
    user_ids = [str(number) for number in range(6)]
    users = pd.DataFrame(
        {
            "user_id": user_ids,
            "signup_ts": [START - 60 * DAY] * 6,
            "region": "eu",
            "device": "app",
        }
    )
    count = 600
    owners = rng.choice(user_ids[:5], count)
    offsets = rng.integers(0, 30 * 86_400, count)
    categories = rng.choice(CATEGORIES, count)
    numbers = rng.integers(0, 10, count)
    items = [f"{c}-{n}" for c, n in zip(categories, numbers, strict=True)]
    events = pd.DataFrame(
        {
            "event_id": [f"e-{number}" for number in range(count)],
            "user_id": owners,
            "event_ts": pd.Timestamp(START) + pd.to_timedelta(offsets, unit="s"),
            "event_type": rng.choice(EVENT_TYPES, count),
            "item_id": items,
            "category": categories,
            "price_cents": rng.integers(100, 5_000, count),
            "quantity": 1,
            "session_id": [
                f"{owner}-{offset // 3_600}"
                for owner, offset in zip(owners, offsets, strict=True)
            ],
            "dwell_seconds": 12.5,
        }
    )
    lake.write_lake_partitions(settings, USERS, "users", coerce(users, USERS))
    lake.write_lake_partitions(settings, EVENTS, "events", coerce(events, EVENTS))


@pytest.fixture(scope="module")
def lake_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    settings = Settings(home=tmp_path_factory.mktemp("lake"), dask_workers=1)
    synthetic_lake(settings)
    return settings


@pytest.fixture(scope="module")
def features(lake_settings: Settings) -> pd.DataFrame:
    return compute_user_features(lake_settings, AS_OF)


@pytest.fixture(scope="module")
def interest(lake_settings: Settings) -> pd.DataFrame:
    return compute_user_interest(lake_settings, AS_OF)


@pytest.fixture
def settings(
    tmp_path: Path, features: pd.DataFrame, interest: pd.DataFrame
) -> Settings:
    configured = Settings(home=tmp_path)
    write_user_features(configured, features)
    write_user_interest(configured, interest)
    return configured


def snapshot(features: pd.DataFrame, user_id: str, as_of: datetime) -> pd.Series:
    rows = features[
        (features["user_id"] == user_id)
        & (features["event_timestamp"] == pd.Timestamp(as_of))
    ]
    assert len(rows) == 1
    return rows.iloc[0]


def assert_features_equal(actual: pd.Series, expected: pd.Series) -> None:
    for name in FEATURE_NAMES:
        if isinstance(expected[name], float):
            assert actual[name] == pytest.approx(expected[name]), name
        else:
            assert actual[name] == expected[name], name


def write_profiles(settings: Settings, frame: pd.DataFrame) -> None:
    assert settings.feature_dir is not None
    path = settings.feature_dir / "user_profiles.parquet"
    temporary = path.with_name("profiles.tmp")
    frame.astype(feature_store.PROFILE_COLUMNS).to_parquet(temporary, index=False)
    os.replace(temporary, path)


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def unique_project() -> str:
    return f"couponflow_test_{uuid.uuid4().hex[:10]}"


def test_definitions_are_registered(settings: Settings) -> None:
    feature_store.apply_definitions(settings)
    store = feature_store.get_store(settings)

    user = store.get_entity("user")
    assert user.join_key == "user_id"
    assert user.value_type == ValueType.STRING
    views = {view.name: view for view in store.list_feature_views()}
    assert sorted(views) == VIEW_NAMES
    assert views["user_features"].ttl == timedelta(days=30)
    assert views["user_interest"].ttl == timedelta(days=30)
    assert [f.name for f in views["user_features"].features] == FEATURE_NAMES
    assert [f.name for f in views["user_profile"].features] == PROFILE_NAMES
    assert [f.name for f in views["user_interest"].features] == INTEREST_NAMES
    service = store.get_feature_service("response_model_v1")
    assert [p.name for p in service.feature_view_projections] == [
        "user_features",
        "user_profile",
        "user_interest",
    ]


def test_python_names_equal_registered_names(settings: Settings) -> None:
    definitions = feature_store.load_definitions(settings)
    # The module-level objects that the `feast` command line reads.
    module = feature_store._definitions_module()

    for name, value in definitions._asdict().items():
        assert value.name == name
        assert getattr(module, name).name == name


def test_sources_follow_settings(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, feature_dir=tmp_path / "elsewhere")

    definitions = feature_store.load_definitions(settings)

    assert definitions.user_features_source.path == str(
        (tmp_path / "elsewhere" / "user_features.parquet").resolve()
    )
    assert definitions.user_profile_source.path == str(
        (tmp_path / "elsewhere" / "user_profiles.parquet").resolve()
    )


def test_yaml_written_for_settings(settings: Settings) -> None:
    feature_store.get_store(settings)

    path = settings.home / "feast" / "feature_store.yaml"
    config = yaml.safe_load(path.read_text())
    assert config["project"] == "couponflow"
    assert config["provider"] == "local"
    assert config["registry"]["registry_type"] == "sql"
    registry_path = (settings.home / "feast" / "registry.db").resolve()
    assert config["registry"]["path"] == f"sqlite:///{registry_path}"
    assert config["online_store"] == {
        "type": "sqlite",
        "path": str(settings.feast_online_path.resolve()),
    }
    assert config["offline_store"] == {"type": "file"}
    assert config["entity_key_serialization_version"] == 3


def test_config_rejects_unknown_stores(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'sqlite' or 'redis'"):
        feature_store.store_config(Settings(home=tmp_path, feast_online_store="dynamo"))
    with pytest.raises(ValueError, match="host:port"):
        feature_store.store_config(
            Settings(
                home=tmp_path,
                feast_online_store="redis",
                feast_redis_url="redis://127.0.0.1:6379",
            )
        )
    with pytest.raises(ValueError, match="unsupported Feast registry"):
        feature_store.store_config(
            Settings(home=tmp_path, feast_registry="s3://bucket/registry.pb")
        )


def test_apply_deletes_stale_views(settings: Settings) -> None:
    feature_store.apply_definitions(settings)
    store = feature_store.get_store(settings)
    definitions = feature_store.load_definitions(settings)
    stale = FeatureView(
        name="stale_view",
        entities=[definitions.user],
        ttl=timedelta(days=1),
        schema=[Field(name="recency_days", dtype=Float64)],
        source=definitions.user_features_source,
    )
    store.apply([stale])
    assert "stale_view" in [view.name for view in store.list_feature_views()]

    feature_store.apply_definitions(settings)

    names = [view.name for view in store.list_feature_views(allow_cache=False)]
    assert sorted(names) == VIEW_NAMES


def test_user_zero_round_trips_online(
    settings: Settings, features: pd.DataFrame
) -> None:
    feature_store.apply_definitions(settings)
    feature_store.materialize(settings, AS_OF[-1])

    online = feature_store.online_features(settings, ["0"])

    assert online["user_id"].tolist() == ["0"]
    assert_features_equal(online.iloc[0], snapshot(features, "0", AS_OF[-1]))


def test_online_unknown_user_is_null(settings: Settings) -> None:
    feature_store.apply_definitions(settings)
    feature_store.materialize(settings, AS_OF[-1])

    online = feature_store.online_features(settings, ["0", "nobody", "1"])

    assert online["user_id"].tolist() == ["0", "nobody", "1"]
    assert list(online.columns) == [
        "user_id",
        *FEATURE_NAMES,
        *PROFILE_NAMES,
        *INTEREST_NAMES,
    ]
    assert online.loc[1, FEATURE_NAMES].isna().all()
    assert online.loc[[0, 2], "events_30d"].notna().all()
    assert str(online["spend_30d_cents"].dtype) == "Int64"


def test_online_without_users_is_empty(settings: Settings) -> None:
    feature_store.apply_definitions(settings)

    online = feature_store.online_features(settings, [])

    assert online.empty
    assert list(online.columns) == [
        "user_id",
        *FEATURE_NAMES,
        *PROFILE_NAMES,
        *INTEREST_NAMES,
    ]


def test_training_frame_keeps_every_entity_row(
    settings: Settings, features: pd.DataFrame
) -> None:
    feature_store.apply_definitions(settings)
    entity_df = pd.DataFrame(
        {
            "user_id": ["0", "0", "1", "0", "2", "nobody"],
            "event_timestamp": [
                AS_OF[1],
                AS_OF[1],
                AS_OF[1] + timedelta(hours=5),
                AS_OF[0] - timedelta(hours=1),
                AS_OF[2] + 31 * DAY,
                AS_OF[2],
            ],
            "label": [1, 2, 3, 4, 5, 6],
        },
        index=[10, 11, 12, 13, 14, 15],
    )

    frame = feature_store.training_frame(settings, entity_df)

    assert len(frame) == len(entity_df)
    assert frame.index.tolist() == entity_df.index.tolist()
    assert frame["label"].tolist() == [1, 2, 3, 4, 5, 6]
    assert frame["user_id"].tolist() == entity_df["user_id"].tolist()
    expected = snapshot(features, "0", AS_OF[1])
    assert_features_equal(frame.loc[10], expected)
    assert_features_equal(frame.loc[11], expected)
    # A row between two snapshots gets the earlier one.
    assert_features_equal(frame.loc[12], snapshot(features, "1", AS_OF[1]))
    # Before the first snapshot, past the 30-day ttl, and an unknown user: null.
    for index in (13, 14, 15):
        assert frame.loc[index, FEATURE_NAMES].isna().all(), index
    assert str(frame["frequency_30d"].dtype) == "Int64"


def test_training_frame_rejects_bad_entity_df(settings: Settings) -> None:
    feature_store.apply_definitions(settings)
    naive = pd.DataFrame({"user_id": ["0"], "event_timestamp": [datetime(2025, 3, 5)]})
    clash = pd.DataFrame(
        {"user_id": ["0"], "event_timestamp": [AS_OF[0]], "segment": [1]}
    )

    with pytest.raises(ValueError, match="timezone-naive"):
        feature_store.training_frame(settings, naive)
    with pytest.raises(ValueError, match="missing columns"):
        feature_store.training_frame(settings, naive[["user_id"]])
    with pytest.raises(ValueError, match="segment"):
        feature_store.training_frame(settings, clash)


def interest_row(interest: pd.DataFrame, user_id: str, as_of: datetime) -> pd.Series:
    rows = interest[
        (interest["user_id"] == user_id)
        & (interest["event_timestamp"] == pd.Timestamp(as_of))
    ]
    assert len(rows) == 1
    return rows.iloc[0][INTEREST_NAMES].astype("float64")


def test_training_frame_joins_interest_point_in_time(
    settings: Settings, interest: pd.DataFrame, lake_settings: Settings
) -> None:
    feature_store.apply_definitions(settings)
    entity_df = pd.DataFrame(
        {
            "user_id": ["0", "0", "1", "5", "0"],
            "event_timestamp": [
                AS_OF[0],
                AS_OF[2],
                AS_OF[1] + timedelta(hours=5),
                AS_OF[2],
                AS_OF[0] - timedelta(hours=1),
            ],
        }
    )

    frame = feature_store.training_frame(settings, entity_df)

    for name in INTEREST_NAMES:
        assert str(frame[name].dtype) == "float64", name
    np.testing.assert_allclose(
        frame.loc[0, INTEREST_NAMES].astype("float64"),
        interest_row(interest, "0", AS_OF[0]),
    )
    np.testing.assert_allclose(
        frame.loc[1, INTEREST_NAMES].astype("float64"),
        interest_row(interest, "0", AS_OF[2]),
    )
    # Between two snapshots: the earlier one.
    np.testing.assert_allclose(
        frame.loc[2, INTEREST_NAMES].astype("float64"),
        interest_row(interest, "1", AS_OF[1]),
    )
    # User 5 has no events, so it gets the mean of the users with events.
    latest = interest[interest["event_timestamp"] == pd.Timestamp(AS_OF[2])]
    with_events = latest[latest["user_id"] != "5"][INTEREST_NAMES].mean()
    np.testing.assert_allclose(
        frame.loc[3, INTEREST_NAMES].astype("float64"), with_events
    )
    # Before the first snapshot: null.
    assert frame.loc[4, INTEREST_NAMES].isna().all()

    # The first snapshot is a fit on the events before it only: the same as a fit
    # of the lake's events at that time, and different from the last snapshot.
    events = lake.read_lake_table(lake_settings, "events")
    users = lake.read_lake_table(lake_settings, "users")
    first = compute_interest(events, users, AS_OF[0], lookback=INTEREST_LOOKBACK)
    expected = first.set_index("user_id").loc["0", INTEREST_NAMES]
    np.testing.assert_allclose(
        frame.loc[0, INTEREST_NAMES].astype("float64"), expected.astype("float64")
    )
    first_values = frame.loc[0, INTEREST_NAMES].to_numpy(dtype="float64")
    last_values = frame.loc[1, INTEREST_NAMES].to_numpy(dtype="float64")
    assert not np.allclose(first_values, last_values)


def test_interest_materialized_online(
    settings: Settings, interest: pd.DataFrame
) -> None:
    feature_store.apply_definitions(settings)
    feature_store.materialize(settings, AS_OF[-1])

    online = feature_store.online_features(settings, ["0", "5", "nobody"])

    np.testing.assert_allclose(
        online.loc[0, INTEREST_NAMES].astype("float64"),
        interest_row(interest, "0", AS_OF[-1]),
    )
    np.testing.assert_allclose(
        online.loc[1, INTEREST_NAMES].astype("float64"),
        interest_row(interest, "5", AS_OF[-1]),
    )
    assert online.loc[2, INTEREST_NAMES].isna().all()


def test_missing_interest_file_is_created_empty(
    tmp_path: Path, features: pd.DataFrame
) -> None:
    settings = Settings(home=tmp_path)
    write_user_features(settings, features)
    assert settings.feature_dir is not None
    path = settings.feature_dir / "user_interest.parquet"
    assert not path.exists()

    feature_store.apply_definitions(settings)
    feature_store.materialize(settings, AS_OF[-1])
    entity_df = pd.DataFrame({"user_id": ["0"], "event_timestamp": [AS_OF[-1]]})
    frame = feature_store.training_frame(settings, entity_df)

    assert pd.read_parquet(path).empty
    assert frame.loc[0, INTEREST_NAMES].isna().all()
    assert frame.loc[0, "events_30d"] > 0


def test_missing_profile_file_is_created_empty(settings: Settings) -> None:
    assert settings.feature_dir is not None
    path = settings.feature_dir / "user_profiles.parquet"
    assert not path.exists()

    feature_store.apply_definitions(settings)
    feature_store.materialize(settings, AS_OF[-1])
    entity_df = pd.DataFrame({"user_id": ["0"], "event_timestamp": [AS_OF[-1]]})
    frame = feature_store.training_frame(settings, entity_df)

    assert pd.read_parquet(path).empty
    assert frame.loc[0, PROFILE_NAMES].isna().all()
    assert frame.loc[0, "events_30d"] > 0


def test_written_profiles_are_served(settings: Settings) -> None:
    feature_store.apply_definitions(settings)
    profiles = pd.DataFrame(
        {
            "user_id": ["0", "1"],
            "event_timestamp": [AS_OF[1], AS_OF[1]],
            "created_timestamp": [AS_OF[1], AS_OF[1]],
            "purchasing_power": [0.8, 0.2],
            "segment": [3, 1],
            "interest_tags": ["home,beauty", "sports"],
        }
    )
    write_profiles(settings, profiles)

    feature_store.materialize(settings, AS_OF[-1])
    online = feature_store.online_features(settings, ["1", "0"])
    entity_df = pd.DataFrame(
        {
            "user_id": ["0", "0"],
            "event_timestamp": [AS_OF[-1], AS_OF[0] + timedelta(hours=1)],
        }
    )
    frame = feature_store.training_frame(settings, entity_df)

    assert online["segment"].tolist() == [1, 3]
    assert online["interest_tags"].tolist() == ["sports", "home,beauty"]
    assert frame.loc[0, "purchasing_power"] == pytest.approx(0.8)
    # Before the first profile row: no profile, but the behaviour features remain.
    assert frame.loc[1, PROFILE_NAMES].isna().all()
    assert frame.loc[1, "events_30d"] > 0


def test_existing_profile_file_is_kept(settings: Settings) -> None:
    profiles = pd.DataFrame(
        {
            "user_id": ["0"],
            "event_timestamp": [AS_OF[0]],
            "created_timestamp": [AS_OF[0]],
            "purchasing_power": [0.5],
            "segment": [2],
            "interest_tags": ["home"],
        }
    )
    write_profiles(settings, profiles)

    path = feature_store.ensure_profile_source(settings)

    assert pd.read_parquet(path)["segment"].tolist() == [2]


def test_materialize_needs_aware_end_and_features(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)

    with pytest.raises(ValueError, match="timezone-naive"):
        feature_store.materialize(settings, datetime(2025, 4, 1))
    with pytest.raises(FileNotFoundError, match="compute_user_features"):
        feature_store.materialize(settings, AS_OF[-1])


@pytest.fixture
def redis_settings(tmp_path: Path, features: pd.DataFrame) -> Iterator[Settings]:
    if not reachable(REDIS_HOST, REDIS_PORT):
        pytest.skip(f"no Redis server at {REDIS_HOST}:{REDIS_PORT}")
    configured = Settings(
        home=tmp_path,
        feast_online_store="redis",
        feast_redis_url=f"{REDIS_HOST}:{REDIS_PORT}",
    )
    write_user_features(configured, features)
    yield configured


def test_redis_online_store(redis_settings: Settings, features: pd.DataFrame) -> None:
    project = unique_project()
    feature_store.apply_definitions(redis_settings, project=project)
    store = feature_store.get_store(redis_settings, project=project)
    try:
        feature_store.materialize(redis_settings, AS_OF[-1], project=project)
        online = feature_store.online_features(
            redis_settings, ["0", "nobody"], project=project
        )
    finally:
        # Removes this project's Redis keys; the registry is the test's own SQLite.
        store.teardown()

    assert store.config.online_store.type == "redis"
    assert_features_equal(online.iloc[0], snapshot(features, "0", AS_OF[-1]))
    assert online.loc[1, FEATURE_NAMES].isna().all()


def postgres_reachable() -> bool:
    import psycopg

    try:
        with psycopg.connect(
            "postgresql://postgres@127.0.0.1:5432/test", connect_timeout=2
        ):
            return True
    except psycopg.Error:
        return False


def test_postgres_registry(tmp_path: Path, features: pd.DataFrame) -> None:
    if not postgres_reachable():
        pytest.skip("no PostgreSQL database 'test' at 127.0.0.1:5432 for user postgres")
    settings = Settings(home=tmp_path, feast_registry=POSTGRES_URL)
    write_user_features(settings, features)
    project = unique_project()
    store = feature_store.get_store(settings, project=project)
    try:
        feature_store.apply_definitions(settings, project=project)
        views = store.list_feature_views(allow_cache=False)
        entity_df = pd.DataFrame({"user_id": ["0"], "event_timestamp": [AS_OF[1]]})
        frame = feature_store.training_frame(settings, entity_df, project=project)
    finally:
        # Only this project: the database may hold other projects' registries.
        store.registry.delete_project(project, commit=True)

    assert store.config.registry.path == POSTGRES_URL
    assert sorted(view.name for view in views) == VIEW_NAMES
    assert_features_equal(frame.iloc[0], snapshot(features, "0", AS_OF[1]))
