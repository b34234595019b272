"""Per-user features computed with Dask from the offline store, point-in-time correct.

Each row describes one user as of one time, from events strictly before that time.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Sequence
from datetime import date, datetime, timedelta
from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd
from distributed import Client

from couponflow import lake
from couponflow.dask_cluster import dask_client
from couponflow.interest import INTEREST_COLUMNS, compute_interest_snapshots
from couponflow.schemas import CATEGORIES, EVENTS, USERS, UTC_TS, TableSchema
from couponflow.settings import Settings

log = logging.getLogger(__name__)

FEATURES_FILE = "user_features.parquet"
INTEREST_FILE = "user_interest.parquet"

# Recency of a user without events, and the cap on every recency, so that "no event"
# sorts as the oldest activity. Events older than this before every as-of time are
# not read at all.
RECENCY_SENTINEL_DAYS = 365.0
SHORT_WINDOW = timedelta(days=30)
LONG_WINDOW = timedelta(days=90)
NO_CATEGORY = "none"
NO_PEAK_HOUR = -1

# UTC hour ranges [start, end) of the hour_share_* features.
DAY_PARTS: dict[str, tuple[int, int]] = {
    "night": (0, 6),
    "morning": (6, 12),
    "afternoon": (12, 18),
    "evening": (18, 24),
}

# Output columns and their pandas dtypes, in order. Frequency (purchase events),
# spend, events, sessions, browse seconds, click depth, cart rate and views per
# session cover 30 days. Orders (sessions with a purchase), AOV (spend per order),
# the view price index, affinity, top category, peak hour and hour shares cover 90
# days. Recency looks back up to RECENCY_SENTINEL_DAYS.
# uses_app is 1 when the users table lists the store's app as the user's device.
FEATURE_COLUMNS: dict[str, str] = {
    "user_id": "string",
    "event_timestamp": UTC_TS,
    "created_timestamp": UTC_TS,
    "recency_days": "float64",
    "frequency_30d": "int64",
    "spend_30d_cents": "int64",
    "aov_cents": "int64",
    "events_30d": "int64",
    "sessions_30d": "int64",
    "browse_seconds_30d": "float64",
    "click_depth": "float64",
    "cart_rate": "float64",
    **{f"affinity_{category}": "float64" for category in CATEGORIES},
    "top_category": "string",
    "peak_hour": "int64",
    **{f"hour_share_{part}": "float64" for part in DAY_PARTS},
    "days_since_signup": "float64",
    "orders_90d": "int64",
    "views_per_session_30d": "float64",
    "view_price_index_90d": "float64",
    "uses_app": "int64",
}
APP_DEVICE = "app"
# Columns and pandas dtypes of user_interest.parquet, the source of the Feast view
# user_interest.
INTEREST_FEATURE_COLUMNS: dict[str, str] = {
    "user_id": "string",
    "event_timestamp": UTC_TS,
    "created_timestamp": UTC_TS,
    **{column: "float64" for column in INTEREST_COLUMNS},
}
# Events that the interest score of an as-of time factorizes: the same span that
# the behaviour features read for their recency.
INTEREST_LOOKBACK = timedelta(days=RECENCY_SENTINEL_DAYS)

_EVENT_COLUMNS = (
    "user_id",
    "event_ts",
    "event_type",
    "category",
    "price_cents",
    "quantity",
    "session_id",
    "dwell_seconds",
)
_INTEREST_EVENT_COLUMNS = ("user_id", "event_ts", "event_type", "item_id", "category")
_CATEGORY_COUNTS = [f"cat_{category}" for category in CATEGORIES]
_CATEGORY_VIEWS = [f"views_{category}" for category in CATEGORIES]
_CATEGORY_LOG_PRICES = [f"log_price_{category}" for category in CATEGORIES]
_HOUR_COUNTS = [f"hour_{hour:02d}" for hour in range(24)]
_SHORT_SUMS = [
    "events_30d",
    "purchases_30d",
    "spend_30d",
    "clicks_30d",
    "views_30d",
    "carts_30d",
    "dwell_30d",
]
# The 90-day sums of the count matrix, in the order of _LONG_COUNTS, then the
# 90-day sums of the float matrix.
_LONG_COUNT_SUMS = [
    "purchases_90d",
    "spend_90d",
    *_CATEGORY_COUNTS,
    *_HOUR_COUNTS,
    *_CATEGORY_VIEWS,
]
_LONG_SUMS = [*_LONG_COUNT_SUMS, *_CATEGORY_LOG_PRICES]
# Window sums that are float64; the others are int64.
_FLOAT_SUMS = ["dwell_30d", *_CATEGORY_LOG_PRICES]
# Columns of the per-event count matrix, and the ones summed over each window.
_COUNT_NAMES = [
    "events",
    "purchases",
    "spend",
    "clicks",
    "views",
    "carts",
    *_CATEGORY_COUNTS,
    *_HOUR_COUNTS,
    *_CATEGORY_VIEWS,
]
# Counts of distinct sessions, from the session reduction.
_SESSION_COUNTS = ["sessions_30d", "orders_90d"]
_FIRST_CATEGORY = _COUNT_NAMES.index(_CATEGORY_COUNTS[0])
_FIRST_HOUR = _COUNT_NAMES.index(_HOUR_COUNTS[0])
_FIRST_CATEGORY_VIEW = _COUNT_NAMES.index(_CATEGORY_VIEWS[0])
_SHORT_COUNTS = ["events", "purchases", "spend", "clicks", "views", "carts"]
_LONG_COUNTS = [
    "purchases",
    "spend",
    *_CATEGORY_COUNTS,
    *_HOUR_COUNTS,
    *_CATEGORY_VIEWS,
]
# Columns of the per-event float matrix: dwell, then the log price of priced views
# per category.
_FLOAT_NAMES = ["dwell", *_CATEGORY_LOG_PRICES]
_NANOS_PER_DAY = 86_400 * 10**9
_NO_EVENT = np.iinfo("int64").min
_KEYS = ["user_id", "as_of_index"]
_PARTITION_DATE = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")
# Parquet bytes read into one Dask partition: about 200,000 events at the 40 bytes
# per event of synthetic test data.
_PARTITION_BYTES = 8 * 2**20


def compute_user_features(
    settings: Settings, as_of: Sequence[datetime], client: Client | None = None
) -> pd.DataFrame:
    """Compute one feature row per (user, as-of time) from the lake's events and users.

    Only events strictly before an as-of time count for it. Every user who signed
    up strictly before it gets a row, with zeros when the user has no events. Runs
    on ``client``, or on a client of :func:`couponflow.dask_cluster.dask_client`
    when it is None. Raises ``ValueError`` when ``as_of`` is empty or contains a
    timezone-naive time.
    """
    times = _normalize_as_of(as_of)
    if client is None:
        with dask_client(settings) as new_client:
            return _compute(settings, times, new_client)
    return _compute(settings, times, client)


def write_user_features(settings: Settings, frame: pd.DataFrame) -> Path:
    """Replace the feature folder's user_features.parquet by ``frame``, atomically.

    Writes a temporary file next to the target and renames it over the target, so a
    reader (the Feast offline store) reads the old table or the new one, never a
    part of either.
    Raises ``ValueError`` naming the columns of :data:`FEATURE_COLUMNS` that are
    missing.
    """
    missing = [column for column in FEATURE_COLUMNS if column not in frame.columns]
    if missing:
        raise ValueError(
            f"user features frame is missing columns {missing}; build it with "
            "compute_user_features"
        )
    target = _write_feature_table(settings, frame[list(FEATURE_COLUMNS)], FEATURES_FILE)
    log.info("wrote %d user feature rows to %s", len(frame), target)
    return target


def compute_user_interest(
    settings: Settings, as_of: Sequence[datetime], seed: int = 0
) -> pd.DataFrame:
    """Compute the interest scores of every user at each as-of time from the lake.

    Each time's scores come from a factorization of the events strictly before it
    and within INTEREST_LOOKBACK of it, as
    :func:`couponflow.interest.compute_interest_snapshots` fits them. Returns the
    columns of :data:`INTEREST_FEATURE_COLUMNS`, with one row per user who signed up
    before the time. Raises ``ValueError`` when ``as_of`` is empty or contains a
    timezone-naive time.
    """
    times = _normalize_as_of(as_of)
    started = time.perf_counter()
    event_files = _event_files_for(settings, times)
    user_files = lake.lake_files(settings, USERS.name)
    log.info(
        "computing interest for %d as-of times (%s to %s) from %d event files",
        len(times),
        times[0].isoformat(),
        times[-1].isoformat(),
        len(event_files),
    )
    events = _read_all(event_files, EVENTS, list(_INTEREST_EVENT_COLUMNS))
    users = _read_all(user_files, USERS, ["user_id", "signup_ts"])
    scores = compute_interest_snapshots(
        events, users, times, lookback=INTEREST_LOOKBACK, seed=seed
    )
    scores.insert(2, "created_timestamp", pd.Timestamp.now(tz="UTC").as_unit("ns"))
    frame = scores.astype(INTEREST_FEATURE_COLUMNS)[list(INTEREST_FEATURE_COLUMNS)]
    log.info(
        "computed %d interest rows for %d as-of times in %.1f s",
        len(frame),
        len(times),
        time.perf_counter() - started,
    )
    return frame


def write_user_interest(settings: Settings, frame: pd.DataFrame) -> Path:
    """Replace the feature folder's user_interest.parquet by ``frame``, atomically.

    Raises ``ValueError`` naming the columns of :data:`INTEREST_FEATURE_COLUMNS` that
    are missing.
    """
    columns = list(INTEREST_FEATURE_COLUMNS)
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ValueError(
            f"user interest frame is missing columns {missing}; build it with "
            "compute_user_interest"
        )
    target = _write_feature_table(settings, frame[columns], INTEREST_FILE)
    log.info("wrote %d user interest rows to %s", len(frame), target)
    return target


def _write_feature_table(settings: Settings, frame: pd.DataFrame, name: str) -> Path:
    """Write ``frame`` to a temporary file and rename it over the feature table."""
    assert settings.feature_dir is not None
    settings.feature_dir.mkdir(parents=True, exist_ok=True)
    target = settings.feature_dir / name
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        frame.to_parquet(temporary, index=False)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return target


def _compute(
    settings: Settings, times: list[pd.Timestamp], client: Client
) -> pd.DataFrame:
    started = time.perf_counter()
    event_files = _event_files_for(settings, times)
    user_files = lake.lake_files(settings, USERS.name)
    log.info(
        "computing user features for %d as-of times (%s to %s) from %d event files "
        "and %d user files",
        len(times),
        times[0].isoformat(),
        times[-1].isoformat(),
        len(event_files),
        len(user_files),
    )

    events = _read_table(event_files, EVENTS, list(_EVENT_COLUMNS))
    users = _read_table(user_files, USERS, ["user_id", "signup_ts", "device"])
    # Tree reductions of per-partition partial results: the reduced tables have one
    # row per (user, as-of), small enough for one worker, and need no shuffle.
    totals = events.reduction(
        _window_sums,
        aggregate=_combine_window_sums,
        meta=_window_sums(_empty_events(), times),
        chunk_kwargs={"times": times},
    )
    sessions = events.reduction(
        _session_pairs,
        combine=_combine_session_pairs,
        aggregate=_count_sessions,
        meta=_count_sessions(_session_pairs(_empty_events(), times)),
        chunk_kwargs={"times": times},
    )
    totals_frame, sessions_frame, users_frame = client.compute(
        [totals, sessions, users], sync=True
    )

    frame = _assemble(users_frame, totals_frame, sessions_frame, times)
    log.info(
        "computed %d user feature rows for %d as-of times in %.1f s",
        len(frame),
        len(times),
        time.perf_counter() - started,
    )
    return frame


def _normalize_as_of(as_of: Sequence[datetime]) -> list[pd.Timestamp]:
    if len(as_of) == 0:
        raise ValueError("as_of is empty: pass at least one timezone-aware UTC time")
    times: set[pd.Timestamp] = set()
    for position, value in enumerate(as_of):
        stamp = pd.Timestamp(value)
        if stamp.tzinfo is None:
            raise ValueError(
                f"as_of[{position}] = {value!r} is timezone-naive; pass an aware UTC "
                "time such as datetime(..., tzinfo=UTC)"
            )
        times.add(stamp.tz_convert("UTC").as_unit("ns"))
    return sorted(times)


def _event_files_for(settings: Settings, times: list[pd.Timestamp]) -> list[Path]:
    """Return the event files whose date partition can affect any as-of time."""
    first_day = (times[0] - timedelta(days=RECENCY_SENTINEL_DAYS)).date()
    last_day = times[-1].date()
    selected = []
    for path in lake.lake_files(settings, EVENTS.name):
        partition_day = _partition_day(path)
        # A folder that is not named date=YYYY-MM-DD is read rather than skipped.
        if partition_day is None or first_day <= partition_day <= last_day:
            selected.append(path)
    return selected


def _partition_day(path: Path) -> date | None:
    match = _PARTITION_DATE.match(path.parent.name)
    if match is None:
        return None
    return date.fromisoformat(match.group(1))


def _read_table(
    files: list[Path], schema: TableSchema, columns: list[str]
) -> dd.DataFrame:
    meta = _typed(schema.empty_frame(), schema, columns)
    if not files:
        return dd.from_pandas(meta, npartitions=1)
    return dd.from_map(
        _read_files,
        _group_files(files),
        args=(schema, columns),
        meta=meta,
        enforce_metadata=False,
    )


def _group_files(files: list[Path]) -> list[list[Path]]:
    """Split ``files`` into runs of about _PARTITION_BYTES, one run per partition.

    A day partition of a small shop is a few kilobytes, and a Dask task per file
    would cost more in scheduling than in work.
    """
    groups: list[list[Path]] = [[]]
    size = 0
    for path in files:
        if groups[-1] and size >= _PARTITION_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(path)
        size += path.stat().st_size
    return groups


def _read_all(
    files: list[Path], schema: TableSchema, columns: list[str]
) -> pd.DataFrame:
    """Read ``columns`` of every file into one frame, in the contract's dtypes."""
    if not files:
        return _typed(schema.empty_frame(), schema, columns)
    return _read_files(files, schema, columns)


