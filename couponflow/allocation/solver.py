"""Choose at most one offer per user to maximize expected profit under a budget."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from numbers import Integral

import numpy as np
import numpy.typing as npt
from scipy.optimize import linprog
from scipy.sparse import coo_matrix

log = logging.getLogger(__name__)

FloatMatrix = npt.NDArray[np.float64]
Choice = npt.NDArray[np.int64]

NO_OFFER = -1
# Bisection stops when the bracket on the multiplier is this small relative to it.
_LAMBDA_RTOL = 1e-12
_MAX_BISECTIONS = 200
# Each fill round adds the best-ratio moves that still fit, and the next round retries
# with what is left. The cap bounds the run time on adversarial inputs.
_MAX_FILL_ROUNDS = 64


@dataclass(frozen=True)
class Solution:
    """An allocation: ``choice[i]`` is the offer column of user ``i``, or -1 for none.

    ``budget_used_fraction`` is ``total_cost_cents / budget_cents``, and ``None``
    when the budget is 0 because the fraction is not defined there. ``lam`` is the
    budget's Lagrange multiplier, and NaN for baselines that use none.
    """

    choice: Choice
    total_profit_cents: float
    total_cost_cents: float
    lam: float
    budget_cents: int
    budget_used_fraction: float | None
    policy: str

    @property
    def n_granted(self) -> int:
        return int((self.choice != NO_OFFER).sum())


@dataclass(frozen=True)
class LPSolution:
    """Optimum of the LP relaxation: ``x[i, j]`` in [0, 1], each row summing to <= 1."""

    x: FloatMatrix
    objective_cents: float
    total_cost_cents: float


def solve_budget(
    profit: npt.ArrayLike,
    cost: npt.ArrayLike,
    budget_cents: int,
    policy: str = "lagrangian",
) -> Solution:
    """Choose at most one offer per user, maximizing total profit with cost <= budget.

    ``profit`` and ``cost`` are ``(n_users, n_offers)`` expected cents, ``cost`` >= 0.
    For a multiplier ``lam`` each user takes ``argmax_j(profit - lam * cost)`` when it
    is positive. Bisection finds the smallest ``lam`` whose total cost fits, and a
    greedy fill then spends what is left on the moves with the best profit per cent
    of cost, never going over the budget. Ties go to the lower offer index, then to
    the lower user index, so the same input always gives the same allocation. A
    budget of 0 allocates nothing, even offers with zero expected cost, and ``lam``
    is then ``inf``.
    """
    profit_matrix, cost_matrix = validate_matrices(profit, cost)
    budget = validate_budget(budget_cents)
    n_users = profit_matrix.shape[0]
    choice = np.full(n_users, NO_OFFER, dtype=np.int64)
    if budget == 0:
        return make_solution(choice, profit_matrix, cost_matrix, 0, math.inf, policy)

    # Users without a positive-profit offer are never chosen at any lam >= 0.
    active = np.flatnonzero((profit_matrix > 0).any(axis=1))
    profit_t = np.ascontiguousarray(profit_matrix[active].T)
    cost_t = np.ascontiguousarray(cost_matrix[active].T)

    active_choice, lam = _lagrangian_choice(profit_t, cost_t, budget)
    rounds = _greedy_fill(profit_t, cost_t, active_choice, budget)
    choice[active] = active_choice

    solution = make_solution(choice, profit_matrix, cost_matrix, budget, lam, policy)
    while solution.total_cost_cents > budget:
        # The fast sums above can round below the budget while the exact total is a
        # few ulps above it. Dropping the paid grant with the least profit per cent
        # restores the limit.
        _drop_worst_grant(profit_matrix, cost_matrix, choice)
        solution = make_solution(
            choice, profit_matrix, cost_matrix, budget, lam, policy
        )
    log.info(
        "%s: %d of %d users granted, expected cost %.0f of %d cents, lam=%.6g, "
        "%d fill rounds",
        policy,
        solution.n_granted,
        n_users,
        solution.total_cost_cents,
        budget,
        lam,
        rounds,
    )
    return solution


def solve_budget_lp(
    profit: npt.ArrayLike, cost: npt.ArrayLike, budget_cents: int
) -> LPSolution:
    """Solve the LP relaxation of :func:`solve_budget` exactly with HiGHS.

    Its objective bounds every integral allocation from above, so it checks the
    Lagrangian solution on small cases. Pairs with profit <= 0 stay at 0 and are left
    out of the LP. Raises ``RuntimeError`` when HiGHS does not reach an optimum.
    """
    profit_matrix, cost_matrix = validate_matrices(profit, cost)
    budget = validate_budget(budget_cents)
    n_users, n_offers = profit_matrix.shape
    x = np.zeros((n_users, n_offers))
    users, offers = np.nonzero(profit_matrix > 0)
    n_vars = users.size
    if n_vars == 0:
        return LPSolution(x=x, objective_cents=0.0, total_cost_cents=0.0)

    pair_profit = profit_matrix[users, offers]
    pair_cost = cost_matrix[users, offers]
    # Rows 0..n_users-1: one offer per user at most. Row n_users: the budget.
    rows = np.concatenate([users, np.full(n_vars, n_users)])
    columns = np.concatenate([np.arange(n_vars), np.arange(n_vars)])
    values = np.concatenate([np.ones(n_vars), pair_cost])
    a_ub = coo_matrix((values, (rows, columns)), shape=(n_users + 1, n_vars)).tocsr()
    b_ub = np.concatenate([np.ones(n_users), [float(budget)]])
    result = linprog(
        -pair_profit, A_ub=a_ub, b_ub=b_ub, bounds=(0.0, 1.0), method="highs"
    )
    if result.status != 0:
        raise RuntimeError(f"HiGHS did not solve the LP relaxation: {result.message}")

    x[users, offers] = result.x
    return LPSolution(
        x=x,
        objective_cents=float(pair_profit @ result.x),
        total_cost_cents=float(pair_cost @ result.x),
    )


def make_solution(
    choice: Choice,
    profit: FloatMatrix,
    cost: FloatMatrix,
    budget_cents: int,
    lam: float,
    policy: str,
) -> Solution:
    """Build a :class:`Solution`, summing the chosen pairs' profit and cost."""
    users = np.flatnonzero(choice != NO_OFFER)
    # fsum is exactly rounded, so the totals do not depend on the order of users.
    total_profit = math.fsum(profit[users, choice[users]])
    total_cost = math.fsum(cost[users, choice[users]])
    used = total_cost / budget_cents if budget_cents > 0 else None
    return Solution(
        choice=choice,
        total_profit_cents=total_profit,
        total_cost_cents=total_cost,
        lam=lam,
        budget_cents=budget_cents,
        budget_used_fraction=used,
        policy=policy,
    )


