"""User x category interest from implicit-feedback matrix factorization of events.

Alternating least squares on the user x item matrix of weighted event counts, after
Hu, Koren and Volinsky, "Collaborative Filtering for Implicit Feedback Datasets" (2008).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy import sparse

from couponflow.schemas import CATEGORIES

log = logging.getLogger(__name__)

FloatMatrix = npt.NDArray[np.float64]

INTEREST_COLUMNS: tuple[str, ...] = tuple(f"interest_{c}" for c in CATEGORIES)
# Weight of one event of each type in the interaction count: the stronger the intent
# an event shows, the more it counts.
EVENT_WEIGHTS: dict[str, float] = {
    "view": 1.0,
    "click": 2.0,
    "add_to_cart": 4.0,
    "purchase": 8.0,
    "review": 4.0,
}
DEFAULT_FACTORS = 16
DEFAULT_REGULARIZATION = 0.1
DEFAULT_ITERATIONS = 10
# Sweeps of a snapshot that starts from the item factors of the snapshot before it.
DEFAULT_WARM_ITERATIONS = 2
# Confidence of an observed preference: 1 + ALPHA * log(1 + weighted count).
DEFAULT_ALPHA = 10.0
# Standard deviation of the random initial factors.
_INIT_SCALE = 0.1
# Rows per batch of the normal equations, bounding the (rows, k, k) buffer.
_ROWS_PER_SOLVE = 8_192
# Users per batch when the predicted preferences are averaged per category.
_USERS_PER_BATCH = 4_096


def compute_interest(
    events: pd.DataFrame,
    users: pd.DataFrame,
    as_of: datetime,
    *,
    lookback: timedelta | None = None,
    factors: int = DEFAULT_FACTORS,
    regularization: float = DEFAULT_REGULARIZATION,
    iterations: int = DEFAULT_ITERATIONS,
    alpha: float = DEFAULT_ALPHA,
    seed: int = 0,
) -> pd.DataFrame:
    """Return one row per user who signed up before ``as_of``, with interest scores.

    Columns are ``user_id`` and ``interest_<category>`` for each of CATEGORIES, in
    [0, 1]. Only events strictly before ``as_of`` count, and with ``lookback`` only
    those at or after ``as_of - lookback``, weighted by EVENT_WEIGHTS.
    Events without an item id, a known event type or a category of CATEGORIES are
    skipped, because the factorization learns from items. A user's interest in a
    category is the mean predicted preference, clipped to [0, 1], over the
    category's items seen in the events. A user without usable events gets the mean
    interest of the eligible users with events. Eligibility is the user feature
    rule: a user id and a signup time strictly before ``as_of``, the earliest
    signup when a user appears twice. Rows are sorted by user id, and the same
    inputs and ``seed`` give the same scores.
    """
    frame = compute_interest_snapshots(
        events,
        users,
        [as_of],
        lookback=lookback,
        factors=factors,
        regularization=regularization,
        iterations=iterations,
        alpha=alpha,
        seed=seed,
    )
    return frame.drop(columns="event_timestamp")


def compute_interest_snapshots(
    events: pd.DataFrame,
    users: pd.DataFrame,
    as_of: Sequence[datetime],
    *,
    lookback: timedelta | None = None,
    factors: int = DEFAULT_FACTORS,
    regularization: float = DEFAULT_REGULARIZATION,
    iterations: int = DEFAULT_ITERATIONS,
    warm_iterations: int = DEFAULT_WARM_ITERATIONS,
    alpha: float = DEFAULT_ALPHA,
    seed: int = 0,
) -> pd.DataFrame:
    """Compute the interest scores of every user at each of several as-of times.

    Returns ``user_id``, ``event_timestamp`` (the as-of time) and INTEREST_COLUMNS,
    one row per as-of time and user who signed up before it, sorted by time and
    then user id. Each time gets its own factorization of the events before it,
    scored as :func:`compute_interest` scores one. The earliest time starts from
    random factors and runs ``iterations`` sweeps, as compute_interest does, so a
    single time gives compute_interest's rows. Each later time starts from the item
    factors of the time before it, with random ones for items new since then, and
    runs ``warm_iterations`` sweeps. Those starting factors come from earlier
    events only, so no snapshot depends on an event at or after its time. Raises
    ``ValueError`` for an empty ``as_of``, a timezone-naive time or a non-positive
    ``lookback``.
    """
    if len(as_of) == 0:
        raise ValueError("as_of is empty: pass at least one timezone-aware UTC time")
    cutoffs = sorted({_as_utc(value) for value in as_of})
    if lookback is not None and lookback <= timedelta(0):
        raise ValueError(f"lookback must be positive or None, got {lookback}")
    _check_hyperparameters(factors, regularization, iterations, alpha)
    if warm_iterations < 1:
        raise ValueError(f"warm_iterations must be >= 1, got {warm_iterations}")
    signups = _first_signups(users)
    encoded = _encode_events(events)
    hyperparameters = _Hyperparameters(
        factors, regularization, iterations, warm_iterations, alpha
    )
    rng = np.random.default_rng(seed)

    frames = []
    previous: _ItemFactors | None = None
    for position, cutoff in enumerate(cutoffs, start=1):
        started = time.perf_counter()
        eligible = sorted(signups.index[signups < cutoff].tolist())
        scores, has_history, previous = _snapshot_scores(
            encoded, eligible, cutoff, lookback, hyperparameters, rng, previous
        )
        frame = pd.DataFrame(scores, columns=list(INTEREST_COLUMNS))
        frame.insert(0, "user_id", pd.Series(eligible, dtype="string"))
        frame.insert(1, "event_timestamp", cutoff)
        frames.append(frame)
        log.info(
            "interest snapshot %d of %d, as of %s: %d users, %d with events, %d on "
            "the population mean, %.1f s",
            position,
            len(cutoffs),
            cutoff.isoformat(),
            len(frame),
            int(has_history.sum()),
            int((~has_history).sum()),
            time.perf_counter() - started,
        )
    result = pd.concat(frames, ignore_index=True)
    result["event_timestamp"] = pd.to_datetime(
        result["event_timestamp"], utc=True
    ).dt.as_unit("ns")
    return result


class _Hyperparameters(NamedTuple):
    factors: int
    regularization: float
    iterations: int
    warm_iterations: int
    alpha: float


class _ItemFactors(NamedTuple):
    """Item factors of one snapshot, by item code of _EncodedEvents, codes sorted."""

    codes: npt.NDArray[np.int64]
    factors: FloatMatrix


class _EncodedEvents(NamedTuple):
    """The usable events as integer codes, one entry per event."""

    user_ids: npt.NDArray[np.object_]
    user_codes: npt.NDArray[np.int64]
    item_count: int
    item_codes: npt.NDArray[np.int64]
    category_codes: npt.NDArray[np.int64]
    weights: FloatMatrix
    stamps: npt.NDArray[np.int64]


def _snapshot_scores(
    encoded: _EncodedEvents,
    eligible: list[str],
    cutoff: pd.Timestamp,
    lookback: timedelta | None,
    hyperparameters: _Hyperparameters,
    rng: np.random.Generator,
    previous: _ItemFactors | None,
) -> tuple[FloatMatrix, npt.NDArray[np.bool_], _ItemFactors | None]:
    """Fit the factorization on the events before ``cutoff``; score ``eligible``.

    Starts from ``previous`` when given. Returns the users x CATEGORIES scores,
    whether each user had usable events, and the item factors for the next
    snapshot. Users without usable events get the mean of those with them.
    """
    in_window = encoded.stamps < cutoff.value
    if lookback is not None:
        in_window &= encoded.stamps >= (cutoff - lookback).value

    scores = np.zeros((len(eligible), len(CATEGORIES)))
    has_history = np.zeros(len(eligible), dtype=bool)
    if in_window.any():
        matrix, user_ids, item_codes, item_categories = _interaction_matrix(
            encoded, in_window
        )
        start = _starting_item_factors(
            item_codes, previous, rng, hyperparameters.factors
        )
        sweeps = (
            hyperparameters.iterations
            if previous is None
            else hyperparameters.warm_iterations
        )
        user_factors, item_factors = _implicit_als(
            matrix,
            start,
            hyperparameters.regularization,
            sweeps,
            hyperparameters.alpha,
        )
        previous = _ItemFactors(item_codes, item_factors)
        known = pd.Index(user_ids).get_indexer(pd.Index(eligible))
        has_history = known >= 0
        scores[has_history] = _category_interest(
            user_factors[known[has_history]], item_factors, item_categories
        )

    if has_history.any():
        fallback = scores[has_history].mean(axis=0)
    else:
        fallback = np.zeros(len(CATEGORIES))
        log.warning(
            "no eligible user has events before %s, so every interest score is 0",
            cutoff.isoformat(),
        )
    scores[~has_history] = fallback
    return scores, has_history, previous


def _starting_item_factors(
    item_codes: npt.NDArray[np.int64],
    previous: _ItemFactors | None,
    rng: np.random.Generator,
    factors: int,
) -> FloatMatrix:
    """Return the previous snapshot's factors of known items, random ones for others.

    The draw has one row per item either way, so the generator's state after it
    depends only on the number of items in the window.
    """
    start = rng.normal(0.0, _INIT_SCALE, (len(item_codes), factors))
    if previous is not None:
        position = np.searchsorted(previous.codes, item_codes)
        position = np.minimum(position, len(previous.codes) - 1)
        known = previous.codes[position] == item_codes
        start[known] = previous.factors[position[known]]
    return start


def _first_signups(users: pd.DataFrame) -> pd.Series:
    """Return the earliest signup time per user id, for users with both."""
    missing = [c for c in ("user_id", "signup_ts") if c not in users.columns]
    if missing:
        raise ValueError(f"users is missing columns {missing} of the USERS contract")
    known = users.dropna(subset=["user_id", "signup_ts"])
    signups = pd.to_datetime(known["signup_ts"], utc=True)
    return signups.groupby(known["user_id"].astype(str)).min()


def _encode_events(events: pd.DataFrame) -> _EncodedEvents:
    """Drop the events the factorization cannot use and encode the rest as codes."""
    required = ["user_id", "event_ts", "event_type", "item_id", "category"]
    missing = [c for c in required if c not in events.columns]
    if missing:
        raise ValueError(f"events is missing columns {missing} of the EVENTS contract")
    stamps = pd.to_datetime(events["event_ts"], utc=True)
    weights = events["event_type"].astype("string").map(EVENT_WEIGHTS)
    category = events["category"].astype("string")
    usable = (
        events["user_id"].notna()
        & events["item_id"].notna()
        & stamps.notna()
        & weights.notna()
        & category.isin(CATEGORIES).fillna(False)
    ).to_numpy(dtype=bool)
    if not usable.all():
        log.info(
            "interest: skipped %d of %d events with no user, item or time, an "
            "unknown event type or a category outside CATEGORIES",
            int((~usable).sum()),
            len(events),
        )

    # Codes follow the sorted ids, so that the factorization does not depend on
    # the order of the rows.
    user_codes, user_ids = pd.factorize(
        events["user_id"][usable].astype(str), sort=True
    )
    item_codes, item_ids = pd.factorize(
        events["item_id"][usable].astype(str), sort=True
    )
    category_codes = pd.Categorical(category[usable], categories=CATEGORIES).codes
    return _EncodedEvents(
        user_ids=np.asarray(user_ids, dtype=object),
        user_codes=np.asarray(user_codes, dtype=np.int64),
        item_count=len(item_ids),
        item_codes=np.asarray(item_codes, dtype=np.int64),
        category_codes=np.asarray(category_codes, dtype=np.int64),
        weights=np.asarray(weights[usable], dtype=np.float64),
        stamps=np.asarray(stamps[usable].dt.as_unit("ns").astype("int64")),
    )


def _interaction_matrix(
    encoded: _EncodedEvents, in_window: npt.NDArray[np.bool_]
) -> tuple[sparse.csr_matrix, list[str], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Return the users x items CSR matrix of summed weights of the events in the
    window, its user ids, its item codes and the category index of each item column.

    Only users and items with an event in the window get a row or a column.
    """
    user_codes = encoded.user_codes[in_window]
    item_codes = encoded.item_codes[in_window]
    weights = encoded.weights[in_window]
    shape = (len(encoded.user_ids), encoded.item_count)
    # Converting from coordinates sums the weights of repeated (user, item) pairs.
    full = sparse.csr_matrix((weights, (user_codes, item_codes)), shape=shape)
    rows = np.flatnonzero(np.diff(full.indptr))
    columns = np.flatnonzero(full.getnnz(axis=0))
    matrix = full[rows][:, columns]

    # An item seen under several categories belongs to the one with the most weight,
    # ties going to the first in CATEGORIES (argmax returns the first maximum).
    n_categories = len(CATEGORIES)
    per_category = np.bincount(
        item_codes * n_categories + encoded.category_codes[in_window],
        weights=weights,
        minlength=encoded.item_count * n_categories,
    ).reshape(encoded.item_count, n_categories)
    categories = per_category[columns].argmax(axis=1).astype(np.int64)
    user_ids = [str(u) for u in encoded.user_ids[rows]]
    return matrix, user_ids, columns.astype(np.int64), categories


