"""Per-block steps of the full allocation solver, shared by the in-memory and Dask paths.

A block is a contiguous range of users. Every function here works on one block and
returns exact integer totals or short lists of values, so the central steps give the
same result however the users are split into blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from couponflow.allocation.options import (
    COST_QUANTA_PER_CENT,
    MAX_COST_CENTS,
    NO_OPTION,
    AllocationSpec,
    Float32Array,
    IntArray,
    UserOptions,
)

FloatArray = npt.NDArray[np.float64]

# Users per chunk of the dense scores; see MAX_COST_CENTS for the int64 bound.
CHUNK_USERS = 1 << 18
NO_SLOT = -1
# Option indices must fit in the low bits of the selection key of _top_options.
MAX_OPTIONS = 256
_OPTION_BITS = 8


@dataclass(frozen=True)
class Multipliers:
    """Lagrange multipliers in cents of objective: ``lam`` per cent of expected
    discount cost, ``mu`` per grant of each offer, ``nu`` per message of each channel."""

    lam: float
    mu: FloatArray
    nu: FloatArray

    def option_penalty(self, spec: AllocationSpec) -> Float32Array:
        """Return ``mu[offer] + nu[channel]`` for each option."""
        penalty = self.mu[spec.option_offer] + self.nu[spec.option_channel]
        return np.asarray(penalty, dtype=np.float32)

    def with_value(self, by_offer: bool | None, index: int, value: float) -> Multipliers:
        """Return a copy with one multiplier changed: ``by_offer`` None means ``lam``."""
        if by_offer is None:
            return Multipliers(value, self.mu.copy(), self.nu.copy())
        mu, nu = self.mu.copy(), self.nu.copy()
        (mu if by_offer else nu)[index] = value
        return Multipliers(self.lam, mu, nu)


@dataclass(frozen=True)
class Usage:
    """Exact use of the limits: the budget in cost quanta, grants and messages."""

    quanta: int
    offer_grants: IntArray
    channel_messages: IntArray

    @staticmethod
    def total(parts: Sequence[Usage]) -> Usage:
        return Usage(
            quanta=sum(p.quanta for p in parts),
            offer_grants=np.sum([p.offer_grants for p in parts], axis=0),
            channel_messages=np.sum([p.channel_messages for p in parts], axis=0),
        )

    def minus(self, other: Usage) -> Usage:
        return Usage(
            self.quanta - other.quanta,
            self.offer_grants - other.offer_grants,
            self.channel_messages - other.channel_messages,
        )


@dataclass(frozen=True)
class Grants:
    """Grants of some users: global user row, option, net profit and cost in cents."""

    users: IntArray
    option: npt.NDArray[np.int16]
    net: Float32Array
    cost: Float32Array

    @property
    def quanta(self) -> IntArray:
        return quantize(self.cost)

    @staticmethod
    def concat(parts: Sequence[Grants]) -> Grants:
        return Grants(
            users=np.concatenate([p.users for p in parts]).astype(np.int64),
            option=np.concatenate([p.option for p in parts]).astype(np.int16),
            net=np.concatenate([p.net for p in parts]).astype(np.float32),
            cost=np.concatenate([p.cost for p in parts]).astype(np.float32),
        )

    def take(self, index: npt.ArrayLike) -> Grants:
        return Grants(
            self.users[index], self.option[index], self.net[index], self.cost[index]
        )

    def usage(self, spec: AllocationSpec) -> Usage:
        return Usage(
            quanta=exact_sum(self.quanta),
            offer_grants=np.bincount(
                spec.option_offer[self.option], minlength=spec.n_offers
            ),
            channel_messages=np.bincount(
                spec.option_channel[self.option], minlength=spec.n_channels
            ),
        )


@dataclass(frozen=True)
class Moves:
    """Candidate moves of the fill step, at most one per user."""

    users: IntArray
    slot: npt.NDArray[np.int8]
    new_option: npt.NDArray[np.int16]
    old_option: npt.NDArray[np.int16]
    new_quanta: IntArray
    old_quanta: IntArray
    ratio: FloatArray

    @staticmethod
    def concat(parts: Sequence[Moves]) -> Moves:
        names = ("users", "slot", "new_option", "old_option", "new_quanta")
        arrays = {n: np.concatenate([getattr(p, n) for p in parts]) for n in names}
        return Moves(
            old_quanta=np.concatenate([p.old_quanta for p in parts]),
            ratio=np.concatenate([p.ratio for p in parts]),
            **arrays,
        )

    def best(self, limit: int) -> Moves:
        """Return the ``limit`` best moves: highest ratio, then lower user row."""
        order = np.lexsort((self.users, -self.ratio))[:limit]
        return Moves(
            self.users[order],
            self.slot[order],
            self.new_option[order],
            self.old_option[order],
            self.new_quanta[order],
            self.old_quanta[order],
            self.ratio[order],
        )


@dataclass(frozen=True)
class Margins:
    """One block's margins of an offer (or channel) over each user's best other choice.

    ``above_zero`` and ``above_high`` count margins above 0 and above the window's
    upper end; ``window`` holds the margins in ``(low, high]``.
    """

    above_zero: int
    above_high: int
    window: FloatArray

    @staticmethod
    def total(parts: Sequence[Margins]) -> Margins:
        return Margins(
            above_zero=sum(p.above_zero for p in parts),
            above_high=sum(p.above_high for p in parts),
            window=np.concatenate([p.window for p in parts]),
        )


@dataclass(frozen=True)
class CandidateBlock:
    """The few best options of each user of a block, and each user's current choice.

    Columns are users with at least one usable option, in ascending global row order;
    arrays are ``(n_slots, n_rows)``. A slot with option -1 is padding, with net
    profit ``-inf`` and offer and channel -1. ``choice`` is a slot or -1.
    """

    users: IntArray
    option: npt.NDArray[np.int16]
    offer: npt.NDArray[np.int8]
    channel: npt.NDArray[np.int8]
    net: Float32Array
    cost: Float32Array
    choice: npt.NDArray[np.int8]

    @property
    def n_rows(self) -> int:
        return int(self.users.size)

    def grants(self) -> Grants:
        rows = np.flatnonzero(self.choice != NO_SLOT)
        slots = self.choice[rows]
        return Grants(
            users=self.users[rows],
            option=self.option[slots, rows],
            net=self.net[slots, rows],
            cost=self.cost[slots, rows],
        )


@dataclass(frozen=True)
class ScreenResult:
    """Use of the best responses at the screening multipliers, and the dual sum."""

    usage: Usage
    # Sum over users of max(0, best Lagrangian value), for the dual bound.
    dual_sum: float


def quantize(cost: npt.ArrayLike) -> IntArray:
    """Return costs in cents rounded up to whole quanta of 2**-16 cents."""
    scaled = np.asarray(cost, dtype=np.float64) * COST_QUANTA_PER_CENT
    return np.ceil(scaled).astype(np.int64)


def exact_sum(values: IntArray) -> int:
    """Sum int64 quanta without overflow, in chunks whose sums fit in int64."""
    flat = np.ravel(values)
    return sum(
        int(flat[start : start + CHUNK_USERS].sum())
        for start in range(0, flat.size, CHUNK_USERS)
    )


def usable_values(
    options: UserOptions, spec: AllocationSpec
) -> tuple[Float32Array, Float32Array]:
    """Return net profit and cost as ``(n_users, n_options)`` float32 matrices.

    Net profit is ``profit_cents`` minus the channel's message cost. An option is
    usable when it is eligible, its offer has stock, its channel has capacity and its
    net profit is positive. Every other option gets net profit ``-inf`` and cost 0,
    so no multiplier makes it chosen. Raises ``ValueError`` on a NaN, infinite,
    negative or too large score of an eligible option, naming the global user row.
    """
    n_users, n_options = options.n_users, spec.n_options
    profit = np.asarray(options.profit_cents).reshape(n_users, n_options)
    cost = np.asarray(options.cost_cents).reshape(n_users, n_options)
    eligible = np.asarray(options.eligible).reshape(n_users, n_options)
    _check_scores(profit, cost, eligible, options.first_user)

    message_cost = spec.message_cost_cents[spec.option_channel].astype(np.float32)
    is_open = (spec.stock[spec.option_offer] > 0) & (
        spec.capacity[spec.option_channel] > 0
    )
    net = profit - message_cost
    usable = eligible & is_open & (net > 0)
    net[~usable] = -np.inf
    return net, np.where(usable, cost, np.float32(0.0))


def screen_block(
    options: UserOptions,
    spec: AllocationSpec,
    multipliers: Multipliers,
    n_candidates: int,
) -> tuple[CandidateBlock, ScreenResult]:
    """Keep each user's ``n_candidates`` best options and choose the best response.

    Best means the highest Lagrangian value ``net - lam * cost - mu - nu``, with the
    lower option index first among equal values. The best response is the best
    option when its value is positive.
    """
    parts = [
        _screen_rows(
            options.rows(start, min(start + CHUNK_USERS, options.n_users)),
            spec,
            multipliers,
            n_candidates,
        )
        for start in range(0, max(options.n_users, 1), CHUNK_USERS)
    ]
    blocks = [block for block, _ in parts]
    block = CandidateBlock(
        users=np.concatenate([b.users for b in blocks]),
        option=np.concatenate([b.option for b in blocks], axis=1),
        offer=np.concatenate([b.offer for b in blocks], axis=1),
        channel=np.concatenate([b.channel for b in blocks], axis=1),
        net=np.concatenate([b.net for b in blocks], axis=1),
        cost=np.concatenate([b.cost for b in blocks], axis=1),
        choice=np.concatenate([b.choice for b in blocks]),
    )
    result = ScreenResult(
        usage=Usage.total([r.usage for _, r in parts]),
        dual_sum=float(sum(r.dual_sum for _, r in parts)),
    )
    return block, result


def dual_sum(options: UserOptions, spec: AllocationSpec, multipliers: Multipliers) -> float:
    """Return the sum over users of max(0, best Lagrangian value) over all options."""
    total = 0.0
    penalty = multipliers.option_penalty(spec)
    lam = np.float32(multipliers.lam)
    for start in range(0, options.n_users, CHUNK_USERS):
        rows = options.rows(start, min(start + CHUNK_USERS, options.n_users))
        net, cost = usable_values(rows, spec)
        value = net - lam * cost - penalty
        best = value.max(axis=1, initial=0.0)
        total += float(best.astype(np.float64).sum())
    return total


def respond(
    block: CandidateBlock, spec: AllocationSpec, multipliers: Multipliers
) -> tuple[CandidateBlock, Usage]:
    """Set every user to the best response among the candidates; return the use."""
    choice = _best_slots(block, _slot_values(block, spec, multipliers))
    updated = replace(block, choice=choice)
    return updated, block_usage(updated, spec)


def budget_use(
    block: CandidateBlock, spec: AllocationSpec, multipliers: Multipliers
) -> int:
    """Return the cost quanta of the best responses, without changing the block."""
    choice = _best_slots(block, _slot_values(block, spec, multipliers))
    rows = np.flatnonzero(choice != NO_SLOT)
    return exact_sum(quantize(block.cost[choice[rows], rows]))


def margins(
    block: CandidateBlock,
    spec: AllocationSpec,
    multipliers: Multipliers,
    by_offer: bool,
    index: int,
    low: float,
    high: float,
) -> Margins:
    """Return the margins of offer (or channel) ``index`` over each user's other best.

    A margin is the best value among the user's candidates of that offer, without
    the offer's own multiplier, minus the best value of the other candidates or 0.
    The user takes the offer exactly when the margin exceeds the multiplier.
    """
    value = _slot_values(block, spec, multipliers)
    group = block.offer if by_offer else block.channel
    own = multipliers.mu[index] if by_offer else multipliers.nu[index]
    member = group == index
    inside = np.where(member, value, np.float32(-np.inf)).max(axis=0, initial=-np.inf)
    outside = np.where(member, np.float32(-np.inf), value).max(axis=0, initial=0.0)
    margin = inside.astype(np.float64) + own - outside
    in_window = (margin > low) & (margin <= high)
    return Margins(
        above_zero=int((margin > 0).sum()),
        above_high=int((margin > high).sum()),
        window=margin[in_window],
    )


def block_usage(block: CandidateBlock, spec: AllocationSpec) -> Usage:
    """Return the exact use of the limits by the block's current choices."""
    return block.grants().usage(spec)


