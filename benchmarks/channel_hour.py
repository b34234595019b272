"""The worth of choosing each user's channel and send hour, on the simulator's truth.

Every variant allocates the same budget with the oracle's knowledge of the true
coupon effects, so the only difference between them is which channels and hours it
may use:

- first channel at 00:00 or 12:00 UTC: every coupon by its first listed channel,
  all sent at one hour (the campaign before it chose channels and hours);
- best channel at 12:00 UTC: any listed channel, one hour;
- first channel at the chosen hour: couponflow's hour per user, from the active-hour
  features (``send_hours_for``), on the first listed channel;
- best channel at the chosen hour: couponflow's decision space;
- best channel at the true hour: the same with the user's true usual hour, which
  bounds what better hour estimates could add.

Run: ``python benchmarks/channel_hour.py --users 30000``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from couponflow import lake
from couponflow.allocation import ChannelRules, oracle, send_hours_for
from couponflow.demo import judge_assignments
from couponflow.features import compute_user_features
from couponflow.schemas import CHANNELS, EVENTS, USERS
from couponflow.settings import Settings
from couponflow.simulate import World, simulate_world

log = logging.getLogger(__name__)

DEFAULT_USERS = 30_000
DEFAULT_DAYS = 45
DEFAULT_SEED = 7
BUDGET_SHARES = (0.05, 0.10, 0.25)
MARGIN_RATE = Settings.model_fields["margin_rate"].default
# Hours of a variant: a fixed UTC hour, "chosen" (couponflow's) or "true".
Hour = int | str


@dataclass(frozen=True)
class Variant:
    name: str
    best_channel: bool
    hour: Hour


VARIANTS = (
    Variant("first channel at 00:00 UTC", False, 0),
    Variant("first channel at 12:00 UTC", False, 12),
    Variant("best channel at 12:00 UTC", True, 12),
    Variant("first channel, chosen hour", False, "chosen"),
    Variant("best channel, chosen hour", True, "chosen"),
    Variant("best channel, true hour", True, "true"),
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=DEFAULT_USERS)
    parser.add_argument("--days", type=int, default=DEFAULT_DAYS)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(message)s")

    started = time.perf_counter()
    world = simulate_world(args.users, args.days, args.seed)
    with tempfile.TemporaryDirectory(prefix="couponflow-bench-") as home:
        settings = Settings(home=Path(home))
        settings.ensure_dirs()
        lake.write_lake_partitions(settings, USERS, "users", world.users)
        lake.write_lake_partitions(settings, EVENTS, "events", world.events)
        end = pd.Timestamp(world.meta["end"])
        features = compute_user_features(settings, [end.to_pydatetime()])
    features = features.reset_index(drop=True)
    tables = {v.name: variant_matrices(world, features, v, end) for v in VARIANTS}

    reference = tables["first channel at 00:00 UTC"]
    spend = _unconstrained_spend(*reference)
    print(
        f"{args.users} users x {args.days} days, seed {args.seed}; true profit of the "
        "oracle's allocation, currency units"
    )
    header = f"{'variant':<30}" + "".join(f"{s:>12.0%}" for s in BUDGET_SHARES)
    print(header)
    for variant in VARIANTS:
        profit, cost = tables[variant.name]
        cells = []
        for share in BUDGET_SHARES:
            budget = max(1, int(round(spend * share)))
            choice = oracle(profit, cost, budget).choice
            rows = np.flatnonzero(choice >= 0)
            cells.append(float(profit[rows, choice[rows]].sum()) / 100)
        print(f"{variant.name:<30}" + "".join(f"{c:>12,.2f}" for c in cells))
    print(f"budgets are shares of {spend / 100:,.2f}, the unconstrained spend")
    print(f"time: {time.perf_counter() - started:.0f} s")
    return 0


def variant_matrices(
    world: World, features: pd.DataFrame, variant: Variant, day: pd.Timestamp
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Return true profit and cost, users x options, of one variant's options.

    Options are (coupon, channel) pairs: each coupon's first listed channel, or all
    of its listed channels when the variant picks the best one.
    """
    coupons = world.coupons.reset_index(drop=True)
    listed = [
        [c.strip() for c in str(names).split(",")] for names in coupons["channels"]
    ]
    options = [
        (j, channel)
        for j, channels in enumerate(listed)
        for channel in (channels if variant.best_channel else channels[:1])
    ]
    user_ids = features["user_id"].astype(str).to_numpy(dtype=object)
    hours = send_hours_for(features, ChannelRules())
    n_users = len(user_ids)
    columns = []
    for j, channel in options:
        send_at = _send_times(world, user_ids, hours.hour, channel, variant.hour, day)
        rows = pd.DataFrame(
            {
                "user_id": user_ids,
                "arm": str(coupons["coupon_id"].iloc[j]),
                "channel": channel,
                "send_at": send_at,
            }
        )
        columns.append(judge_assignments(world, rows, MARGIN_RATE))
    profit = np.column_stack([c["true_profit_cents"].to_numpy() for c in columns])
    cost = np.column_stack([c["true_cost_cents"].to_numpy() for c in columns])
    assert profit.shape == (n_users, len(options))
    return profit, cost


def _send_times(
    world: World,
    user_ids: npt.NDArray[np.object_],
    chosen: npt.NDArray[np.int8],
    channel: str,
    hour: Hour,
    day: pd.Timestamp,
) -> pd.DatetimeIndex:
    if hour == "chosen":
        hours = chosen[:, CHANNELS.index(channel)].astype(np.int64)
    elif hour == "true":
        latent = world.latent.set_index(world.latent["user_id"].astype(str))
        usual = latent.loc[user_ids, "pref_hour"].to_numpy()
        hours = (np.round(usual) % 24).astype(np.int64)
        if channel == "sms":
            # Text messages keep their quiet hours even at the true hour.
            hours = np.clip(hours, 8, 20)
    else:
        hours = np.full(len(user_ids), int(hour), dtype=np.int64)
    return pd.DatetimeIndex(day + pd.to_timedelta(hours, unit="h"))


def _unconstrained_spend(
    profit: npt.NDArray[np.float64], cost: npt.NDArray[np.float64]
) -> float:
    best = profit.argmax(axis=1)
    rows = np.arange(len(profit))
    chosen = profit[rows, best] > 0
    return float(cost[rows, best][chosen].sum())


if __name__ == "__main__":
    sys.exit(main())