def _read_files(
    paths: list[Path], schema: TableSchema, names: list[str]
) -> pd.DataFrame:
    # Not named `columns`: dask.dataframe.from_map passes its own column projection
    # to a function with a parameter of that name.
    frames = [
        _typed(pd.read_parquet(path, columns=names), schema, names) for path in paths
    ]
    return pd.concat(frames, ignore_index=True)


def _typed(
    frame: pd.DataFrame, schema: TableSchema, columns: list[str]
) -> pd.DataFrame:
    """Cast ``columns`` of ``frame`` to the contract's dtypes, keeping nulls."""
    out = pd.DataFrame(index=frame.index)
    for column in columns:
        dtype = schema.columns[column]
        if dtype == UTC_TS:
            out[column] = pd.to_datetime(frame[column], utc=True).dt.as_unit("ns")
        elif dtype == "int64":
            # Nullable, so that a file with a missing price still reads.
            out[column] = frame[column].astype("Int64")
        else:
            out[column] = frame[column].astype(pd.api.types.pandas_dtype(dtype))
    return out


def _empty_events() -> pd.DataFrame:
    return _typed(EVENTS.empty_frame(), EVENTS, list(_EVENT_COLUMNS))


def _event_counts(part: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Return a row per event of integer counts and of floats.

    The columns are _COUNT_NAMES and _FLOAT_NAMES. Only views with a known category
    and a positive price count in views_<category> and log_price_<category>.
    """
    event_type = part["event_type"].fillna("").to_numpy(dtype=object)
    is_purchase = event_type == "purchase"
    price = part["price_cents"].fillna(0).to_numpy(dtype="int64")
    # A purchase event without a quantity sold at least one unit.
    quantity = part["quantity"].fillna(1).to_numpy(dtype="int64")
    category_codes = pd.Categorical(part["category"], categories=CATEGORIES).codes
    hours = part["event_ts"].dt.hour.to_numpy(dtype="int64")

    counts = np.zeros((len(part), len(_COUNT_NAMES)), dtype="int64")
    counts[:, _COUNT_NAMES.index("events")] = 1
    counts[:, _COUNT_NAMES.index("purchases")] = is_purchase
    counts[:, _COUNT_NAMES.index("spend")] = np.where(is_purchase, price * quantity, 0)
    counts[:, _COUNT_NAMES.index("clicks")] = event_type == "click"
    counts[:, _COUNT_NAMES.index("views")] = event_type == "view"
    counts[:, _COUNT_NAMES.index("carts")] = event_type == "add_to_cart"
    rows = np.arange(len(part))
    # Code -1 (a missing or unknown category) counts in no category column.
    known = category_codes >= 0
    counts[rows[known], _FIRST_CATEGORY + category_codes[known]] = 1
    counts[rows, _FIRST_HOUR + hours] = 1

    floats = np.zeros((len(part), len(_FLOAT_NAMES)), dtype="float64")
    floats[:, 0] = part["dwell_seconds"].fillna(0.0).to_numpy(dtype="float64")
    priced_view = (event_type == "view") & known & (price > 0)
    view_rows = rows[priced_view]
    view_codes = category_codes[priced_view]
    counts[view_rows, _FIRST_CATEGORY_VIEW + view_codes] = 1
    floats[view_rows, 1 + view_codes] = np.log(price[priced_view])
    return counts, floats


def _window_sums(part: pd.DataFrame, times: list[pd.Timestamp]) -> pd.DataFrame:
    """Sum one partition's events per (user, as-of index) over the feature windows.

    Returns a row for each user with an event before the as-of time; sums add up
    and the recency takes the minimum across partitions (_combine_window_sums).
    """
    part = part.dropna(subset=["user_id", "event_ts"])
    user_codes, user_ids = pd.factorize(part["user_id"])
    stamps = part["event_ts"].astype("int64").to_numpy()
    counts, floats = _event_counts(part)
    window_sums = _CachedWindowSums(counts, floats, user_codes, len(user_ids))
    short_columns = [_COUNT_NAMES.index(name) for name in _SHORT_COUNTS]
    long_columns = [_COUNT_NAMES.index(name) for name in _LONG_COUNTS]

    pieces = []
    for index, as_of in enumerate(times):
        before = stamps < as_of.value
        if not before.any():
            continue
        last_event = np.full(len(user_ids), _NO_EVENT, dtype="int64")
        np.maximum.at(last_event, user_codes[before], stamps[before])
        present = last_event > _NO_EVENT

        long_window = before & (stamps >= (as_of - LONG_WINDOW).value)
        long_sums, long_floats = window_sums.sums(long_window)
        short_window = long_window & (stamps >= (as_of - SHORT_WINDOW).value)
        short_sums, short_floats = window_sums.sums(short_window)

        piece = pd.DataFrame(
            short_sums[present][:, short_columns],
            columns=[f"{name}_30d" for name in _SHORT_COUNTS],
        )
        piece["dwell_30d"] = short_floats[present, 0]
        long_frame = pd.DataFrame(
            long_sums[present][:, long_columns], columns=_LONG_COUNT_SUMS
        )
        for position, name in enumerate(_CATEGORY_LOG_PRICES):
            long_frame[name] = long_floats[present, 1 + position]
        piece = pd.concat([piece, long_frame], axis=1)
        piece.insert(0, "user_id", user_ids[present])
        piece.insert(1, "as_of_index", index)
        recency = (as_of.value - last_event[present]) / _NANOS_PER_DAY
        piece.insert(2, "recency_days", recency)
        pieces.append(piece)

    if not pieces:
        return _empty_window_sums()
    return pd.concat(pieces, ignore_index=True)


class _CachedWindowSums:
    """Per-user sums of the count and float matrices over a mask of events.

    A partition often lies wholly inside a window, so the sums over all of its events
    are computed once and reused.
    """

    def __init__(
        self, counts: np.ndarray, floats: np.ndarray, codes: np.ndarray, size: int
    ) -> None:
        self._counts = counts
        self._floats = floats
        self._codes = codes
        self._size = size
        self._all: tuple[np.ndarray, np.ndarray] | None = None

    def sums(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if mask.all():
            if self._all is None:
                self._all = self._masked_sums(mask)
            return self._all
        return self._masked_sums(mask)

    def _masked_sums(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        counts = np.zeros((self._size, self._counts.shape[1]), dtype="int64")
        floats = np.zeros((self._size, self._floats.shape[1]), dtype="float64")
        if mask.any():
            np.add.at(counts, self._codes[mask], self._counts[mask])
            np.add.at(floats, self._codes[mask], self._floats[mask])
        return counts, floats


def _combine_window_sums(frame: pd.DataFrame) -> pd.DataFrame:
    """Reduce concatenated partial sums to one row per (user, as-of index)."""
    if frame.empty:
        return _empty_window_sums()
    grouped = frame.groupby(_KEYS, sort=False, observed=True)
    sums = grouped[[*_SHORT_SUMS, *_LONG_SUMS]].sum()
    sums.insert(0, "recency_days", grouped["recency_days"].min())
    return sums.reset_index()


def _empty_window_sums() -> pd.DataFrame:
    columns: dict[str, pd.Series] = {
        "user_id": pd.Series(dtype="string"),
        "as_of_index": pd.Series(dtype="int64"),
        "recency_days": pd.Series(dtype="float64"),
    }
    for column in [*_SHORT_SUMS, *_LONG_SUMS]:
        dtype = "float64" if column in _FLOAT_SUMS else "int64"
        columns[column] = pd.Series(dtype=dtype)
    return pd.DataFrame(columns)


def _session_pairs(part: pd.DataFrame, times: list[pd.Timestamp]) -> pd.DataFrame:
    """Return one partition's distinct (user, as-of index, session, count) rows.

    The count is "sessions_30d" for a session with an event in the 30 days before
    the as-of time, and "orders_90d" for one with a purchase in the 90 days.
    """
    part = part.dropna(subset=["user_id", "event_ts", "session_id"])
    stamps = part["event_ts"].astype("int64").to_numpy()
    is_purchase = (part["event_type"] == "purchase").fillna(False).to_numpy(bool)
    pairs = part[["user_id", "session_id"]]
    pieces = []
    for index, as_of in enumerate(times):
        before = stamps < as_of.value
        windows = {
            "sessions_30d": before & (stamps >= (as_of - SHORT_WINDOW).value),
            "orders_90d": before
            & is_purchase
            & (stamps >= (as_of - LONG_WINDOW).value),
        }
        for count, in_window in windows.items():
            if in_window.any():
                distinct = pairs[in_window].drop_duplicates()
                pieces.append(distinct.assign(as_of_index=index, count=count))
    if not pieces:
        return pd.DataFrame(
            {
                "user_id": pd.Series(dtype="string"),
                "session_id": pd.Series(dtype="string"),
                "as_of_index": pd.Series(dtype="int64"),
                "count": pd.Series(dtype="string"),
            }
        )
    return pd.concat(pieces, ignore_index=True)


def _combine_session_pairs(frame: pd.DataFrame) -> pd.DataFrame:
    # A session that crosses midnight has events in two day partitions.
    return frame.drop_duplicates(ignore_index=True)


def _count_sessions(frame: pd.DataFrame) -> pd.DataFrame:
    """Return sessions_30d and orders_90d per (user, as-of index)."""
    distinct = _combine_session_pairs(frame)
    counts = distinct.groupby([*_KEYS, "count"], observed=True).size()
    table = counts.unstack("count", fill_value=0)
    table = table.reindex(columns=_SESSION_COUNTS, fill_value=0)
    table.columns.name = None
    return table.reset_index().astype({name: "int64" for name in _SESSION_COUNTS})


def _assemble(
    users: pd.DataFrame,
    totals: pd.DataFrame,
    sessions: pd.DataFrame,
    times: list[pd.Timestamp],
) -> pd.DataFrame:
    """Join the reduced sums onto every (user, as-of) pair and derive the features."""
    grid = _user_grid(users, times)
    sums = grid.merge(totals, on=_KEYS, how="left")
    sums = sums.merge(sessions, on=_KEYS, how="left")
    unmatched = len(totals) - int(totals.merge(grid[_KEYS], on=_KEYS).shape[0])
    if unmatched:
        log.info(
            "skipped %d (user, as-of) event aggregates of users not signed up yet "
            "or missing from the users table",
            unmatched,
        )
    for column in [*_SHORT_SUMS, *_LONG_SUMS, *_SESSION_COUNTS]:
        sum_dtype = np.float64 if column in _FLOAT_SUMS else np.int64
        sums[column] = sums[column].fillna(0).astype(sum_dtype)

    out = pd.DataFrame(
        {
            "user_id": sums["user_id"].astype("string"),
            "event_timestamp": sums["event_timestamp"],
            "created_timestamp": pd.Timestamp.now(tz="UTC").as_unit("ns"),
            "recency_days": sums["recency_days"]
            .fillna(RECENCY_SENTINEL_DAYS)
            .clip(upper=RECENCY_SENTINEL_DAYS),
            "frequency_30d": sums["purchases_30d"],
            "spend_30d_cents": sums["spend_30d"],
            "aov_cents": _rounded_mean(sums["spend_90d"], sums["orders_90d"]),
            "events_30d": sums["events_30d"],
            "sessions_30d": sums["sessions_30d"],
            "browse_seconds_30d": sums["dwell_30d"],
            "click_depth": _share(sums["clicks_30d"], sums["sessions_30d"]),
            "cart_rate": _share(sums["carts_30d"], sums["views_30d"]),
        }
    )
    _add_category_features(out, sums)
    _add_hour_features(out, sums)
    since_signup = sums["event_timestamp"] - sums["signup_ts"]
    out["days_since_signup"] = since_signup.dt.total_seconds() / 86_400
    out["orders_90d"] = sums["orders_90d"]
    out["views_per_session_30d"] = _share(sums["views_30d"], sums["sessions_30d"])
    out["view_price_index_90d"] = _view_price_index(sums, totals)
    out["uses_app"] = (sums["device"] == APP_DEVICE).fillna(False).astype(int)
    out = out.sort_values(["event_timestamp", "user_id"], ignore_index=True)
    return out.astype(FEATURE_COLUMNS)[list(FEATURE_COLUMNS)]


def _user_grid(users: pd.DataFrame, times: list[pd.Timestamp]) -> pd.DataFrame:
    """Return one row per (user, as-of) for users who signed up before the as-of."""
    known = users.dropna(subset=["user_id", "signup_ts"]).sort_values("signup_ts")
    # A user ingested in two batches keeps the earliest signup and its device.
    signups = (
        known.groupby("user_id", observed=True)
        .agg(signup_ts=("signup_ts", "min"), device=("device", "first"))
        .reset_index()
    )
    as_of_frame = pd.DataFrame(
        {
            "as_of_index": np.arange(len(times), dtype="int64"),
            "event_timestamp": pd.DatetimeIndex(times).as_unit("ns"),
        }
    )
    grid = signups.merge(as_of_frame, how="cross")
    grid = grid[grid["signup_ts"] < grid["event_timestamp"]]
    grid["user_id"] = grid["user_id"].astype("string")
    return grid.reset_index(drop=True)


def _rounded_mean(total: pd.Series, count: pd.Series) -> pd.Series:
    """Return ``total / count`` rounded half up in integers, and 0 where count is 0."""
    total_values = total.to_numpy(dtype="int64")
    count_values = count.to_numpy(dtype="int64")
    safe_count = np.where(count_values > 0, count_values, 1)
    mean = (2 * total_values + safe_count) // (2 * safe_count)
    return pd.Series(np.where(count_values > 0, mean, 0), index=total.index)


def _share(part: pd.Series, whole: pd.Series) -> pd.Series:
    whole_values = whole.to_numpy(dtype="float64")
    safe_whole = np.where(whole_values > 0, whole_values, 1.0)
    share = part.to_numpy(dtype="float64") / safe_whole
    return pd.Series(np.where(whole_values > 0, share, 0.0), index=part.index)


def _view_price_index(sums: pd.DataFrame, totals: pd.DataFrame) -> pd.Series:
    """Return how dear the items a user viewed in 90 days are for their categories.

    The index is the exponential of the user's mean, over priced views, of the log
    price minus the mean log price of every view of that category before the same
    as-of time. So 1 is a typical price, 0.5 half of it, and 0 means no priced view.
    """
    view_counts = sums[_CATEGORY_VIEWS].to_numpy(dtype="float64")
    log_sums = sums[_CATEGORY_LOG_PRICES].to_numpy(dtype="float64")
    # Reference log price per (as-of, category), over every user with events.
    reference = totals.groupby("as_of_index")[
        [*_CATEGORY_VIEWS, *_CATEGORY_LOG_PRICES]
    ].sum()
    all_views = reference[_CATEGORY_VIEWS].to_numpy(dtype="float64")
    all_logs = reference[_CATEGORY_LOG_PRICES].to_numpy(dtype="float64")
    mean_log = np.divide(
        all_logs, all_views, out=np.zeros_like(all_logs), where=all_views > 0
    )
    position = reference.index.get_indexer(pd.Index(sums["as_of_index"]))
    # An as-of time without any view has no reference row; its users have no views.
    row_mean_log = np.where(position[:, None] >= 0, mean_log[position], 0.0)

    total_views = view_counts.sum(axis=1)
    deviation = (log_sums - view_counts * row_mean_log).sum(axis=1)
    safe_views = np.where(total_views > 0, total_views, 1.0)
    index = np.where(total_views > 0, np.exp(deviation / safe_views), 0.0)
    return pd.Series(index, index=sums.index)


def _add_category_features(out: pd.DataFrame, sums: pd.DataFrame) -> None:
    """Add affinity_<category> (shares of categorized 90-day events) and top_category.

    Events whose category is missing or outside CATEGORIES count in no share, so
    the shares of a user sum to 1, or are all 0 when no event has a known category.
    Ties for the top category go to the one listed first in CATEGORIES.
    """
    counts = sums[_CATEGORY_COUNTS].to_numpy(dtype="float64")
    total = counts.sum(axis=1)
    safe_total = np.where(total > 0, total, 1.0)[:, None]
    shares = np.where(total[:, None] > 0, counts / safe_total, 0.0)
    for position, category in enumerate(CATEGORIES):
        out[f"affinity_{category}"] = shares[:, position]
    top = np.asarray(CATEGORIES, dtype=object)[counts.argmax(axis=1)]
    out["top_category"] = np.where(total > 0, top, NO_CATEGORY)


def _add_hour_features(out: pd.DataFrame, sums: pd.DataFrame) -> None:
    """Add peak_hour and hour_share_* from the 90-day counts per UTC hour.

    Ties for the peak hour go to the earliest hour.
    """
    counts = sums[_HOUR_COUNTS].to_numpy(dtype="float64")
    total = counts.sum(axis=1)
    out["peak_hour"] = np.where(total > 0, counts.argmax(axis=1), NO_PEAK_HOUR)
    safe_total = np.where(total > 0, total, 1.0)
    for part, (start, end) in DAY_PARTS.items():
        in_part = counts[:, start:end].sum(axis=1)
        out[f"hour_share_{part}"] = np.where(total > 0, in_part / safe_total, 0.0)