def validate_matrices(
    profit: npt.ArrayLike, cost: npt.ArrayLike
) -> tuple[FloatMatrix, FloatMatrix]:
    """Return ``profit`` and ``cost`` as float64 matrices, or raise ``ValueError``."""
    profit_matrix = np.asarray(profit, dtype=np.float64)
    cost_matrix = np.asarray(cost, dtype=np.float64)
    if profit_matrix.ndim != 2 or profit_matrix.shape[1] == 0:
        raise ValueError(
            "profit must have shape (n_users, n_offers) with at least one offer, "
            f"got {profit_matrix.shape}"
        )
    if cost_matrix.shape != profit_matrix.shape:
        raise ValueError(
            f"cost has shape {cost_matrix.shape} but profit has shape "
            f"{profit_matrix.shape}; both must be (n_users, n_offers)"
        )
    if not (np.isfinite(profit_matrix).all() and np.isfinite(cost_matrix).all()):
        raise ValueError("profit and cost must be finite; found NaN or infinity")
    if cost_matrix.size and cost_matrix.min() < 0:
        raise ValueError(f"cost must be >= 0, got minimum {cost_matrix.min()}")
    return profit_matrix, cost_matrix


def validate_budget(budget_cents: int) -> int:
    """Return the budget as an int, or raise ``ValueError`` unless it is >= 0 cents."""
    if isinstance(budget_cents, bool) or not isinstance(budget_cents, Integral):
        raise ValueError(
            f"budget_cents must be an integer number of cents, got {budget_cents!r}"
        )
    if budget_cents < 0:
        raise ValueError(f"budget_cents must be >= 0, got {budget_cents}")
    return int(budget_cents)


def _pick_offers(
    profit_t: FloatMatrix, cost_t: FloatMatrix, lam: float
) -> tuple[Choice, FloatMatrix]:
    """Return each user's ``argmax_j(profit - lam * cost)`` if positive, and its cost.

    The matrices are transposed, ``(n_offers, n_users)``, so each step is one
    contiguous pass over all users. A strict ``>`` keeps the lower offer index on
    ties and leaves a user with no offer when the best value is exactly 0.
    """
    n_offers, n_users = profit_t.shape
    best = np.zeros(n_users)
    chosen_cost = np.zeros(n_users)
    choice = np.full(n_users, NO_OFFER, dtype=np.int64)
    value = np.empty(n_users)
    better = np.empty(n_users, dtype=bool)
    for j in range(n_offers):
        np.multiply(cost_t[j], lam, out=value)
        np.subtract(profit_t[j], value, out=value)
        np.greater(value, best, out=better)
        np.copyto(choice, j, where=better)
        np.copyto(chosen_cost, cost_t[j], where=better)
        np.maximum(best, value, out=best)
    return choice, chosen_cost


