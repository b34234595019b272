"""The main job on a simulated world: every DAG in turn, then simulated outcomes.

Ends by comparing, at the same budget, the true incremental profit of couponflow's
allocation with random targeting, the likeliest buyers and the oracle.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from couponflow import lake
from couponflow.schemas import CHANNELS, CONTROL_ARM, EXPOSURES, coerce
from couponflow.settings import Settings

log = logging.getLogger(__name__)

# Sized so that `make demo` finishes in about ten minutes on 2 cores after install.
DEFAULT_USERS = 10_000
DEFAULT_DAYS = 45
DEFAULT_SEED = 7
DEMO_CAMPAIGN = "demo-001"
DEMO_HOLDOUT = 0.1
DEMO_EXPLORE = 0.05
# The demo's budget is this share of the oracle's unconstrained expected spend.
DEMO_BUDGET_SHARE = 0.25
_HOME_MARKER = ".couponflow-home"


@dataclass(frozen=True)
class PolicyResult:
    """One targeting policy scored on the simulator's true effects."""

    policy: str
    offers_granted: int
    true_cost_cents: float
    true_profit_cents: float


@dataclass(frozen=True)
class DemoResult:
    """The demo's policy comparison and where its report is."""

    policies: list[PolicyResult]
    budget_cents: int
    report: Path

    def format(self) -> str:
        return format_comparison(self.policies, self.budget_cents, self.report)


def simulate_to_raw(
    settings: Settings, n_users: int, days: int, seed: int
) -> dict[str, Any]:
    """Simulate a world and write it as raw batches; the truth goes to truth_dir."""
    from couponflow.simulate import simulate_world, write_world

    settings.ensure_dirs()
    (settings.home / _HOME_MARKER).touch()
    world = simulate_world(
        n_users, days, seed, progress=lambda stage: log.info("simulating %s", stage)
    )
    written = write_world(settings, world)
    return {
        "users": len(world.users),
        "events": len(world.events),
        "coupons": len(world.coupons),
        "past_campaign": world.meta["past_campaign_id"],
        "raw_batches": sum(len(v) for k, v in written.items() if k != "truth"),
        "raw_dir": str(settings.raw_dir),
    }


def run_demo(
    settings: Settings,
    n_users: int = DEFAULT_USERS,
    days: int = DEFAULT_DAYS,
    seed: int = DEFAULT_SEED,
    budget_cents: int | None = None,
    fresh: bool = True,
) -> DemoResult:
    """Carry one campaign from raw events to its report and compare the policies."""
    from couponflow.dagrun import run_dag

    if fresh:
        _clear_home(settings.home)
    steps = 9
    started = time.perf_counter()

    def step(number: int, text: str) -> None:
        log.info("[%d/%d %.0fs] %s", number, steps, time.perf_counter() - started, text)

    step(1, f"simulating {n_users} users over {days} days (seed {seed})")
    simulate_to_raw(settings, n_users, days, seed)
    step(2, "DAG ingest_events: checking raw batches with Great Expectations")
    run_dag(settings, "ingest_events")
    step(3, "DAG build_features: Dask features into Feast, materialized online")
    run_dag(settings, "build_features")
    step(4, "DAG train_models: TensorFlow profiles, XGBoost uplift, MLflow")
    run_dag(settings, "train_models", {"seed": seed})

    if budget_cents is None:
        budget_cents = demo_budget(settings)
    step(5, f"DAG allocate_campaign: {DEMO_CAMPAIGN} with budget {budget_cents} cents")
    run_dag(
        settings,
        "allocate_campaign",
        {
            "campaign_id": DEMO_CAMPAIGN,
            "budget_cents": budget_cents,
            "holdout_fraction": DEMO_HOLDOUT,
            "explore_fraction": DEMO_EXPLORE,
            "seed": seed,
        },
    )
    step(6, "the simulator draws the campaign's outcomes from the true response")
    answer_campaign(settings, DEMO_CAMPAIGN, seed)
    step(7, "DAG ingest_events: the campaign's exposures and outcomes")
    run_dag(settings, "ingest_events")
    step(8, "DAG analyze_experiment: arms against the holdout")
    run_dag(settings, "analyze_experiment", {"campaign_id": DEMO_CAMPAIGN})
    step(9, "comparing policies at the same budget on the true effects")
    results = compare_policies(settings, DEMO_CAMPAIGN, budget_cents, seed)
    assert settings.reports_dir is not None
    report = settings.reports_dir / DEMO_CAMPAIGN / "report.html"
    return DemoResult(results, budget_cents, report)


def demo_budget(settings: Settings) -> int:
    """Return DEMO_BUDGET_SHARE of the oracle's unconstrained spend, in cents."""
    from couponflow.simulate import load_world_truth

    profit, cost = _true_matrices(settings, load_world_truth(settings))
    best = np.where(profit > 0, profit, 0).argmax(axis=1)
    chosen = profit[np.arange(len(profit)), best] > 0
    spend = float(cost[np.arange(len(cost)), best][chosen].sum())
    return max(1, int(round(spend * DEMO_BUDGET_SHARE)))


