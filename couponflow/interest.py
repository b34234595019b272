"""User x category interest from implicit-feedback matrix factorization of events.

Alternating least squares on the user x item matrix of weighted event counts, after
Hu, Koren and Volinsky, "Collaborative Filtering for Implicit Feedback Datasets" (2008).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime

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
# Confidence of an observed preference: 1 + ALPHA * log(1 + weighted count).
DEFAULT_ALPHA = 10.0
# Standard deviation of the random initial factors.
_INIT_SCALE = 0.1
# Nonzeros per batch of the normal equations, bounding the (nnz, k, k) buffer.
_NNZ_PER_BATCH = 20_000
# Users per batch when the predicted preferences are averaged per category.
_USERS_PER_BATCH = 4_096


def compute_interest(
    events: pd.DataFrame,
    users: pd.DataFrame,
    as_of: datetime,
    *,
    factors: int = DEFAULT_FACTORS,
    regularization: float = DEFAULT_REGULARIZATION,
    iterations: int = DEFAULT_ITERATIONS,
    alpha: float = DEFAULT_ALPHA,
    seed: int = 0,
) -> pd.DataFrame:
    """Return one row per user who signed up before ``as_of``, with interest scores.

    Columns are ``user_id`` and ``interest_<category>`` for each of CATEGORIES, in
    [0, 1]. Only events strictly before ``as_of`` count, weighted by EVENT_WEIGHTS.
    Events without an item id, a known event type or a category of CATEGORIES are
    skipped, because the factorization learns from items. A user's interest in a
    category is the mean predicted preference, clipped to [0, 1], over the
    category's items seen in the events. A user without usable events gets the mean
    interest of the eligible users with events. Eligibility is the user feature
    rule: a user id and a signup time strictly before ``as_of``, the earliest
    signup when a user appears twice. Rows are sorted by user id, and the same
    inputs and ``seed`` give the same scores.
    """
    cutoff = _as_utc(as_of)
    _check_hyperparameters(factors, regularization, iterations, alpha)
    started = time.perf_counter()
    eligible = _eligible_users(users, cutoff)
    interactions = _weighted_interactions(events, cutoff)

    scores = np.zeros((len(eligible), len(CATEGORIES)))
    has_history = np.zeros(len(eligible), dtype=bool)
    if not interactions.empty:
        matrix, user_ids, item_categories = _interaction_matrix(interactions)
        user_factors, item_factors = _implicit_als(
            matrix, factors, regularization, iterations, alpha, seed
        )
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
    frame = pd.DataFrame(scores, columns=list(INTEREST_COLUMNS))
    frame.insert(0, "user_id", pd.Series(eligible, dtype="string"))
    log.info(
        "interest as of %s: %d users, %d with events, %d on the population mean, "
        "%.1f s",
        cutoff.isoformat(),
        len(frame),
        int(has_history.sum()),
        int((~has_history).sum()),
        time.perf_counter() - started,
    )
    return frame


def _eligible_users(users: pd.DataFrame, cutoff: pd.Timestamp) -> list[str]:
    missing = [c for c in ("user_id", "signup_ts") if c not in users.columns]
    if missing:
        raise ValueError(f"users is missing columns {missing} of the USERS contract")
    known = users.dropna(subset=["user_id", "signup_ts"])
    signups = pd.to_datetime(known["signup_ts"], utc=True)
    first = signups.groupby(known["user_id"].astype(str)).min()
    return sorted(first.index[first < cutoff].tolist())


def _weighted_interactions(events: pd.DataFrame, cutoff: pd.Timestamp) -> pd.DataFrame:
    """Return user_id, item, category and weight, summed per (user, item)."""
    required = ["user_id", "event_ts", "event_type", "item_id", "category"]
    missing = [c for c in required if c not in events.columns]
    if missing:
        raise ValueError(f"events is missing columns {missing} of the EVENTS contract")
    frame = events[required].copy()
    frame = frame[pd.to_datetime(frame["event_ts"], utc=True) < cutoff]
    frame["weight"] = frame["event_type"].astype("string").map(EVENT_WEIGHTS)
    usable = (
        frame["user_id"].notna()
        & frame["item_id"].notna()
        & frame["weight"].notna()
        & frame["category"].astype("string").isin(CATEGORIES).fillna(False)
    )
    if (~usable).any():
        log.info(
            "interest: skipped %d of %d events before %s with no user or item, an "
            "unknown event type or a category outside CATEGORIES",
            int((~usable).sum()),
            len(frame),
            cutoff.isoformat(),
        )
    frame = frame[usable]
    frame = pd.DataFrame(
        {
            "user_id": frame["user_id"].astype(str),
            "item": frame["item_id"].astype(str),
            "category": frame["category"].astype(str),
            "weight": frame["weight"].astype(np.float64),
        }
    )
    grouped = frame.groupby(["user_id", "item", "category"], as_index=False)
    return pd.DataFrame(grouped["weight"].sum())


def _interaction_matrix(
    interactions: pd.DataFrame,
) -> tuple[sparse.csr_matrix, list[str], npt.NDArray[np.int64]]:
    """Return the users x items CSR matrix of weights, its user ids, and the category
    index of each item column."""
    # An item seen under several categories belongs to the one with the most weight,
    # ties going to the first in CATEGORIES.
    per_category = pd.DataFrame(
        interactions.groupby(["item", "category"], as_index=False)["weight"].sum()
    )
    per_category["rank"] = per_category["category"].map(CATEGORIES.index)
    per_category = per_category.sort_values(
        by=["item", "weight", "rank"], ascending=[True, False, True]
    )
    item_category = per_category.drop_duplicates("item").set_index("item")["rank"]

    per_item = pd.DataFrame(
        interactions.groupby(["user_id", "item"], as_index=False)["weight"].sum()
    )
    user_ids, user_codes = np.unique(per_item["user_id"], return_inverse=True)
    item_ids, item_codes = np.unique(per_item["item"], return_inverse=True)
    matrix = sparse.csr_matrix(
        (per_item["weight"].to_numpy(), (user_codes, item_codes)),
        shape=(len(user_ids), len(item_ids)),
    )
    categories = item_category.loc[item_ids].to_numpy(dtype=np.int64)
    return matrix, [str(u) for u in user_ids], categories


def _implicit_als(
    weights: sparse.csr_matrix,
    factors: int,
    regularization: float,
    iterations: int,
    alpha: float,
    seed: int,
) -> tuple[FloatMatrix, FloatMatrix]:
    """Return user and item factors whose products approximate the 0/1 preferences.

    Preference is 1 where a user has events on an item, with confidence
    ``1 + alpha * log1p(weight)``, and 0 elsewhere with confidence 1.
    """
    confidence = weights.copy()
    confidence.data = 1.0 + alpha * np.log1p(confidence.data)
    by_item = confidence.T.tocsr()
    rng = np.random.default_rng(seed)
    user_factors = rng.normal(0.0, _INIT_SCALE, (weights.shape[0], factors))
    item_factors = rng.normal(0.0, _INIT_SCALE, (weights.shape[1], factors))
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
    result = np.empty((n_rows, k))
    indptr = confidence.indptr
    start = 0
    while start < n_rows:
        # Rows up to _NNZ_PER_BATCH nonzeros further on, and at least one row.
        limit = indptr[start] + _NNZ_PER_BATCH
        stop = max(start + 1, int(np.searchsorted(indptr, limit, side="right")) - 1)
        stop = min(stop, n_rows)
        lo, hi = indptr[start], indptr[stop]
        columns = confidence.indices[lo:hi]
        values = confidence.data[lo:hi]
        vectors = fixed[columns]
        outer = (
            (values - 1.0)[:, None, None] * vectors[:, :, None] * vectors[:, None, :]
        )
        segments = indptr[start:stop] - lo
        lhs = gram[None, :, :] + np.add.reduceat(outer, segments, axis=0)
        rhs = np.add.reduceat(values[:, None] * vectors, segments, axis=0)
        result[start:stop] = np.linalg.solve(lhs, rhs[:, :, None])[:, :, 0]
        start = stop
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
        out[start : start + _USERS_PER_BATCH] = np.clip(block, 0.0, 1.0) @ averaging
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
