"""Baseline allocations at the same budget, to compare the optimized policy against."""

from __future__ import annotations

import logging
import math

import numpy as np
import numpy.typing as npt

from couponflow.allocation.solver import (
    NO_OFFER,
    Choice,
    FloatMatrix,
    Solution,
    make_solution,
    solve_budget,
    validate_budget,
    validate_matrices,
)

log = logging.getLogger(__name__)

RANK_BY: tuple[str, ...] = ("base", "max")


def random_targeting(
    profit: npt.ArrayLike, cost: npt.ArrayLike, budget_cents: int, seed: int
) -> Solution:
    """Give users in a seeded random order a uniformly random offer each.

    Users are served in that order until the next one's expected cost no longer
    fits the budget. Profit is ignored, so some grants lose money.
    """
    profit_matrix, cost_matrix = validate_matrices(profit, cost)
    budget = validate_budget(budget_cents)
    n_users, n_offers = profit_matrix.shape
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_users)
    offer = np.asarray(rng.integers(0, n_offers, size=n_users), dtype=np.int64)
    choice = _fill_in_order(order, offer, cost_matrix, budget)
    return _baseline_solution(choice, profit_matrix, cost_matrix, budget, "random")


def likeliest_buyers(
    p: npt.ArrayLike,
    profit: npt.ArrayLike,
    cost: npt.ArrayLike,
    budget_cents: int,
    rank_by: str = "base",
) -> Solution:
    """Give the likeliest buyers their highest-profit offer until the budget is spent.

    Users are ranked by ``p[:, 0]`` (``rank_by="base"``, conversion without an offer)
    or by their highest ``p[:, 1:]`` (``rank_by="max"``), highest first and lower
    user index on ties. Each gets the offer with the highest expected profit for
    them (lower offer index on ties), even when that profit is negative. Serving
    stops at the first user whose expected cost no longer fits.
    """
    profit_matrix, cost_matrix = validate_matrices(profit, cost)
    budget = validate_budget(budget_cents)
    probabilities = np.asarray(p, dtype=np.float64)
    n_users, n_offers = profit_matrix.shape
    if probabilities.shape != (n_users, 1 + n_offers):
        raise ValueError(
            f"p must have shape ({n_users}, {1 + n_offers}) to match profit, got "
            f"{probabilities.shape}"
        )
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {RANK_BY}, got {rank_by!r}")

    if rank_by == "base":
        ranking = probabilities[:, 0]
    else:
        ranking = probabilities[:, 1:].max(axis=1)
    order = np.lexsort((np.arange(n_users), -ranking))
    offer = profit_matrix.argmax(axis=1)
    choice = _fill_in_order(order, offer, cost_matrix, budget)
    return _baseline_solution(
        choice, profit_matrix, cost_matrix, budget, f"likeliest_{rank_by}"
    )


def oracle(
    true_profit: npt.ArrayLike, true_cost: npt.ArrayLike, budget_cents: int
) -> Solution:
    """Solve the budget problem on the true effects, the reference for every policy."""
    return solve_budget(true_profit, true_cost, budget_cents, policy="oracle")


def _fill_in_order(
    order: npt.NDArray[np.int64],
    offer: npt.NDArray[np.int64],
    cost: FloatMatrix,
    budget: int,
) -> Choice:
    choice = np.full(cost.shape[0], NO_OFFER, dtype=np.int64)
    if budget == 0 or order.size == 0:
        return choice
    costs = cost[order, offer[order]]
    over = np.flatnonzero(np.cumsum(costs) > budget)
    n_served = int(over[0]) if over.size else order.size
    while n_served > 0 and math.fsum(costs[:n_served]) > budget:
        # The running sum can round below the budget while the exact total is above.
        n_served -= 1
    served = order[:n_served]
    choice[served] = offer[served]
    return choice


def _baseline_solution(
    choice: Choice, profit: FloatMatrix, cost: FloatMatrix, budget: int, policy: str
) -> Solution:
    # These policies use no multiplier, so lam is NaN.
    solution = make_solution(choice, profit, cost, budget, math.nan, policy)
    log.info(
        "%s: %d users granted, expected cost %.0f of %d cents",
        policy,
        solution.n_granted,
        solution.total_cost_cents,
        budget,
    )
    return solution
