"""TensorFlow profile model: a GRU over each user's recent events, self-supervised.

It yields per-user embeddings, interest tags, purchasing power and KMeans segments.
TensorFlow is imported inside functions, so that importing this module stays fast.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from sklearn.cluster import KMeans

from couponflow.schemas import CATEGORIES, EVENT_TYPES
from couponflow.settings import Settings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

log = logging.getLogger(__name__)

PROFILE_EXPERIMENT = "couponflow-profile"
PROFILE_ARTIFACT_NAME = "profile_model"
EMBEDDING_DIM = 16
DEFAULT_SEQUENCE_LENGTH = 32
DEFAULT_SEGMENTS = 4
DEFAULT_EPOCHS = 8
# The model learns to predict what a user does in the window after its input events.
DEFAULT_TARGET_WINDOW = timedelta(days=7)
INTEREST_TAG_COUNT = 3
PROFILES_FILE = "user_profiles.parquet"
EMBEDDINGS_FILE = "user_embeddings.parquet"

# Token channels of the input tensor, in order. Token 0 is padding in every channel,
# and only the event-type channel carries the padding mask.
EVENT_TYPE_CHANNEL, CATEGORY_CHANNEL, PRICE_CHANNEL, HOUR_CHANNEL, AGE_CHANNEL = range(
    5
)
N_CHANNELS = 5
# Event-type tokens: 1 marks a user without events, so that such a user gets a learned
# input step instead of a fully masked row. EVENT_TYPES follow from 2, and the last
# token is any other type.
NO_HISTORY_TOKEN = 1
_EVENT_TYPE_TOKENS = {name: i + 2 for i, name in enumerate(EVENT_TYPES)}
_OTHER_EVENT_TOKEN = len(EVENT_TYPES) + 2
# Category tokens: 1 is a missing or unknown category, then CATEGORIES.
_CATEGORY_TOKENS = {name: i + 2 for i, name in enumerate(CATEGORIES)}
# Price tokens: 1 is a missing or zero price. A positive price gets 2 + the number of
# edges (in cents) that it reaches, so prices below the first edge get 2.
PRICE_EDGES_CENTS: tuple[int, ...] = (500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000)
# Age tokens: 1 + the number of edges that the event's age (before the reference
# time) reaches, in days.
AGE_EDGES_DAYS: tuple[float, ...] = (1, 3, 7, 14, 30, 60)
_VOCABULARY_SIZES = (
    _OTHER_EVENT_TOKEN + 1,
    len(CATEGORIES) + 2,
    len(PRICE_EDGES_CENTS) + 3,
    25,
    len(AGE_EDGES_DAYS) + 2,
)
_TOKEN_EMBEDDING_DIMS = (8, 8, 4, 4, 4)
_ENCODER_UNITS = 32
_BATCH_SIZE = 128
_LEARNING_RATE = 5e-3
_LOSS_WEIGHTS = {"purchase": 1.0, "category": 1.0, "log_spend": 0.2}
# Weight of the campaign-wide category mix in each user's target distribution, in
# events: a user with no events in the window gets the campaign-wide mix.
_CATEGORY_PRIOR_EVENTS = 1.0
_VALIDATION_SPLIT = 0.2
_MIN_USERS_FOR_VALIDATION = 500


@dataclass
class ProfileResult:
    """A trained profile model and the profiles it produced for one as-of time."""

    model: Any
    profiles: pd.DataFrame
    embeddings: pd.DataFrame
    metrics: dict[str, float]
    as_of: pd.Timestamp
    device: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ProfileRegistration:
    """The MLflow run and the registered version of one profile model."""

    run_id: str
    model_uri: str
    version: int


def train_profile_model(
    events: pd.DataFrame,
    users: pd.DataFrame,
    as_of: datetime,
    settings: Settings,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    *,
    n_segments: int = DEFAULT_SEGMENTS,
    sequence_length: int = DEFAULT_SEQUENCE_LENGTH,
    target_window: timedelta = DEFAULT_TARGET_WINDOW,
) -> ProfileResult:
    """Train the profile model on events before ``as_of`` and profile every user.

    Training inputs are each user's last ``sequence_length`` events before
    ``as_of - target_window``. The targets come from the window itself: whether the
    user purchased, log1p of the purchase spend in currency units, and the category
    mix of the window's events. The profiles then encode the last events before
    ``as_of``. ``users`` only needs a ``user_id`` column. ``settings`` is not read,
    because training touches no store; log_profile_model takes the locations.
    """
    del settings
    as_of_utc = _as_utc_timestamp(as_of)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if sequence_length < 1:
        raise ValueError(f"sequence_length must be >= 1, got {sequence_length}")
    user_ids = _user_ids(users)
    if len(user_ids) < n_segments:
        raise ValueError(
            f"KMeans needs at least n_segments={n_segments} users, got "
            f"{len(user_ids)}; pass more users or a smaller n_segments"
        )
    history = _events_before(events, user_ids, as_of_utc)
    cutoff = as_of_utc - pd.Timedelta(target_window)
    context = history[history["event_ts"] < cutoff]
    window = history[history["event_ts"] >= cutoff]

    train_tokens = encode_sequences(context, user_ids, cutoff, sequence_length)
    targets = _window_targets(window, user_ids)
    profile_tokens = encode_sequences(history, user_ids, as_of_utc, sequence_length)

    device = _training_device()
    log.info(
        "training profile model on %s: %d users, %d events before %s",
        device,
        len(user_ids),
        len(history),
        as_of_utc.isoformat(),
    )
    started = time.perf_counter()
    full_model, history_metrics = _fit(train_tokens, targets, epochs, seed)
    train_seconds = time.perf_counter() - started

    outputs = full_model.predict(profile_tokens, batch_size=1024, verbose=0)
    embedding = np.asarray(outputs["embedding"], dtype=np.float32)
    segments = KMeans(n_clusters=n_segments, random_state=seed, n_init=10).fit_predict(
        embedding
    )
    profiles = _profiles_frame(user_ids, as_of_utc, outputs, segments)
    embeddings = _embeddings_frame(user_ids, embedding)

    metrics = {
        **history_metrics,
        "n_users": float(len(user_ids)),
        "n_events": float(len(history)),
        "window_purchase_rate": float(targets["purchase"].mean()),
        "train_seconds": train_seconds,
    }
    for segment, share in profiles["segment"].value_counts(normalize=True).items():
        metrics[f"segment_share/{segment}"] = float(share)
    log.info(
        "trained profile model in %.1f s (final loss %.4f)",
        train_seconds,
        metrics.get("loss", float("nan")),
    )
    return ProfileResult(
        model=full_model,
        profiles=profiles,
        embeddings=embeddings,
        metrics=metrics,
        as_of=as_of_utc,
        device=device,
        params={
            "epochs": epochs,
            "seed": seed,
            "n_segments": n_segments,
            "sequence_length": sequence_length,
            "target_window_hours": target_window.total_seconds() / 3600,
            "embedding_dim": EMBEDDING_DIM,
            "encoder_units": _ENCODER_UNITS,
            "batch_size": _BATCH_SIZE,
            "learning_rate": _LEARNING_RATE,
        },
    )


def log_profile_model(result: ProfileResult, settings: Settings) -> ProfileRegistration:
    """Log the model to MLflow, register a version, then write the profile files.

    The run, with the model's tensor signature, goes to experiment
    "couponflow-profile" and the version to ``settings.profile_model_name``. The
    files are those of :func:`write_profile_outputs`.
    """
    import keras
    import mlflow
    import mlflow.keras
    import tensorflow as tf

    from training.registry import ensure_experiment, mlflow_tracking

    with mlflow_tracking(settings) as client:
        experiment_id = ensure_experiment(client, PROFILE_EXPERIMENT, settings)
        with mlflow.start_run(experiment_id=experiment_id) as run:
            mlflow.log_params(result.params)
            mlflow.log_metrics(result.metrics)
            mlflow.set_tags(
                {"device": result.device, "as_of": result.as_of.isoformat()}
            )
            info = mlflow.keras.log_model(
                result.model,
                name=PROFILE_ARTIFACT_NAME,
                signature=profile_signature(int(result.params["sequence_length"])),
                # Listing the requirements skips MLflow's inference, which reloads
                # the model in a subprocess.
                pip_requirements=[
                    f"tensorflow=={tf.__version__}",
                    f"keras=={keras.__version__}",
                ],
            )
            registered = mlflow.register_model(
                info.model_uri, settings.profile_model_name
            )
    log.info(
        "registered %s version %s from run %s",
        settings.profile_model_name,
        registered.version,
        run.info.run_id,
    )
    write_profile_outputs(result, settings)
    return ProfileRegistration(
        run_id=run.info.run_id,
        model_uri=str(info.model_uri),
        version=int(registered.version),
    )


def write_profile_outputs(
    result: ProfileResult, settings: Settings
) -> tuple[Path, Path]:
    """Write the profiles and embeddings parquet files that the feature store reads.

    Each file is written to a temporary name in the same folder and then renamed, so
    a reader sees the previous file or the new one, never a partial file. Returns
    the paths of the profiles and of the embeddings.
    """
    assert settings.feature_dir is not None
    settings.feature_dir.mkdir(parents=True, exist_ok=True)
    profiles_path = settings.feature_dir / PROFILES_FILE
    embeddings_path = settings.feature_dir / EMBEDDINGS_FILE
    _write_parquet_atomically(result.profiles, profiles_path)
    _write_parquet_atomically(result.embeddings, embeddings_path)
    log.info(
        "wrote %d profiles to %s and embeddings to %s",
        len(result.profiles),
        profiles_path,
        embeddings_path,
    )
    return profiles_path, embeddings_path


def profile_signature(sequence_length: int = DEFAULT_SEQUENCE_LENGTH) -> Any:
    """Return the MLflow signature: int32 event tokens in, the four outputs out."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    float32 = np.dtype(np.float32)
    inputs = Schema(
        [TensorSpec(np.dtype(np.int32), (-1, sequence_length, N_CHANNELS), "events")]
    )
    outputs = Schema(
        [
            TensorSpec(float32, (-1, EMBEDDING_DIM), "embedding"),
            TensorSpec(float32, (-1, 1), "purchase"),
            TensorSpec(float32, (-1, len(CATEGORIES)), "category"),
            TensorSpec(float32, (-1, 1), "log_spend"),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


def encode_sequences(
    events: pd.DataFrame,
    user_ids: pd.Index,
    reference_time: pd.Timestamp,
    sequence_length: int = DEFAULT_SEQUENCE_LENGTH,
) -> npt.NDArray[np.int32]:
    """Encode each user's last events before ``reference_time`` as integer tokens.

    Returns shape ``(len(user_ids), sequence_length, N_CHANNELS)``. Events are in
    time order from position 0 and padded with zeros at the end. A user without
    events gets one NO_HISTORY_TOKEN event.
    """
    tokens = np.zeros((len(user_ids), sequence_length, N_CHANNELS), dtype=np.int32)
    tokens[:, 0, EVENT_TYPE_CHANNEL] = NO_HISTORY_TOKEN
    if events.empty:
        return tokens

    ordered = events.sort_values(["user_id", "event_ts"], kind="stable")
    from_end = ordered.groupby("user_id", sort=False).cumcount(ascending=False)
    recent = ordered[from_end.to_numpy() < sequence_length]
    kept = recent.groupby("user_id", sort=False)["event_ts"].transform("size")
    rank_from_end = from_end[from_end < sequence_length].to_numpy()
    position = kept.to_numpy() - 1 - rank_from_end
    row = user_ids.get_indexer(pd.Index(recent["user_id"]))

    event_type = recent["event_type"].astype("string").map(_EVENT_TYPE_TOKENS)
    tokens[row, position, EVENT_TYPE_CHANNEL] = event_type.fillna(
        _OTHER_EVENT_TOKEN
    ).to_numpy(dtype=np.int32)
    tokens[row, position, CATEGORY_CHANNEL] = _category_tokens(recent)
    tokens[row, position, PRICE_CHANNEL] = _price_tokens(recent)
    tokens[row, position, HOUR_CHANNEL] = recent["event_ts"].dt.hour.to_numpy() + 1
    age_days = (reference_time - recent["event_ts"]).dt.total_seconds() / 86_400
    tokens[row, position, AGE_CHANNEL] = 1 + np.searchsorted(
        AGE_EDGES_DAYS, age_days.to_numpy(), side="right"
    )
    return tokens


def _fit(
    tokens: npt.NDArray[np.int32],
    targets: dict[str, npt.NDArray[np.float32]],
    epochs: int,
    seed: int,
) -> tuple[Any, dict[str, float]]:
    import keras

    keras.utils.set_random_seed(seed)
    training_model, full_model = _build_models(tokens.shape[1])
    training_model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=_LEARNING_RATE),
        loss={
            "purchase": "binary_crossentropy",
            "category": "categorical_crossentropy",
            "log_spend": "mean_squared_error",
        },
        loss_weights=_LOSS_WEIGHTS,
        metrics={"purchase": [keras.metrics.AUC(name="auc")]},
    )
    validation_split = (
        _VALIDATION_SPLIT if len(tokens) >= _MIN_USERS_FOR_VALIDATION else 0.0
    )
    history = training_model.fit(
        tokens,
        targets,
        epochs=epochs,
        batch_size=_BATCH_SIZE,
        validation_split=validation_split,
        shuffle=True,
        verbose=0,
    )
    final = {name: float(values[-1]) for name, values in history.history.items()}
    return full_model, final


