"""Decision-quality benchmark: the share of the oracle's true profit each policy earns.

Runs the library without Airflow on a simulated world and judges every allocation on
the simulator's true expected profit. Run: ``python benchmarks/decision_quality.py``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from couponflow import lake
from couponflow.allocation import (
    NO_OFFER,
    likeliest_buyers,
    oracle,
    random_targeting,
    score_users,
    solve_budget,
)
from couponflow.features import compute_user_features
from couponflow.schemas import CONTROL_ARM, EVENTS, USERS
from couponflow.settings import Settings
from couponflow.simulate import (
    World,
    expected_response,
    simulate_world,
    true_incremental_profit_cents,
)
from training.response import ResponseModel, train_response_model

log = logging.getLogger(__name__)

DEFAULT_USERS = 30_000
DEFAULT_DAYS = 45
DEFAULT_SEED = 7
# Budgets as shares of the oracle's spend when the budget does not bind.
BUDGET_SHARES = (0.05, 0.10, 0.25)
PLOT_SHARES = (0.02, 0.05, 0.10, 0.15, 0.25, 0.40, 0.60, 0.80, 1.0)
POLICIES = (
    "random targeting",
    "likeliest buyers",
    "uplift top-k",
    "couponflow",
    "oracle",
)
# The pipeline sends a campaign at its feature snapshot's as-of time, UTC midnight.
PIPELINE_SEND_HOUR = 0
FloatMatrix = npt.NDArray[np.float64]
Choice = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Scored:
    """couponflow's scores at decision time, and the truth that judges them.

    The true matrices send each coupon by its first listed channel at the user's
    usual hour; ``true_profit_midnight`` sends it at PIPELINE_SEND_HOUR instead.
    """

    p: FloatMatrix
    profit: FloatMatrix
    cost: FloatMatrix
    uplift: FloatMatrix
    true_profit: FloatMatrix
    true_cost: FloatMatrix
    true_uplift: FloatMatrix
    true_profit_midnight: FloatMatrix
    offer_ids: list[str]
    seconds: dict[str, float]


@dataclass(frozen=True)
class PolicyOutcome:
    """One policy at one budget, judged on the true effects.

    ``oracle_at_true_cost_cents`` is the oracle's true profit when its budget is the
    policy's true cost: a policy whose predicted costs are too low spends more than
    the budget, and this compares it with the oracle at the same spend.
    """

    budget_share: float
    budget_cents: int
    policy: str
    granted: int
    true_cost_cents: float
    true_profit_cents: float
    oracle_at_true_cost_cents: float


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=DEFAULT_USERS, help="users")
    parser.add_argument("--days", type=int, default=DEFAULT_DAYS, help="days")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="world seed")
    parser.add_argument(
        "--plot", type=Path, default=None, help="write the profit-budget plot (PNG)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(message)s")

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="couponflow-bench-") as home:
        settings = Settings(home=Path(home))
        scored = score_world(settings, args.users, args.days, args.seed)
    outcomes = compare(scored, BUDGET_SHARES, args.seed)
    print(
        f"{args.users} users x {args.days} days, seed {args.seed}; true expected "
        "profit in currency units"
    )
    print(format_table(outcomes))
    print(format_midnight(scored, BUDGET_SHARES))
    print(format_uplift_correlation(scored))
    if args.plot is not None:
        write_plot(compare(scored, PLOT_SHARES, args.seed), args.plot)
        print(f"plot: {args.plot}")
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in scored.seconds.items())
    print(f"time: {stages}; total {time.perf_counter() - started:.0f} s")
    return 0


def score_world(settings: Settings, n_users: int, days: int, seed: int) -> Scored:
    """Simulate, compute features, train and score as the pipeline does."""
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    world = simulate_world(n_users, days, seed)
    settings.ensure_dirs()
    # Straight into the offline store: the benchmark skips the quality checks.
    lake.write_lake_partitions(settings, USERS, "users", world.users)
    lake.write_lake_partitions(settings, EVENTS, "events", world.events)
    seconds["simulate"] = time.perf_counter() - clock

    clock = time.perf_counter()
    send_day = pd.Timestamp(world.meta["send_at"]).normalize()
    end = pd.Timestamp(world.meta["end"])
    # Snapshots for the past campaign (its sends fall on send_day, at any hour) and
    # for the new one, decided at the end of the window.
    as_of = [send_day - timedelta(days=1), send_day, end]
    features = compute_user_features(settings, as_of)
    seconds["features"] = time.perf_counter() - clock

    clock = time.perf_counter()
    train = training_rows(world, features)
    model = train_response_model(train, world.coupons, seed=seed)
    seconds["train"] = time.perf_counter() - clock

    clock = time.perf_counter()
    users = features[features["event_timestamp"] == end].reset_index(drop=True)
    offers = world.coupons.reset_index(drop=True)
    p, profit, cost, uplift = score(model, users, offers, settings.margin_rate)
    truth = true_matrices(world, users["user_id"], offers, settings, None)
    midnight = true_matrices(
        world, users["user_id"], offers, settings, PIPELINE_SEND_HOUR
    )
    seconds["score"] = time.perf_counter() - clock
    return Scored(
        p=p,
        profit=profit,
        cost=cost,
        uplift=uplift,
        true_profit=truth[0],
        true_cost=truth[1],
        true_uplift=truth[2],
        true_profit_midnight=midnight[0],
        offer_ids=offers["coupon_id"].astype(str).tolist(),
        seconds=seconds,
    )


def training_rows(world: World, features: pd.DataFrame) -> pd.DataFrame:
    """Join each past exposure with its outcome and the last snapshot before it.

    The snapshot's as-of time is strictly before the send time. Exposures of users
    without such a snapshot (signed up on the day before the send) are dropped.
    """
    rows = world.exposures.merge(
        world.outcomes[["campaign_id", "user_id", "converted", "revenue_cents"]],
        on=["campaign_id", "user_id"],
        validate="one_to_one",
    )
    joined = pd.merge_asof(
        rows.sort_values("send_at"),
        features.sort_values("event_timestamp"),
        left_on="send_at",
        right_on="event_timestamp",
        by="user_id",
        allow_exact_matches=False,
    )
    missing = joined["event_timestamp"].isna()
    if missing.any():
        log.warning("dropped %d exposures without a prior snapshot", missing.sum())
    return joined[~missing].reset_index(drop=True)


def score(
    model: ResponseModel, users: pd.DataFrame, offers: pd.DataFrame, margin: float
) -> tuple[FloatMatrix, FloatMatrix, FloatMatrix, FloatMatrix]:
    """Score every user x offer as couponflow.pipeline.score_campaign does."""
    p, scores = score_users(model, users, offers, margin)
    return p, scores.profit_cents, scores.cost_cents, scores.uplift


def true_matrices(
    world: World,
    user_ids: pd.Series,
    offers: pd.DataFrame,
    settings: Settings,
    send_hour: int | None,
) -> tuple[FloatMatrix, FloatMatrix, FloatMatrix]:
    """Return the true profit, expected discount and uplift, users x offers.

    Each coupon goes by its first listed channel, at ``send_hour`` UTC on the day
    after the window, or at the user's usual hour when ``send_hour`` is None.
    """
    ids = user_ids.astype(str).tolist()
    columns = offers["coupon_id"].astype(str).tolist()
    truth = world.truth if send_hour is None else _truth_at(world, ids, send_hour)
    profit = true_incremental_profit_cents(truth, settings.margin_rate)
    discount = truth.pivot(
        index="user_id", columns="coupon_id", values="expected_discount_cents"
    )
    p = truth.pivot(index="user_id", columns="coupon_id", values="p_convert")
    uplift = p[columns].sub(p[CONTROL_ARM], axis=0)
    return (
        profit.loc[ids, columns].to_numpy("float64"),
        discount.loc[ids, columns].to_numpy("float64"),
        uplift.loc[ids, columns].to_numpy("float64"),
    )


def _truth_at(world: World, ids: list[str], send_hour: int) -> pd.DataFrame:
    send_at = pd.Timestamp(world.meta["end"]) + pd.Timedelta(hours=send_hour)
    first_channel = world.coupons["channels"].astype(str).str.split(",").str[0]
    arms = [CONTROL_ARM, *world.coupons["coupon_id"].astype(str)]
    channels = ["email", *first_channel]
    assignments = pd.DataFrame(
        {
            "user_id": np.repeat(ids, len(arms)),
            "arm": np.tile(arms, len(ids)),
            "channel": np.tile(channels, len(ids)),
            "send_at": send_at,
        }
    )
    return expected_response(world, assignments)


def unconstrained_spend(true_profit: FloatMatrix, true_cost: FloatMatrix) -> float:
    """Return the oracle's true spend when every positive-profit grant is made."""
    best = true_profit.argmax(axis=1)
    rows = np.arange(len(true_profit))
    chosen = true_profit[rows, best] > 0
    return float(true_cost[rows, best][chosen].sum())