def lowest_count_grants(
    block: CandidateBlock, spec: AllocationSpec, by_offer: bool, excess: IntArray
) -> Grants:
    """Return, per over-used offer (or channel), its ``excess`` lowest-value grants.

    Lowest means the lowest net profit, then the higher user row, which is the
    order in which the repair step drops grants.
    """
    grants = block.grants()
    groups = spec.option_offer if by_offer else spec.option_channel
    return grants.take(lowest_in_groups(grants, groups[grants.option], excess))


def lowest_in_groups(grants: Grants, group: IntArray, excess: IntArray) -> IntArray:
    """Return positions of the ``excess[g]`` lowest-value grants of each group ``g``."""
    picked = [np.zeros(0, dtype=np.int64)]
    for index in np.flatnonzero(excess > 0):
        members = np.flatnonzero(group == index)
        order = np.lexsort((-grants.users[members], grants.net[members]))
        picked.append(members[order[: int(excess[index])]])
    return np.concatenate(picked)


def lowest_ratio_grants(block: CandidateBlock, excess_quanta: int) -> Grants:
    """Return the paid grants with the least net profit per cent, until their cost
    reaches ``excess_quanta``; among equal ratios the higher user row comes first."""
    grants = block.grants()
    order = lowest_ratio_order(grants)
    reached = np.flatnonzero(np.cumsum(grants.quanta[order]) >= excess_quanta)
    count = int(reached[0]) + 1 if reached.size else order.size
    return grants.take(order[:count])


