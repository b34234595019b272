"""Simulated online store with known ground truth, deterministic for a seed.

It draws users, events, a coupon catalogue, one past randomized campaign and the true
response of every user to every coupon, so that targeting and measurement can be scored.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy.special import expit, logit, ndtr

from couponflow import lake
from couponflow.money import percent_of_cents_array
from couponflow.schemas import (
    ALL_CATEGORIES,
    CATEGORIES,
    CHANNELS,
    CONTROL_ARM,
    COUPONS,
    EVENT_TYPES,
    EVENTS,
    EXPOSURES,
    OUTCOMES,
    USERS,
    coerce,
)
from couponflow.settings import Settings

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
ProgressCallback = Callable[[str], None]

DEFAULT_START = pd.Timestamp("2026-09-01T00:00:00Z").as_unit("ns")
PAST_CAMPAIGN_ID = "past-001"
PAST_POLICY = "uniform"
PAST_SEND_DAYS_BEFORE_END = 8
ATTRIBUTION_DAYS = 7
MIN_DAYS = PAST_SEND_DAYS_BEFORE_END + 1
NEW_USER_SHARE = 0.12
SURE_THING_SHARE = 0.08
# Deal seekers are very price sensitive (Beta(8, 2), mean 0.8), the others little
# (Beta(2, 8), mean 0.2).
DEAL_SEEKER_SHARE = 0.3

# True response. One order's basket is lognormal around the user's mean basket. A
# basket up to TOPUP_BAND below a coupon's min_spend is topped up to min_spend with
# the user's top-up probability. A category coupon is redeemable when the basket
# contains that category, which has probability 1 - (1 - taste)**BASKET_ITEMS, and
# then its discount applies to the whole basket.
ORDER_LOG_SIGMA = 0.5
TOPUP_BAND = 0.3
BASKET_ITEMS = 3
# Logit gain per unit of expected discount share, scaled by price sensitivity.
GAIN_PER_DEPTH = 10.0
# Logit gain of being reminded of the store, scaled by the chance that the coupon
# is redeemable, so that a coupon that cannot be used adds no reminder for free.
REMINDER_GAIN = 0.15
# Shoppers value free shipping above its cost in cents.
FREE_SHIPPING_PREMIUM = 1.5

# Messages. A coupon persuades only as far as its message gets attention: the logit
# effect of a coupon (gain minus aversion) is multiplied by the attention of the
# channel and send hour. The discount applies at checkout whether or not the
# message was read. Attention is min(1, CHANNEL_ATTENTION * reach) * timing. The
# reach is the user's relative reach on the channel: engagement for email, the
# PUSH_REACH_* values for push, 1 for SMS. Timing falls from 1 at the user's usual
# hour to OFF_HOURS_ATTENTION far from it.
CHANNEL_ATTENTION = {"email": 0.7, "push": 0.5, "sms": 0.6}
APP_USER_SHARE = 0.45
PUSH_REACH_APP_USER = 2.0
PUSH_REACH_OTHER = 0.2
OFF_HOURS_ATTENTION = 0.4
# Open rate of a message at reach 1 and the usual hour, per channel.
OPEN_RATE = {"email": 0.22, "push": 0.10, "sms": 0.35}
CLICK_GIVEN_OPEN = 0.30

# Events.
ITEMS_PER_CATEGORY = 200
CATEGORY_MEDIAN_PRICE_CENTS = {
    "electronics": 12_000,
    "fashion": 4_000,
    "home": 5_000,
    "beauty": 2_000,
    "grocery": 1_200,
    "sports": 4_500,
}
CLICK_GIVEN_VIEW = 0.40
CART_GIVEN_CLICK = 0.30
REVIEW_GIVEN_PURCHASE = 0.06
MAX_QUANTITY = 10
# Mean dwell seconds per event type, in EVENT_TYPES order.
MEAN_DWELL_SECONDS = (35.0, 20.0, 12.0, 60.0, 90.0)
REGIONS = ("north", "south", "east", "west", "central")
REGION_WEIGHTS = (0.2, 0.25, 0.2, 0.2, 0.15)
# App users shop in the store's app, which the users table lists as their device.
DEVICES = ("app", "mobile", "desktop", "tablet")
APP_USER_DEVICE_WEIGHTS = (1.0, 0.0, 0.0, 0.0)
OTHER_DEVICE_WEIGHTS = (0.0, 0.45, 0.4, 0.15)

# coupon_id, kind, value, min_spend_cents, category, valid_days, stock per user,
# channels. Value is cents for amount_off and free_shipping, basis points for
# percent_off.
COUPON_CATALOGUE: tuple[tuple[str, str, int, int, str, int, float, str], ...] = (
    ("amt-500", "amount_off", 500, 2_500, ALL_CATEGORIES, 14, 0.30, "email,push"),
    ("amt-1500-elec", "amount_off", 1_500, 10_000, "electronics", 14, 0.10, "email"),
    ("pct-10", "percent_off", 1_000, 0, ALL_CATEGORIES, 7, 0.30, "email,push,sms"),
    ("pct-20-fashion", "percent_off", 2_000, 3_000, "fashion", 7, 0.15, "email,sms"),
    ("pct-15-beauty", "percent_off", 1_500, 2_000, "beauty", 14, 0.15, "push,sms"),
    ("ship-free", "free_shipping", 599, 0, ALL_CATEGORIES, 7, 0.30, "push,sms"),
)
# Coupons stay valid this long after the simulated window, for new campaigns.
COUPON_VALID_AFTER_END = pd.Timedelta(days=90)

TASTE_COLUMNS = tuple(f"taste_{c}" for c in CATEGORIES)
TRUTH_COLUMNS = (
    "user_id",
    "coupon_id",
    "p_convert",
    "expected_revenue_cents",
    "expected_discount_cents",
)
_TRUTH_FILES = ("latent.parquet", "truth.parquet", "coupons.parquet", "meta.json")
_META_TIMESTAMPS = ("start", "end", "send_at")


@dataclass(frozen=True)
class World:
    """Raw tables of one simulated store, with the latent parameters and the truth."""

    users: pd.DataFrame
    events: pd.DataFrame
    coupons: pd.DataFrame
    exposures: pd.DataFrame
    outcomes: pd.DataFrame
    latent: pd.DataFrame
    truth: pd.DataFrame
    meta: dict[str, Any]


@dataclass(frozen=True)
class WorldTruth:
    """The evaluation-only part of a persisted world, enough for :func:`respond`."""

    latent: pd.DataFrame
    truth: pd.DataFrame
    coupons: pd.DataFrame
    meta: dict[str, Any]


def simulate_world(
    n_users: int,
    days: int,
    seed: int,
    start: datetime | None = None,
    progress: ProgressCallback | None = None,
) -> World:
    """Draw a store of ``n_users`` over ``days`` days from ``start``.

    The same arguments give identical frames. The past campaign is sent
    PAST_SEND_DAYS_BEFORE_END days before the end, so ``days`` must be at least
    MIN_DAYS. ``progress`` is called with the name of each stage as it starts.
    """
    if n_users < 1:
        raise ValueError(f"n_users must be >= 1, got {n_users}")
    if days < MIN_DAYS:
        raise ValueError(
            f"days must be >= {MIN_DAYS} so that the past campaign and its "
            f"{ATTRIBUTION_DAYS}-day window fit, got {days}"
        )
    begin = _as_utc(start) if start is not None else DEFAULT_START
    end = begin + pd.Timedelta(days=days)
    send_day = end - pd.Timedelta(days=PAST_SEND_DAYS_BEFORE_END)
    streams = np.random.SeedSequence(seed).spawn(5)
    latent_rng, users_rng, events_rng, campaign_rng, outcome_rng = (
        np.random.default_rng(s) for s in streams
    )
    report = progress or (lambda stage: None)
    started = time.perf_counter()

    report("latent")
    latent = _draw_latent(latent_rng, n_users)
    report("users")
    users = _draw_users(users_rng, latent, begin, send_day)
    coupons = coupon_catalogue(begin, end, n_users)
    report("events")
    events = _draw_events(events_rng, latent, users, begin, days)
    report("truth")
    response = _compute_response(latent, coupons)
    truth = _truth_frame(latent, response)
    report("past campaign")
    # NOTE: the events are drawn without the past campaign, so purchases in its
    # attribution window neither reflect the coupons sent nor match the outcomes.
    exposures = _draw_past_exposures(campaign_rng, latent, coupons, send_day)
    outcomes = _draw_outcomes(
        outcome_rng, latent, response, exposures, PAST_CAMPAIGN_ID
    )
    meta: dict[str, Any] = {
        "start": begin,
        "end": end,
        "past_campaign_id": PAST_CAMPAIGN_ID,
        "send_at": send_day,
        "attribution_window_days": ATTRIBUTION_DAYS,
        "seed": seed,
        "n_users": n_users,
        "days": days,
    }
    log.info(
        "simulated %s users, %s events, %s days in %.1f s (seed %s)",
        n_users,
        len(events),
        days,
        time.perf_counter() - started,
        seed,
    )
    return World(users, events, coupons, exposures, outcomes, latent, truth, meta)


def coupon_catalogue(start: datetime, end: datetime, n_users: int) -> pd.DataFrame:
    """Return the hand-made coupon catalogue, valid from ``start`` to 90 days past end.

    Stock scales with ``n_users``, so that the past campaign cannot exhaust it.
    """
    begin = _as_utc(start)
    finish = _as_utc(end) + COUPON_VALID_AFTER_END
    rows = [
        {
            "coupon_id": coupon_id,
            "kind": kind,
            "value": value,
            "min_spend_cents": min_spend,
            "category": category,
            "valid_days": valid_days,
            "stock": max(10, int(np.ceil(stock_per_user * n_users))),
            "channels": channels,
            "starts_at": begin,
            "ends_at": finish,
        }
        for (
            coupon_id,
            kind,
            value,
            min_spend,
            category,
            valid_days,
            stock_per_user,
            channels,
        ) in COUPON_CATALOGUE
    ]
    return coerce(pd.DataFrame(rows), COUPONS)


def true_incremental_profit_cents(
    truth: pd.DataFrame, margin_rate: float
) -> pd.DataFrame:
    """Return the expected profit in cents of each coupon over control, per user.

    The result has one row per user_id (the index) and one float column per coupon,
    ``margin_rate * (E[revenue | coupon] - E[revenue | control])`` minus
    ``E[discount | coupon]``. Control is not a column, because its profit is 0.
    """
    if not 0 <= margin_rate <= 1:
        raise ValueError(f"margin_rate must be in [0, 1], got {margin_rate}")
    missing = [c for c in TRUTH_COLUMNS if c not in truth.columns]
    if missing:
        raise KeyError(f"truth frame: missing columns {missing}")
    revenue = truth.pivot(
        index="user_id", columns="coupon_id", values="expected_revenue_cents"
    )
    discount = truth.pivot(
        index="user_id", columns="coupon_id", values="expected_discount_cents"
    )
    if CONTROL_ARM not in revenue.columns:
        raise ValueError(f"truth frame has no {CONTROL_ARM!r} rows to compare against")
    coupon_ids = [c for c in pd.unique(truth["coupon_id"]) if c != CONTROL_ARM]
    uplift = revenue[coupon_ids].sub(revenue[CONTROL_ARM], axis=0)
    profit = margin_rate * uplift - discount[coupon_ids]
    profit = profit.reindex(pd.unique(truth["user_id"])).astype("float64")
    profit.columns.name = "coupon_id"
    return profit


def true_response(latent: pd.DataFrame, coupons: pd.DataFrame) -> pd.DataFrame:
    """Return the truth frame of every user in ``latent`` under each of ``coupons``.

    The frame has TRUTH_COLUMNS and the layout of ``World.truth``, control included,
    so that coupons the world never drew (a designed catalogue) can be scored too.
    Raises ``ValueError`` when the catalogue fails the simulator's checks.
    """
    return _truth_frame(latent, _compute_response(latent, coupons))


def respond(
    world_or_latent: World | WorldTruth | pd.DataFrame,
    assignments: pd.DataFrame,
    campaign_id: str,
    seed: int,
) -> pd.DataFrame:
    """Draw the outcomes of a new campaign from the true response.

    ``assignments`` has one row per user with columns user_id, arm (a coupon id or
    "control"), channel and send_at. A coupon's effect, and its message's open
    rate, depend on the channel and on how far send_at is from the user's usual
    hour; :func:`expected_response` returns the expected values. A bare latent
    frame uses the default catalogue and skips the check of its validity dates.
    Returns a frame in the outcomes contract, in the order of ``assignments``.
    """
    latent, coupons, check_validity = _latent_and_coupons(world_or_latent)
    frame = _validated_assignments(assignments, latent, coupons, check_validity)
    response = _compute_response(latent, coupons)
    # NOTE: coupon stock is not enforced, so every assigned coupon can be redeemed.
    # Mixing the campaign id into the seed keeps two campaigns drawn with the same
    # seed from sharing their random numbers.
    rng = np.random.default_rng([seed, zlib.crc32(campaign_id.encode())])
    outcomes = _draw_outcomes(rng, latent, response, frame, campaign_id)
    log.info("drew outcomes of campaign %s for %s users", campaign_id, len(outcomes))
    return outcomes


def expected_response(
    world_or_latent: World | WorldTruth | pd.DataFrame, assignments: pd.DataFrame
) -> pd.DataFrame:
    """Return the true expected outcome of each assignment, for evaluation.

    ``assignments`` has the columns of :func:`respond` (user_id, arm, channel,
    send_at), but a user may have several rows, for example one per arm to compare.
    The result has TRUTH_COLUMNS, with the arm as coupon_id, then channel and
    send_at, in the order of ``assignments``. Sending each coupon by its first listed
    channel at the user's usual hour, rounded to a whole UTC hour as the past
    campaign does, gives the values of ``World.truth``. Raises like :func:`respond`
    on unknown users, arms, channels or dates.
    """
    latent, coupons, check_validity = _latent_and_coupons(world_or_latent)
    frame = _validated_assignments(
        assignments, latent, coupons, check_validity, unique_users=False
    )
    response = _compute_response(latent, coupons)
    user = pd.Index(latent["user_id"].astype(str)).get_indexer(
        pd.Index(frame["user_id"])
    )
    arm = pd.Index(response.arms).get_indexer(pd.Index(frame["arm"]))
    channel = frame["channel"].to_numpy(dtype=object)
    p = _row_conversion(
        latent, response, user, arm, channel, _send_hours(frame["send_at"])
    )
    result = pd.DataFrame(
        {
            "user_id": frame["user_id"].astype("string"),
            "coupon_id": frame["arm"].astype("string"),
            "p_convert": p,
            "expected_revenue_cents": p * response.revenue_given_conversion[user, arm],
            "expected_discount_cents": p
            * response.discount_given_conversion[user, arm],
            "channel": frame["channel"].astype("string"),
            "send_at": frame["send_at"],
        }
    )
    return result


def write_world(settings: Settings, world: World) -> dict[str, list[Path]]:
    """Write the raw tables as raw batches, and latent, truth and meta to truth_dir.

    Events go in one batch per UTC day of the window, empty days included. Returns
    the written paths per table, with the truth_dir files under the key "truth".
    """
    settings.ensure_dirs()
    campaign_id = str(world.meta["past_campaign_id"])
    written: dict[str, list[Path]] = {
        "users": [lake.write_raw_batch(settings, "users", "users-0001", world.users)],
        "coupons": [
            lake.write_raw_batch(settings, "coupons", "coupons-0001", world.coupons)
        ],
        "events": _write_event_batches(settings, world),
        "exposures": [
            lake.write_raw_batch(
                settings, "exposures", f"exposures-{campaign_id}", world.exposures
            )
        ],
        "outcomes": [
            lake.write_raw_batch(
                settings, "outcomes", f"outcomes-{campaign_id}", world.outcomes
            )
        ],
        "truth": _write_truth(settings, world),
    }
    log.info(
        "wrote world: %s event batches, truth in %s",
        len(written["events"]),
        settings.truth_dir,
    )
    return written


def load_world_truth(settings: Settings) -> WorldTruth:
    """Read the latent parameters, truth, coupons and meta of :func:`write_world`."""
    assert settings.truth_dir is not None
    folder = settings.truth_dir
    missing = [name for name in _TRUTH_FILES if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"simulated truth not found in {folder}: missing {missing}; "
            "run simulate_world and write_world with these settings first"
        )
    meta = json.loads((folder / "meta.json").read_text())
    for key in _META_TIMESTAMPS:
        meta[key] = pd.Timestamp(meta[key])
    coupons = pd.read_parquet(folder / "coupons.parquet")
    return WorldTruth(
        latent=pd.read_parquet(folder / "latent.parquet"),
        truth=pd.read_parquet(folder / "truth.parquet"),
        coupons=coerce(coupons, COUPONS),
        meta=meta,
    )


def _latent_and_coupons(
    world_or_latent: World | WorldTruth | pd.DataFrame,
) -> tuple[pd.DataFrame, pd.DataFrame, bool]:
    """Return the latent frame, the catalogue and whether to check coupon dates.

    A bare latent frame uses the default catalogue, whose dates are not checked.
    """
    if isinstance(world_or_latent, pd.DataFrame):
        return world_or_latent, coupon_catalogue(DEFAULT_START, DEFAULT_START, 1), False
    return world_or_latent.latent, world_or_latent.coupons, True


# --- latent parameters and users -------------------------------------------------


def _draw_latent(rng: np.random.Generator, n_users: int) -> pd.DataFrame:
    n = n_users
    deal_seeker = rng.random(n) < DEAL_SEEKER_SHARE
    price_sensitivity = np.where(
        deal_seeker, rng.beta(8.0, 2.0, n), rng.beta(2.0, 8.0, n)
    )
    tastes = rng.dirichlet(np.full(len(CATEGORIES), 0.6), n)
    evening = rng.random(n) < 0.6
    pref_hour = (
        np.where(evening, rng.normal(20.0, 1.5, n), rng.normal(12.5, 2.0, n)) % 24.0
    )
    hour_spread = rng.uniform(1.0, 3.5, n)
    sure_thing = rng.random(n) < SURE_THING_SHARE
    sessions_per_day = np.where(
        sure_thing, rng.uniform(0.6, 1.5, n), rng.lognormal(np.log(0.15), 0.7, n)
    )
    purchase_prob = np.where(
        sure_thing, rng.uniform(0.5, 0.8, n), rng.beta(1.2, 14.0, n)
    )
    basket_cents = np.round(rng.lognormal(np.log(4_500.0), 0.5, n)).astype(np.int64)
    # Aversion is likelier among shoppers who care little about price, so that the
    # browsing prices in the events carry a signal of it.
    averse = ~sure_thing & (rng.random(n) < 0.03 + 0.17 * (1.0 - price_sensitivity))
    coupon_aversion = np.where(averse, rng.uniform(0.3, 1.2, n), 0.0)
    engagement = rng.uniform(0.5, 1.5, n)
    # Purchase sessions are Poisson with rate sessions * purchase_prob per day, so
    # this is the chance of at least one purchase in the attribution window.
    p0 = 1.0 - np.exp(-ATTRIBUTION_DAYS * sessions_per_day * purchase_prob)
    app_user = rng.random(n) < APP_USER_SHARE

    latent = pd.DataFrame(
        {
            "user_id": pd.array(np.arange(n).astype(str), dtype="string"),
            "price_sensitivity": price_sensitivity,
            **{col: tastes[:, i] for i, col in enumerate(TASTE_COLUMNS)},
            "pref_hour": pref_hour,
            "hour_spread": hour_spread,
            "sessions_per_day": sessions_per_day,
            "purchase_prob": purchase_prob,
            "basket_cents": basket_cents,
            "coupon_aversion": coupon_aversion,
            "sure_thing": sure_thing,
            "topup_prob": 0.2 + 0.6 * price_sensitivity,
            "engagement": engagement,
            "p0": p0,
            "deal_seeker": deal_seeker,
            "app_user": app_user,
        }
    )
    return latent


def _draw_users(
    rng: np.random.Generator,
    latent: pd.DataFrame,
    start: pd.Timestamp,
    send_day: pd.Timestamp,
) -> pd.DataFrame:
    n = len(latent)
    is_new = rng.random(n) < NEW_USER_SHARE
    # New users sign up inside the window but before the past campaign's send day,
    # so that every user is eligible for it.
    new_span = (send_day - start).total_seconds()
    offset_new = rng.uniform(0.0, new_span, n)
    offset_old = -rng.uniform(86_400.0, 1_000 * 86_400.0, n)
    offset_s = np.floor(np.where(is_new, offset_new, offset_old)).astype(np.int64)
    signup = start + pd.to_timedelta(offset_s, unit="s")
    device_weights = np.where(
        latent["app_user"].to_numpy()[:, None],
        np.array(APP_USER_DEVICE_WEIGHTS),
        np.array(OTHER_DEVICE_WEIGHTS),
    )
    users = pd.DataFrame(
        {
            "user_id": latent["user_id"],
            "signup_ts": signup,
            "region": np.array(REGIONS)[
                rng.choice(len(REGIONS), size=n, p=REGION_WEIGHTS)
            ],
            "device": np.array(DEVICES)[_sample_rows(rng, device_weights)],
        }
    )
    return coerce(users, USERS)


# --- events ----------------------------------------------------------------------


def _item_catalogue(
    rng: np.random.Generator,
) -> tuple[npt.NDArray[np.object_], IntArray]:
    """Return item ids and prices, ITEMS_PER_CATEGORY per category, cheapest first."""
    ids: list[str] = []
    prices: list[IntArray] = []
    for category in CATEGORIES:
        median = CATEGORY_MEDIAN_PRICE_CENTS[category]
        price = np.sort(rng.lognormal(np.log(median), 0.6, ITEMS_PER_CATEGORY))
        prices.append(np.maximum(99, np.round(price)).astype(np.int64))
        ids.extend(f"{category}-{i:04d}" for i in range(ITEMS_PER_CATEGORY))
    return np.array(ids, dtype=object), np.concatenate(prices)


def _draw_events(
    rng: np.random.Generator,
    latent: pd.DataFrame,
    users: pd.DataFrame,
    start: pd.Timestamp,
    days: int,
) -> pd.DataFrame:
    item_ids, item_prices = _item_catalogue(rng)
    session_user, session_start_ns = _draw_sessions(rng, latent, users, start, days)
    n_sessions = len(session_user)

    # Browsing: price-sensitive users compare more items and view cheaper ones.
    sensitivity = latent["price_sensitivity"].to_numpy()
    purchase_session = (
        rng.random(n_sessions) < latent["purchase_prob"].to_numpy()[session_user]
    )
    n_views = 1 + rng.poisson(1.5 + 3.0 * sensitivity[session_user])
    view_session = np.repeat(np.arange(n_sessions), n_views)
    first_view = np.cumsum(n_views) - n_views
    view_rank = np.arange(len(view_session)) - first_view[view_session]
    view_user = session_user[view_session]
    tastes = latent[list(TASTE_COLUMNS)].to_numpy()
    category = _sample_rows(rng, tastes[view_user])
    skew = 1.0 + 3.0 * sensitivity[view_user]
    # Position in the category's price ladder, cheapest at 0.
    price_position = rng.random(len(view_session)) ** skew
    item_rank = np.minimum(
        (ITEMS_PER_CATEGORY * price_position).astype(np.int64),
        ITEMS_PER_CATEGORY - 1,
    )
    is_last = view_rank == n_views[view_session] - 1
    forced = purchase_session[view_session] & is_last
    clicked = (rng.random(len(view_session)) < CLICK_GIVEN_VIEW) | forced
    carted = (clicked & (rng.random(len(view_session)) < CART_GIVEN_CLICK)) | forced

    # A purchase session orders about a basket drawn around the user's mean basket,
    # split evenly over its carted items. Its last viewed item is one the share
    # buys 1 to MAX_QUANTITY units of, and other carted items are bought when
    # their price fits the share. So an order's value tracks the user's basket.
    basket = latent["basket_cents"].to_numpy(np.float64)[session_user] * np.exp(
        ORDER_LOG_SIGMA * rng.standard_normal(n_sessions) - ORDER_LOG_SIGMA**2 / 2
    )
    in_purchase = carted & purchase_session[view_session]
    n_candidates = np.bincount(view_session[in_purchase], minlength=n_sessions)
    candidate_share = basket / np.maximum(n_candidates, 1)
    item_rank[forced] = _affordable_rank(
        item_prices,
        category[forced],
        candidate_share[view_session[forced]],
        price_position[forced],
    )
    view_item = category * ITEMS_PER_CATEGORY + item_rank
    fits = item_prices[view_item] <= candidate_share[view_session]
    bought = forced | (in_purchase & fits)
    n_bought = np.bincount(view_session[bought], minlength=n_sessions)
    share = basket[view_session] / np.maximum(n_bought[view_session], 1)
    quantity = np.clip(
        np.round(share / item_prices[view_item]), 1, MAX_QUANTITY
    ).astype(np.int64)
    reviewed = bought & (rng.random(len(view_session)) < REVIEW_GIVEN_PURCHASE)

    # One row per event: (view, click, add_to_cart) per view in view order, then the
    # purchases, then the reviews. Type codes follow EVENT_TYPES.
    views = np.arange(len(view_session))
    parts = [
        (views, 0, 0, 0),
        (views[clicked], 0, 1, 1),
        (views[carted], 0, 2, 2),
        (views[bought], 1, 0, 3),
        (views[reviewed], 2, 0, 4),
    ]
    view_of_event = np.concatenate([p[0] for p in parts])
    phase = np.concatenate([np.full(len(p[0]), p[1]) for p in parts])
    step = np.concatenate([np.full(len(p[0]), p[2]) for p in parts])
    type_code = np.concatenate([np.full(len(p[0]), p[3]) for p in parts])
    event_session = view_session[view_of_event]
    order = np.lexsort((step, view_rank[view_of_event], phase, event_session))
    view_of_event = view_of_event[order]
    type_code = type_code[order]
    event_session = event_session[order]

    mean_dwell = np.array(MEAN_DWELL_SECONDS)[type_code]
    dwell = np.round(rng.exponential(mean_dwell), 1)
    event_ns = _event_times(session_start_ns, event_session, dwell, start, days)
    event_quantity = np.where(type_code >= 2, quantity[view_of_event], 1)

    # Session ids follow the order of session starts, and event ids the event order.
    by_time = np.argsort(event_ns, kind="stable")
    session_rank = np.empty(n_sessions, dtype=np.int64)
    session_rank[np.argsort(session_start_ns, kind="stable")] = np.arange(n_sessions)
    item = view_item[view_of_event][by_time]
    events = pd.DataFrame(
        {
            "event_id": _prefixed_ids("ev", len(by_time)),
            "user_id": latent["user_id"].to_numpy()[session_user[event_session]][
                by_time
            ],
            "event_ts": pd.to_datetime(event_ns[by_time], utc=True),
            "event_type": np.array(EVENT_TYPES)[type_code[by_time]],
            "item_id": item_ids[item],
            "category": np.array(CATEGORIES)[item // ITEMS_PER_CATEGORY],
            "price_cents": item_prices[item],
            "quantity": event_quantity[by_time],
            "session_id": _prefixed_ids("s", n_sessions)[
                session_rank[event_session[by_time]]
            ],
            "dwell_seconds": dwell[by_time],
        }
    )
    return coerce(events, EVENTS)


def _draw_sessions(
    rng: np.random.Generator,
    latent: pd.DataFrame,
    users: pd.DataFrame,
    start: pd.Timestamp,
    days: int,
) -> tuple[IntArray, IntArray]:
    """Return the user position and start (ns since epoch) of every session.

    Every user has at least one session after signup: the users are the store's
    active customers of the window.
    """
    n = len(latent)
    rate = latent["sessions_per_day"].to_numpy()
    counts = rng.poisson(np.broadcast_to(rate[:, None], (n, days)))
    flat = counts.ravel()
    session_user = np.repeat(np.repeat(np.arange(n), days), flat)
    session_day = np.repeat(np.tile(np.arange(days), n), flat)
    start_ns = _session_starts(rng, latent, start, session_user, session_day)
    signup_ns = _epoch_ns(users["signup_ts"])
    keep = start_ns >= signup_ns[session_user]
    session_user, start_ns = session_user[keep], start_ns[keep]

    # Users left without a session get one: new users within an hour of signup,
    # the others on a random day at their usual hour.
    lacking = np.flatnonzero(np.bincount(session_user, minlength=n) == 0)
    extra_day = rng.integers(0, days, len(lacking))
    extra_ns = _session_starts(rng, latent, start, lacking, extra_day)
    soon_ns = signup_ns[lacking] + (rng.uniform(0, 3_600, len(lacking)) * 1e9).astype(
        np.int64
    )
    extra_ns = np.where(signup_ns[lacking] >= start.value, soon_ns, extra_ns)
    session_user = np.concatenate([session_user, lacking])
    start_ns = np.concatenate([start_ns, extra_ns])
    order = np.lexsort((start_ns, session_user))
    return session_user[order], start_ns[order]


def _session_starts(
    rng: np.random.Generator,
    latent: pd.DataFrame,
    start: pd.Timestamp,
    session_user: IntArray,
    session_day: IntArray,
) -> IntArray:
    pref = latent["pref_hour"].to_numpy()[session_user]
    spread = latent["hour_spread"].to_numpy()[session_user]
    hour = (pref + spread * rng.standard_normal(len(session_user))) % 24.0
    seconds = np.floor(session_day * 86_400.0 + hour * 3_600.0).astype(np.int64)
    return start.value + seconds * 1_000_000_000


def _event_times(
    session_start_ns: IntArray,
    event_session: IntArray,
    dwell: FloatArray,
    start: pd.Timestamp,
    days: int,
) -> IntArray:
    """Return event times: each event starts when the previous one's dwell ends.

    A session that would run past the end of the window is moved earlier to end
    before it. ``event_session`` must be grouped by session in event order.
    """
    n_sessions = len(session_start_ns)
    dwell_ns = np.round(dwell * 1e9).astype(np.int64)
    before = np.cumsum(dwell_ns) - dwell_ns
    first = np.searchsorted(event_session, np.arange(n_sessions))
    offset = before - before[first[event_session]]
    duration = np.bincount(event_session, weights=dwell_ns, minlength=n_sessions)
    end_ns = start.value + days * 86_400 * 1_000_000_000
    latest_start = end_ns - duration.astype(np.int64) - 1_000_000_000
    session_ns = np.minimum(session_start_ns, latest_start)
    return session_ns[event_session] + offset


def _affordable_rank(
    item_prices: IntArray,
    category: IntArray,
    share: FloatArray,
    price_position: FloatArray,
) -> IntArray:
    """Return an item rank per row among the category's items priced in a share.

    The items are those priced from ``share / MAX_QUANTITY`` to ``share``, and
    ``price_position`` in [0, 1) picks one, cheapest first. A category without such
    an item gives its item nearest to the range.
    """
    rank = np.zeros(len(category), dtype=np.int64)
    for code in range(len(CATEGORIES)):
        rows = np.flatnonzero(category == code)
        if rows.size == 0:
            continue
        ladder = item_prices[
            code * ITEMS_PER_CATEGORY : (code + 1) * ITEMS_PER_CATEGORY
        ]
        low = np.searchsorted(ladder, share[rows] / MAX_QUANTITY, side="left")
        high = np.searchsorted(ladder, share[rows], side="right") - 1
        low = np.clip(low, 0, ITEMS_PER_CATEGORY - 1)
        high = np.clip(high, low, ITEMS_PER_CATEGORY - 1)
        width = high - low + 1
        pick = np.minimum((width * price_position[rows]).astype(np.int64), width - 1)
        rank[rows] = low + pick
    return rank


def _sample_rows(rng: np.random.Generator, weights: FloatArray) -> IntArray:
    """Draw one column index per row with probability proportional to its weights."""
    cumulative = np.cumsum(weights, axis=1)
    draw = rng.random(len(weights)) * cumulative[:, -1]
    index = (draw[:, None] >= cumulative).sum(axis=1)
    return np.minimum(index, weights.shape[1] - 1).astype(np.int64)


def _prefixed_ids(prefix: str, n: int) -> npt.NDArray[np.object_]:
    return (prefix + pd.Series(np.arange(n)).astype(str)).to_numpy(dtype=object)


# --- true response ---------------------------------------------------------------


@dataclass(frozen=True)
class _Response:
    """Per-(user, arm) response arrays. Arm 0 is control, then come the coupons.

    ``effect`` is the logit effect of a coupon when its message gets full attention,
    and ``p_convert`` the conversion when each coupon is sent by its first listed
    channel at the user's usual hour.
    """

    arms: list[str]
    p0: FloatArray
    effect: FloatArray
    p_convert: FloatArray
    revenue_given_conversion: FloatArray
    discount_given_conversion: FloatArray
    match: FloatArray
    kind: npt.NDArray[np.object_]
    value: IntArray
    min_spend: IntArray


def _compute_response(latent: pd.DataFrame, coupons: pd.DataFrame) -> _Response:
    _check_catalogue(coupons)
    mean_basket = latent["basket_cents"].to_numpy(np.float64)[:, None]
    sensitivity = latent["price_sensitivity"].to_numpy()[:, None]
    topup = latent["topup_prob"].to_numpy()[:, None]
    match = _category_match(latent, coupons)
    kind = coupons["kind"].to_numpy(dtype=object)
    value = coupons["value"].to_numpy(np.int64)
    min_spend = coupons["min_spend_cents"].to_numpy(np.int64)
    spend = min_spend.astype(np.float64)[None, :]

    # Baskets in [band_low, min_spend) are topped up to min_spend by eligible users.
    above_p, above_e = _lognormal_tail(mean_basket, spend)
    band_low_p, band_low_e = _lognormal_tail(mean_basket, spend * (1.0 - TOPUP_BAND))
    band_p = band_low_p - above_p
    band_e = band_low_e - above_e
    topped = match * topup
    revenue = mean_basket + topped * (spend * band_p - band_e)
    redeem = match * above_p + topped * band_p
    redeemed_basket = match * above_e + topped * spend * band_p
    is_percent = (kind == "percent_off")[None, :]
    discount = np.where(
        is_percent, value[None, :] / 10_000.0 * redeemed_basket, value[None, :] * redeem
    )

    # Effect at full attention: the perceived discount share raises the logit,
    # scaled by price sensitivity. Sure things buy anyway, and aversion lowers the
    # logit.
    perceived = np.where(
        (kind == "free_shipping")[None, :], FREE_SHIPPING_PREMIUM, 1.0
    ) * (discount / mean_basket)
    gain = GAIN_PER_DEPTH * sensitivity * perceived + REMINDER_GAIN * redeem
    gain = np.where(latent["sure_thing"].to_numpy()[:, None], 0.0, gain)
    effect = gain - latent["coupon_aversion"].to_numpy()[:, None]
    p0 = np.clip(latent["p0"].to_numpy(), 1e-9, 1 - 1e-9)

    n, k = len(latent), len(coupons)
    first_channels = [str(c).split(",")[0].strip() for c in coupons["channels"]]
    usual_hour = _usual_send_hour(latent).astype(np.float64)
    attention = np.empty((n, k))
    for j, channel in enumerate(first_channels):
        attention[:, j] = _attention(
            latent, np.arange(n), np.full(n, channel, dtype=object), usual_hour
        )
    p1 = expit(logit(p0)[:, None] + attention * effect)

    return _Response(
        arms=[CONTROL_ARM, *coupons["coupon_id"].astype(str)],
        p0=p0,
        effect=np.column_stack([np.zeros(n), effect]),
        p_convert=np.column_stack([p0, p1]),
        revenue_given_conversion=np.column_stack([mean_basket[:, 0], revenue]),
        discount_given_conversion=np.column_stack([np.zeros(n), discount]),
        match=np.column_stack([np.zeros(n), match]),
        kind=np.concatenate([np.array(["none"], dtype=object), kind]),
        value=np.concatenate([[0], value]).astype(np.int64),
        min_spend=np.concatenate([[0], min_spend]).astype(np.int64),
    )


def _row_conversion(
    latent: pd.DataFrame,
    response: _Response,
    user: IntArray,
    arm: IntArray,
    channel: npt.NDArray[np.object_],
    send_hour: FloatArray,
) -> FloatArray:
    """Return P(convert) of each (user, arm) row sent by ``channel`` at ``send_hour``.

    Control rows get no message, so their channel and hour do not matter.
    """
    treated = arm > 0
    p = response.p0[user].copy()
    rows = np.flatnonzero(treated)
    if rows.size:
        attention = _attention(latent, user[rows], channel[rows], send_hour[rows])
        effect = response.effect[user[rows], arm[rows]]
        p[rows] = expit(logit(response.p0[user[rows]]) + attention * effect)
    return p


def _attention(
    latent: pd.DataFrame,
    user: IntArray,
    channel: npt.NDArray[np.object_],
    send_hour: FloatArray,
) -> FloatArray:
    """Return the share of a coupon's effect that its message delivers, per row."""
    unknown = sorted(set(channel) - set(CHANNEL_ATTENTION))
    if unknown:
        raise ValueError(
            f"unknown channels {unknown}; the simulator models "
            f"{sorted(CHANNEL_ATTENTION)}"
        )
    base = pd.Series(channel).map(CHANNEL_ATTENTION).to_numpy(np.float64)
    reach = _reach(latent, user, channel)
    return np.minimum(1.0, base * reach) * _timing(latent, user, send_hour)