def _build_models(sequence_length: int) -> tuple[Any, Any]:
    import keras

    inputs = keras.Input(
        shape=(sequence_length, N_CHANNELS), dtype="int32", name="events"
    )
    embedded = []
    names = ("event_type", "category", "price", "hour", "age")
    for channel, name in enumerate(names):
        layer = keras.layers.Embedding(
            _VOCABULARY_SIZES[channel],
            _TOKEN_EMBEDDING_DIMS[channel],
            mask_zero=channel == EVENT_TYPE_CHANNEL,
            name=f"{name}_embedding",
        )
        embedded.append(layer(inputs[:, :, channel]))
    features = keras.layers.Concatenate(name="token_features")(embedded)
    encoded = keras.layers.GRU(_ENCODER_UNITS, name="encoder")(features)
    embedding = keras.layers.Dense(EMBEDDING_DIM, activation="tanh", name="embedding")(
        encoded
    )
    purchase = keras.layers.Dense(1, activation="sigmoid", name="purchase")(embedding)
    category = keras.layers.Dense(
        len(CATEGORIES), activation="softmax", name="category"
    )(embedding)
    log_spend = keras.layers.Dense(1, name="log_spend")(embedding)
    heads = {"purchase": purchase, "category": category, "log_spend": log_spend}
    training_model = keras.Model(inputs, heads, name="couponflow_profile_training")
    full_model = keras.Model(
        inputs, {"embedding": embedding, **heads}, name="couponflow_profile"
    )
    return training_model, full_model


