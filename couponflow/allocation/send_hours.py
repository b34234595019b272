"""Each user's send hour per channel, chosen before the solver from active hours.

The hour that maximizes the chance a message is seen is the same for every offer, so
picking it first removes the hour dimension. The solver then works on users x
offers x channels, with scores scaled by each (user, channel) reach.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import numpy.typing as npt
import pandas as pd

from couponflow.schemas import CHANNELS

HOURS_PER_DAY = 24
_NS_PER_HOUR = 3_600 * 10**9
_NS_PER_DAY = HOURS_PER_DAY * _NS_PER_HOUR


@dataclass(frozen=True)
class SendHours:
    """The chosen UTC hour of day (0-23) and its reach, per user and channel.

    ``reach[i, c]`` is the probability that a message sent to user ``i`` on channel
    ``c`` at ``hour[i, c]`` is seen.
    """

    hour: npt.NDArray[np.int8]
    reach: npt.NDArray[np.float32]
    channels: tuple[str, ...] = CHANNELS

    def send_times(self, after: datetime | pd.Timestamp) -> npt.NDArray[np.datetime64]:
        """Return, per user and channel, the first time at the chosen hour >= ``after``.

        Times are ``datetime64[ns]`` in UTC, shape ``(n_users, n_channels)``.
        """
        start = pd.Timestamp(after)
        if start.tzinfo is None:
            raise ValueError(f"after must be timezone-aware, got {after!r}; pass UTC")
        start_ns = start.tz_convert("UTC").as_unit("ns").value
        day_ns = start_ns - start_ns % _NS_PER_DAY
        times = day_ns + self.hour.astype(np.int64) * _NS_PER_HOUR
        times += np.where(times < start_ns, _NS_PER_DAY, 0)
        return times.astype("datetime64[ns]")


def channel_reach(
    open_rate: Mapping[str, float],
    send_hours: Mapping[str, Sequence[int]] | None = None,
    channels: Sequence[str] = CHANNELS,
) -> npt.NDArray[np.float32]:
    """Return ``(n_channels, 24)`` reach of a message when the user is fully active.

    Each channel reaches ``open_rate[channel]`` of users at the hours it may send
    (all hours when ``send_hours`` has no entry for it) and no user at other hours,
    for example SMS outside quiet hours.
    """
    reach = np.zeros((len(channels), HOURS_PER_DAY), dtype=np.float32)
    for c, channel in enumerate(channels):
        if channel not in open_rate:
            raise ValueError(f"open_rate has no rate for channel {channel!r}")
        rate = float(open_rate[channel])
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"open_rate[{channel!r}] must be in [0, 1], got {rate}")
        allowed = list(range(HOURS_PER_DAY))
        if send_hours is not None and channel in send_hours:
            allowed = sorted(set(send_hours[channel]))
        if any(not 0 <= hour < HOURS_PER_DAY for hour in allowed):
            raise ValueError(f"send_hours[{channel!r}] must be hours 0-23")
        reach[c, allowed] = rate
    return reach


def activity_from_features(features: pd.DataFrame) -> npt.NDArray[np.float32]:
    """Return ``(n_users, 24)`` relative activity per UTC hour, 1 at the busiest hour.

    Each ``hour_share_<part>`` feature spreads evenly over its hours, and the user's
    ``peak_hour`` (when known) gets the weight of its part once more. Users without
    events are equally active at every hour.
    """
    from couponflow.features import DAY_PARTS, NO_PEAK_HOUR

    n_users = len(features)
    activity = np.zeros((n_users, HOURS_PER_DAY), dtype=np.float32)
    for part, (start, end) in DAY_PARTS.items():
        name = f"hour_share_{part}"
        if name not in features.columns:
            raise ValueError(f"features is missing column {name}")
        share = features[name].fillna(0.0).to_numpy(dtype=np.float32)
        activity[:, start:end] = (share / (end - start))[:, None]
    if "peak_hour" in features.columns:
        peak = features["peak_hour"].fillna(NO_PEAK_HOUR).to_numpy(dtype=np.int64)
        known = np.flatnonzero((peak >= 0) & (peak < HOURS_PER_DAY))
        activity[known, peak[known]] *= 2.0
    busiest = activity.max(axis=1, keepdims=True)
    inactive = busiest[:, 0] <= 0
    activity[inactive] = 1.0
    busiest[inactive] = 1.0
    return activity / busiest


def choose_send_hours(
    activity: npt.ArrayLike,
    reach_by_hour: npt.ArrayLike,
    channels: Sequence[str] = CHANNELS,
    chunk_users: int = 1 << 16,
) -> SendHours:
    """Pick each (user, channel) hour with the highest ``activity * reach_by_hour``.

    ``activity`` is ``(n_users, 24)`` in [0, 1] and ``reach_by_hour`` is
    ``(n_channels, 24)`` from :func:`channel_reach`. Only hours where the channel's
    reach is above 0 are chosen, so a user never active in them still gets one of
    them (with reach 0); a channel with no such hour gets hour 0 and reach 0. Ties
    go to the earlier hour.
    """
    active = np.asarray(activity, dtype=np.float32)
    by_hour = np.asarray(reach_by_hour, dtype=np.float32)
    channels = tuple(channels)
    if active.ndim != 2 or active.shape[1] != HOURS_PER_DAY:
        raise ValueError(f"activity must be (n_users, 24), got {active.shape}")
    if by_hour.shape != (len(channels), HOURS_PER_DAY):
        raise ValueError(
            f"reach_by_hour must be ({len(channels)}, 24) for channels {channels}, got "
            f"{by_hour.shape}"
        )
    for name, array in (("activity", active), ("reach_by_hour", by_hour)):
        if array.size and not (array.min() >= 0 and array.max() <= 1):
            raise ValueError(f"{name} must contain values in [0, 1]")

    n_users = active.shape[0]
    hour = np.empty((n_users, len(channels)), dtype=np.int8)
    reach = np.empty((n_users, len(channels)), dtype=np.float32)
    for start in range(0, n_users, chunk_users):
        stop = min(start + chunk_users, n_users)
        score = active[start:stop, None, :] * by_hour[None, :, :]
        # An hour the channel may not send at never wins, even against a zero score.
        score = np.where(by_hour[None, :, :] > 0, score, -1.0)
        best = score.argmax(axis=2)
        hour[start:stop] = best
        best_score = np.take_along_axis(score, best[:, :, None], axis=2)[:, :, 0]
        reach[start:stop] = np.maximum(best_score, 0.0)
    return SendHours(hour=hour, reach=reach, channels=channels)