def _reach(
    latent: pd.DataFrame, user: IntArray, channel: npt.NDArray[np.object_]
) -> FloatArray:
    """Return each user's reach on the row's channel, relative to a typical user."""
    engagement = latent["engagement"].to_numpy(np.float64)[user]
    app_user = latent["app_user"].to_numpy(bool)[user]
    push = np.where(app_user, PUSH_REACH_APP_USER, PUSH_REACH_OTHER)
    return np.select([channel == "email", channel == "push"], [engagement, push], 1.0)


def _timing(latent: pd.DataFrame, user: IntArray, send_hour: FloatArray) -> FloatArray:
    """Return 1 at the user's usual hour, falling to OFF_HOURS_ATTENTION far from it.

    The fall is Gaussian in the hours between the send hour and the usual hour on
    the 24-hour clock, with the user's hour spread as its standard deviation.
    """
    gap = np.abs(send_hour - latent["pref_hour"].to_numpy(np.float64)[user]) % 24.0
    gap = np.minimum(gap, 24.0 - gap)
    spread = latent["hour_spread"].to_numpy(np.float64)[user]
    closeness = np.exp(-0.5 * (gap / spread) ** 2)
    return OFF_HOURS_ATTENTION + (1.0 - OFF_HOURS_ATTENTION) * closeness


