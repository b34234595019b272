"""Compare a designed coupon catalogue with the hand-made one on the simulator's truth.

Simulates a store, computes user features, trains the XGBoost response model on the
past randomized campaign, designs a catalogue with the genetic search, and allocates
both catalogues at the same budget with the same model. Each allocation is then
scored on the true expected profit: the simulator's truth for the hand-made coupons,
and ``simulate.true_response`` for the designed ones, which the world never drew.

Run: .venv/bin/python benchmarks/coupon_design.py [--users 3000 --generations 20]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from couponflow import lake
from couponflow.allocation import solve_budget
from couponflow.design import (
    DesignSpace,
    allocate_catalogue,
    constraint_violations,
    design_catalogue,
)
from couponflow.features import compute_user_features
from couponflow.schemas import EVENTS, USERS
from couponflow.settings import Settings
from couponflow.simulate import (
    World,
    simulate_world,
    true_incremental_profit_cents,
    true_response,
)
from training.response import ResponseModel, train_response_model

log = logging.getLogger("benchmarks.coupon_design")

MARGIN_RATE = 0.30
# Budget as a share of the oracle's unconstrained expected discount on the
# hand-made catalogue, the rule of the demo.
BUDGET_SHARE = 0.25


@dataclass(frozen=True)
class Scored:
    """One catalogue's allocation, by the model's estimate and by the truth."""

    name: str
    coupons: int
    offers_granted: int
    model_profit_cents: float
    true_profit_cents: float
    true_cost_cents: float
    oracle_profit_cents: float


def main() -> None:
    args = _parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # The solver and the scorer log once per candidate catalogue.
    logging.getLogger("couponflow.allocation").setLevel(logging.WARNING)
    started = time.perf_counter()

    world = simulate_world(args.users, args.days, args.seed)
    with tempfile.TemporaryDirectory(prefix="couponflow-bench-") as home:
        settings = Settings(home=Path(home), dask_workers=2)
        train_users, users = _features(settings, world)
    model = _train_model(world, train_users, args.seed)

    truth_profit = true_incremental_profit_cents(world.truth, MARGIN_RATE)
    truth_cost = _true_cost(world.truth)
    budget = args.budget_cents or _default_budget(truth_profit, truth_cost)
    log.info("budget %d cents for %d users", budget, len(users))

    space = DesignSpace(
        max_face_value_cents=args.max_face_value_cents,
        margin_floor=args.margin_floor,
        max_percent_bp=args.max_percent_bp,
        max_min_spend_cents=args.max_min_spend_cents,
    )
    design_started = time.perf_counter()
    result = design_catalogue(
        model,
        users,
        budget,
        MARGIN_RATE,
        args.n_coupons,
        args.seed,
        args.generations,
        space=space,
        population_size=args.population,
        starts_at=world.meta["end"],
    )
    design_seconds = time.perf_counter() - design_started
    designed = result.catalogue
    designed_truth = true_response(world.latent, designed)

    rows = [
        _score("hand-made", model, users, world.coupons, budget, world.truth, space),
        _score("designed", model, users, designed, budget, designed_truth, space),
    ]
    _print_report(args, rows, budget, result.initial_objective_cents, design_seconds)
    columns = [
        "coupon_id",
        "kind",
        "value",
        "min_spend_cents",
        "category",
        "valid_days",
    ]
    print(designed[columns].to_string(index=False))
    print(f"total {time.perf_counter() - started:.0f} s")


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=3_000, help="users simulated")
    parser.add_argument("--days", type=int, default=45, help="days simulated")
    parser.add_argument("--seed", type=int, default=7, help="world and search seed")
    parser.add_argument("--n-coupons", type=int, default=6, help="coupons to design")
    parser.add_argument(
        "--generations", type=int, default=20, help="generations of the search"
    )
    parser.add_argument(
        "--population", type=int, default=24, help="catalogues per generation"
    )
    parser.add_argument(
        "--budget-cents",
        type=int,
        default=0,
        help=f"budget in cents; 0 takes {BUDGET_SHARE:.0%} of the oracle's spend",
    )
    parser.add_argument(
        "--max-face-value-cents",
        type=int,
        default=3_000,
        help="largest amount_off value and free shipping fee, in cents",
    )
    parser.add_argument(
        "--max-percent-bp",
        type=int,
        default=3_000,
        help="largest percent_off value, in basis points",
    )
    parser.add_argument(
        "--max-min-spend-cents",
        type=int,
        default=20_000,
        help="largest minimum spend, in cents",
    )
    parser.add_argument(
        "--margin-floor",
        type=float,
        default=0.5,
        help="share of the smallest accepted basket kept after the discount",
    )
    return parser.parse_args()


def _features(settings: Settings, world: World) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return the features at the past campaign's send day and at the window's end."""
    # The simulator's frames already follow the contracts, so they skip the quality
    # suite and go straight to the lake.
    lake.write_lake_partitions(settings, USERS, "users-0001", world.users)
    lake.write_lake_partitions(settings, EVENTS, "events-0001", world.events)
    send_day = pd.Timestamp(world.meta["send_at"]).floor("D")
    end = pd.Timestamp(world.meta["end"])
    features = compute_user_features(
        settings, [send_day.to_pydatetime(), end.to_pydatetime()]
    )
    at_send = features[features["event_timestamp"] == send_day]
    at_end = features[features["event_timestamp"] == end]
    return at_send.reset_index(drop=True), at_end.reset_index(drop=True)