def _implicit_als(
    weights: sparse.csr_matrix,
    item_factors: FloatMatrix,
    regularization: float,
    iterations: int,
    alpha: float,
) -> tuple[FloatMatrix, FloatMatrix]:
    """Return user and item factors whose products approximate the 0/1 preferences.

    Preference is 1 where a user has events on an item, with confidence
    ``1 + alpha * log1p(weight)``, and 0 elsewhere with confidence 1. Each sweep
    solves the users given ``item_factors`` and then the items, so only the item
    factors need starting values.
    """
    confidence = weights.copy()
    confidence.data = 1.0 + alpha * np.log1p(confidence.data)
    by_item = confidence.T.tocsr()
    user_factors = np.empty((weights.shape[0], item_factors.shape[1]))
    for _ in range(iterations):
        user_factors = _solve_side(confidence, item_factors, regularization)
        item_factors = _solve_side(by_item, user_factors, regularization)
    return user_factors, item_factors


def _solve_side(
    confidence: sparse.csr_matrix, fixed: FloatMatrix, regularization: float
) -> FloatMatrix:
    """Solve the least-squares factors of every row of ``confidence`` given ``fixed``.

    Row ``u`` solves ``(F'F + F'(C_u - I)F + reg * I) x = F' C_u p_u``, where only the
    row's nonzeros add to F'F. Every row must have a nonzero, which is true because
    rows and columns come from observed interactions.
    """
    n_rows, k = confidence.shape[0], fixed.shape[1]
    gram = fixed.T @ fixed + regularization * np.eye(k)
    excess = confidence.copy()
    excess.data = excess.data - 1.0
    result = np.empty((n_rows, k))
    for start in range(0, n_rows, _ROWS_PER_SOLVE):
        stop = min(start + _ROWS_PER_SOLVE, n_rows)
        block = excess[start:stop]
        # F'(C_u - I)F is built one column at a time, so no (nonzeros, k, k) array
        # is needed. Column a of every row's k x k matrix is the sparse product of
        # C - I with the fixed factors scaled by their a-th entry.
        lhs = np.empty((stop - start, k, k))
        for a in range(k):
            lhs[:, :, a] = block @ (fixed * fixed[:, a, None])
        lhs += gram[None, :, :]
        # F' C_u p_u, where the preference p_u is 1 on the row's nonzeros, else 0.
        rhs = confidence[start:stop] @ fixed
        result[start:stop] = np.linalg.solve(lhs, rhs[:, :, None])[:, :, 0]
    return result


