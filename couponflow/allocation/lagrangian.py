"""Lagrangian solver of the full problem: one (offer, channel) per user under limits.

Limits are the budget on expected discount cost, each offer's stock and each
channel's capacity. The multipliers are fitted on a working set of users, every user
then takes the best response to them, and a repair and a greedy fill make the
allocation feasible and spend what is left.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from couponflow.allocation.blocks import (
    CHUNK_USERS,
    Float32Array,
    Grants,
    LocalBlocks,
    Moves,
    Multipliers,
    ScreenResult,
    Usage,
    apply_moves,
    collect_grants,
    drop_users,
    exact_sum,
    fill_moves,
    lowest_count_grants,
    lowest_ratio_grants,
    quantize,
)
from couponflow.allocation.options import (
    COST_QUANTA_PER_CENT,
    NO_OPTION,
    AllocationSpec,
    IntArray,
    UserOptions,
)

log = logging.getLogger(__name__)

# The budget multiplier is bisected until its bracket is this small relative to it.
_LAMBDA_RTOL = 1e-7
_MAX_BISECTIONS = 100


@dataclass(frozen=True)
class SolverParams:
    """Tuning of :func:`solve_allocation`; the defaults suit 10M users x 30 options."""

    # Users on which the multipliers are fitted, drawn uniformly with ``seed``. With
    # fewer users than this, every user is in the working set.
    working_users: int = 200_000
    # Options kept per user after screening, for the best response, repair and fill.
    candidates: int = 4
    seed: int = 0
    # Coordinate-descent sweeps over the multipliers, stopped earlier once the dual
    # value improves by less than ``dual_rtol`` relative to itself.
    max_sweeps: int = 40
    dual_rtol: float = 1e-6
    # Moves taken per fill round, and the number of rounds.
    fill_batch: int = 65_536
    max_fill_rounds: int = 50
    chunk_users: int = CHUNK_USERS
    threads: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))

    def __post_init__(self) -> None:
        for name in ("working_users", "candidates", "max_sweeps", "fill_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_fill_rounds < 0:
            raise ValueError(f"max_fill_rounds must be >= 0, got {self.max_fill_rounds}")


@dataclass(frozen=True)
class Allocation:
    """At most one option per user: ``option[i]`` is ``offer * n_channels + channel``
    of user row ``i``, or -1 for none.

    ``objective_cents`` is the total net profit (profit minus message cost) of the
    grants, from the float32 scores. ``dual_bound_cents`` is the Lagrangian dual
    value at the multipliers used, an upper bound on the optimum of the LP
    relaxation and so on every feasible allocation.
    """

    option: npt.NDArray[np.int16]
    spec: AllocationSpec
    multipliers: Multipliers
    objective_cents: float
    discount_cost_cents: float
    message_cost_cents: int
    offer_grants: IntArray
    channel_messages: IntArray
    dual_bound_cents: float
    working_users: int
    fill_rounds: int
    seconds: dict[str, float]

    @property
    def n_users(self) -> int:
        return int(self.option.size)

    @property
    def n_granted(self) -> int:
        return int((self.option != NO_OPTION).sum())

    @property
    def offer(self) -> IntArray:
        """Offer index per user, -1 for none."""
        return np.where(self.option >= 0, self.option // self.spec.n_channels, -1)

    @property
    def channel(self) -> IntArray:
        """Channel index per user, -1 for none."""
        return np.where(self.option >= 0, self.option % self.spec.n_channels, -1)

    @property
    def gap_to_bound(self) -> float:
        """Share of the dual bound that the allocation leaves, 0 when both are 0."""
        if self.dual_bound_cents <= 0:
            return 0.0
        return 1.0 - self.objective_cents / self.dual_bound_cents


class Blocks(Protocol):
    """What the central steps need from the users' blocks, in memory or in Dask."""

    n_users: int

    def rows(
        self, spec: AllocationSpec, users: IntArray
    ) -> tuple[Float32Array, Float32Array]: ...

    def screen(
        self, spec: AllocationSpec, multipliers: Multipliers, n_candidates: int
    ) -> list[ScreenResult]: ...

    def map(self, function: Callable[..., Any], *args: Any) -> list[Any]: ...

    def update(self, function: Callable[..., Any], *args: Any) -> list[Any]: ...