def _train_model(world: World, users: pd.DataFrame, seed: int) -> ResponseModel:
    rows = world.exposures[["user_id", "arm", "channel", "propensity"]].merge(
        world.outcomes[["user_id", "converted"]], on="user_id", validate="one_to_one"
    )
    frame = rows.merge(users, on="user_id", validate="one_to_one")
    return train_response_model(frame, world.coupons, seed=seed)


def _true_cost(truth: pd.DataFrame) -> pd.DataFrame:
    return truth.pivot(
        index="user_id", columns="coupon_id", values="expected_discount_cents"
    )


def _default_budget(profit: pd.DataFrame, cost: pd.DataFrame) -> int:
    cost = cost.loc[profit.index, profit.columns]
    values = profit.to_numpy()
    best = values.argmax(axis=1)
    rows = np.arange(len(values))
    chosen = values[rows, best] > 0
    spend = float(cost.to_numpy()[rows, best][chosen].sum())
    return max(1, round(spend * BUDGET_SHARE))


def _score(
    name: str,
    model: ResponseModel,
    users: pd.DataFrame,
    catalogue: pd.DataFrame,
    budget: int,
    truth: pd.DataFrame,
    space: DesignSpace,
) -> Scored:
    problems = constraint_violations(catalogue, space)
    if problems:
        log.info("%s catalogue breaks the design constraints: %s", name, problems)
    solution = allocate_catalogue(model, users, catalogue, budget, MARGIN_RATE)
    ids = users["user_id"].astype(str).tolist()
    offers = catalogue["coupon_id"].astype(str).tolist()
    profit = true_incremental_profit_cents(truth, MARGIN_RATE).loc[ids, offers]
    cost = _true_cost(truth).loc[ids, offers]
    choice = solution.choice
    granted = np.flatnonzero(choice >= 0)
    oracle = solve_budget(profit.to_numpy(), cost.to_numpy(), budget, policy="oracle")
    return Scored(
        name=name,
        coupons=len(catalogue),
        offers_granted=int(granted.size),
        model_profit_cents=solution.total_profit_cents,
        true_profit_cents=float(profit.to_numpy()[granted, choice[granted]].sum()),
        true_cost_cents=float(cost.to_numpy()[granted, choice[granted]].sum()),
        oracle_profit_cents=oracle.total_profit_cents,
    )


def _print_report(
    args: argparse.Namespace,
    rows: list[Scored],
    budget: int,
    initial_cents: float,
    design_seconds: float,
) -> None:
    print(
        f"{args.users} users, {args.days} days, seed {args.seed}, budget "
        f"{budget / 100:,.2f}; search {args.generations} generations x "
        f"{args.population} catalogues in {design_seconds:.0f} s "
        f"(model objective of the initial best {initial_cents / 100:,.2f})"
    )
    header = (
        f"{'catalogue':<11}{'offers':>8}{'model profit':>14}{'true profit':>13}"
        f"{'true cost':>12}{'oracle':>12}"
    )
    print(header)
    for r in rows:
        print(
            f"{r.name:<11}{r.offers_granted:>8}{r.model_profit_cents / 100:>14,.2f}"
            f"{r.true_profit_cents / 100:>13,.2f}{r.true_cost_cents / 100:>12,.2f}"
            f"{r.oracle_profit_cents / 100:>12,.2f}"
        )


if __name__ == "__main__":
    main()
