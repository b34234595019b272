"""Per-block steps of the full allocation solver, for the in-memory and Dask paths.

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
    """Lagrange multipliers in cents of objective.

    ``lam`` is per cent of expected discount cost, ``mu`` per grant of each offer and
    ``nu`` per message of each channel.
    """

    lam: float
    mu: FloatArray
    nu: FloatArray

    def option_penalty(self, spec: AllocationSpec) -> Float32Array:
        """Return ``mu[offer] + nu[channel]`` for each option."""
        penalty = self.mu[spec.option_offer] + self.nu[spec.option_channel]
        return np.asarray(penalty, dtype=np.float32)

    def with_value(
        self, by_offer: bool | None, index: int, value: float
    ) -> Multipliers:
        """Return a copy with one multiplier changed; ``by_offer`` None is ``lam``."""
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

    def take(self, index: IntArray) -> Grants:
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
    upper end; ``window`` contains the margins in ``(low, high]``.
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

    Rows are the users with at least one usable option, and ``users`` contains their
    global rows in ascending order. Arrays are ``(n_slots, n_rows)``, and each
    user's slots contain options in ascending index order with padding last. A padding
    slot has option ``n_options``, offer ``n_offers`` and channel ``n_channels``
    (indices past the end, because negative ones make ``np.take`` slow), net profit
    ``-inf`` and cost 0. ``choice`` is a slot or -1.
    """

    users: IntArray
    option: npt.NDArray[np.int16]
    offer: npt.NDArray[np.int8]
    channel: npt.NDArray[np.int8]
    net: Float32Array
    cost: Float32Array
    quanta: IntArray
    choice: npt.NDArray[np.int8]

    @property
    def n_rows(self) -> int:
        return int(self.choice.size)

    def grants(self) -> Grants:
        rows, flat = _chosen(self, self.choice)
        return Grants(
            users=self.users[rows],
            option=np.take(self.option, flat),
            net=np.take(self.net, flat),
            cost=np.take(self.cost, flat),
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


def exact_sum(values: npt.ArrayLike) -> int:
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
    net, cost, usable = _dense_scores(options, spec)
    return np.where(usable, net, np.float32(-np.inf)), np.where(usable, cost, 0)


def screen_block(
    options: UserOptions,
    spec: AllocationSpec,
    multipliers: Multipliers,
    n_candidates: int,
) -> tuple[list[CandidateBlock], ScreenResult]:
    """Keep each user's ``n_candidates`` best options and choose the best response.

    Best means the highest Lagrangian value ``net - lam * cost - mu - nu``, with the
    lower option index first among equal values. The best response is the best
    option when its value is positive. Returns one candidate block per chunk of at
    most ``CHUNK_USERS`` users, so that int64 sums over a block cannot overflow.
    """
    blocks = []
    results: list[ScreenResult] = []
    for start in range(0, options.n_users, CHUNK_USERS):
        stop = min(start + CHUNK_USERS, options.n_users)
        # Small pieces keep the temporaries in cache, about twice as fast.
        pieces = [
            _screen_rows(
                options.rows(piece, min(piece + _SCREEN_ROWS, stop)),
                spec,
                multipliers,
                n_candidates,
            )
            for piece in range(start, stop, _SCREEN_ROWS)
        ]
        blocks.append(_concat_blocks([block for block, _ in pieces]))
        results.extend(result for _, result in pieces)
    result = ScreenResult(
        usage=Usage.total([r.usage for r in results] or [_no_usage(spec)]),
        dual_sum=float(sum(r.dual_sum for r in results)),
    )
    return blocks, result


def dual_sum(
    options: UserOptions, spec: AllocationSpec, multipliers: Multipliers
) -> float:
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
    updated = replace(block, choice=_best_slots(_slot_values(block, spec, multipliers)))
    return updated, block_usage(updated, spec)


def best_usage(
    block: CandidateBlock, spec: AllocationSpec, multipliers: Multipliers
) -> Usage:
    """Return the use of the best responses, without changing the block."""
    return _usage_of(block, spec, _best_slots(_slot_values(block, spec, multipliers)))


def budget_use(
    block: CandidateBlock, spec: AllocationSpec, multipliers: Multipliers
) -> int:
    """Return the cost quanta of the best responses, without changing the block."""
    choice = _best_slots(_slot_values(block, spec, multipliers))
    return sum(
        exact_sum(block.quanta[slot] * (choice == slot))
        for slot in range(block.quanta.shape[0])
    )


def candidate_dual(
    block: CandidateBlock, spec: AllocationSpec, multipliers: Multipliers
) -> int:
    """Return the sum of max(0, best candidate value), in cost quanta rounded up.

    Integer quanta make the sum exact, so decisions on it do not depend on how
    users are split into blocks.
    """
    best = _slot_values(block, spec, multipliers).max(axis=0, initial=0.0)
    return exact_sum(quantize(best))


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
    The user takes the offer when the margin exceeds the multiplier.
    """
    value = _slot_values(block, spec, multipliers)
    group = block.offer if by_offer else block.channel
    own = multipliers.mu[index] if by_offer else multipliers.nu[index]
    member = group == index
    # Subtracting a huge number excludes a slot faster than np.where does.
    inside = (value - ~member * _EXCLUDED).max(axis=0, initial=-np.inf)
    outside = (value - member * _EXCLUDED).max(axis=0, initial=0.0)
    margin = inside.astype(np.float64) + own - outside
    in_window = (margin > low) & (margin <= high)
    return Margins(
        above_zero=int(np.count_nonzero(margin > 0)),
        above_high=int(np.count_nonzero(margin > high)),
        window=margin[in_window],
    )


def block_usage(block: CandidateBlock, spec: AllocationSpec) -> Usage:
    """Return the exact use of the limits by the block's current choices."""
    return _usage_of(block, spec, block.choice)


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
    choice = block.choice.copy()
    choice[_rows_of(block, users)[0]] = NO_SLOT
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
    user already uses counts 0. Its ratio is the extra net profit per unit of
    weight, and per user the highest ratio wins, then the lower slot.
    """
    n_rows = block.n_rows
    chosen = block.choice != NO_SLOT
    flat = np.maximum(block.choice, 0).astype(np.intp) * n_rows + np.arange(n_rows)
    old_net = np.where(chosen, np.take(block.net, flat), np.float32(0.0))
    old_quanta = np.where(chosen, np.take(block.quanta, flat), 0)
    # A cheap first filter: only users with a more profitable candidate that fits
    # the budget can move.
    possible = (block.net > old_net) & (block.quanta - old_quanta <= quanta_left)
    movers = np.flatnonzero(possible.any(axis=0))
    if movers.size == 0:
        return _no_moves()
    chosen, flat = chosen[movers], flat[movers]
    old_net, old_quanta = old_net[movers], old_quanta[movers]
    old_option = np.where(chosen, np.take(block.option, flat), NO_OPTION)
    old_offer = np.where(chosen, np.take(block.offer, flat), -1)
    old_channel = np.where(chosen, np.take(block.channel, flat), -1)
    option = np.take(block.option, movers, axis=1)
    offer = np.take(block.offer, movers, axis=1)
    channel = np.take(block.channel, movers, axis=1)
    quanta = np.take(block.quanta, movers, axis=1)

    extra_net = np.take(block.net, movers, axis=1) - old_net
    extra_quanta = quanta - old_quanta
    uses_offer = offer != old_offer
    uses_channel = channel != old_channel
    stock = np.take(np.append(stock_left, 0), offer)
    capacity = np.take(np.append(capacity_left, 0), channel)
    fits = (
        np.take(possible, movers, axis=1)
        & (~uses_offer | (stock > 0))
        & (~uses_channel | (capacity > 0))
    )
    weight = (
        np.maximum(extra_quanta, 0) / max(quanta_left, 1)
        + uses_offer / np.maximum(stock, 1)
        + uses_channel / np.maximum(capacity, 1)
    )
    # A different option needs a new offer or channel, so a fitting move has
    # weight > 0; padding slots have net -inf and never fit.
    ratio = np.where(fits, extra_net / np.maximum(weight, 1e-300), -np.inf)

    best_slot = _first_max_slots(ratio)
    columns = np.flatnonzero(ratio.max(axis=0) > -np.inf)
    slots = best_slot[columns]
    picked = slots.astype(np.intp) * movers.size + columns
    moves = Moves(
        users=block.users[movers[columns]],
        slot=slots,
        new_option=np.take(option, picked),
        old_option=old_option[columns].astype(np.int16),
        new_quanta=np.take(quanta, picked),
        old_quanta=old_quanta[columns],
        ratio=np.take(ratio, picked),
    )
    return moves.best(max_moves)


def apply_moves(
    block: CandidateBlock, users: IntArray, slots: npt.NDArray[np.int8]
) -> tuple[CandidateBlock, None]:
    """Set those given global rows (sorted ascending) in the block to the slots."""
    rows, inside = _rows_of(block, users)
    choice = block.choice.copy()
    choice[rows] = slots[inside]
    return replace(block, choice=choice), None


def collect_grants(block: CandidateBlock) -> Grants:
    """Return the block's grants."""
    return block.grants()


class LocalBlocks:
    """The in-memory path: blocks of one :class:`UserOptions`, run on threads."""

    def __init__(self, options: UserOptions, chunk_users: int, threads: int) -> None:
        if not 1 <= chunk_users <= CHUNK_USERS:
            raise ValueError(
                f"chunk_users must be in [1, {CHUNK_USERS}], got {chunk_users}"
            )
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
        self.blocks = [block for blocks, _ in results for block in blocks]
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


# Users per piece of the screening pass.
_SCREEN_ROWS = 16_384
# Subtracted from the value of an unusable option, so that it sorts below every
# usable one. Values at or below _UNUSABLE mark such options.
_EXCLUDED = np.float32(np.finfo(np.float32).max)
_UNUSABLE = np.float32(-1e38)


def _dense_scores(
    options: UserOptions, spec: AllocationSpec
) -> tuple[Float32Array, Float32Array, npt.NDArray[np.bool_]]:
    """Return net profit, cost and the usable mask, all ``(n_users, n_options)``."""
    n_users, n_options = options.n_users, spec.n_options
    profit = np.asarray(options.profit_cents).reshape(n_users, n_options)
    cost = np.asarray(options.cost_cents).reshape(n_users, n_options)
    eligible = np.asarray(options.eligible).reshape(n_users, n_options)
    if not _check_scores(profit, cost, eligible, options.first_user):
        # Ineligible options may hold NaN; zero them so arithmetic stays finite.
        profit = np.where(eligible, profit, np.float32(0.0))
        cost = np.where(eligible, cost, np.float32(0.0))
    message_cost = spec.message_cost_cents[spec.option_channel].astype(np.float32)
    is_open = (spec.stock[spec.option_offer] > 0) & (
        spec.capacity[spec.option_channel] > 0
    )
    net = profit - message_cost
    usable = eligible & is_open & (net > 0)
    return net, cost, usable


def _screen_rows(
    options: UserOptions,
    spec: AllocationSpec,
    multipliers: Multipliers,
    n_candidates: int,
) -> tuple[CandidateBlock, ScreenResult]:
    net, cost, usable = _dense_scores(options, spec)
    lam = np.float32(multipliers.lam)
    value: Float32Array = net - lam * cost if lam else net.copy()
    value -= multipliers.option_penalty(spec)
    value -= ~usable * _EXCLUDED
    n_slots = min(n_candidates, spec.n_options)
    option, found = _top_options(value, n_slots)

    # Slots are sorted with padding last, so a user has a usable option when the
    # first slot is not padding.
    usable_rows = np.flatnonzero(found[0])
    option, found = option[:, usable_rows], found[:, usable_rows]
    safe = np.minimum(option, spec.n_options - 1)
    slot_net = net[usable_rows, safe]
    slot_cost = cost[usable_rows, safe]
    slot_net[~found] = -np.inf
    slot_cost[~found] = 0.0
    pad_offer = np.append(spec.option_offer, spec.n_offers).astype(np.int8)
    pad_channel = np.append(spec.option_channel, spec.n_channels).astype(np.int8)
    block = CandidateBlock(
        users=options.first_user + usable_rows.astype(np.int64),
        option=option,
        offer=pad_offer[option],
        channel=pad_channel[option],
        net=slot_net,
        cost=slot_cost,
        quanta=quantize(slot_cost),
        choice=np.zeros(usable_rows.size, dtype=np.int8),
    )
    slot_value = _slot_values(block, spec, multipliers)
    block = replace(block, choice=_best_slots(slot_value))
    best = slot_value.max(axis=0, initial=0.0).astype(np.float64)
    result = ScreenResult(usage=block_usage(block, spec), dual_sum=float(best.sum()))
    return block, result


def _concat_blocks(blocks: Sequence[CandidateBlock]) -> CandidateBlock:
    names = ("option", "offer", "channel", "net", "cost", "quanta")
    # Fancy indexing can return column-major arrays, and reductions over the slot
    # axis are many times slower on those, so every array is made row-major.
    arrays = {
        name: np.ascontiguousarray(
            np.concatenate([getattr(b, name) for b in blocks], axis=1)
        )
        for name in names
    }
    return CandidateBlock(
        users=np.concatenate([b.users for b in blocks]),
        choice=np.concatenate([b.choice for b in blocks]),
        **arrays,
    )


def _top_options(
    value: Float32Array, n_slots: int
) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.bool_]]:
    """Return the options of each row's ``n_slots`` highest values, and which exist.

    Each float32 value becomes an int64 key that sorts like the value, with the
    option index in the low bits so that a lower index sorts higher among equal
    values. One partition per row then finds the top keys exactly. The result is
    ``(n_slots, n_rows)``, each column in ascending option order with unusable
    options last as index ``n_options``.
    """
    n_rows, n_options = value.shape
    if n_options > MAX_OPTIONS:
        raise ValueError(
            f"at most {MAX_OPTIONS} offer x channel options are supported, got "
            f"{n_options}"
        )
    bits = value.view(np.int32)
    # Flip the magnitude bits of negative floats so that integer order is float
    # order.
    flip = bits >> 31
    flip &= np.int32(0x7FFFFFFF)
    flip ^= bits
    key = np.multiply(flip, 1 << _OPTION_BITS, dtype=np.int64)
    key += MAX_OPTIONS - 1 - np.arange(n_options, dtype=np.int64)
    if n_slots < n_options:
        key.partition(n_options - n_slots, axis=1)
    top = np.ascontiguousarray(key[:, n_options - n_slots :].T)
    option = (MAX_OPTIONS - 1 - (top & (MAX_OPTIONS - 1))).astype(np.int16)
    ordered = (top >> _OPTION_BITS).astype(np.int32)
    ordered ^= (ordered >> 31) & np.int32(0x7FFFFFFF)
    option[ordered.view(np.float32) <= _UNUSABLE] = n_options
    _sort_columns(option)
    return option, option < n_options