def _window_targets(
    window: pd.DataFrame, user_ids: pd.Index
) -> dict[str, npt.NDArray[np.float32]]:
    n_users = len(user_ids)
    row = user_ids.get_indexer(pd.Index(window["user_id"]))
    is_purchase = (window["event_type"].astype("string") == "purchase").fillna(False)
    purchase_rows = row[is_purchase.to_numpy(dtype=bool)]
    purchased = np.zeros(n_users, dtype=np.float32)
    purchased[purchase_rows] = 1.0

    spend_cents = np.zeros(n_users, dtype=np.float64)
    purchases = window[is_purchase.to_numpy(dtype=bool)]
    amounts = _numeric(purchases, "price_cents", 0.0) * _numeric(
        purchases, "quantity", 1.0
    )
    np.add.at(spend_cents, purchase_rows, np.clip(amounts, 0.0, None))

    counts = np.zeros((n_users, len(CATEGORIES)), dtype=np.float64)
    category_index = _category_tokens(window) - 2
    known = category_index >= 0
    np.add.at(counts, (row[known], category_index[known]), 1.0)
    total = counts.sum()
    prior = (
        counts.sum(axis=0) / total
        if total > 0
        else np.full(len(CATEGORIES), 1.0 / len(CATEGORIES))
    )
    mix = (counts + _CATEGORY_PRIOR_EVENTS * prior) / (
        counts.sum(axis=1, keepdims=True) + _CATEGORY_PRIOR_EVENTS
    )
    return {
        "purchase": purchased[:, None],
        "category": mix.astype(np.float32),
        "log_spend": np.log1p(spend_cents / 100.0).astype(np.float32)[:, None],
    }