def lowest_ratio_order(grants: Grants) -> IntArray:
    """Return positions of the paid grants, lowest net profit per cent first."""
    paid = np.flatnonzero(grants.cost > 0)
    ratio = grants.net[paid].astype(np.float64) / grants.cost[paid]
    return paid[np.lexsort((-grants.users[paid], ratio))]


def drop_users(block: CandidateBlock, users: IntArray) -> tuple[CandidateBlock, None]:
    """Remove the grants of those given global rows (sorted ascending) in the block."""
    rows = _rows_of(block, users[_inside(block, users)])
    choice = block.choice.copy()
    choice[rows] = NO_SLOT
    return replace(block, choice=choice), None


def fill_moves(
    block: CandidateBlock,
    spec: AllocationSpec,
    quanta_left: int,
    stock_left: IntArray,
    capacity_left: IntArray,
    max_moves: int,
) -> Moves:
    """Return each user's best move that fits what is left, the ``max_moves`` best.

    A move switches a user, with or without a grant, to a candidate with more net
    profit. Its weight is the share it takes of what is left of the budget, of the
    new offer's stock and of the new channel's capacity, where a limit that the
    user already uses counts 0, and its ratio is the extra net profit per unit of
    weight. Per user the highest ratio wins, then the lower slot.
    """
    if block.n_rows == 0:
        return _no_moves()
    rows = np.arange(block.n_rows)
    chosen = block.choice != NO_SLOT
    slot = np.where(chosen, block.choice, 0)
    old_option = np.where(chosen, block.option[slot, rows], NO_OPTION).astype(np.int16)
    old_net = np.where(chosen, block.net[slot, rows], np.float32(0.0))
    old_quanta = np.where(chosen, quantize(block.cost[slot, rows]), 0)
    old_offer = np.where(chosen, block.offer[slot, rows], -1)
    old_channel = np.where(chosen, block.channel[slot, rows], -1)

    new_quanta = quantize(block.cost)
    extra_net = block.net.astype(np.float64) - old_net
    extra_quanta = new_quanta - old_quanta
    uses_offer = block.offer != old_offer
    uses_channel = block.channel != old_channel
    stock = stock_left[np.maximum(block.offer, 0)]
    capacity = capacity_left[np.maximum(block.channel, 0)]
    fits = (
        (block.option >= 0)
        & (extra_net > 0)
        & (extra_quanta <= quanta_left)
        & (~uses_offer | (stock > 0))
        & (~uses_channel | (capacity > 0))
    )
    weight = (
        np.maximum(extra_quanta, 0) / max(quanta_left, 1)
        + uses_offer / np.maximum(stock, 1)
        + uses_channel / np.maximum(capacity, 1)
    )
    # A different option always needs a new offer or channel, so weight > 0.
    ratio = np.where(fits, extra_net / np.maximum(weight, 1e-300), -np.inf)

    best_slot = ratio.argmax(axis=0)
    best_ratio = ratio[best_slot, rows]
    movers = np.flatnonzero(best_ratio > -np.inf)
    slots = best_slot[movers]
    moves = Moves(
        users=block.users[movers],
        slot=slots.astype(np.int8),
        new_option=block.option[slots, movers],
        old_option=old_option[movers],
        new_quanta=new_quanta[slots, movers],
        old_quanta=old_quanta[movers],
        ratio=best_ratio[movers],
    )
    return moves.best(max_moves)


