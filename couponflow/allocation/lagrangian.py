"""Lagrangian solver of the full problem: one (offer, channel) per user under limits.

The limits are the budget on expected discount cost, each offer's stock and each
channel's capacity. Multipliers fitted on a working set pick each user's candidate
options, a polish refits them on every user, and a repair and a greedy fill make
the best responses feasible and spend what is left.
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
    Grants,
    LocalBlocks,
    Moves,
    Multipliers,
    ScreenResult,
    Usage,
    apply_moves,
    collect_grants,
    drop_users,
    fill_moves,
    lowest_count_grants,
    lowest_in_groups,
    lowest_ratio_grants,
    lowest_ratio_order,
    respond,
)
from couponflow.allocation.dual import (
    WorkingSet,
    fit_multipliers,
    limit_value,
    polish_multipliers,
)
from couponflow.allocation.options import (
    COST_QUANTA_PER_CENT,
    NO_OPTION,
    AllocationSpec,
    Float32Array,
    IntArray,
    UserOptions,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SolverParams:
    """Tuning of :func:`solve_allocation`; the defaults suit 10M users x 30 options."""

    # Users on which the multipliers are first fitted, drawn uniformly with ``seed``.
    # With this many users or fewer, all of them are the working set and the polish
    # is skipped.
    working_users: int = 100_000
    # Options kept per user after screening, for the polish, repair and fill.
    candidates: int = 4
    seed: int = 0
    # Coordinate-descent sweeps on the working set, stopped earlier once the dual
    # improves by less than ``dual_rtol`` relative to itself.
    max_sweeps: int = 60
    dual_rtol: float = 1e-7
    # Coordinate sweeps over all users when the working set is a sample.
    polish_sweeps: int = 3
    # Moves taken per fill round, and the number of rounds.
    fill_batch: int = 65_536
    max_fill_rounds: int = 50
    chunk_users: int = CHUNK_USERS
    threads: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))

    def __post_init__(self) -> None:
        for name in ("working_users", "candidates", "max_sweeps", "fill_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("polish_sweeps", "max_fill_rounds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class Allocation:
    """At most one option per user: ``option[i]`` is ``offer * n_channels + channel``
    of user row ``i``, or -1 for none.

    ``objective_cents`` is the total net profit (profit minus message cost) of the
    grants, summed from the float32 scores. ``dual_bound_cents`` is the Lagrangian
    dual at the screening multipliers over every option, an upper bound on the
    optimum of the LP relaxation and so on every feasible allocation. It is 0 when
    nothing was solved (a budget of 0 or no users).
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
        """Share of the dual bound the objective falls short of; 0 if both are 0."""
        if self.dual_bound_cents <= 0:
            return 0.0
        return 1.0 - self.objective_cents / self.dual_bound_cents


class Blocks(Protocol):
    """Interface of the users' blocks that the central steps use, in memory or Dask."""

    n_users: int

    def rows(
        self, spec: AllocationSpec, users: IntArray
    ) -> tuple[Float32Array, Float32Array]: ...

    def screen(
        self, spec: AllocationSpec, multipliers: Multipliers, n_candidates: int
    ) -> list[ScreenResult]: ...

    def dual_sum(self, spec: AllocationSpec, multipliers: Multipliers) -> float: ...

    def map(self, function: Callable[..., Any], *args: Any) -> list[Any]: ...

    def update(self, function: Callable[..., Any], *args: Any) -> list[Any]: ...


def solve_allocation(
    options: UserOptions, spec: AllocationSpec, params: SolverParams | None = None
) -> Allocation:
    """Choose at most one (offer, channel) per user, maximizing net profit in limits.

    For multipliers ``lam`` (budget), ``mu`` (stock) and ``nu`` (capacity), each
    user takes ``argmax(profit - message_cost - lam * cost - mu[offer] -
    nu[channel])`` over usable options when it is positive. The multipliers are
    fitted by coordinate descent on a working set with the limits scaled to its
    size, and refitted on all users when the working set is a sample. A repair then
    drops, per over-used limit, the grants with the lowest net profit per unit of
    it (stock and capacity first, then the budget), and a greedy fill spends what is
    left. No limit is ever exceeded, and no offer without stock, channel without
    capacity or ineligible option is chosen.

    Ties: between options of one user the lower option index wins. Between users in
    the repair the higher user row loses its grant first, and in the fill the lower
    user row moves first. So the same input gives the same allocation, and while
    every user is in the working set a permutation of users gives each user the
    same result except through such ties. A budget of 0 grants nothing, even options
    with zero expected cost.
    """
    options.check_spec(spec)
    params = params or SolverParams()
    blocks = LocalBlocks(options, params.chunk_users, params.threads)
    return solve_blocks(blocks, spec, params)