def _profiles_frame(
    user_ids: pd.Index,
    as_of: pd.Timestamp,
    outputs: dict[str, Any],
    segments: npt.NDArray[np.int_],
) -> pd.DataFrame:
    category_probability = np.asarray(outputs["category"])
    # A stable sort keeps CATEGORIES order among equal probabilities.
    top = np.argsort(-category_probability, axis=1, kind="stable")[
        :, :INTEREST_TAG_COUNT
    ]
    names = np.array(CATEGORIES)
    tags = [",".join(names[indices]) for indices in top]
    predicted_spend = pd.Series(np.asarray(outputs["log_spend"]).ravel())
    n_users = len(user_ids)
    return pd.DataFrame(
        {
            "user_id": pd.Series(user_ids, dtype="string").array,
            "event_timestamp": pd.Series(
                [as_of] * n_users, dtype="datetime64[ns, UTC]"
            ),
            "created_timestamp": pd.Series(
                [pd.Timestamp.now(tz="UTC")] * n_users, dtype="datetime64[ns, UTC]"
            ),
            # Percentile rank of predicted spend: in (0, 1], ties share a rank.
            "purchasing_power": predicted_spend.rank(pct=True).to_numpy(np.float64),
            "segment": segments.astype(np.int64),
            "interest_tags": pd.array(tags, dtype="string"),
        }
    )