def answer_campaign(settings: Settings, campaign_id: str, seed: int) -> dict[str, int]:
    """Write the campaign's exposures and the simulator's outcomes as raw batches."""
    from couponflow.allocation import read_current_allocation
    from couponflow.simulate import load_world_truth, respond
    from couponflow.store import get_engine

    allocation = read_current_allocation(
        get_engine(settings.campaign_db_url), campaign_id
    )
    if allocation is None or allocation.empty:
        raise ValueError(f"campaign {campaign_id!r} has no current allocation")
    exposures = allocation.assign(campaign_id=campaign_id, policy="couponflow")
    exposures["channel"] = exposures["channel"].fillna("email")
    exposures = coerce(exposures, EXPOSURES)
    outcomes = respond(
        load_world_truth(settings),
        exposures[["user_id", "arm", "channel", "send_at"]],
        campaign_id,
        seed,
    )
    lake.write_raw_batch(settings, "exposures", f"exposures-{campaign_id}", exposures)
    lake.write_raw_batch(settings, "outcomes", f"outcomes-{campaign_id}", outcomes)
    return {"exposures": len(exposures), "outcomes": len(outcomes)}


def compare_policies(
    settings: Settings, campaign_id: str, budget_cents: int, seed: int
) -> list[PolicyResult]:
    """Judge couponflow's campaign and the baselines, at one budget, on the truth.

    couponflow is judged on what its policy chose for every user: the offer,
    channel and send time stored for treatment users, and the withheld offer for
    holdout users, so that all policies cover the same users. The baselines choose
    offers from the same scores on each coupon's first listed channel, sent at
    couponflow's send hour for that channel. "couponflow, fixed send" solves the
    budget on the same first-channel scores and sends every coupon at the campaign
    time (the snapshot's midnight, UTC), the way the campaign went out before it
    chose channels and hours. The oracle solves the budget on the true effects of
    every listed channel at each user's true usual hour.
    """
    from couponflow import allocation as alloc
    from couponflow.allocation import read_current_allocation
    from couponflow.pipeline import campaign_dir
    from couponflow.simulate import load_world_truth
    from couponflow.store import get_engine

    world = load_world_truth(settings)
    folder = campaign_dir(settings, campaign_id)
    matrices = np.load(folder / "scores.npz")
    users = pd.read_parquet(folder / "users.parquet")
    offers = pd.read_parquet(folder / "offers.parquet")
    user_ids = users["user_id"].astype(str).to_numpy(dtype=object)
    offer_ids = offers["coupon_id"].astype(str).to_numpy(dtype=object)
    channels = list(CHANNELS)
    plan = read_current_allocation(get_engine(settings.campaign_db_url), campaign_id)
    if plan is None or plan.empty:
        raise ValueError(f"campaign {campaign_id!r} has no current allocation")
    plan = plan.set_index("user_id").loc[user_ids].reset_index()
    as_of = pd.Timestamp(plan["send_at"].min()).floor("D")

    # The first listed channel of each offer, and couponflow's hour on it per user.
    first = np.array(
        [channels.index(str(c).split(",")[0].strip()) for c in offers["channels"]]
    )
    columns = np.arange(len(offer_ids))
    profit = matrices["profit"][:, columns, first]
    cost = matrices["cost"][:, columns, first]
    p = np.column_stack([matrices["p"][:, 0, 0], matrices["p"][:, 1 + columns, first]])
    hours = alloc.send_hours_for(users, alloc.ChannelRules())
    first_channel_times = hours.send_times(as_of)[:, first]

    def on_first_channel(choice: np.ndarray, at: pd.Timestamp | None) -> pd.DataFrame:
        rows = np.flatnonzero(choice >= 0)
        offer = choice[rows]
        send_at = (
            first_channel_times[rows, offer]
            if at is None
            else np.full(rows.size, at.as_unit("ns").value).astype("datetime64[ns]")
        )
        return pd.DataFrame(
            {
                "user_id": user_ids[rows],
                "arm": offer_ids[offer],
                "channel": np.asarray(channels, dtype=object)[first[offer]],
                "send_at": pd.to_datetime(send_at, utc=True),
            }
        )

    chosen = plan[plan["policy_arm"] != CONTROL_ARM]
    assignments = {
        "couponflow": chosen[["user_id", "policy_arm", "channel", "send_at"]].rename(
            columns={"policy_arm": "arm"}
        ),
        "couponflow, fixed send": on_first_channel(
            alloc.solve_budget(profit, cost, budget_cents).choice,
            as_of,
        ),
        "random targeting": on_first_channel(
            alloc.random_targeting(profit, cost, budget_cents, seed).choice, None
        ),
        "likeliest buyers": on_first_channel(
            alloc.likeliest_buyers(p, profit, cost, budget_cents).choice, None
        ),
        "oracle": _oracle_assignments(
            world, user_ids, offers, as_of, budget_cents, settings.margin_rate
        ),
    }
    results = []
    for name, rows in assignments.items():
        judged = judge_assignments(world, rows, settings.margin_rate)
        results.append(
            PolicyResult(
                policy=name,
                offers_granted=len(judged),
                true_cost_cents=float(judged["true_cost_cents"].sum()),
                true_profit_cents=float(judged["true_profit_cents"].sum()),
            )
        )
    return results


