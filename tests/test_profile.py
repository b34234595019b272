"""Tests of the TensorFlow profile model on synthetic users with a favorite category."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from couponflow.schemas import CATEGORIES, EVENT_TYPES
from couponflow.settings import Settings
from training.profile import (
    AGE_CHANNEL,
    CATEGORY_CHANNEL,
    EMBEDDING_DIM,
    EVENT_TYPE_CHANNEL,
    HOUR_CHANNEL,
    NO_HISTORY_TOKEN,
    PRICE_CHANNEL,
    ProfileResult,
    encode_sequences,
    log_profile_model,
    train_profile_model,
    write_profile_outputs,
)
from training.registry import mlflow_tracking

AS_OF = pd.Timestamp("2026-03-01", tz="UTC")
N_USERS = 400
# Users whose ids appear in no event, to check that they still get a profile.
N_SILENT_USERS = 5
N_SEGMENTS = 4
EPOCHS = 12
SEED = 3
# Share of events in a user's favorite category; the others are spread evenly.
FAVORITE_SHARE = 0.8
# The first interest tag should be the user's favorite category for most users; a
# random guess is right for 1/6 of them. Measured: 0.975 with these settings.
MIN_FAVORITE_TAG_SHARE = 0.6


def make_events(n_users: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    favorite = rng.integers(0, len(CATEGORIES), n_users)
    per_user = 5 + rng.poisson(20, n_users)
    user = np.repeat(np.arange(n_users), per_user)
    n = len(user)
    offsets = pd.to_timedelta(rng.uniform(0, 45 * 86_400, n), unit="s")
    random_category = rng.integers(0, len(CATEGORIES), n)
    category = np.where(rng.random(n) < FAVORITE_SHARE, favorite[user], random_category)
    events = pd.DataFrame(
        {
            "event_id": pd.array([f"e{i}" for i in range(n)], dtype="string"),
            "user_id": pd.array([f"u{u}" for u in user], dtype="string"),
            "event_ts": pd.Series(AS_OF - offsets, dtype="datetime64[ns, UTC]"),
            "event_type": pd.array(
                rng.choice(EVENT_TYPES, n, p=[0.6, 0.2, 0.1, 0.07, 0.03]),
                dtype="string",
            ),
            "item_id": pd.array([f"i{i % 300}" for i in range(n)], dtype="string"),
            "category": pd.array(np.array(CATEGORIES)[category], dtype="string"),
            "price_cents": rng.gamma(2, 2500, n).round().astype(np.int64),
            "quantity": np.ones(n, dtype=np.int64),
            "session_id": pd.array([f"s{i // 5}" for i in range(n)], dtype="string"),
            "dwell_seconds": rng.exponential(30, n),
        }
    )
    return events, favorite


def make_users(n_users: int) -> pd.DataFrame:
    ids = [f"u{u}" for u in range(n_users + N_SILENT_USERS)]
    return pd.DataFrame({"user_id": pd.array(ids, dtype="string")})


@pytest.fixture(scope="module")
def events_and_favorite() -> tuple[pd.DataFrame, np.ndarray]:
    return make_events(N_USERS, seed=1)


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    home = tmp_path_factory.mktemp("profile")
    return Settings(
        home=home,
        mlflow_tracking_uri=f"sqlite:///{home / 'mlflow.db'}",
        mlflow_artifact_root=str(home / "mlartifacts"),
    )


def train(events: pd.DataFrame, settings: Settings) -> ProfileResult:
    return train_profile_model(
        events,
        make_users(N_USERS),
        AS_OF,
        settings,
        epochs=EPOCHS,
        seed=SEED,
        n_segments=N_SEGMENTS,
    )


@pytest.fixture(scope="module")
def result(
    events_and_favorite: tuple[pd.DataFrame, np.ndarray], settings: Settings
) -> ProfileResult:
    events, _ = events_and_favorite
    return train(events, settings)


def test_profile_frames_have_contract_shape(result: ProfileResult) -> None:
    n = N_USERS + N_SILENT_USERS
    assert list(result.profiles.columns) == [
        "user_id",
        "event_timestamp",
        "created_timestamp",
        "purchasing_power",
        "segment",
        "interest_tags",
    ]
    assert len(result.profiles) == n
    assert result.profiles["user_id"].is_unique
    assert (result.profiles["event_timestamp"] == AS_OF).all()
    assert str(result.profiles["created_timestamp"].dt.tz) == "UTC"
    expected_columns = ["user_id", *(f"emb_{i}" for i in range(EMBEDDING_DIM))]
    assert list(result.embeddings.columns) == expected_columns
    assert len(result.embeddings) == n
    assert np.isfinite(result.embeddings.iloc[:, 1:].to_numpy()).all()


def test_profile_values_in_range(result: ProfileResult) -> None:
    profiles = result.profiles
    assert profiles["segment"].between(0, N_SEGMENTS - 1).all()
    assert profiles["segment"].nunique() > 1
    assert profiles["purchasing_power"].between(0.0, 1.0).all()
    for tags in profiles["interest_tags"]:
        names = tags.split(",")
        assert len(names) == 3
        assert len(set(names)) == 3
        assert set(names) <= set(CATEGORIES)


def test_first_interest_tag_finds_favorite(
    result: ProfileResult, events_and_favorite: tuple[pd.DataFrame, np.ndarray]
) -> None:
    _, favorite = events_and_favorite
    first_tag = result.profiles["interest_tags"].str.split(",").str[0]
    expected = np.array(CATEGORIES)[favorite]
    share = (first_tag.to_numpy()[:N_USERS] == expected).mean()
    assert share > MIN_FAVORITE_TAG_SHARE


def test_training_is_deterministic_for_seed(
    result: ProfileResult,
    events_and_favorite: tuple[pd.DataFrame, np.ndarray],
    settings: Settings,
) -> None:
    events, _ = events_and_favorite
    again = train(events, settings)
    first = result.embeddings.iloc[:, 1:].to_numpy()
    np.testing.assert_allclose(again.embeddings.iloc[:, 1:], first, atol=1e-6)
    assert again.profiles["segment"].tolist() == result.profiles["segment"].tolist()


def test_encode_sequences_tokens() -> None:
    reference = pd.Timestamp("2026-03-01", tz="UTC")
    events = pd.DataFrame(
        {
            "user_id": ["a", "a", "a"],
            "event_ts": pd.to_datetime(
                ["2026-02-28 10:00", "2026-02-20 23:30", "2026-02-28 12:00"], utc=True
            ),
            "event_type": ["view", "purchase", "unknown_type"],
            "category": ["home", None, "fashion"],
            "price_cents": [0, 1500, 60_000],
        }
    )
    tokens = encode_sequences(events, pd.Index(["a", "b"]), reference, 2)
    assert tokens.shape == (2, 2, 5)
    # User "a" keeps its two latest events, oldest first.
    assert tokens[0, :, EVENT_TYPE_CHANNEL].tolist() == [2, len(EVENT_TYPES) + 2]
    assert tokens[0, :, CATEGORY_CHANNEL].tolist() == [
        2 + CATEGORIES.index("home"),
        2 + CATEGORIES.index("fashion"),
    ]
    assert tokens[0, :, PRICE_CHANNEL].tolist() == [1, 9]
    assert tokens[0, :, HOUR_CHANNEL].tolist() == [11, 13]
    # 14 and 12 hours before the reference time: below the first edge of one day.
    assert tokens[0, :, AGE_CHANNEL].tolist() == [1, 1]
    # User "b" has no events.
    assert tokens[1, 0].tolist() == [NO_HISTORY_TOKEN, 0, 0, 0, 0]
    assert tokens[1, 1].tolist() == [0, 0, 0, 0, 0]


def test_write_profile_outputs_round_trips(
    result: ProfileResult, tmp_path: Path
) -> None:
    settings = Settings(home=tmp_path)
    profiles_path, embeddings_path = write_profile_outputs(result, settings)
    assert profiles_path == tmp_path / "features" / "user_profiles.parquet"
    assert embeddings_path == tmp_path / "features" / "user_embeddings.parquet"
    pd.testing.assert_frame_equal(pd.read_parquet(profiles_path), result.profiles)
    pd.testing.assert_frame_equal(pd.read_parquet(embeddings_path), result.embeddings)
    assert sorted(p.name for p in profiles_path.parent.iterdir()) == [
        "user_embeddings.parquet",
        "user_profiles.parquet",
    ]


def test_log_profile_model_registers_version(
    result: ProfileResult,
    events_and_favorite: tuple[pd.DataFrame, np.ndarray],
    settings: Settings,
) -> None:
    import mlflow
    import mlflow.keras

    registration = log_profile_model(result, settings)
    assert registration.version == 1
    assert settings.feature_dir is not None
    written = pd.read_parquet(settings.feature_dir / "user_profiles.parquet")
    pd.testing.assert_frame_equal(written, result.profiles)

    uri = f"models:/{settings.profile_model_name}/{registration.version}"
    with mlflow_tracking(settings):
        info = mlflow.models.get_model_info(uri)
        loaded = mlflow.keras.load_model(uri)
    assert info.signature is not None
    assert info.signature.inputs.input_names() == ["events"]
    events, _ = events_and_favorite
    user_ids = pd.Index(result.profiles["user_id"].astype(str))
    tokens = encode_sequences(events[events["event_ts"] < AS_OF], user_ids, AS_OF)
    embedding = loaded.predict(tokens, verbose=0)["embedding"]
    expected = result.embeddings.iloc[:, 1:].to_numpy()
    np.testing.assert_allclose(embedding, expected, atol=1e-5)


def test_naive_as_of_is_rejected(
    events_and_favorite: tuple[pd.DataFrame, np.ndarray], settings: Settings
) -> None:
    events, _ = events_and_favorite
    with pytest.raises(ValueError, match="timezone-aware"):
        train_profile_model(
            events, make_users(10), pd.Timestamp("2026-03-01"), settings, epochs=1
        )


def test_too_few_users_for_segments(
    events_and_favorite: tuple[pd.DataFrame, np.ndarray], settings: Settings
) -> None:
    events, _ = events_and_favorite
    users = pd.DataFrame({"user_id": ["u0", "u1"]})
    with pytest.raises(ValueError, match="at least n_segments=4 users"):
        train_profile_model(events, users, AS_OF, settings, epochs=1)