def _usual_send_hour(latent: pd.DataFrame) -> IntArray:
    """Return each user's usual hour, rounded to a whole UTC hour."""
    return np.round(latent["pref_hour"].to_numpy()).astype(np.int64) % 24


def _send_hours(send_at: pd.Series) -> FloatArray:
    """Return the UTC hour of day of each send time, with minutes as a fraction."""
    stamps = pd.DatetimeIndex(pd.to_datetime(send_at, utc=True))
    seconds = stamps.hour * 3_600 + stamps.minute * 60 + stamps.second
    return np.asarray(seconds, dtype=np.float64) / 3_600.0


def _check_catalogue(coupons: pd.DataFrame) -> None:
    if CONTROL_ARM in set(coupons["coupon_id"]):
        raise ValueError(f"coupon_id {CONTROL_ARM!r} is reserved for the control arm")
    bad_kind = sorted(
        set(coupons["kind"]) - {"amount_off", "percent_off", "free_shipping"}
    )
    if bad_kind:
        raise ValueError(
            f"unknown coupon kinds {bad_kind}; use amount_off, percent_off or "
            "free_shipping"
        )
    # The response assumes an amount_off discount never exceeds the basket.
    amount = coupons[coupons["kind"] == "amount_off"]
    short = amount[amount["min_spend_cents"] < amount["value"]]
    if not short.empty:
        raise ValueError(
            "amount_off coupons need min_spend_cents >= value, got "
            f"{short['coupon_id'].tolist()}"
        )
    bad_category = sorted(set(coupons["category"]) - set(CATEGORIES) - {ALL_CATEGORIES})
    if bad_category:
        raise ValueError(
            f"unknown coupon categories {bad_category}; use one of {CATEGORIES} "
            f"or {ALL_CATEGORIES!r}"
        )