def dual_bound(
    options: UserOptions,
    spec: AllocationSpec,
    multipliers: Multipliers,
    params: SolverParams | None = None,
) -> float:
    """Return the Lagrangian dual at ``multipliers``, a bound on every allocation.

    This is one pass over every option of every user, for certifying a solution.
    """
    options.check_spec(spec)
    params = params or SolverParams()
    blocks = LocalBlocks(options, params.chunk_users, params.threads)
    return blocks.dual_sum(spec, multipliers) + limit_value(spec, multipliers)


def solve_blocks(
    blocks: Blocks, spec: AllocationSpec, params: SolverParams
) -> Allocation:
    """Run the solver of :func:`solve_allocation` over blocks in memory or in Dask.

    Only exact integer totals, multipliers and short lists pass between the blocks
    and this function, so the result does not depend on how users are split.
    """
    started = time.perf_counter()
    n_users = blocks.n_users
    if spec.budget_cents == 0 or n_users == 0:
        return _empty_allocation(n_users, spec)

    seconds: dict[str, float] = {}
    rows = _working_rows(n_users, params.working_users, params.seed)
    working = WorkingSet.build(*blocks.rows(spec, rows), scale=rows.size / n_users)
    multipliers = fit_multipliers(working, spec, params.max_sweeps, params.dual_rtol)
    seconds["fit"] = time.perf_counter() - started

    mark = time.perf_counter()
    screened = blocks.screen(spec, multipliers, params.candidates)
    usage = Usage.total([s.usage for s in screened])
    bound = sum(s.dual_sum for s in screened) + limit_value(spec, multipliers)
    seconds["screen"] = time.perf_counter() - mark

    if rows.size < n_users and params.polish_sweeps:
        mark = time.perf_counter()
        multipliers = polish_multipliers(
            blocks, working, spec, multipliers, params.polish_sweeps
        )
        usage = Usage.total(blocks.update(respond, spec, multipliers))
        seconds["polish"] = time.perf_counter() - mark
    del working

    mark = time.perf_counter()
    usage = _repair(blocks, spec, usage)
    seconds["repair"] = time.perf_counter() - mark
    mark = time.perf_counter()
    _, rounds = _fill(blocks, spec, usage, params)
    seconds["fill"] = time.perf_counter() - mark

    grants = Grants.concat(blocks.map(collect_grants))
    option = np.full(n_users, NO_OPTION, dtype=np.int16)
    option[grants.users] = grants.option
    final = grants.usage(spec)
    _check_within_limits(final, spec)
    seconds["total"] = time.perf_counter() - started
    allocation = Allocation(
        option=option,
        spec=spec,
        multipliers=multipliers,
        objective_cents=math.fsum(grants.net.astype(np.float64)),
        discount_cost_cents=math.fsum(grants.cost.astype(np.float64)),
        message_cost_cents=int(final.channel_messages @ spec.message_cost_cents),
        offer_grants=final.offer_grants,
        channel_messages=final.channel_messages,
        dual_bound_cents=bound,
        working_users=int(rows.size),
        fill_rounds=rounds,
        seconds=seconds,
    )
    log.info(
        "allocated %d of %d users: objective %.0f cents, dual bound %.0f, discount "
        "cost %.0f of %d cents, %d fill rounds, %.2f s",
        allocation.n_granted,
        n_users,
        allocation.objective_cents,
        bound,
        allocation.discount_cost_cents,
        spec.budget_cents,
        rounds,
        seconds["total"],
    )
    return allocation


def _working_rows(n_users: int, size: int, seed: int) -> IntArray:
    if n_users <= size:
        return np.arange(n_users, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_users, size=size, replace=False)).astype(np.int64)