def solve_allocation(
    options: UserOptions, spec: AllocationSpec, params: SolverParams | None = None
) -> Allocation:
    """Choose at most one (offer, channel) per user, maximizing net profit in limits.

    For multipliers ``lam`` (budget), ``mu`` (stock) and ``nu`` (capacity), each
    user takes ``argmax(profit - message_cost - lam * cost - mu[offer] -
    nu[channel])`` over eligible options when it is positive. The multipliers are
    fitted by coordinate descent on a working set, with the limits scaled to its
    size: bisection for ``lam`` and the exact minimizer for each ``mu`` and ``nu``.
    A repair step then drops, per over-used limit, the grants with the lowest net
    profit per unit of it (stock and capacity first, then the budget), and a greedy
    fill spends what is left. No limit is ever exceeded.

    Ties: between options of one user the lower option index wins; between users in
    the repair and the fill the lower user row keeps or gets the grant. So the same
    input gives the same allocation. While every user is in the working set, the
    result does not depend on the order of users except through such ties. A budget
    of 0 grants nothing, even options with zero expected cost.
    """
    options.check_spec(spec)
    params = params or SolverParams()
    blocks = LocalBlocks(options, params.chunk_users, params.threads)
    return solve_blocks(blocks, spec, params)


def solve_blocks(blocks: Blocks, spec: AllocationSpec, params: SolverParams) -> Allocation:
    """Run the solver of :func:`solve_allocation` over blocks in memory or in Dask.

    Only exact integer totals and short lists of grants pass between the blocks and
    this function, so the result does not depend on how users are split.
    """
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    n_users = blocks.n_users
    if spec.budget_cents == 0 or n_users == 0:
        return _empty_allocation(n_users, spec)

    working = _working_set(n_users, params.working_users, params.seed)
    net, cost = blocks.rows(spec, working)
    multipliers = fit_multipliers(net, cost, spec, working.size / n_users, params)
    del net, cost
    seconds["fit_multipliers"] = time.perf_counter() - started

    mark = time.perf_counter()
    screened = blocks.screen(spec, multipliers, params.candidates)
    usage = Usage.total([s.usage for s in screened])
    dual_bound = _dual_bound(sum(s.dual_sum for s in screened), multipliers, spec)
    seconds["screen"] = time.perf_counter() - mark

    mark = time.perf_counter()
    usage = _repair(blocks, spec, usage)
    seconds["repair"] = time.perf_counter() - mark
    mark = time.perf_counter()
    usage, rounds = _fill(blocks, spec, usage, params)
    seconds["fill"] = time.perf_counter() - mark

    grants = Grants.concat(blocks.map(collect_grants))
    option = np.full(n_users, NO_OPTION, dtype=np.int16)
    option[grants.users] = grants.option
    _check_within_limits(grants.usage(spec), spec)
    seconds["total"] = time.perf_counter() - started
    allocation = Allocation(
        option=option,
        spec=spec,
        multipliers=multipliers,
        objective_cents=math.fsum(grants.net.astype(np.float64)),
        discount_cost_cents=math.fsum(grants.cost.astype(np.float64)),
        message_cost_cents=int(usage.channel_messages @ spec.message_cost_cents),
        offer_grants=usage.offer_grants,
        channel_messages=usage.channel_messages,
        dual_bound_cents=dual_bound,
        working_users=int(working.size),
        fill_rounds=rounds,
        seconds=seconds,
    )
    log.info(
        "allocated %d of %d users: objective %.0f cents, dual bound %.0f, discount "
        "cost %.0f of %d cents, %d fill rounds, %.2f s",
        allocation.n_granted,
        n_users,
        allocation.objective_cents,
        dual_bound,
        allocation.discount_cost_cents,
        spec.budget_cents,
        rounds,
        seconds["total"],
    )
    return allocation