def _sort_columns(array: npt.NDArray[Any]) -> None:
    """Sort each column of a few rows in place by odd-even transposition.

    With n rows, n passes of compare-exchange between neighbouring rows sort every
    column. On few rows this is much faster than numpy's sort along axis 0.
    """
    n_rows = array.shape[0]
    for step in range(n_rows):
        for row in range(step % 2, n_rows - 1, 2):
            low = np.minimum(array[row], array[row + 1])
            np.maximum(array[row], array[row + 1], out=array[row + 1])
            array[row] = low


def _slot_values(
    block: CandidateBlock, spec: AllocationSpec, multipliers: Multipliers
) -> Float32Array:
    lam = np.float32(multipliers.lam)
    value: Float32Array = block.net - lam * block.cost if lam else block.net.copy()
    # Padding slots have net -inf, so the extra penalty entry leaves them -inf.
    penalty = np.append(multipliers.option_penalty(spec), np.float32(0.0))
    value -= np.take(penalty, block.option)
    return value


def _best_slots(value: Float32Array) -> npt.NDArray[np.int8]:
    """Return per user the first slot of the highest positive value, or -1.

    Slots are in ascending option order, so the first of equal values has the
    lower option index, as in the dense best response.
    """
    positive = value.max(axis=0, initial=-np.inf) > 0
    slot = _first_max_slots(value)
    return (slot + np.int8(1)) * positive.view(np.int8) - np.int8(1)