def _repair(blocks: Blocks, spec: AllocationSpec, usage: Usage) -> Usage:
    """Drop grants until every limit holds: stock, then capacity, then the budget.

    Dropping a grant only frees resources, so a later step never breaks an earlier
    one.
    """
    for by_offer in (True, False):
        used = usage.offer_grants if by_offer else usage.channel_messages
        limit = spec.stock if by_offer else spec.capacity
        excess = np.maximum(used - limit, 0)
        if not excess.any():
            continue
        candidates = Grants.concat(
            blocks.map(lowest_count_grants, spec, by_offer, excess)
        )
        groups = spec.option_offer if by_offer else spec.option_channel
        picked = lowest_in_groups(candidates, groups[candidates.option], excess)
        usage = _drop(blocks, spec, usage, candidates.take(picked))

    excess_quanta = usage.quanta - spec.budget_cents * COST_QUANTA_PER_CENT
    if excess_quanta > 0:
        candidates = Grants.concat(blocks.map(lowest_ratio_grants, excess_quanta))
        order = lowest_ratio_order(candidates)
        reached = np.flatnonzero(np.cumsum(candidates.quanta[order]) >= excess_quanta)
        count = int(reached[0]) + 1 if reached.size else order.size
        usage = _drop(blocks, spec, usage, candidates.take(order[:count]))
    return usage


def _drop(blocks: Blocks, spec: AllocationSpec, usage: Usage, dropped: Grants) -> Usage:
    blocks.update(drop_users, np.sort(dropped.users))
    log.info("repair dropped %d grants", dropped.users.size)
    return usage.minus(dropped.usage(spec))


def _fill(
    blocks: Blocks, spec: AllocationSpec, usage: Usage, params: SolverParams
) -> tuple[Usage, int]:
    """Spend what the limits leave on the moves with the most profit per resource.

    Each round takes the ``fill_batch`` best moves over all blocks and accepts them
    in that order while they fit. The next round starts from what is left.
    """
    budget = spec.budget_cents * COST_QUANTA_PER_CENT
    quanta_left = budget - usage.quanta
    stock_left = spec.stock - usage.offer_grants
    capacity_left = spec.capacity - usage.channel_messages
    rounds = 0
    while rounds < params.max_fill_rounds:
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
            break
        rounds += 1
        accepted, quanta_left = _accept_moves(
            moves, spec, quanta_left, stock_left, capacity_left
        )
        users, slots = moves.users[accepted], moves.slot[accepted]
        order = np.argsort(users)
        blocks.update(apply_moves, users[order], slots[order])
        log.debug("fill round %d: %d moves", rounds, accepted.size)
        if (
            moves.users.size == params.fill_batch
            and 10 * accepted.size < moves.users.size
        ):
            # Most proposals no longer fit, so further full rounds would gain little.
            break
    used = Usage(
        quanta=budget - quanta_left,
        offer_grants=spec.stock - stock_left,
        channel_messages=spec.capacity - capacity_left,
    )
    return used, rounds


def _accept_moves(
    moves: Moves,
    spec: AllocationSpec,
    quanta_left: int,
    stock_left: IntArray,
    capacity_left: IntArray,
) -> tuple[IntArray, int]:
    """Accept moves in order while they fit, updating what is left in place.

    Every move fitted what was left when it was proposed, so the first one is always
    accepted and each round makes progress.
    """
    option_offer = spec.option_offer.tolist()
    option_channel = spec.option_channel.tolist()
    accepted = []
    for index, (new, old, new_quanta, old_quanta) in enumerate(
        zip(
            moves.new_option.tolist(),
            moves.old_option.tolist(),
            moves.new_quanta.tolist(),
            moves.old_quanta.tolist(),
            strict=True,
        )
    ):
        new_offer, new_channel = option_offer[new], option_channel[new]
        old_offer = option_offer[old] if old >= 0 else -1
        old_channel = option_channel[old] if old >= 0 else -1
        extra = new_quanta - old_quanta
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
    return np.asarray(accepted, dtype=np.int64), quanta_left


def _check_within_limits(usage: Usage, spec: AllocationSpec) -> None:
    # The steps above keep every limit by construction; this guards against a bug.
    over_budget = usage.quanta > spec.budget_cents * COST_QUANTA_PER_CENT
    over_count = (usage.offer_grants > spec.stock).any() or (
        usage.channel_messages > spec.capacity
    ).any()
    if over_budget or over_count:
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