def judge_assignments(
    world: Any, assignments: pd.DataFrame, margin_rate: float
) -> pd.DataFrame:
    """Return each assignment's true expected discount and incremental profit.

    ``assignments`` has user_id, arm, channel and send_at, one row per grant. The
    profit is ``margin_rate`` times the expected revenue over the user's control
    revenue, minus the expected discount.
    """
    from couponflow.simulate import expected_response

    rows = assignments.reset_index(drop=True)
    if rows.empty:
        return rows.assign(true_cost_cents=[], true_profit_cents=[])
    treated = expected_response(world, rows)
    control = expected_response(world, rows.assign(arm=CONTROL_ARM, channel="email"))
    revenue_gain = (
        treated["expected_revenue_cents"].to_numpy()
        - control["expected_revenue_cents"].to_numpy()
    )
    discount = treated["expected_discount_cents"].to_numpy()
    return rows.assign(
        true_cost_cents=discount,
        true_profit_cents=margin_rate * revenue_gain - discount,
    )


def _oracle_assignments(
    world: Any,
    user_ids: np.ndarray,
    offers: pd.DataFrame,
    as_of: pd.Timestamp,
    budget_cents: int,
    margin_rate: float,
) -> pd.DataFrame:
    """Solve the budget on the true effect of every (offer, listed channel) option.

    Each message goes out at the user's true usual hour, rounded to the hour.
    """
    from couponflow import allocation as alloc

    usual = (
        world.latent.set_index(world.latent["user_id"].astype(str))
        .loc[user_ids, "pref_hour"]
        .to_numpy()
    )
    send_at = as_of + pd.to_timedelta(np.round(usual) % 24, unit="h")
    options = [
        (str(o.coupon_id), channel.strip())
        for o in offers.itertuples()
        for channel in str(o.channels).split(",")
    ]
    candidates = pd.DataFrame(
        {
            "user_id": np.repeat(user_ids, len(options)),
            "arm": np.tile([arm for arm, _ in options], len(user_ids)),
            "channel": np.tile([channel for _, channel in options], len(user_ids)),
            "send_at": np.repeat(pd.DatetimeIndex(send_at), len(options)),
        }
    )
    judged = judge_assignments(world, candidates, margin_rate)
    shape = (len(user_ids), len(options))
    profit = judged["true_profit_cents"].to_numpy().reshape(shape)
    cost = judged["true_cost_cents"].to_numpy().reshape(shape)
    choice = alloc.oracle(profit, cost, budget_cents).choice
    return candidates.iloc[
        np.flatnonzero(choice >= 0) * len(options) + choice[choice >= 0]
    ].reset_index(drop=True)


def format_comparison(
    results: list[PolicyResult], budget_cents: int, report: Path
) -> str:
    """Return the comparison table that the demo prints."""
    oracle = next(r.true_profit_cents for r in results if r.policy == "oracle")
    lines = [
        f"Incremental profit at a budget of {budget_cents / 100:,.2f} "
        "(true expected values from the simulator):",
        f"{'policy':<24}{'offers':>8}{'cost':>14}{'profit':>14}{'of oracle':>11}",
    ]
    for r in results:
        share = f"{r.true_profit_cents / oracle:.1%}" if oracle > 0 else "n/a"
        lines.append(
            f"{r.policy:<24}{r.offers_granted:>8}{r.true_cost_cents / 100:>14,.2f}"
            f"{r.true_profit_cents / 100:>14,.2f}{share:>11}"
        )
    lines.append(f"Experiment report: {report}")
    return "\n".join(lines)


def _true_matrices(settings: Settings, world: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return the true profit and expected discount, users x offers, in cents.

    Each coupon goes by its first listed channel at the user's usual hour.
    """
    from couponflow.simulate import true_incremental_profit_cents

    profit = true_incremental_profit_cents(world.truth, settings.margin_rate)
    discount = world.truth.pivot(
        index="user_id", columns="coupon_id", values="expected_discount_cents"
    )
    discount = discount.loc[profit.index, profit.columns]
    return profit.to_numpy("float64"), discount.to_numpy("float64")


def _clear_home(home: Path) -> None:
    """Remove a previous demo's stores; refuse a folder couponflow did not create."""
    if not home.exists():
        return
    if any(home.iterdir()) and not (home / _HOME_MARKER).exists():
        raise ValueError(
            f"{home} is not empty and was not created by couponflow; set "
            "COUPONFLOW_HOME to an empty folder or pass --keep"
        )
    shutil.rmtree(home)