def _first_max_slots(value: npt.NDArray[Any]) -> npt.NDArray[np.int8]:
    """Return per column the first row holding the column's maximum.

    A loop over the few rows with boolean masks is much faster than ``argmax``
    along axis 0.
    """
    best = value.max(axis=0)
    slot = np.zeros(best.size, dtype=np.int8)
    seen = np.zeros(best.size, dtype=bool)
    for index in range(value.shape[0]):
        equal = value[index] == best
        slot += (equal & ~seen).view(np.int8) * np.int8(index)
        seen |= equal
    return slot


def _check_scores(
    profit: npt.NDArray[Any],
    cost: npt.NDArray[Any],
    eligible: npt.NDArray[Any],
    first_user: int,
) -> bool:
    """Raise on an invalid score of an eligible option; return whether all are valid."""
    if profit.size == 0:
        return True
    # min and max propagate NaN, and NaN fails every comparison.
    if (
        cost.min() >= 0
        and cost.max() <= MAX_COST_CENTS
        and profit.min() >= -MAX_COST_CENTS
        and profit.max() <= MAX_COST_CENTS
    ):
        return True
    with np.errstate(invalid="ignore"):
        valid = (
            np.isfinite(profit)
            & np.isfinite(cost)
            & (cost >= 0)
            & (cost <= MAX_COST_CENTS)
            & (np.abs(profit) <= MAX_COST_CENTS)
        )
    bad = eligible & ~valid
    if bad.any():
        row, option = np.argwhere(bad)[0]
        raise ValueError(
            f"user row {first_user + int(row)}, option {int(option)}: an eligible "
            f"option needs a finite profit within +-{MAX_COST_CENTS} cents and a "
            f"cost in [0, {MAX_COST_CENTS}] cents, got profit {profit[row, option]} "
            f"and cost {cost[row, option]}; fix the scores or mark the option "
            "ineligible"
        )
    return bool(valid.all())


