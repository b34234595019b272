"""Turn a solved allocation into a campaign plan with a holdout and propensities."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime

import numpy as np
import numpy.typing as npt
import pandas as pd

from couponflow.allocation.scoring import OfferScores
from couponflow.allocation.solver import NO_OFFER, Solution
from couponflow.schemas import CHANNELS, CONTROL_ARM, UTC_TS

log = logging.getLogger(__name__)

HOLDOUT = "holdout"
TREATMENT = "treatment"

# Columns and dtypes of a campaign plan, as the allocations table stores them.
PLAN_COLUMNS: dict[str, str] = {
    "user_id": "string",
    "group_name": "string",
    "arm": "string",
    # The arm the policy chose before the holdout draw: equal to arm for treatment
    # users, the withheld coupon (or control) for holdout users.
    "policy_arm": "string",
    "channel": "string",
    "send_at": UTC_TS,
    "propensity": "float64",
    "score_uplift": "float64",
    "expected_profit_cents": "int64",
    "expected_cost_cents": "int64",
}


def assign_campaign(
    user_ids: Sequence[str] | pd.Series,
    solution: Solution,
    scores: OfferScores,
    holdout_fraction: float,
    seed: int,
    send_at: datetime | pd.Timestamp,
    channel: str | Mapping[str, str],
) -> pd.DataFrame:
    """Build one plan row per user: group, arm, propensity and expected cents.

    The holdout is drawn first and independently of the policy: each user joins it
    with probability ``holdout_fraction``, from ``numpy.random.default_rng(seed)``.
    Holdout users get ``"control"``; treatment users get the solution's coupon, or
    ``"control"`` when the policy gives them none.

    ``propensity`` is the probability of the recorded arm under this randomized
    policy: ``1 - holdout_fraction`` for a treatment user with a coupon,
    ``holdout_fraction`` for a holdout user whom the policy would have given one, and
    1.0 for a user whom the policy gives nothing. ``score_uplift`` is the predicted
    uplift of the policy's coupon for every user, holdout included (0 without one).
    ``expected_profit_cents`` and ``expected_cost_cents`` belong to the recorded
    arm, so they are 0 for control rows, rounded half up to whole cents.

    ``channel`` is either one channel for every row, or a map from coupon id to
    channel. With a map, each row gets the channel of the policy's coupon (holdout
    rows included), and users whom the policy gives nothing get no channel.
    """
    ids = _validate_user_ids(user_ids, scores.n_users)
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(
            f"holdout_fraction must be in [0, 1), got {holdout_fraction}; use 0 for "
            "no holdout"
        )
    if solution.choice.shape != (scores.n_users,):
        raise ValueError(
            f"solution covers {solution.choice.shape[0]} users but scores cover "
            f"{scores.n_users}; solve on the same score matrices"
        )
    if solution.choice.size and not (
        NO_OFFER <= solution.choice.min() and solution.choice.max() < scores.n_offers
    ):
        raise ValueError(
            f"solution.choice must be -1 or an offer column below {scores.n_offers}, "
            f"got values in [{solution.choice.min()}, {solution.choice.max()}]"
        )
    channels = _channel_per_column(channel, scores.offer_ids)
    send_at_utc = _validate_send_at(send_at)

    n_users = scores.n_users
    holdout = draw_holdout(n_users, holdout_fraction, seed)
    choice = solution.choice
    offered = choice != NO_OFFER
    treated = offered & ~holdout
    users = np.flatnonzero(offered)

    uplift = np.zeros(n_users)
    uplift[users] = scores.uplift[users, choice[users]]
    profit = np.zeros(n_users)
    cost = np.zeros(n_users)
    treated_users = np.flatnonzero(treated)
    profit[treated_users] = scores.profit_cents[treated_users, choice[treated_users]]
    cost[treated_users] = scores.cost_cents[treated_users, choice[treated_users]]

    offer_ids = np.asarray([*scores.offer_ids, CONTROL_ARM], dtype=object)
    # Index -1 (no offer) lands on the trailing CONTROL_ARM entry.
    arm = offer_ids[np.where(treated, choice, NO_OFFER)]
    channel_column = np.asarray(channels, dtype=object)[choice]
    propensity = np.ones(n_users)
    propensity[treated] = 1.0 - holdout_fraction
    propensity[offered & holdout] = holdout_fraction

    plan = pd.DataFrame(
        {
            "user_id": pd.array(ids, dtype="string"),
            "group_name": pd.array(np.where(holdout, HOLDOUT, TREATMENT), "string"),
            "arm": pd.array(arm, dtype="string"),
            "policy_arm": pd.array(offer_ids[choice], dtype="string"),
            "channel": pd.array(channel_column, dtype="string"),
            "send_at": pd.DatetimeIndex([send_at_utc]).repeat(n_users).astype(UTC_TS),
            "propensity": propensity,
            "score_uplift": uplift,
            "expected_profit_cents": _round_half_up(profit),
            "expected_cost_cents": _round_half_up(cost),
        }
    )
    log.info(
        "campaign plan: %d users, %d in holdout, %d treated with a coupon",
        n_users,
        int(holdout.sum()),
        int(treated.sum()),
    )
    return plan


def draw_holdout(n_users: int, holdout_fraction: float, seed: int) -> npt.NDArray:
    """Return a boolean mask, each user in the holdout with ``holdout_fraction``."""
    rng = np.random.default_rng(seed)
    return np.asarray(rng.random(n_users) < holdout_fraction)


def _channel_per_column(
    channel: str | Mapping[str, str], offer_ids: Sequence[str]
) -> list[str | None]:
    """Return the channel of each offer column, then the channel of "no offer"."""
    if isinstance(channel, str):
        if channel not in CHANNELS:
            raise ValueError(f"channel must be one of {CHANNELS}, got {channel!r}")
        return [channel] * (len(offer_ids) + 1)
    missing = [c for c in offer_ids if c not in channel]
    if missing:
        raise ValueError(f"channel map has no channel for coupons {missing}")
    invalid = {c: channel[c] for c in offer_ids if channel[c] not in CHANNELS}
    if invalid:
        raise ValueError(f"channel map values must be one of {CHANNELS}, got {invalid}")
    return [channel[c] for c in offer_ids] + [None]


def _round_half_up(cents: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    # Half up is toward +infinity, also for negative profits (-2.5 becomes -2).
    return np.floor(cents + 0.5).astype(np.int64)


def _validate_user_ids(user_ids: Sequence[str] | pd.Series, n_users: int) -> list[str]:
    ids = list(user_ids)
    if len(ids) != n_users:
        raise ValueError(
            f"got {len(ids)} user_ids for {n_users} scored users; pass the ids in "
            "the row order of the score matrices"
        )
    bad = [i for i, v in enumerate(ids) if not isinstance(v, str) or v == ""]
    if bad:
        raise ValueError(
            f"user_ids must be non-empty strings; row {bad[0]} is {ids[bad[0]]!r}"
        )
    if len(set(ids)) != len(ids):
        duplicated = pd.Series(ids)[pd.Series(ids).duplicated()].iloc[0]
        raise ValueError(
            f"user_ids must be unique; {duplicated!r} appears more than once"
        )
    return ids


def _validate_send_at(send_at: datetime | pd.Timestamp) -> pd.Timestamp:
    stamp = pd.Timestamp(send_at)
    if stamp.tzinfo is None:
        raise ValueError(
            f"send_at must be timezone-aware, got naive {send_at!r}; pass a UTC time"
        )
    return stamp.tz_convert("UTC")