def _category_match(latent: pd.DataFrame, coupons: pd.DataFrame) -> FloatArray:
    """Return the chance that a user's basket contains each coupon's category."""
    tastes = latent[list(TASTE_COLUMNS)].to_numpy()
    match = np.ones((len(latent), len(coupons)))
    for j, category in enumerate(coupons["category"]):
        if category != ALL_CATEGORIES:
            taste = tastes[:, CATEGORIES.index(category)]
            match[:, j] = 1.0 - (1.0 - taste) ** BASKET_ITEMS
    return match


def _lognormal_tail(
    mean: FloatArray, threshold: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Return P(B >= threshold) and E[B; B >= threshold] for one order's basket B."""
    sigma = ORDER_LOG_SIGMA
    mu = np.log(mean) - sigma**2 / 2
    with np.errstate(divide="ignore"):
        log_threshold = np.log(threshold)
    prob = ndtr((mu - log_threshold) / sigma)
    partial = mean * ndtr((mu + sigma**2 - log_threshold) / sigma)
    return prob, partial


def _truth_frame(latent: pd.DataFrame, response: _Response) -> pd.DataFrame:
    n, n_arms = response.p_convert.shape
    p = response.p_convert
    truth = pd.DataFrame(
        {
            "user_id": np.repeat(latent["user_id"].to_numpy(dtype=object), n_arms),
            "coupon_id": np.tile(np.array(response.arms, dtype=object), n),
            "p_convert": p.ravel(),
            "expected_revenue_cents": (p * response.revenue_given_conversion).ravel(),
            "expected_discount_cents": (p * response.discount_given_conversion).ravel(),
        }
    )
    truth["user_id"] = truth["user_id"].astype("string")
    truth["coupon_id"] = truth["coupon_id"].astype("string")
    return truth


# --- campaigns -------------------------------------------------------------------


def _draw_past_exposures(
    rng: np.random.Generator,
    latent: pd.DataFrame,
    coupons: pd.DataFrame,
    send_day: pd.Timestamp,
) -> pd.DataFrame:
    """Assign every user one coupon or control uniformly, sent at their usual hour.

    The channel is uniform among the coupon's channels, and "email" for control.
    """
    n = len(latent)
    arms = np.array([CONTROL_ARM, *coupons["coupon_id"].astype(str)], dtype=object)
    arm_position = rng.integers(0, len(arms), n)
    channel_lists = [["email"]] + [c.split(",") for c in coupons["channels"]]
    n_channels = np.array([len(c) for c in channel_lists])
    table = np.array(
        [c + [""] * (len(CHANNELS) - len(c)) for c in channel_lists], dtype=object
    )
    pick = (rng.random(n) * n_channels[arm_position]).astype(np.int64)
    hour = _usual_send_hour(latent)
    exposures = pd.DataFrame(
        {
            "campaign_id": PAST_CAMPAIGN_ID,
            "user_id": latent["user_id"].to_numpy(dtype=object),
            "arm": arms[arm_position],
            "channel": table[arm_position, pick],
            "send_at": send_day + pd.to_timedelta(hour, unit="h"),
            "propensity": 1.0 / len(arms),
            "policy": PAST_POLICY,
        }
    )
    return coerce(exposures, EXPOSURES)


def _draw_outcomes(
    rng: np.random.Generator,
    latent: pd.DataFrame,
    response: _Response,
    assignments: pd.DataFrame,
    campaign_id: str,
) -> pd.DataFrame:
    """Draw one outcome per row of ``assignments`` (user_id, arm, channel, send_at).

    Users and arms must exist in ``latent`` and ``response``.
    """
    user = pd.Index(latent["user_id"].astype(str)).get_indexer(
        pd.Index(assignments["user_id"].astype(str))
    )
    arm = pd.Index(response.arms).get_indexer(pd.Index(assignments["arm"].astype(str)))
    k = len(user)
    u_convert, u_eligible, u_topup, u_open, u_click, u_visit = rng.random((6, k))
    z = rng.standard_normal(k)
    channel = assignments["channel"].astype(str).to_numpy(dtype=object)
    send_hour = _send_hours(assignments["send_at"])

    # Conversion, then the order's basket, top-up to min_spend and redemption.
    treated = arm > 0
    p_convert = _row_conversion(latent, response, user, arm, channel, send_hour)
    converted = u_convert < p_convert
    mean_basket = latent["basket_cents"].to_numpy(np.float64)[user]
    basket = mean_basket * np.exp(ORDER_LOG_SIGMA * z - ORDER_LOG_SIGMA**2 / 2)
    min_spend = response.min_spend[arm]
    eligible = treated & (u_eligible < response.match[user, arm])
    in_band = (basket >= min_spend * (1.0 - TOPUP_BAND)) & (basket < min_spend)
    topped = eligible & in_band & (u_topup < latent["topup_prob"].to_numpy()[user])
    basket = np.where(topped, min_spend, basket)
    revenue = np.where(converted, np.maximum(1, np.floor(basket + 0.5)), 0).astype(
        np.int64
    )
    redeemed = converted & eligible & (revenue >= min_spend)
    value = response.value[arm]
    discount = np.where(
        response.kind[arm] == "percent_off",
        percent_of_cents_array(revenue, value),
        np.minimum(value, revenue),
    )
    discount = np.where(redeemed, discount, 0).astype(np.int64)

    # Message funnel. Control users get no message, so they never open one.
    open_rate = np.zeros(k)
    rows = np.flatnonzero(treated)
    open_rate[rows] = np.minimum(
        1.0,
        pd.Series(channel[rows]).map(OPEN_RATE).to_numpy(np.float64)
        * _reach(latent, user[rows], channel[rows])
        * _timing(latent, user[rows], send_hour[rows]),
    )
    opened = treated & (u_open < open_rate)
    clicked = opened & (u_click < CLICK_GIVEN_OPEN)
    visit_rate = 1.0 - np.exp(
        -ATTRIBUTION_DAYS * latent["sessions_per_day"].to_numpy()[user]
    )
    visited = clicked | converted | (u_visit < visit_rate)

    send_at = pd.to_datetime(assignments["send_at"], utc=True).reset_index(drop=True)
    outcomes = pd.DataFrame(
        {
            "campaign_id": campaign_id,
            "user_id": assignments["user_id"].astype(str).to_numpy(dtype=object),
            "observed_at": send_at + pd.Timedelta(days=ATTRIBUTION_DAYS),
            "opened": opened,
            "clicked": clicked,
            "visited": visited,
            "redeemed": redeemed,
            "converted": converted,
            "revenue_cents": revenue,
            "discount_cents": discount,
        }
    )
    return coerce(outcomes, OUTCOMES)


def _validated_assignments(
    assignments: pd.DataFrame,
    latent: pd.DataFrame,
    coupons: pd.DataFrame,
    check_validity: bool,
    unique_users: bool = True,
) -> pd.DataFrame:
    required = ["user_id", "arm", "channel", "send_at"]
    missing = [c for c in required if c not in assignments.columns]
    if missing:
        raise KeyError(f"assignments: missing columns {missing}")
    frame = assignments[required].copy()
    frame["user_id"] = frame["user_id"].astype(str)
    frame["arm"] = frame["arm"].astype(str)
    frame["channel"] = frame["channel"].astype(str)
    send_at = pd.to_datetime(frame["send_at"])
    if send_at.dt.tz is None:
        raise ValueError(
            "assignments.send_at must be timezone-aware (UTC), got naive "
            f"{send_at.iloc[0] if len(send_at) else 'values'}"
        )
    frame["send_at"] = send_at.dt.tz_convert("UTC")

    duplicated = frame.loc[frame["user_id"].duplicated(), "user_id"]
    if unique_users and not duplicated.empty:
        raise ValueError(
            "assignments: users appear more than once, e.g. "
            f"{duplicated.iloc[:5].tolist()}"
        )
    unknown_users = ~frame["user_id"].isin(set(latent["user_id"].astype(str)))
    if unknown_users.any():
        raise ValueError(
            "assignments: user_id not in the simulated world, e.g. "
            f"{frame.loc[unknown_users, 'user_id'].iloc[:5].tolist()}"
        )
    known_arms = {CONTROL_ARM, *coupons["coupon_id"].astype(str)}
    unknown_arms = sorted(set(frame["arm"]) - known_arms)
    if unknown_arms:
        raise ValueError(
            f"assignments: unknown arms {unknown_arms}; use a coupon_id of the "
            f"catalogue or {CONTROL_ARM!r}"
        )

    catalogue = coupons.set_index(coupons["coupon_id"].astype(str))
    treated = frame[frame["arm"] != CONTROL_ARM]
    for coupon_id, rows in treated.groupby("arm"):
        coupon = catalogue.loc[str(coupon_id)]
        allowed = set(str(coupon["channels"]).split(","))
        bad_channel = sorted(set(rows["channel"]) - allowed)
        if bad_channel:
            raise ValueError(
                f"assignments: coupon {coupon_id} sent by {bad_channel}, but it "
                f"allows only {sorted(allowed)}"
            )
        if not check_validity:
            continue
        outside = (rows["send_at"] < coupon["starts_at"]) | (
            rows["send_at"] > coupon["ends_at"]
        )
        if outside.any():
            raise ValueError(
                f"assignments: coupon {coupon_id} sent at "
                f"{rows.loc[outside, 'send_at'].iloc[0]}, outside its validity "
                f"{coupon['starts_at']} to {coupon['ends_at']}"
            )
    return frame.reset_index(drop=True)


# --- persistence -----------------------------------------------------------------


def _write_event_batches(settings: Settings, world: World) -> list[Path]:
    events = world.events
    start = pd.Timestamp(world.meta["start"])
    days = int(world.meta["days"])
    event_ns = _epoch_ns(events["event_ts"])
    day_ns = 86_400 * 1_000_000_000
    # A start that is not at midnight still yields one batch per UTC date.
    first_day = start.normalize()
    last_day = (
        start + pd.Timedelta(days=days) - pd.Timedelta(1, unit="ns")
    ).normalize()
    n_days = int((last_day - first_day) / pd.Timedelta(days=1)) + 1
    bounds = first_day.value + day_ns * np.arange(n_days + 1)
    cuts = np.searchsorted(event_ns, bounds)
    paths = []
    for i in range(n_days):
        day = (first_day + pd.Timedelta(days=i)).strftime("%Y-%m-%d")
        part = events.iloc[cuts[i] : cuts[i + 1]].reset_index(drop=True)
        paths.append(lake.write_raw_batch(settings, "events", f"events-{day}", part))
    return paths


def _write_truth(settings: Settings, world: World) -> list[Path]:
    assert settings.truth_dir is not None
    folder = settings.truth_dir
    folder.mkdir(parents=True, exist_ok=True)
    world.latent.to_parquet(folder / "latent.parquet", index=False)
    world.truth.to_parquet(folder / "truth.parquet", index=False)
    world.coupons.to_parquet(folder / "coupons.parquet", index=False)
    meta = {
        key: value.isoformat() if isinstance(value, pd.Timestamp) else value
        for key, value in world.meta.items()
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return [folder / name for name in _TRUTH_FILES]


def _epoch_ns(column: pd.Series) -> IntArray:
    """Return nanoseconds since the epoch of a UTC timestamp column."""
    return np.asarray(pd.DatetimeIndex(column).asi8, dtype=np.int64)


def _as_utc(value: datetime) -> pd.Timestamp:
    stamp = pd.Timestamp(value)
    if stamp.tzinfo is None:
        raise ValueError(f"timestamp must be timezone-aware (UTC), got naive {value}")
    return stamp.tz_convert("UTC").as_unit("ns")