def apply_moves(
    block: CandidateBlock, users: IntArray, slots: npt.NDArray[np.int8]
) -> tuple[CandidateBlock, None]:
    """Set those given global rows (sorted ascending) in the block to the slots."""
    inside = _inside(block, users)
    rows = _rows_of(block, users[inside])
    choice = block.choice.copy()
    choice[rows] = slots[inside]
    return replace(block, choice=choice), None


def collect_grants(block: CandidateBlock) -> Grants:
    """Return the block's grants."""
    return block.grants()


class LocalBlocks:
    """The in-memory path: blocks of one :class:`UserOptions`, run on threads."""

    def __init__(self, options: UserOptions, chunk_users: int, threads: int) -> None:
        if chunk_users < 1:
            raise ValueError(f"chunk_users must be >= 1, got {chunk_users}")
        self.options = options
        self.n_users = options.n_users
        self.raw = [
            options.rows(start, min(start + chunk_users, options.n_users))
            for start in range(0, options.n_users, chunk_users)
        ]
        self.blocks: list[CandidateBlock] = []
        self.threads = max(1, threads)

    def rows(
        self, spec: AllocationSpec, users: IntArray
    ) -> tuple[Float32Array, Float32Array]:
        """Return usable net profit and cost of the given global rows, in that order."""
        return usable_values(self.options.take(users), spec)

    def screen(
        self, spec: AllocationSpec, multipliers: Multipliers, n_candidates: int
    ) -> list[ScreenResult]:
        results = self._run(screen_block, self.raw, spec, multipliers, n_candidates)
        self.blocks = [block for block, _ in results]
        return [result for _, result in results]

    def dual_sum(self, spec: AllocationSpec, multipliers: Multipliers) -> float:
        return float(sum(self._run(dual_sum, self.raw, spec, multipliers)))

    def map(self, function: Callable[..., Any], *args: Any) -> list[Any]:
        return self._run(function, self.blocks, *args)

    def update(self, function: Callable[..., Any], *args: Any) -> list[Any]:
        results = self._run(function, self.blocks, *args)
        self.blocks = [block for block, _ in results]
        return [result for _, result in results]

    def _run(
        self, function: Callable[..., Any], items: Sequence[Any], *args: Any
    ) -> list[Any]:
        if self.threads == 1 or len(items) <= 1:
            return [function(item, *args) for item in items]
        # numpy releases the GIL in its loops, so threads share the cores.
        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            return list(pool.map(lambda item: function(item, *args), items))