def fit_multipliers(
    net: Float32Array,
    cost: Float32Array,
    spec: AllocationSpec,
    scale: float,
    params: SolverParams,
) -> Multipliers:
    """Minimize the Lagrangian dual of a working set by coordinate descent.

    ``net`` and ``cost`` are ``(n_users, n_options)`` from ``usable_values``, and
    every limit is multiplied by ``scale``, the working set's share of all users.
    Each sweep bisects ``lam``, then sets each ``mu`` and each ``nu`` to its exact
    minimizer with the others fixed. Every step uses exact integer sums, order
    statistics or ``math.fsum``, so the result does not depend on the order of rows.
    """
    n_rows, n_options = net.shape
    n_offers, n_channels = spec.n_offers, spec.n_channels
    quanta = quantize(cost)
    budget = spec.budget_cents * COST_QUANTA_PER_CENT * scale
    stock = spec.stock * scale
    capacity = spec.capacity * scale
    # A limit at least as large as the number of rows cannot bind in the working set.
    offers = [o for o in range(n_offers) if stock[o] < n_rows]
    channels = [c for c in range(n_channels) if capacity[c] < n_rows]

    lam = 0.0
    mu = np.zeros(n_offers)
    nu = np.zeros(n_channels)
    previous = math.inf
    for sweep in range(params.max_sweeps):
        penalty = Multipliers(lam, mu, nu).option_penalty(spec)
        lam = _budget_multiplier(net - penalty, cost, quanta, budget)
        base = net - np.float32(lam) * cost
        if offers:
            value = (base - penalty).reshape(n_rows, n_offers, n_channels)
            best = value.max(axis=2)
            for offer in offers:
                mu[offer] = _shift_multiplier(best, offer, mu[offer], stock[offer])
        if channels:
            penalty = Multipliers(lam, mu, nu).option_penalty(spec)
            value = (base - penalty).reshape(n_rows, n_offers, n_channels)
            best = value.max(axis=1)
            for channel in channels:
                nu[channel] = _shift_multiplier(
                    best, channel, nu[channel], capacity[channel]
                )
        penalty = Multipliers(lam, mu, nu).option_penalty(spec)
        dual = _working_dual(base - penalty, lam, mu, nu, spec, scale)
        log.debug("sweep %d: dual %.6g, lam %.6g", sweep, dual, lam)
        if previous - dual <= params.dual_rtol * max(abs(dual), 1.0):
            break
        previous = dual
    return Multipliers(lam, mu.copy(), nu.copy())


def _working_set(n_users: int, size: int, seed: int) -> IntArray:
    if n_users <= size:
        return np.arange(n_users, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_users, size=size, replace=False)).astype(np.int64)


def _budget_multiplier(
    value: Float32Array, cost: Float32Array, quanta: IntArray, budget: float
) -> float:
    """Return the smallest ``lam`` at which the best responses' cost fits ``budget``.

    ``value`` is net profit minus the stock and capacity multipliers. Each user's
    chosen cost can only fall as ``lam`` grows, and an option that is best at both
    ends of a bracket is best inside it, so such users are settled and the later
    steps evaluate only the others.
    """
    choice = _best_dense(value, cost, 0.0)
    if _chosen_quanta(choice, quanta) <= budget:
        return 0.0
    paid = (cost > 0) & (value > 0)
    # Above the largest value per cent only zero-cost options stay positive, and
    # they use no budget.
    ratio = value[paid].astype(np.float64) / cost[paid]
    low, high = 0.0, 2.0 * float(ratio.max())
    choice_low = choice
    choice_high = _best_dense(value, cost, high)
    settled_quanta = 0
    for _ in range(_MAX_BISECTIONS):
        same = choice_low == choice_high
        # Compacting copies the matrices, so it waits until a quarter is settled.
        if 4 * int(same.sum()) >= same.size and same.any():
            settled_quanta += _chosen_quanta(choice_high[same], quanta[same])
            keep = ~same
            value, cost, quanta = value[keep], cost[keep], quanta[keep]
            choice_low, choice_high = choice_low[keep], choice_high[keep]
        if choice_low.size == 0 or high - low <= _LAMBDA_RTOL * high:
            break
        middle = 0.5 * (low + high)
        choice_middle = _best_dense(value, cost, middle)
        if settled_quanta + _chosen_quanta(choice_middle, quanta) <= budget:
            high, choice_high = middle, choice_middle
        else:
            low, choice_low = middle, choice_middle
    return high


def _best_dense(value: Float32Array, cost: Float32Array, lam: float) -> IntArray:
    score = value - np.float32(lam) * cost if lam else value
    top = score.argmax(axis=1)
    best = score[np.arange(top.size), top]
    return np.where(best > 0, top, NO_OPTION)