def uplift_top_k(uplift: FloatMatrix, cost: FloatMatrix, budget_cents: int) -> Choice:
    """Rank users by their best predicted uplift and grant that offer until the budget.

    Serving stops at the first user whose predicted cost no longer fits, as the
    baselines of couponflow.allocation do.
    """
    best = uplift.argmax(axis=1)
    rows = np.arange(len(uplift))
    order = np.lexsort((rows, -uplift[rows, best]))
    spent = np.cumsum(cost[order, best[order]])
    over = np.flatnonzero(spent > budget_cents)
    served = order[: over[0]] if over.size else order
    choice = np.full(len(uplift), NO_OFFER, dtype=np.int64)
    choice[served] = best[served]
    return choice


def choose(scored: Scored, budget_cents: int, seed: int) -> dict[str, Choice]:
    """Return each policy's offer column per user at one budget."""
    return {
        "random targeting": random_targeting(
            scored.profit, scored.cost, budget_cents, seed
        ).choice,
        "likeliest buyers": likeliest_buyers(
            scored.p, scored.profit, scored.cost, budget_cents
        ).choice,
        "uplift top-k": uplift_top_k(scored.uplift, scored.cost, budget_cents),
        "couponflow": solve_budget(scored.profit, scored.cost, budget_cents).choice,
        "oracle": oracle(scored.true_profit, scored.true_cost, budget_cents).choice,
    }