def _screen_rows(
    options: UserOptions,
    spec: AllocationSpec,
    multipliers: Multipliers,
    n_candidates: int,
) -> tuple[CandidateBlock, ScreenResult]:
    net, cost = usable_values(options, spec)
    value = net - np.float32(multipliers.lam) * cost
    value -= multipliers.option_penalty(spec)
    n_slots = min(n_candidates, spec.n_options)
    option, top_value = _top_options(value, n_slots)

    found = top_value > -np.inf
    keep = found.any(axis=0)
    option, top_value, found = option[:, keep], top_value[:, keep], found[:, keep]
    kept_rows = np.flatnonzero(keep)
    safe = np.where(found, option, 0)
    option = np.where(found, option, NO_OPTION).astype(np.int16)
    block = CandidateBlock(
        users=options.first_user + kept_rows.astype(np.int64),
        option=option,
        offer=np.where(found, spec.option_offer[safe], -1).astype(np.int8),
        channel=np.where(found, spec.option_channel[safe], -1).astype(np.int8),
        net=np.where(found, net[kept_rows, safe], np.float32(-np.inf)),
        cost=np.where(found, cost[kept_rows, safe], np.float32(0.0)),
        choice=np.zeros(kept_rows.size, dtype=np.int8),
    )
    block = replace(block, choice=_best_slots(block, top_value))
    best = top_value.max(axis=0, initial=0.0).astype(np.float64)
    result = ScreenResult(usage=block_usage(block, spec), dual_sum=float(best.sum()))
    return block, result


