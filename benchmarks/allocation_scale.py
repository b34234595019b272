"""Time the full allocation solver at scale and compare it with HiGHS on smaller sets.

Builds a synthetic campaign (users x offers x channels, send hours, eligibility)
with the library's own helpers and solves it with ``solve_allocation``. Prints the
seconds, peak RSS and gap to the Lagrangian dual bound, then the objective as a
share of HiGHS's LP bound (and of a time-limited MILP) on smaller instances.

    .venv/bin/python benchmarks/allocation_scale.py --users 10000000 --threads 2
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import resource
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from couponflow.allocation import (
    UNLIMITED,
    AllocationSpec,
    EligibilityRules,
    SolverParams,
    UserOptions,
    build_eligibility,
    channel_reach,
    choose_send_hours,
    dual_bound,
    expand_over_channels,
    solve_allocation,
    solve_allocation_exact,
)
from couponflow.schemas import CATEGORIES, CHANNELS

log = logging.getLogger(__name__)

SEND_AFTER = datetime(2026, 5, 4, 6, 0, tzinfo=UTC)
MARGIN_RATE = 0.30
# Share of users each offer's stock covers, and each channel's capacity.
STOCK_SHARE = (0.004, 0.008, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.10)
CAPACITY_SHARE = {"email": None, "push": 0.04, "sms": 0.015}
MESSAGE_COST_CENTS = {"email": 0, "push": 0, "sms": 2}
OPEN_RATE = {"email": 0.25, "push": 0.45, "sms": 0.9}
# SMS only in daytime (UTC) hours.
SMS_HOURS = range(8, 21)
GENERATE_CHUNK = 500_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10_000_000, help="users to solve")
    parser.add_argument("--offers", type=int, default=10, help="offers (at most 10)")
    parser.add_argument("--threads", type=int, default=2, help="solver threads")
    parser.add_argument(
        "--check-users", type=int, default=100_000, help="users of the HiGHS LP check"
    )
    parser.add_argument(
        "--milp-users", type=int, default=5_000, help="users of the HiGHS MILP check"
    )
    parser.add_argument(
        "--milp-seconds", type=float, default=60.0, help="time limit of the MILP check"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the instance")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")

    figures: dict[str, Any] = {
        "command": "benchmarks/allocation_scale.py " + _argv_text(args),
        "machine": f"{platform.machine()}, {_cpu_count()} CPUs, "
        f"{_memory_gib():.0f} GiB, Python {platform.python_version()}",
    }
    figures["scale"] = _scale_run(args)
    gc.collect()
    figures["lp_check"] = _lp_check(args)
    figures["milp_check"] = _milp_check(args)
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


def build_instance(
    n_users: int, n_offers: int, seed: int
) -> tuple[UserOptions, AllocationSpec]:
    """Build a synthetic campaign with the library's send-hour and eligibility steps.

    Users have a base conversion rate, a basket, category affinities, signup age,
    recent events and past exposures. Offers are percent, amount and shipping
    discounts with categories, channel lists and end times. The budget is a
    quarter of what every user's most profitable option would cost.
    """
    rng = np.random.default_rng(seed)
    offers = _offers(n_offers, rng)
    channels = CHANNELS
    shape = (n_users, n_offers, len(channels))
    profit = np.empty(shape, dtype=np.float32)
    cost = np.empty(shape, dtype=np.float32)
    eligible = np.empty(shape, dtype=bool)
    reach_by_hour = channel_reach(OPEN_RATE, {"sms": SMS_HOURS}, channels)
    rules = EligibilityRules()
    for start in range(0, n_users, GENERATE_CHUNK):
        stop = min(start + GENERATE_CHUNK, n_users)
        users = _users(stop - start, rng)
        hours = choose_send_hours(users.pop("activity"), reach_by_hour, channels)
        offer_profit, offer_cost = _offer_scores(users, offers, rng)
        profit[start:stop], cost[start:stop] = expand_over_channels(
            offer_profit, offer_cost, hours.reach
        )
        frame = users.pop("frame")
        eligible[start:stop] = build_eligibility(
            frame, offers, hours.send_times(SEND_AFTER), rules, channels
        )

    best_cost = _best_cost_sample(profit, cost, eligible, rng)
    capacity = [_capacity(CAPACITY_SHARE[c], n_users) for c in channels]
    spec = AllocationSpec(
        offer_ids=tuple(offers["coupon_id"]),
        budget_cents=int(0.25 * best_cost * n_users),
        stock=np.array([int(STOCK_SHARE[j] * n_users) for j in range(n_offers)]),
        channels=channels,
        capacity=np.array(capacity),
        message_cost_cents=np.array([MESSAGE_COST_CENTS[c] for c in channels]),
    )
    return UserOptions(profit, cost, eligible), spec


def _capacity(share: float | None, n_users: int) -> int:
    return UNLIMITED if share is None else int(share * n_users)


def _scale_run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    options, spec = build_instance(args.users, args.offers, args.seed)
    build_seconds = time.perf_counter() - started
    rss_before = _peak_rss_gib()
    params = SolverParams(threads=args.threads)

    started = time.perf_counter()
    solution = solve_allocation(options, spec, params)
    solve_seconds = time.perf_counter() - started
    rss_after = _peak_rss_gib()
    started = time.perf_counter()
    bound = dual_bound(options, spec, solution.multipliers, params)
    bound_seconds = time.perf_counter() - started
    input_gib = (
        options.profit_cents.nbytes
        + options.cost_cents.nbytes
        + options.eligible.nbytes
    ) / 2**30
    result = {
        "users": args.users,
        "offers": spec.n_offers,
        "channels": spec.n_channels,
        "build_seconds": round(build_seconds, 1),
        "solve_seconds": round(solve_seconds, 2),
        "solve_steps_seconds": {k: round(v, 2) for k, v in solution.seconds.items()},
        "input_gib": round(input_gib, 2),
        "peak_rss_gib_before_solve": round(rss_before, 2),
        "peak_rss_gib_after_solve": round(rss_after, 2),
        "granted": solution.n_granted,
        "fill_rounds": solution.fill_rounds,
        "objective_cents": round(solution.objective_cents),
        "dual_bound_cents": round(bound),
        "gap_to_dual_bound": round(1 - solution.objective_cents / bound, 7),
        "bound_seconds": round(bound_seconds, 2),
        "discount_cost_cents": round(solution.discount_cost_cents),
        "budget_cents": spec.budget_cents,
        "offer_grants_over_stock": _shares(solution.offer_grants, spec.stock),
        "channel_messages_over_capacity": _shares(
            solution.channel_messages, spec.capacity
        ),
    }
    del options, solution
    return result


def _lp_check(args: argparse.Namespace) -> dict[str, Any]:
    options, spec = build_instance(args.check_users, args.offers, args.seed + 1)
    started = time.perf_counter()
    lp = solve_allocation_exact(options, spec, integral=False, time_limit_s=900)
    lp_seconds = time.perf_counter() - started
    result: dict[str, Any] = {
        "users": args.check_users,
        "reference": "LP relaxation (HiGHS interior point), an upper bound",
        "highs_seconds": round(lp_seconds, 1),
        "lp_bound_cents": round(lp.objective_cents),
    }
    sample = max(1, args.check_users // 10)
    for name, params in (
        ("every_user_in_working_set", SolverParams(threads=args.threads)),
        (
            f"working_set_of_{sample}",
            SolverParams(threads=args.threads, working_users=sample),
        ),
    ):
        started = time.perf_counter()
        solution = solve_allocation(options, spec, params)
        result[name] = {
            "seconds": round(time.perf_counter() - started, 2),
            "objective_cents": round(solution.objective_cents),
            "share_of_lp_bound": round(
                solution.objective_cents / lp.objective_cents, 6
            ),
        }
    return result


def _milp_check(args: argparse.Namespace) -> dict[str, Any]:
    options, spec = build_instance(args.milp_users, args.offers, args.seed + 2)
    started = time.perf_counter()
    solution = solve_allocation(options, spec, SolverParams(threads=args.threads))
    seconds = time.perf_counter() - started
    exact = solve_allocation_exact(
        options, spec, integral=True, time_limit_s=args.milp_seconds
    )
    return {
        "users": args.milp_users,
        "reference": "MILP (HiGHS branch and bound)",
        "milp_optimal": exact.optimal,
        "milp_seconds": round(exact.seconds, 1),
        "milp_objective_cents": round(exact.objective_cents),
        "milp_bound_cents": round(exact.bound_cents),
        "lagrangian_seconds": round(seconds, 2),
        "lagrangian_objective_cents": round(solution.objective_cents),
        "share_of_milp_objective": round(
            solution.objective_cents / exact.objective_cents, 6
        ),
        "share_of_milp_bound": round(solution.objective_cents / exact.bound_cents, 6),
    }


def _offers(n_offers: int, rng: np.random.Generator) -> pd.DataFrame:
    if not 1 <= n_offers <= len(STOCK_SHARE):
        raise SystemExit(f"--offers must be in [1, {len(STOCK_SHARE)}], got {n_offers}")
    kinds = ["percent_off", "amount_off", "free_shipping"]
    ends = [SEND_AFTER + timedelta(days=7)] * n_offers
    # One offer ends during the send day, so late send hours make it ineligible.
    ends[n_offers - 1] = SEND_AFTER + timedelta(hours=8)
    return pd.DataFrame(
        {
            "coupon_id": [f"offer{j}" for j in range(n_offers)],
            "kind": [kinds[j % 3] for j in range(n_offers)],
            # Basis points, cents off, or shipping cents waived, by kind.
            "value": [
                [1_000, 800, 499][j % 3] + 100 * (j // 3) for j in range(n_offers)
            ],
            # Every third offer targets one category; the others suit everyone.
            "category": [
                CATEGORIES[(j // 3) % len(CATEGORIES)] if j % 3 == 2 else "all"
                for j in range(n_offers)
            ],
            "channels": [
                "email,push,sms" if j % 4 else "email,push" for j in range(n_offers)
            ],
            "new_users_only": [j == 1 for j in range(n_offers)],
            "lift": rng.uniform(0.01, 0.05, n_offers),
            "starts_at": pd.to_datetime([SEND_AFTER - timedelta(days=1)] * n_offers),
            "ends_at": pd.to_datetime(ends),
        }
    )


def _users(n_users: int, rng: np.random.Generator) -> dict[str, Any]:
    affinity = rng.dirichlet(np.full(len(CATEGORIES), 0.6), n_users)
    frame = pd.DataFrame(
        {
            "days_since_signup": rng.exponential(200.0, n_users),
            "events_30d": rng.poisson(6.0, n_users),
            "exposures_in_window": rng.poisson(0.8, n_users),
            "days_since_last_exposure": np.where(
                rng.random(n_users) < 0.4, np.inf, rng.exponential(6.0, n_users)
            ),
            **{f"affinity_{c}": affinity[:, i] for i, c in enumerate(CATEGORIES)},
            "reachable_push": rng.random(n_users) < 0.6,
            "reachable_sms": rng.random(n_users) < 0.4,
        }
    )
    peak = rng.integers(0, 24, n_users)
    hours = np.arange(24)
    distance = np.minimum(
        np.abs(hours - peak[:, None]), 24 - np.abs(hours - peak[:, None])
    )
    activity = np.exp(-0.5 * (distance / 3.0) ** 2).astype(np.float32)
    return {
        "frame": frame,
        "activity": activity,
        "affinity": affinity,
        "base": rng.beta(2.0, 30.0, n_users),
        "basket": np.round(rng.lognormal(np.log(4_500), 0.5, n_users)).astype(np.int64),
        "responsiveness": rng.gamma(2.0, 0.5, n_users),
    }


def _offer_scores(
    users: dict[str, Any], offers: pd.DataFrame, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Return profit and discount cost per (user, offer) for a user who sees it."""
    base, basket = users["base"], users["basket"]
    n_users = base.size
    profit = np.empty((n_users, len(offers)), dtype=np.float32)
    cost = np.empty((n_users, len(offers)), dtype=np.float32)
    kinds = offers["kind"].tolist()
    values = offers["value"].to_numpy(dtype=np.int64)
    lifts = offers["lift"].to_numpy(dtype=np.float64)
    for j, kind in enumerate(kinds):
        if kind == "percent_off":
            discount = basket * values[j] / 10_000
        elif kind == "amount_off":
            discount = np.minimum(basket, values[j]).astype(np.float64)
        else:
            discount = np.full(n_users, float(values[j]))
        noise = rng.lognormal(0.0, 0.6, n_users)
        uplift = lifts[j] * users["responsiveness"] * noise * (0.5 + base * 5)
        converted = np.minimum(base + uplift, 1.0)
        profit[:, j] = MARGIN_RATE * basket * (converted - base) - converted * discount
        cost[:, j] = converted * discount
    return profit, cost


