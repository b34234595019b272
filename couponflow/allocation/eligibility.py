"""Eligibility of each user for each (offer, channel), from user and offer attributes.

The mask is users x offers x channels and combines the offer rules (new users only,
category match, minimum history, listed channels, validity at delivery) with the
user's contact rules (frequency cap, cool-down, reachable channels). A user without
history matches a category offer on the collaborative-filtering interest score
(couponflow.interest) when the users frame has it, because such a user has no
category affinity.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
import numpy.typing as npt
import pandas as pd

from couponflow.schemas import ALL_CATEGORIES, CATEGORIES, CHANNELS, CONTROL_ARM

log = logging.getLogger(__name__)

BoolArray = npt.NDArray[np.bool_]

# User columns that build_eligibility reads; affinity_<category> is read for each
# category that an offer targets, and frequency_cap, reachable_<channel> and
# interest_<category> are optional.
USER_COLUMNS: tuple[str, ...] = (
    "days_since_signup",
    "events_30d",
    "exposures_in_window",
    "days_since_last_exposure",
)
# Offer columns; new_users_only and min_events_30d are optional.
OFFER_COLUMNS: tuple[str, ...] = (
    "coupon_id",
    "category",
    "channels",
    "starts_at",
    "ends_at",
)


def _default_lags() -> dict[str, timedelta]:
    return {
        "email": timedelta(minutes=30),
        "push": timedelta(minutes=1),
        "sms": timedelta(minutes=5),
    }


@dataclass(frozen=True)
class EligibilityRules:
    """Thresholds of :func:`build_eligibility`; times in days unless named otherwise."""

    # An offer with new_users_only needs days_since_signup below this.
    new_user_max_days: float = 30.0
    # A category offer needs affinity_<category> above this; "all" needs none.
    min_affinity: float = 0.05
    # A user without history matches a category offer with interest_<category>
    # above this instead. The score is the mean predicted preference over the
    # category's items, so 0.1 means a predicted engagement with a tenth of them.
    # NOTE: the scale depends on the store's catalogue and traffic. On the simulated
    # demo store (10,000 users, 45 days, 200 items per category), at the first and
    # last of 21 daily snapshots, the median score per category was 0.08 to 0.11
    # and the population mean, which every user without events gets, 0.12 to 0.18.
    min_interest: float = 0.1
    # Every offer needs at least this many events in 30 days, unless the offer's
    # min_events_30d column sets its own minimum. The default of 0 lets a shopper
    # without recent events get offers, so that the store can court new and lapsed
    # users: with 1, a user signed up but not yet active could never get a
    # new-users-only offer or a category offer on interest. An offer that should
    # go to active users only sets its own min_events_30d.
    min_events_30d: int = 0
    # A user may get a message only with fewer than frequency_cap exposures in the
    # last frequency_window_days (a frequency_cap user column overrides the cap),
    # and only cooldown_days after the last exposure.
    frequency_cap: int = 3
    frequency_window_days: int = 7
    cooldown_days: float = 1.0
    # Time from send to delivery, per channel; an offer must still be valid then.
    delivery_lag: Mapping[str, timedelta] = field(default_factory=_default_lags)


def build_eligibility(
    users: pd.DataFrame,
    offers: pd.DataFrame,
    send_at: npt.NDArray[np.datetime64],
    rules: EligibilityRules | None = None,
    channels: Sequence[str] = CHANNELS,
) -> BoolArray:
    """Return the ``(n_users, n_offers, n_channels)`` mask of allowed options.

    ``users`` contains the columns of ``USER_COLUMNS`` (``days_since_last_exposure`` is
    NaN or inf for a user never exposed), ``offers`` the COUPONS columns of
    ``OFFER_COLUMNS`` and ``send_at`` the UTC send time of each (user, channel), as
    :meth:`SendHours.send_times` returns it. An option is allowed when all hold:

    - the user passes the frequency cap and the cool-down;
    - the user has the offer's minimum ``events_30d``;
    - a new-users-only offer goes to a user signed up under ``new_user_max_days``
      ago (an unknown signup is not new);
    - the offer's category is "all", or the user's affinity for it is above
      ``min_affinity``. A user without history (no event in 30 days, so
      ``events_30d`` is 0 or missing, and no category affinity, so every
      ``affinity_<category>`` column of ``users`` is 0 or missing) matches on
      ``interest_<category>`` above ``min_interest`` instead, when ``users`` has
      that column, and on affinity, which then fails, when it does not;
    - the offer lists the channel, and the user is reachable on it;
    - the offer is valid when the message arrives: ``starts_at <= send_at + lag``
      and ``send_at + lag <= ends_at``.

    Raises ``ValueError`` naming a missing column or a shape that does not match.

    NOTE: each (user, channel) send hour is chosen before this check, so an offer
    that expires before that hour is ineligible even when an earlier hour would
    have delivered it in time.
    """
    rules = rules or EligibilityRules()
    channels = tuple(channels)
    _require_columns(users, USER_COLUMNS, "users")
    _require_columns(offers, OFFER_COLUMNS, "offers")
    n_users, n_offers = len(users), len(offers)
    times = np.asarray(send_at)
    if times.shape != (n_users, len(channels)):
        raise ValueError(
            f"send_at must have shape ({n_users}, {len(channels)}), one time per user "
            f"and channel, got {times.shape}"
        )
    missing_lags = [c for c in channels if c not in rules.delivery_lag]
    if missing_lags:
        raise ValueError(f"rules.delivery_lag has no lag for channels {missing_lags}")

    user_ok = _contact_allowed(users, rules)
    offer_ok = _offer_allowed(users, offers, rules)
    channel_ok = _channels_reachable(users, channels)
    listed = _listed_channels(offers, channels)
    on_time = _valid_on_delivery(offers, times, channels, rules)

    mask = on_time
    mask &= listed[None, :, :]
    mask &= channel_ok[:, None, :]
    mask &= offer_ok[:, :, None]
    mask &= user_ok[:, None, None]
    log.info(
        "eligibility: %d users x %d offers x %d channels, %d users contactable, %d "
        "options allowed",
        n_users,
        n_offers,
        len(channels),
        int(user_ok.sum()),
        int(mask.sum()),
    )
    return mask


def exposure_history(
    exposures: pd.DataFrame,
    user_ids: Sequence[str] | pd.Series,
    as_of: datetime | pd.Timestamp,
    window_days: int,
) -> pd.DataFrame:
    """Count each user's exposures in the last ``window_days`` and days since the last.

    ``exposures`` follows the EXPOSURES contract; control rows sent no message and
    do not count, nor do exposures at or after ``as_of``. Returns a frame in the
    order of ``user_ids`` with ``exposures_in_window`` (int64) and
    ``days_since_last_exposure`` (float64, inf for a user never exposed).
    """
    as_of_utc = pd.Timestamp(as_of)
    if as_of_utc.tzinfo is None:
        raise ValueError(f"as_of must be timezone-aware, got {as_of!r}; pass UTC")
    as_of_utc = as_of_utc.tz_convert("UTC")
    if window_days < 1:
        raise ValueError(f"window_days must be >= 1, got {window_days}")
    _require_columns(exposures, ("user_id", "arm", "send_at"), "exposures")

    sent = exposures[(exposures["arm"] != CONTROL_ARM) & exposures["send_at"].notna()]
    sent = sent[pd.to_datetime(sent["send_at"], utc=True) < as_of_utc]
    send_at = pd.to_datetime(sent["send_at"], utc=True)
    start = as_of_utc - pd.Timedelta(days=window_days)
    recent = sent[send_at >= start].groupby("user_id").size()
    last = send_at.groupby(sent["user_id"]).max()

    ids = pd.Index(pd.Series(user_ids, dtype="string"))
    counts = recent.reindex(ids, fill_value=0).to_numpy(dtype=np.int64)
    since = (as_of_utc - last.reindex(ids)).dt.total_seconds() / 86_400
    return pd.DataFrame(
        {
            "exposures_in_window": counts,
            "days_since_last_exposure": since.fillna(np.inf).to_numpy(dtype=np.float64),
        }
    )


def _contact_allowed(users: pd.DataFrame, rules: EligibilityRules) -> BoolArray:
    exposures = users["exposures_in_window"].to_numpy(dtype=np.float64)
    if "frequency_cap" in users.columns:
        cap = users["frequency_cap"].fillna(rules.frequency_cap).to_numpy(np.float64)
    else:
        cap = np.full(len(users), float(rules.frequency_cap))
    since = users["days_since_last_exposure"].to_numpy(dtype=np.float64)
    # A user never exposed has NaN or inf and passes the cool-down.
    cooled = np.isnan(since) | (since >= rules.cooldown_days)
    return np.asarray((np.nan_to_num(exposures, nan=0.0) < cap) & cooled)


def _offer_allowed(
    users: pd.DataFrame, offers: pd.DataFrame, rules: EligibilityRules
) -> BoolArray:
    n_users, n_offers = len(users), len(offers)
    events = np.nan_to_num(users["events_30d"].to_numpy(dtype=np.float64), nan=0.0)
    signup_days = users["days_since_signup"].to_numpy(dtype=np.float64)
    is_new = np.nan_to_num(signup_days, nan=np.inf) < rules.new_user_max_days
    new_only = _offer_column(offers, "new_users_only", False).astype(bool)
    min_events = _offer_column(offers, "min_events_30d", rules.min_events_30d)
    no_history = _without_history(users)

    allowed = np.empty((n_users, n_offers), dtype=bool)
    for j, category in enumerate(
        offers["category"].astype("string").fillna(ALL_CATEGORIES)
    ):
        column = events >= min_events[j]
        if new_only[j]:
            column &= is_new
        if category != ALL_CATEGORIES:
            coupon_id = str(offers["coupon_id"].iloc[j])
            column &= _category_match(
                users, coupon_id, str(category), no_history, rules
            )
        allowed[:, j] = column
    return allowed


def _category_match(
    users: pd.DataFrame,
    coupon_id: str,
    category: str,
    no_history: BoolArray,
    rules: EligibilityRules,
) -> BoolArray:
    """Return which users match a category offer.

    Users match on affinity, except that users without history match on interest
    when ``users`` has the category's interest column.
    """
    name = f"affinity_{category}"
    if name not in users.columns:
        raise ValueError(
            f"offer {coupon_id!r} targets category {category!r} but users has no "
            f"{name} column"
        )
    affinity = np.nan_to_num(users[name].to_numpy(dtype=np.float64), nan=0.0)
    match = affinity > rules.min_affinity
    interest_name = f"interest_{category}"
    if interest_name in users.columns:
        interest = users[interest_name].to_numpy(dtype=np.float64)
        # A missing score (no interest row for the user) does not match.
        by_interest = np.nan_to_num(interest, nan=0.0) > rules.min_interest
        match = np.where(no_history, by_interest, match)
    return np.asarray(match, dtype=bool)


def _without_history(users: pd.DataFrame) -> BoolArray:
    """Return which users have no event in 30 days and no category affinity.

    Reads the affinity_<category> columns that ``users`` has, so a user without
    recent events whose only affinity is for a category without a column counts as
    without history.
    """
    events = np.nan_to_num(users["events_30d"].to_numpy(dtype=np.float64), nan=0.0)
    names = [f"affinity_{c}" for c in CATEGORIES if f"affinity_{c}" in users.columns]
    affinity = np.nan_to_num(users[names].to_numpy(dtype=np.float64), nan=0.0)
    has_affinity = (affinity > 0).any(axis=1)
    return np.asarray((events <= 0) & ~has_affinity, dtype=bool)


def _channels_reachable(users: pd.DataFrame, channels: tuple[str, ...]) -> BoolArray:
    reachable = np.ones((len(users), len(channels)), dtype=bool)
    for c, channel in enumerate(channels):
        name = f"reachable_{channel}"
        if name in users.columns:
            reachable[:, c] = users[name].fillna(False).to_numpy(dtype=bool)
    return reachable


def _listed_channels(offers: pd.DataFrame, channels: tuple[str, ...]) -> BoolArray:
    listed = np.zeros((len(offers), len(channels)), dtype=bool)
    for j, text in enumerate(offers["channels"].astype("string").fillna("")):
        names = {part.strip() for part in str(text).split(",") if part.strip()}
        listed[j] = [channel in names for channel in channels]
    return listed


def _valid_on_delivery(
    offers: pd.DataFrame,
    send_at: npt.NDArray[np.datetime64],
    channels: tuple[str, ...],
    rules: EligibilityRules,
) -> BoolArray:
    lag_ns = np.array(
        [rules.delivery_lag[c] // timedelta(microseconds=1) * 1_000 for c in channels],
        dtype=np.int64,
    )
    delivered = send_at.astype("datetime64[ns]").astype(np.int64) + lag_ns[None, :]
    starts = _utc_ns(offers["starts_at"])
    ends = _utc_ns(offers["ends_at"])
    on_time = delivered[:, None, :] <= ends[None, :, None]
    on_time &= delivered[:, None, :] >= starts[None, :, None]
    return on_time


def _utc_ns(column: pd.Series) -> npt.NDArray[np.int64]:
    times = pd.DatetimeIndex(pd.to_datetime(column, utc=True))
    if times.isna().any():
        raise ValueError(f"offers.{column.name} must not have missing times")
    return np.asarray(times.as_unit("ns").asi8, dtype=np.int64)


def _offer_column(
    offers: pd.DataFrame, name: str, default: float
) -> npt.NDArray[np.float64]:
    if name not in offers.columns:
        return np.full(len(offers), float(default))
    return np.asarray(offers[name].astype("float64").fillna(default), dtype=np.float64)


def _require_columns(frame: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{name} is missing columns {missing}")