def _chosen_quanta(choice: IntArray, quanta: IntArray) -> int:
    rows = np.flatnonzero(choice != NO_OPTION)
    return exact_sum(quanta[rows, choice[rows]])


def _shift_multiplier(
    best: Float32Array, index: int, current: float, limit: float
) -> float:
    """Return the exact minimizer of the dual in one stock or capacity multiplier.

    ``best[:, j]`` is each row's best value among the options of offer (or channel)
    ``j`` at the current multipliers. A row uses ``index`` when its best value there,
    without its own multiplier, beats every other option and no option by more than
    the multiplier, so the minimizer is the ``floor(limit) + 1``-th largest such
    margin, or 0 when no more than ``limit`` rows have a positive margin.
    """
    n_rows = best.shape[0]
    others = np.delete(best, index, axis=1)
    alternative = np.maximum(others.max(axis=1, initial=-np.inf), 0.0)
    margin = best[:, index].astype(np.float64) + current - alternative
    allowed = math.floor(limit)
    if int((margin > 0).sum()) <= allowed:
        new = 0.0
    else:
        new = float(np.partition(margin, n_rows - allowed - 1)[n_rows - allowed - 1])
    best[:, index] += np.float32(current - new)
    return new


def _working_dual(
    value: Float32Array,
    lam: float,
    mu: npt.NDArray[np.float64],
    nu: npt.NDArray[np.float64],
    spec: AllocationSpec,
    scale: float,
) -> float:
    best = np.maximum(value.max(axis=1, initial=-np.inf), 0.0).astype(np.float64)
    limits = (
        lam * spec.budget_cents
        + float(mu @ spec.stock.astype(np.float64))
        + float(nu @ spec.capacity.astype(np.float64))
    )
    return math.fsum(best) + scale * limits


def _dual_bound(dual_sum: float, multipliers: Multipliers, spec: AllocationSpec) -> float:
    return (
        dual_sum
        + multipliers.lam * spec.budget_cents
        + float(multipliers.mu @ spec.stock.astype(np.float64))
        + float(multipliers.nu @ spec.capacity.astype(np.float64))
    )


def _repair(blocks: Blocks, spec: AllocationSpec, usage: Usage) -> Usage:
    """Drop grants until every limit holds: stock, then capacity, then the budget.

    Dropping a grant only frees resources, so a later step never breaks an earlier
    one.
    """
    excess = usage.offer_grants - spec.stock
    if (excess > 0).any():
        usage = _drop_count_excess(blocks, spec, usage, by_offer=True, excess=excess)
    excess = usage.channel_messages - spec.capacity
    if (excess > 0).any():
        usage = _drop_count_excess(blocks, spec, usage, by_offer=False, excess=excess)
    excess_quanta = usage.quanta - spec.budget_cents * COST_QUANTA_PER_CENT
    if excess_quanta > 0:
        candidates = Grants.concat(blocks.map(lowest_ratio_grants, excess_quanta))
        paid = candidates.cost > 0
        candidates = candidates.take(np.flatnonzero(paid))
        ratio = candidates.net.astype(np.float64) / candidates.cost
        order = np.lexsort((-candidates.users, ratio))
        reached = np.flatnonzero(np.cumsum(candidates.quanta[order]) >= excess_quanta)
        count = int(reached[0]) + 1 if reached.size else order.size
        usage = _drop(blocks, spec, usage, candidates.take(order[:count]))
    return usage


def _drop_count_excess(
    blocks: Blocks, spec: AllocationSpec, usage: Usage, by_offer: bool, excess: IntArray
) -> Usage:
    excess = np.maximum(excess, 0)
    candidates = Grants.concat(blocks.map(lowest_count_grants, spec, by_offer, excess))
    groups = spec.option_offer if by_offer else spec.option_channel
    group = groups[candidates.option]
    picked = []
    for index in np.flatnonzero(excess > 0):
        members = np.flatnonzero(group == index)
        order = np.lexsort((-candidates.users[members], candidates.net[members]))
        picked.append(members[order[: int(excess[index])]])
    return _drop(blocks, spec, usage, candidates.take(np.concatenate(picked)))