def _best_cost_sample(
    profit: np.ndarray, cost: np.ndarray, eligible: np.ndarray, rng: np.random.Generator
) -> float:
    """Return the mean cost of each user's most profitable eligible option, sampled."""
    rows = rng.choice(profit.shape[0], size=min(profit.shape[0], 50_000), replace=False)
    value = np.where(eligible[rows], profit[rows], -np.inf).reshape(rows.size, -1)
    best = value.argmax(axis=1)
    positive = value[np.arange(rows.size), best] > 0
    chosen = cost[rows].reshape(rows.size, -1)[np.arange(rows.size), best]
    return float(np.where(positive, chosen, 0.0).mean())


def _shares(used: np.ndarray, limit: np.ndarray) -> list[float | None]:
    return [
        None if lim >= UNLIMITED else round(int(u) / int(lim), 4)
        for u, lim in zip(used, limit, strict=True)
    ]


def _peak_rss_gib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0))


def _memory_gib() -> float:
    with open("/proc/meminfo") as meminfo:
        total_kib = int(meminfo.readline().split()[1])
    return total_kib / 2**20


def _argv_text(args: argparse.Namespace) -> str:
    return (
        f"--users {args.users} --offers {args.offers} --threads {args.threads} "
        f"--check-users {args.check_users} --milp-users {args.milp_users} "
        f"--milp-seconds {args.milp_seconds:g} --seed {args.seed}"
    )


if __name__ == "__main__":
    main()