def _lagrangian_choice(
    profit_t: FloatMatrix, cost_t: FloatMatrix, budget: int
) -> tuple[Choice, float]:
    """Bisect for the smallest multiplier whose choice fits, returning both.

    As lam grows, each user's chosen cost can only fall. A user who picks the same
    offer at both ends of the bracket picks it everywhere inside, so that user is
    settled and later steps evaluate only the undecided users.
    """
    choice, chosen_cost = _pick_offers(profit_t, cost_t, 0.0)
    if float(chosen_cost.sum()) <= budget:
        return choice, 0.0

    # Above the largest profit/cost ratio only zero-cost offers stay positive, so the
    # total cost there is 0 and fits.
    paid = (cost_t > 0) & (profit_t > 0)
    low, high = 0.0, 2.0 * float((profit_t[paid] / cost_t[paid]).max())
    choice_low = choice
    choice_high, cost_high = _pick_offers(profit_t, cost_t, high)
    undecided = np.arange(choice.size)
    settled_cost = 0.0
    for _ in range(_MAX_BISECTIONS):
        same = choice_low == choice_high
        # Compacting copies the matrices, so it waits until a quarter is settled.
        if 4 * int(same.sum()) >= same.size:
            choice[undecided[same]] = choice_high[same]
            settled_cost += float(cost_high[same].sum())
            keep = ~same
            undecided = undecided[keep]
            choice_low, choice_high = choice_low[keep], choice_high[keep]
            cost_high = cost_high[keep]
            profit_t, cost_t = profit_t[:, keep], cost_t[:, keep]
        if undecided.size == 0 or high - low <= _LAMBDA_RTOL * high:
            break

        middle = 0.5 * (low + high)
        choice_middle, cost_middle = _pick_offers(profit_t, cost_t, middle)
        if settled_cost + float(cost_middle.sum()) <= budget:
            high, choice_high, cost_high = middle, choice_middle, cost_middle
        else:
            low, choice_low = middle, choice_middle
    choice[undecided] = choice_high
    return choice, high


def _greedy_fill(
    profit_t: FloatMatrix, cost_t: FloatMatrix, choice: Choice, budget: int
) -> int:
    """Spend the budget left after the Lagrangian step on profitable moves, in place.

    A move switches one user to an offer with more profit. Each round takes, per
    user, the move with the best profit per extra cent among those that fit, sorts
    moves by that ratio (then offer index, then user index) and applies the longest
    prefix that fits. Returns the number of rounds run.
    """
    n_offers, n_users = profit_t.shape
    current_profit, current_cost = _current_values(profit_t, cost_t, choice)
    for round_number in range(_MAX_FILL_ROUNDS):
        remaining = budget - float(current_cost.sum())
        if remaining <= 0:
            return round_number

        best_ratio = np.full(n_users, -np.inf)
        best_offer = np.full(n_users, NO_OFFER, dtype=np.int64)
        for j in range(n_offers):
            extra_profit = profit_t[j] - current_profit
            extra_cost = cost_t[j] - current_cost
            fits = (extra_profit > 0) & (extra_cost <= remaining)
            with np.errstate(divide="ignore", invalid="ignore"):
                # A move that adds profit without adding cost ranks first.
                ratio = np.where(extra_cost > 0, extra_profit / extra_cost, np.inf)
            better = fits & (ratio > best_ratio)
            np.copyto(best_ratio, ratio, where=better)
            np.copyto(best_offer, j, where=better)

        candidates = np.flatnonzero(best_offer != NO_OFFER)
        if candidates.size == 0:
            return round_number
        offers = best_offer[candidates]
        order = np.lexsort((candidates, offers, -best_ratio[candidates]))
        moved, offers = candidates[order], offers[order]
        extra = cost_t[offers, moved] - current_cost[moved]
        over = np.flatnonzero(np.cumsum(extra) > remaining)
        n_taken = int(over[0]) if over.size else moved.size
        if n_taken == 0:
            return round_number

        taken, offers = moved[:n_taken], offers[:n_taken]
        previous = choice[taken].copy()
        choice[taken] = offers
        new_cost = current_cost.copy()
        new_cost[taken] = cost_t[offers, taken]
        if float(new_cost.sum()) > budget:
            # Rounding in the running sum let the round overshoot; undo it and stop.
            choice[taken] = previous
            return round_number + 1
        current_cost = new_cost
        current_profit[taken] = profit_t[offers, taken]
    return _MAX_FILL_ROUNDS


def _drop_worst_grant(profit: FloatMatrix, cost: FloatMatrix, choice: Choice) -> None:
    users = np.flatnonzero(choice != NO_OFFER)
    granted_cost = cost[users, choice[users]]
    paid = users[granted_cost > 0]
    ratio = profit[paid, choice[paid]] / cost[paid, choice[paid]]
    # argmin keeps the lower user index on ties.
    choice[paid[int(np.argmin(ratio))]] = NO_OFFER


def _current_values(
    profit_t: FloatMatrix, cost_t: FloatMatrix, choice: Choice
) -> tuple[FloatMatrix, FloatMatrix]:
    chosen = np.flatnonzero(choice != NO_OFFER)
    current_profit = np.zeros(choice.size)
    current_cost = np.zeros(choice.size)
    current_profit[chosen] = profit_t[choice[chosen], chosen]
    current_cost[chosen] = cost_t[choice[chosen], chosen]
    return current_profit, current_cost