def _rows_of(
    block: CandidateBlock, users: IntArray
) -> tuple[IntArray, npt.NDArray[np.bool_]]:
    """Return the block's rows for the given global rows, and which ones it holds."""
    position = np.searchsorted(block.users, users)
    inside = position < block.n_rows
    inside[inside] = block.users[position[inside]] == users[inside]
    return position[inside], inside


def _chosen(
    block: CandidateBlock, choice: npt.NDArray[np.int8]
) -> tuple[IntArray, IntArray]:
    """Return the rows with a choice and the flat index of each chosen slot."""
    rows = np.flatnonzero(choice != NO_SLOT)
    return rows, choice[rows].astype(np.intp) * block.n_rows + rows


def _usage_of(
    block: CandidateBlock, spec: AllocationSpec, choice: npt.NDArray[np.int8]
) -> Usage:
    _, flat = _chosen(block, choice)
    per_option = np.bincount(np.take(block.option, flat), minlength=spec.n_options)
    per_option = per_option.reshape(spec.n_offers, spec.n_channels)
    return Usage(
        quanta=exact_sum(np.take(block.quanta, flat)),
        offer_grants=per_option.sum(axis=1),
        channel_messages=per_option.sum(axis=0),
    )


def _no_usage(spec: AllocationSpec) -> Usage:
    return Usage(
        0,
        np.zeros(spec.n_offers, dtype=np.int64),
        np.zeros(spec.n_channels, dtype=np.int64),
    )


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