def compare(scored: Scored, shares: Sequence[float], seed: int) -> list[PolicyOutcome]:
    """Run every policy at each budget share and judge it on the truth."""
    spend = unconstrained_spend(scored.true_profit, scored.true_cost)
    outcomes = []
    for share in shares:
        budget = max(1, int(round(spend * share)))
        choices = choose(scored, budget, seed)
        for policy in POLICIES:
            rows, columns = _granted(choices[policy])
            true_cost = float(scored.true_cost[rows, columns].sum())
            outcomes.append(
                PolicyOutcome(
                    budget_share=share,
                    budget_cents=budget,
                    policy=policy,
                    granted=int(rows.size),
                    true_cost_cents=true_cost,
                    true_profit_cents=float(scored.true_profit[rows, columns].sum()),
                    oracle_at_true_cost_cents=_oracle_profit(scored, true_cost),
                )
            )
    return outcomes


def _oracle_profit(scored: Scored, budget_cents: float) -> float:
    """Return the oracle's true profit with ``budget_cents`` of true cost."""
    budget = max(1, int(round(budget_cents)))
    rows, columns = _granted(
        oracle(scored.true_profit, scored.true_cost, budget).choice
    )
    return float(scored.true_profit[rows, columns].sum())


def _granted(choice: Choice) -> tuple[npt.NDArray[np.int64], Choice]:
    rows = np.flatnonzero(np.asarray(choice) >= 0)
    return rows, np.asarray(choice)[rows]


def format_table(outcomes: list[PolicyOutcome]) -> str:
    """Return the table of true profit and share of the oracle per budget.

    "of oracle" divides by the oracle's profit at the same budget, and "same cost"
    by the oracle's profit at the policy's true cost.
    """
    lines = [
        f"{'budget':>7} {'policy':<18}{'offers':>8}{'true cost':>12}"
        f"{'true profit':>13}{'of oracle':>11}{'same cost':>11}{'x likeliest':>13}"
    ]
    by_share: dict[float, list[PolicyOutcome]] = {}
    for outcome in outcomes:
        by_share.setdefault(outcome.budget_share, []).append(outcome)
    for share, group in by_share.items():
        best = next(o.true_profit_cents for o in group if o.policy == "oracle")
        likeliest = next(
            o.true_profit_cents for o in group if o.policy == "likeliest buyers"
        )
        for o in group:
            ratio = f"{o.true_profit_cents / best:.1%}" if best > 0 else "n/a"
            same_cost = (
                f"{o.true_profit_cents / o.oracle_at_true_cost_cents:.1%}"
                if o.oracle_at_true_cost_cents > 0
                else "n/a"
            )
            times = f"{o.true_profit_cents / likeliest:.2f}" if likeliest > 0 else "n/a"
            lines.append(
                f"{share:>7.0%} {o.policy:<18}{o.granted:>8}"
                f"{o.true_cost_cents / 100:>12,.2f}{o.true_profit_cents / 100:>13,.2f}"
                f"{ratio:>11}{same_cost:>11}{times:>13}"
            )
    return "\n".join(lines)


def format_midnight(scored: Scored, shares: Sequence[float]) -> str:
    """Return couponflow's true profit when its coupons go out at midnight UTC."""
    spend = unconstrained_spend(scored.true_profit, scored.true_cost)
    parts = []
    for share in shares:
        budget = max(1, int(round(spend * share)))
        rows, columns = _granted(
            solve_budget(scored.profit, scored.cost, budget).choice
        )
        usual = scored.true_profit[rows, columns].sum()
        midnight = scored.true_profit_midnight[rows, columns].sum()
        parts.append(
            f"{share:.0%}: {midnight / 100:,.2f} (usual hour {usual / 100:,.2f})"
        )
    return (
        f"couponflow sent at {PIPELINE_SEND_HOUR:02d}:00 UTC instead of each user's "
        "usual hour: " + "; ".join(parts)
    )


def format_uplift_correlation(scored: Scored) -> str:
    """Return the correlation of predicted and true uplift per coupon."""
    parts = []
    for j, offer in enumerate(scored.offer_ids):
        correlation = np.corrcoef(scored.uplift[:, j], scored.true_uplift[:, j])[0, 1]
        parts.append(f"{offer} {correlation:.2f}")
    return "correlation of predicted and true uplift: " + ", ".join(parts)


def write_plot(outcomes: list[PolicyOutcome], path: Path) -> None:
    """Save true profit against budget share, one line per policy, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for policy in POLICIES:
        points = [o for o in outcomes if o.policy == policy]
        axes.plot(
            [o.budget_share * 100 for o in points],
            [o.true_profit_cents / 100 for o in points],
            marker="o",
            label=policy,
        )
    axes.axhline(0, color="grey", linewidth=0.8)
    axes.set_xlabel("budget, % of the oracle's unconstrained spend")
    axes.set_ylabel("true incremental profit (currency units)")
    axes.set_title("Decision quality on the simulated store")
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