def _category_interest(
    user_factors: FloatMatrix,
    item_factors: FloatMatrix,
    item_categories: npt.NDArray[np.int64],
) -> FloatMatrix:
    """Return the mean clipped predicted preference per category, users x CATEGORIES.

    A category without any item in the events gets 0.
    """
    n_categories = len(CATEGORIES)
    membership = np.zeros((len(item_categories), n_categories))
    membership[np.arange(len(item_categories)), item_categories] = 1.0
    counts = membership.sum(axis=0)
    averaging = membership / np.where(counts > 0, counts, 1.0)
    out = np.empty((len(user_factors), n_categories))
    for start in range(0, len(user_factors), _USERS_PER_BATCH):
        block = user_factors[start : start + _USERS_PER_BATCH] @ item_factors.T
        np.clip(block, 0.0, 1.0, out=block)
        out[start : start + _USERS_PER_BATCH] = block @ averaging
    return out


def _check_hyperparameters(
    factors: int, regularization: float, iterations: int, alpha: float
) -> None:
    if factors < 1:
        raise ValueError(f"factors must be >= 1, got {factors}")
    if regularization <= 0:
        raise ValueError(
            f"regularization must be > 0 so that every system is solvable, got "
            f"{regularization}"
        )
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")


def _as_utc(value: datetime) -> pd.Timestamp:
    stamp = pd.Timestamp(value)
    if stamp.tzinfo is None:
        raise ValueError(f"as_of must be timezone-aware (UTC), got naive {value}")
    return stamp.tz_convert("UTC")