def _top_options(value: Float32Array, n_slots: int) -> tuple[IntArray, Float32Array]:
    """Return the ``n_slots`` highest values per row and their option indices.

    Each float32 value becomes an int64 key that sorts like the value, with the
    option index in the low bits so that a lower index sorts higher among equal
    values; one partition per row then finds the top keys exactly. The result is
    ``(n_slots, n_rows)`` in no particular order.
    """
    n_rows, n_options = value.shape
    if n_options > MAX_OPTIONS:
        raise ValueError(
            f"at most {MAX_OPTIONS} offer x channel options are supported, got "
            f"{n_options}"
        )
    bits = value.view(np.int32)
    # Flip the magnitude bits of negative floats so that integer order is float
    # order; -inf becomes the smallest key.
    flip = bits >> 31
    flip &= np.int32(0x7FFFFFFF)
    flip ^= bits
    key = np.multiply(flip, 1 << _OPTION_BITS, dtype=np.int64)
    key += MAX_OPTIONS - 1 - np.arange(n_options, dtype=np.int64)
    if n_slots < n_options:
        key.partition(n_options - n_slots, axis=1)
    top = np.ascontiguousarray(key[:, n_options - n_slots :].T)
    option = MAX_OPTIONS - 1 - (top & (MAX_OPTIONS - 1))
    ordered = (top >> _OPTION_BITS).astype(np.int32)
    ordered ^= (ordered >> 31) & np.int32(0x7FFFFFFF)
    return option, ordered.view(np.float32)


def _slot_values(
    block: CandidateBlock, spec: AllocationSpec, multipliers: Multipliers
) -> Float32Array:
    penalty = multipliers.option_penalty(spec)
    value = block.net - np.float32(multipliers.lam) * block.cost
    value -= penalty[np.maximum(block.option, 0)]
    return value


def _best_slots(block: CandidateBlock, value: Float32Array) -> npt.NDArray[np.int8]:
    """Return per user the slot of the highest positive value, or -1.

    Among equal values the lower option index wins, as in the dense best response.
    """
    n_slots = value.shape[0]
    best = value.max(axis=0, initial=-np.inf)
    tied_option = np.where(value == best, block.option, np.int16(MAX_OPTIONS))
    slot = tied_option.argmin(axis=0) if n_slots else np.zeros(0, dtype=np.int64)
    return np.where(best > 0, slot, NO_SLOT).astype(np.int8)


def _check_scores(
    profit: npt.NDArray[Any],
    cost: npt.NDArray[Any],
    eligible: npt.NDArray[Any],
    first_user: int,
) -> None:
    if profit.size == 0:
        return
    if (
        np.isfinite(profit).all()
        and np.isfinite(cost).all()
        and cost.min() >= 0
        and cost.max() <= MAX_COST_CENTS
    ):
        return
    finite = np.isfinite(profit) & np.isfinite(cost)
    with np.errstate(invalid="ignore"):
        bad = eligible & ~(finite & (cost >= 0) & (cost <= MAX_COST_CENTS))
    if bad.any():
        row, option = np.argwhere(bad)[0]
        raise ValueError(
            f"user row {first_user + int(row)}, option {int(option)}: an eligible "
            f"option needs finite profit and a cost in [0, {MAX_COST_CENTS}] cents, "
            f"got profit {profit[row, option]} and cost {cost[row, option]}; fix the "
            "scores or mark the option ineligible"
        )


def _inside(block: CandidateBlock, users: IntArray) -> npt.NDArray[np.bool_]:
    if block.n_rows == 0:
        return np.zeros(users.size, dtype=bool)
    return (users >= block.users[0]) & (users <= block.users[-1])


def _rows_of(block: CandidateBlock, users: IntArray) -> IntArray:
    rows = np.searchsorted(block.users, users)
    if users.size and (rows.max() >= block.n_rows or (block.users[rows] != users).any()):
        raise ValueError("a user row to update has no candidates in this block")
    return rows


def _no_moves() -> Moves:
    empty = np.zeros(0, dtype=np.int64)
    return Moves(
        users=empty,
        slot=np.zeros(0, dtype=np.int8),
        new_option=np.zeros(0, dtype=np.int16),
        old_option=np.zeros(0, dtype=np.int16),
        new_quanta=empty,
        old_quanta=empty,
        ratio=np.zeros(0),
    )
