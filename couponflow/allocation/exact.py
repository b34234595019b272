"""Exact MILP and LP relaxation of the full allocation problem, solved with HiGHS.

For checking the Lagrangian solver: the MILP optimum (or its proven bound) and the
LP optimum bound every allocation from above.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.optimize import Bounds, LinearConstraint, linprog, milp
from scipy.sparse import coo_matrix, csr_matrix

from couponflow.allocation.blocks import usable_values
from couponflow.allocation.options import NO_OPTION, AllocationSpec, UserOptions

log = logging.getLogger(__name__)

# scipy.optimize.milp status 0: optimal; 1: stopped at the time limit.
_MILP_OPTIMAL = 0
_MILP_TIME_LIMIT = 1


@dataclass(frozen=True)
class ExactSolution:
    """A HiGHS solution: ``x[i, k]`` is the share of option ``k`` given to user ``i``.

    ``objective_cents`` is the value of ``x``. ``bound_cents`` is HiGHS's proven
    upper bound on the optimum of the problem it solved, equal to the objective for
    an LP or for a MILP solved to optimality. ``option`` is filled only for a MILP.
    """

    x: npt.NDArray[np.float64]
    option: npt.NDArray[np.int16] | None
    objective_cents: float
    bound_cents: float
    integral: bool
    optimal: bool
    seconds: float


def solve_allocation_exact(
    options: UserOptions,
    spec: AllocationSpec,
    integral: bool = True,
    time_limit_s: float = 60.0,
) -> ExactSolution:
    """Solve the problem of :func:`solve_allocation` with HiGHS, as a MILP or an LP.

    Only usable options (eligible, in stock, with capacity and positive net profit)
    become variables, since an optimum never needs another. Costs are the float32
    expected cents, not rounded to quanta. The LP runs HiGHS's interior-point method,
    which is much faster than simplex on a million variables. Raises
    ``RuntimeError`` when HiGHS stops with neither an optimum nor, for a MILP at the
    time limit, a feasible solution.
    """
    options.check_spec(spec)
    started = time.perf_counter()
    net, cost = usable_values(options, spec)
    n_users, n_options = net.shape
    users, chosen = np.nonzero(np.isfinite(net))
    x = np.zeros((n_users, n_options))
    if users.size == 0:
        return ExactSolution(
            x, _options_of(x) if integral else None, 0.0, 0.0, integral, True, 0.0
        )

    gain = net[users, chosen].astype(np.float64)
    matrix, upper = _constraints(users, chosen, cost, n_users, spec)
    if integral:
        result = milp(
            -gain,
            constraints=LinearConstraint(matrix, -np.inf, upper),
            integrality=np.ones(users.size),
            bounds=Bounds(0.0, 1.0),
            options={"time_limit": time_limit_s, "disp": False},
        )
        if result.status not in (_MILP_OPTIMAL, _MILP_TIME_LIMIT) or result.x is None:
            raise RuntimeError(f"HiGHS did not solve the MILP: {result.message}")
        values = np.round(result.x)
        bound = -float(result.mip_dual_bound)
        optimal = result.status == _MILP_OPTIMAL
    else:
        result = linprog(
            -gain,
            A_ub=matrix,
            b_ub=upper,
            bounds=(0.0, 1.0),
            method="highs-ipm",
            options={"time_limit": time_limit_s},
        )
        if result.status != 0:
            raise RuntimeError(f"HiGHS did not solve the LP: {result.message}")
        values = result.x
        bound = -float(result.fun)
        optimal = True

    x[users, chosen] = values
    objective = math.fsum(gain * values)
    seconds = time.perf_counter() - started
    log.info(
        "HiGHS %s on %d variables: objective %.0f, bound %.0f, %s, %.1f s",
        "MILP" if integral else "LP",
        users.size,
        objective,
        bound,
        "optimal" if optimal else "time limit",
        seconds,
    )
    return ExactSolution(
        x=x,
        option=_options_of(x) if integral else None,
        objective_cents=objective,
        bound_cents=max(bound, objective),
        integral=integral,
        optimal=optimal,
        seconds=seconds,
    )


def _constraints(
    users: npt.NDArray[np.int64],
    chosen: npt.NDArray[np.int64],
    cost: npt.NDArray[np.float32],
    n_users: int,
    spec: AllocationSpec,
) -> tuple[csr_matrix, npt.NDArray[np.float64]]:
    # Rows: one option per user, the budget, each offer's stock, each channel's
    # capacity.
    n_vars = users.size
    columns = np.arange(n_vars)
    offer_rows = n_users + 1 + spec.option_offer[chosen]
    channel_rows = n_users + 1 + spec.n_offers + spec.option_channel[chosen]
    rows = np.concatenate([users, np.full(n_vars, n_users), offer_rows, channel_rows])
    values = np.concatenate(
        [
            np.ones(n_vars),
            cost[users, chosen].astype(np.float64),
            np.ones(n_vars),
            np.ones(n_vars),
        ]
    )
    n_rows = n_users + 1 + spec.n_offers + spec.n_channels
    matrix = coo_matrix(
        (values, (rows, np.tile(columns, 4))), shape=(n_rows, n_vars)
    ).tocsr()
    upper = np.concatenate(
        [
            np.ones(n_users),
            [float(spec.budget_cents)],
            spec.stock.astype(np.float64),
            spec.capacity.astype(np.float64),
        ]
    )
    return matrix, upper


def _options_of(x: npt.NDArray[np.float64]) -> npt.NDArray[np.int16]:
    granted = x.max(axis=1, initial=0.0) > 0.5
    return np.where(granted, x.argmax(axis=1), NO_OPTION).astype(np.int16)