def _drop(blocks: Blocks, spec: AllocationSpec, usage: Usage, dropped: Grants) -> Usage:
    blocks.update(drop_users, np.sort(dropped.users))
    freed = dropped.usage(spec)
    log.info("repair dropped %d grants", dropped.users.size)
    return Usage(
        quanta=usage.quanta - freed.quanta,
        offer_grants=usage.offer_grants - freed.offer_grants,
        channel_messages=usage.channel_messages - freed.channel_messages,
    )


def _fill(
    blocks: Blocks, spec: AllocationSpec, usage: Usage, params: SolverParams
) -> tuple[Usage, int]:
    """Spend what the limits leave on the moves with the most profit per resource.

    Each round takes the ``fill_batch`` best moves over all blocks and accepts them
    in that order while they fit, and the next round starts from what is left.
    """
    budget = spec.budget_cents * COST_QUANTA_PER_CENT
    quanta_left = budget - usage.quanta
    stock_left = spec.stock - usage.offer_grants
    capacity_left = spec.capacity - usage.channel_messages
    option_offer = spec.option_offer
    option_channel = spec.option_channel
    for round_number in range(params.max_fill_rounds):
        moves = Moves.concat(
            blocks.map(
                fill_moves,
                spec,
                quanta_left,
                stock_left,
                capacity_left,
                params.fill_batch,
            )
        ).best(params.fill_batch)
        if moves.users.size == 0:
            return _usage_left(spec, quanta_left, stock_left, capacity_left), round_number

        accepted = []
        for index in range(moves.users.size):
            new, old = int(moves.new_option[index]), int(moves.old_option[index])
            new_offer, new_channel = option_offer[new], option_channel[new]
            old_offer = option_offer[old] if old >= 0 else -1
            old_channel = option_channel[old] if old >= 0 else -1
            extra = int(moves.new_quanta[index]) - int(moves.old_quanta[index])
            uses_offer = new_offer != old_offer
            uses_channel = new_channel != old_channel
            if extra > quanta_left:
                continue
            if uses_offer and stock_left[new_offer] <= 0:
                continue
            if uses_channel and capacity_left[new_channel] <= 0:
                continue
            quanta_left -= extra
            if uses_offer:
                stock_left[new_offer] -= 1
                if old_offer >= 0:
                    stock_left[old_offer] += 1
            if uses_channel:
                capacity_left[new_channel] -= 1
                if old_channel >= 0:
                    capacity_left[old_channel] += 1
            accepted.append(index)

        taken = np.asarray(accepted, dtype=np.int64)
        order = np.argsort(moves.users[taken])
        blocks.update(apply_moves, moves.users[taken][order], moves.slot[taken][order])
        log.debug("fill round %d: %d moves", round_number, taken.size)
    return _usage_left(spec, quanta_left, stock_left, capacity_left), params.max_fill_rounds


def _usage_left(
    spec: AllocationSpec, quanta_left: int, stock_left: IntArray, capacity_left: IntArray
) -> Usage:
    return Usage(
        quanta=spec.budget_cents * COST_QUANTA_PER_CENT - quanta_left,
        offer_grants=spec.stock - stock_left,
        channel_messages=spec.capacity - capacity_left,
    )


def _check_within_limits(usage: Usage, spec: AllocationSpec) -> None:
    # The steps above keep every limit by construction; this guards against a bug.
    over_budget = usage.quanta > spec.budget_cents * COST_QUANTA_PER_CENT
    if over_budget or (usage.offer_grants > spec.stock).any() or (
        usage.channel_messages > spec.capacity
    ).any():
        raise RuntimeError(
            f"allocation exceeds a limit: {usage}; this is a solver bug, report it"
        )


def _empty_allocation(n_users: int, spec: AllocationSpec) -> Allocation:
    return Allocation(
        option=np.full(n_users, NO_OPTION, dtype=np.int16),
        spec=spec,
        multipliers=Multipliers(
            math.inf if spec.budget_cents == 0 else 0.0,
            np.zeros(spec.n_offers),
            np.zeros(spec.n_channels),
        ),
        objective_cents=0.0,
        discount_cost_cents=0.0,
        message_cost_cents=0,
        offer_grants=np.zeros(spec.n_offers, dtype=np.int64),
        channel_messages=np.zeros(spec.n_channels, dtype=np.int64),
        dual_bound_cents=0.0,
        working_users=0,
        fill_rounds=0,
        seconds={},
    )
