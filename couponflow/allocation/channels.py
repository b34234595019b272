"""Scores of every (user, offer, channel) for a campaign, at each user's send hour.

The response model predicts a coupon's effect by the channel that carries it, for a
message sent at the user's usual hour (the randomized campaigns it learns from were
sent then). :func:`score_channels` calls it once per channel, and
:func:`at_send_hours` scales each effect by the user's relative activity at the
hour the message can go out, which is below 1 when a channel's quiet hours keep it
from the user's busiest hour.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pandas as pd

from couponflow.allocation.scoring import ConversionModel, score_users
from couponflow.allocation.send_hours import (
    HOURS_PER_DAY,
    SendHours,
    activity_from_features,
    channel_reach,
    choose_send_hours,
)
from couponflow.schemas import CHANNELS

log = logging.getLogger(__name__)

FloatCube = npt.NDArray[np.float64]


def _default_send_hours() -> dict[str, tuple[int, ...]]:
    # Text messages go out between 08:00 and 20:59 UTC only.
    return {"sms": tuple(range(8, 21))}


def _default_message_cost() -> dict[str, int]:
    return {"email": 0, "push": 0, "sms": 5}


@dataclass(frozen=True)
class ChannelRules:
    """What each channel may do: its hours, the cost of a message and a daily cap.

    ``allowed_hours`` lists the UTC hours a channel may send at. A channel missing
    from it may send at every hour. ``message_cost_cents`` is the cost of one
    message, and ``capacity`` the number of messages a channel may send in the
    campaign; a channel missing from ``capacity`` has no limit.
    """

    channels: tuple[str, ...] = CHANNELS
    allowed_hours: Mapping[str, Sequence[int]] = field(
        default_factory=_default_send_hours
    )
    message_cost_cents: Mapping[str, int] = field(default_factory=_default_message_cost)
    capacity: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        known = set(self.channels)
        for name, mapping in (
            ("allowed_hours", self.allowed_hours),
            ("message_cost_cents", self.message_cost_cents),
            ("capacity", self.capacity),
        ):
            unknown = sorted(set(mapping) - known)
            if unknown:
                raise ValueError(
                    f"{name} names unknown channels {unknown}; the channels are "
                    f"{list(self.channels)}"
                )
        for channel, hours in self.allowed_hours.items():
            if not hours or any(not 0 <= h < HOURS_PER_DAY for h in hours):
                raise ValueError(
                    f"allowed_hours[{channel!r}] must list hours 0-23, got {hours}"
                )
        for name, mapping in (
            ("message_cost_cents", self.message_cost_cents),
            ("capacity", self.capacity),
        ):
            for channel, value in mapping.items():
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(
                        f"{name}[{channel!r}] must be a whole number >= 0, got "
                        f"{value!r}"
                    )

    def cost_array(self) -> npt.NDArray[np.int64]:
        """Message cost per channel, in channel order."""
        return np.array(
            [self.message_cost_cents.get(c, 0) for c in self.channels], dtype=np.int64
        )


@dataclass(frozen=True)
class ChannelScores:
    """Per (user, offer, channel) scores in expected cents, and the probabilities.

    ``p`` is ``(n_users, 1 + n_offers, n_channels)``: column 0 is no offer (the same
    for every channel). ``profit_cents``, ``cost_cents`` and ``uplift`` are
    ``(n_users, n_offers, n_channels)``, as :func:`score_offers` defines them.
    """

    offer_ids: tuple[str, ...]
    channels: tuple[str, ...]
    p: FloatCube
    profit_cents: FloatCube
    cost_cents: FloatCube
    uplift: FloatCube


def score_channels(
    model: ConversionModel,
    users: pd.DataFrame,
    offers: pd.DataFrame,
    margin_rate: float,
    channels: Sequence[str] = CHANNELS,
) -> ChannelScores:
    """Score every user x offer once per channel with :func:`score_users`.

    Every offer is scored on every channel, including channels it does not list;
    eligibility removes those options.
    """
    per_channel = []
    for channel in channels:
        p, scores = score_users(model, users, offers, margin_rate, channel=channel)
        per_channel.append((p, scores))
        log.info("scored %d users x %d offers by %s", len(users), len(offers), channel)
    return ChannelScores(
        offer_ids=tuple(offers["coupon_id"].astype(str)),
        channels=tuple(channels),
        p=np.stack([p for p, _ in per_channel], axis=2),
        profit_cents=np.stack([s.profit_cents for _, s in per_channel], axis=2),
        cost_cents=np.stack([s.cost_cents for _, s in per_channel], axis=2),
        uplift=np.stack([s.uplift for _, s in per_channel], axis=2),
    )


def send_hours_for(users: pd.DataFrame, rules: ChannelRules) -> SendHours:
    """Pick each (user, channel) send hour from the users' active-hour features.

    Each user's hour on a channel is their busiest allowed hour. A user without
    events has no active hours of their own and gets the mean activity of the
    users who have them, so their messages go out when most users are active.
    """
    activity = activity_from_features(users)
    unknown = activity.min(axis=1) >= 1.0
    known = ~unknown
    if unknown.any() and known.any():
        typical = activity[known].mean(axis=0)
        activity[unknown] = typical / typical.max()
    reach_by_hour = channel_reach(
        {c: 1.0 for c in rules.channels}, rules.allowed_hours, rules.channels
    )
    return choose_send_hours(activity, reach_by_hour, rules.channels)


def at_send_hours(scores: ChannelScores, reach: npt.ArrayLike) -> ChannelScores:
    """Scale each option's effect by the user's activity at its channel's send hour.

    ``reach`` is ``(n_users, n_channels)`` in [0, 1]. The uplift of an option
    becomes ``reach * uplift``; the discount is still paid on every order that uses
    the coupon, so the expected cost is recomputed from the scaled conversion
    probability. With a reach of 1 the scores are unchanged.
    """
    weight = np.asarray(reach, dtype=np.float64)
    n_users, n_offers, n_channels = scores.uplift.shape
    if weight.shape != (n_users, n_channels):
        raise ValueError(
            f"reach must be ({n_users}, {n_channels}), one value per user and "
            f"channel, got {weight.shape}"
        )
    if weight.size and (weight.min() < 0 or weight.max() > 1):
        raise ValueError("reach must contain values in [0, 1]")
    weight = weight[:, None, :]
    with_offer = scores.p[:, 1:, :]
    base = scores.p[:, :1, :]
    # The margin on the extra conversions: profit + cost = margin * basket * uplift.
    margin_gain = scores.profit_cents + scores.cost_cents
    scaled_with_offer = base + weight * scores.uplift
    # cost = with_offer * discount, so the discount is cost / with_offer.
    discount = np.divide(
        scores.cost_cents,
        with_offer,
        out=np.zeros_like(scores.cost_cents),
        where=with_offer > 0,
    )
    cost = scaled_with_offer * discount
    p = scores.p.copy()
    p[:, 1:, :] = scaled_with_offer
    return ChannelScores(
        offer_ids=scores.offer_ids,
        channels=scores.channels,
        p=p,
        profit_cents=weight * margin_gain - cost,
        cost_cents=cost,
        uplift=weight * scores.uplift,
    )