def _embeddings_frame(
    user_ids: pd.Index, embedding: npt.NDArray[np.float32]
) -> pd.DataFrame:
    frame = pd.DataFrame(
        embedding, columns=[f"emb_{i}" for i in range(embedding.shape[1])]
    )
    frame.insert(0, "user_id", pd.Series(user_ids, dtype="string").array)
    return frame


def _training_device() -> str:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return f"GPU ({len(gpus)} visible, first {gpus[0].name})"
    return "CPU"


def _user_ids(users: pd.DataFrame) -> pd.Index:
    if "user_id" not in users.columns:
        raise ValueError("users is missing the user_id column")
    ids = users["user_id"]
    if ids.isna().any():
        raise ValueError(f"users.user_id has {int(ids.isna().sum())} missing values")
    unique = pd.Index(ids.astype(str).unique())
    if unique.empty:
        raise ValueError("users has no rows; the profile model needs users to profile")
    return unique


def _events_before(
    events: pd.DataFrame, user_ids: pd.Index, as_of: pd.Timestamp
) -> pd.DataFrame:
    missing = [c for c in ("user_id", "event_ts", "event_type") if c not in events]
    if missing:
        raise ValueError(f"events is missing columns {missing} of the EVENTS contract")
    frame = events.copy()
    frame["user_id"] = frame["user_id"].astype(str)
    frame["event_ts"] = pd.to_datetime(frame["event_ts"], utc=True)
    keep = frame["user_id"].isin(user_ids) & (frame["event_ts"] < as_of)
    return frame[keep.to_numpy()].reset_index(drop=True)


def _category_tokens(events: pd.DataFrame) -> npt.NDArray[np.int32]:
    if "category" not in events.columns:
        return np.ones(len(events), dtype=np.int32)
    tokens = events["category"].astype("string").map(_CATEGORY_TOKENS).fillna(1)
    return np.asarray(tokens.to_numpy(), dtype=np.int32)


def _price_tokens(events: pd.DataFrame) -> npt.NDArray[np.int32]:
    price = _numeric(events, "price_cents", 0.0)
    tokens = 2 + np.searchsorted(PRICE_EDGES_CENTS, price, side="right")
    return np.asarray(np.where(price > 0, tokens, 1), dtype=np.int32)


def _numeric(
    frame: pd.DataFrame, column: str, default: float
) -> npt.NDArray[np.float64]:
    if column not in frame.columns:
        return np.full(len(frame), default)
    values = pd.to_numeric(frame[column], errors="coerce")
    return values.fillna(default).to_numpy(dtype=np.float64)


def _as_utc_timestamp(value: datetime) -> pd.Timestamp:
    timestamp = pd.Timestamp(value)
    if timestamp.tzinfo is None:
        raise ValueError(
            f"as_of must be timezone-aware, got naive {timestamp}; pass a UTC time"
        )
    return timestamp.tz_convert("UTC")


def _write_parquet_atomically(frame: pd.DataFrame, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        frame.to_parquet(temporary, index=False)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
