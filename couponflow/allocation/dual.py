"""Fitting the Lagrange multipliers: on a working set in memory, then on all users.

The dual of the full problem is convex in the multipliers (``lam`` for the budget,
``mu`` per offer's stock, ``nu`` per channel's capacity). Both stages minimize it
coordinate by coordinate: bisection for ``lam`` and the exact minimizer, an order
statistic of per-user margins, for each ``mu`` and ``nu``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from couponflow.allocation.blocks import (
    FloatArray,
    Margins,
    Multipliers,
    Usage,
    best_usage,
    candidate_dual,
    exact_sum,
    margins,
    quantize,
)
from couponflow.allocation.options import (
    COST_QUANTA_PER_CENT,
    NO_OPTION,
    AllocationSpec,
    Float32Array,
    IntArray,
)

log = logging.getLogger(__name__)

# The budget multiplier is searched until its bracket is this small relative to it.
_LAMBDA_RTOL = 1e-6
# Over all users each evaluation is a pass over every block, so the search stops
# sooner; the repair absorbs the remaining over-use.
_FULL_LAMBDA_RTOL = 1e-5
# Relative half-width of the first bracket around lam over all users, and the
# narrowest one later sweeps start from.
_FIRST_BRACKET = 0.01
_LAST_BRACKET = 1e-4
_MAX_BISECTIONS = 100
# Extrapolation steps tried along the last sweep's direction, as multiples of it.
_EXTRAPOLATION_STEPS = (1.0, 2.0, 4.0, 8.0)
# Half-width of the margin window in standard deviations of the working set's rank.
_WINDOW_SIGMAS = 5.0
_MAX_WINDOW_TRIES = 6


class BlockMap(Protocol):
    """The part of the blocks interface that the full-data stage uses."""

    n_users: int

    def map(self, function: Callable[..., Any], *args: Any) -> list[Any]: ...


@dataclass(frozen=True)
class WorkingSet:
    """Dense scores of the working set, transposed to ``(n_options, n_rows)``.

    ``scale`` is the working set's share of all users, by which every limit is
    multiplied.
    """

    net: Float32Array
    cost: Float32Array
    quanta: IntArray
    scale: float

    @staticmethod
    def build(net: Float32Array, cost: Float32Array, scale: float) -> WorkingSet:
        cost_t = np.ascontiguousarray(cost.T)
        return WorkingSet(
            net=np.ascontiguousarray(net.T),
            cost=cost_t,
            quanta=quantize(cost_t),
            scale=scale,
        )

    @property
    def n_rows(self) -> int:
        return int(self.net.shape[1])


def fit_multipliers(
    working: WorkingSet, spec: AllocationSpec, max_sweeps: int, dual_rtol: float
) -> Multipliers:
    """Minimize the working set's dual by coordinate descent with extrapolation.

    Each sweep bisects ``lam``, then sets each ``mu`` and each ``nu`` to its exact
    minimizer with the others fixed. Coordinate descent zig-zags when limits ration
    the same users, so after each sweep the step since the previous one is tried
    again at 1, 2, 4 and 8 times its length and the best point is kept. Every step
    uses exact integer sums, order statistics or ``math.fsum``, so the result does
    not depend on the order of rows. Stops when a sweep improves the dual by less
    than ``dual_rtol`` relative to it.
    """
    multipliers = Multipliers(0.0, np.zeros(spec.n_offers), np.zeros(spec.n_channels))
    previous = math.inf
    for sweep in range(max_sweeps):
        start = multipliers
        multipliers = _sweep(working, spec, multipliers)
        dual = working_dual(working, spec, multipliers)
        multipliers, dual = _extrapolate(
            lambda trial: working_dual(working, spec, trial), start, multipliers, dual
        )
        log.debug("working set sweep %d: dual %.9g", sweep, dual)
        if previous - dual <= dual_rtol * max(abs(dual), 1.0):
            break
        previous = dual
    return multipliers


def working_dual(
    working: WorkingSet, spec: AllocationSpec, multipliers: Multipliers
) -> float:
    """Return the working set's dual value at ``multipliers``, summed exactly."""
    value = _values(working, spec, multipliers)
    best = value.max(axis=0, initial=0.0).astype(np.float64)
    return math.fsum(best) + working.scale * limit_value(spec, multipliers)


def limit_value(spec: AllocationSpec, multipliers: Multipliers) -> float:
    """Return ``lam * budget + mu . stock + nu . capacity``, the limits' dual term."""
    return (
        multipliers.lam * spec.budget_cents
        + float(multipliers.mu @ spec.stock.astype(np.float64))
        + float(multipliers.nu @ spec.capacity.astype(np.float64))
    )


def polish_multipliers(
    blocks: BlockMap,
    working: WorkingSet,
    spec: AllocationSpec,
    multipliers: Multipliers,
    sweeps: int,
) -> Multipliers:
    """Refit the multipliers on every user's candidates, one coordinate at a time.

    The working set's multipliers carry its sampling error, so some limits would be
    over-used and others left slack. Each sweep refits ``lam`` by regula falsi on the
    exact budget use, then each ``mu`` and ``nu`` to its exact minimizer, found from
    block counts and the margins inside a window that the working set predicts.
    A stock or capacity multiplier at 0 whose limit holds at the start of its group
    is left at 0, its exact minimizer then, without a pass over the blocks. After each
    sweep the step is extrapolated as on the working set, judged by the dual over the
    candidates.
    """
    n_users = blocks.n_users
    offers = [o for o in range(spec.n_offers) if spec.stock[o] < n_users]
    channels = [c for c in range(spec.n_channels) if spec.capacity[c] < n_users]

    def dual(trial: Multipliers) -> float:
        total = sum(blocks.map(candidate_dual, spec, trial))
        return total / COST_QUANTA_PER_CENT + limit_value(spec, trial)

    width = _FIRST_BRACKET
    for sweep in range(sweeps):
        start = multipliers
        lam, usage = _full_budget_multiplier(blocks, spec, multipliers, width)
        if multipliers.lam > 0:
            # Later sweeps move lam less, so the next bracket starts narrower.
            moved = abs(lam - multipliers.lam) / multipliers.lam
            width = min(max(4.0 * moved, _LAST_BRACKET), _FIRST_BRACKET)
        multipliers = multipliers.with_value(None, 0, lam)
        changed = False
        for by_offer, indices in ((True, offers), (False, channels)):
            if not by_offer and changed:
                usage = Usage.total(blocks.map(best_usage, spec, multipliers))
            changed = False
            used = usage.offer_grants if by_offer else usage.channel_messages
            limit = spec.stock if by_offer else spec.capacity
            current = multipliers.mu if by_offer else multipliers.nu
            for index in indices:
                if current[index] == 0 and used[index] <= limit[index]:
                    continue
                value = _full_count_multiplier(
                    blocks, working, spec, multipliers, by_offer, index
                )
                changed = changed or value != current[index]
                multipliers = multipliers.with_value(by_offer, index, value)
        multipliers, value = _extrapolate(dual, start, multipliers, dual(multipliers))
        log.debug("polish sweep %d: dual %.9g", sweep, value)
    return multipliers


def _sweep(
    working: WorkingSet, spec: AllocationSpec, multipliers: Multipliers
) -> Multipliers:
    n_rows = working.n_rows
    stock = spec.stock.astype(np.float64) * working.scale
    capacity = spec.capacity.astype(np.float64) * working.scale
    penalty = multipliers.option_penalty(spec)[:, None]
    lam = _budget_multiplier(working, spec, penalty, multipliers.lam)
    base = working.net - np.float32(lam) * working.cost
    mu, nu = multipliers.mu.copy(), multipliers.nu.copy()

    value = (base - penalty).reshape(spec.n_offers, spec.n_channels, n_rows)
    _coordinate_pass(value.max(axis=1), mu, stock, n_rows)
    penalty = Multipliers(lam, mu, nu).option_penalty(spec)[:, None]
    value = (base - penalty).reshape(spec.n_offers, spec.n_channels, n_rows)
    _coordinate_pass(value.max(axis=0), nu, capacity, n_rows)
    return Multipliers(lam, mu, nu)


def _coordinate_pass(
    best: Float32Array, multiplier: FloatArray, limit: FloatArray, n_rows: int
) -> None:
    """Set each multiplier in turn to its exact minimizer, updating ``best`` in place.

    ``best[j]`` is each row's best value among the options of offer (or channel)
    ``j``. Rows after ``j`` are not updated yet, so their maxima come from a suffix
    computed once; rows before come from a running prefix.
    """
    n_groups = best.shape[0]
    suffix = np.full((n_groups + 1, n_rows), -np.inf, dtype=np.float32)
    for group in range(n_groups - 1, -1, -1):
        np.maximum(suffix[group + 1], best[group], out=suffix[group])
    prefix = np.full(n_rows, -np.inf, dtype=np.float32)
    for group in range(n_groups):
        # A limit at least as large as the rows cannot bind, so it keeps 0.
        if limit[group] < n_rows:
            others = np.maximum(np.maximum(prefix, suffix[group + 1]), 0.0)
            margin = best[group].astype(np.float64) + multiplier[group] - others
            new = exact_threshold(margin, limit[group])
            best[group] += np.float32(multiplier[group] - new)
            multiplier[group] = new
        np.maximum(prefix, best[group], out=prefix)


def exact_threshold(margin: FloatArray, limit: float) -> float:
    """Return the smallest ``t >= 0`` with at most ``floor(limit)`` margins above it."""
    allowed = math.floor(limit)
    if int((margin > 0).sum()) <= allowed:
        return 0.0
    position = margin.size - allowed - 1
    return float(np.partition(margin, position)[position])


def _budget_multiplier(
    working: WorkingSet, spec: AllocationSpec, penalty: Float32Array, warm: float
) -> float:
    """Return the smallest ``lam`` at which the best responses' cost fits the budget.

    Each row's chosen cost can only fall as ``lam`` grows, and an option that is
    best at both ends of a bracket is best inside it, so such rows are settled and
    later steps evaluate only the others.
    """
    budget = spec.budget_cents * COST_QUANTA_PER_CENT * working.scale
    value = working.net - penalty
    cost, quanta = working.cost, working.quanta
    choice_zero = _best_dense(value, cost, quanta, 0.0)
    if _chosen_quanta(choice_zero, quanta) <= budget:
        return 0.0

    low, high, choice_low, choice_high = _bracket(value, cost, quanta, budget, warm)
    settled = 0
    for _ in range(_MAX_BISECTIONS):
        same = choice_low == choice_high
        # Compacting copies the matrices, so it waits until a quarter is settled.
        if same.any() and 4 * int(same.sum()) >= same.size:
            settled += _chosen_quanta(choice_high[same], quanta[:, same])
            keep = ~same
            value, cost, quanta = value[:, keep], cost[:, keep], quanta[:, keep]
            choice_low, choice_high = choice_low[keep], choice_high[keep]
        if choice_low.size == 0 or high - low <= _LAMBDA_RTOL * high:
            break
        middle = 0.5 * (low + high)
        choice_middle = _best_dense(value, cost, quanta, middle)
        if settled + _chosen_quanta(choice_middle, quanta) <= budget:
            high, choice_high = middle, choice_middle
        else:
            low, choice_low = middle, choice_middle
    return high


def _bracket(
    value: Float32Array,
    cost: Float32Array,
    quanta: IntArray,
    budget: float,
    warm: float,
) -> tuple[float, float, IntArray, IntArray]:
    """Return ``low < high``, the budget over-used at ``low`` and kept at ``high``."""
    if warm <= 0:
        paid = (cost > 0) & (value > 0)
        # Above the largest value per cent only zero-cost options stay positive.
        high = 2.0 * float((value[paid].astype(np.float64) / cost[paid]).max())
        return (
            0.0,
            high,
            _best_dense(value, cost, quanta, 0.0),
            _best_dense(value, cost, quanta, high),
        )
    choice = _best_dense(value, cost, quanta, warm)
    if _chosen_quanta(choice, quanta) <= budget:
        high, choice_high = warm, choice
        low = 0.5 * warm
        choice_low = _best_dense(value, cost, quanta, low)
        while _chosen_quanta(choice_low, quanta) <= budget:
            high, choice_high = low, choice_low
            low = 0.5 * low if low > 1e-12 * warm else 0.0
            choice_low = _best_dense(value, cost, quanta, low)
        return low, high, choice_low, choice_high
    low, choice_low = warm, choice
    high = 2.0 * warm
    choice_high = _best_dense(value, cost, quanta, high)
    while _chosen_quanta(choice_high, quanta) > budget:
        low, choice_low = high, choice_high
        high *= 2.0
        choice_high = _best_dense(value, cost, quanta, high)
    return low, high, choice_low, choice_high


def _best_dense(
    value: Float32Array, cost: Float32Array, quanta: IntArray, lam: float
) -> IntArray:
    """Return each row's best option at ``lam``, or -1 when no value is positive.

    A strict ``>`` keeps the lower option index among equal values.
    """
    n_options, n_rows = value.shape
    best = np.zeros(n_rows, dtype=np.float32)
    choice = np.full(n_rows, NO_OPTION, dtype=np.int64)
    score = np.empty(n_rows, dtype=np.float32)
    better = np.empty(n_rows, dtype=bool)
    for option in range(n_options):
        if lam:
            np.multiply(cost[option], np.float32(-lam), out=score)
            score += value[option]
        else:
            score[:] = value[option]
        np.greater(score, best, out=better)
        np.copyto(choice, option, where=better)
        np.maximum(best, score, out=best)
    return choice


def _chosen_quanta(choice: IntArray, quanta: IntArray) -> int:
    rows = np.flatnonzero(choice != NO_OPTION)
    return exact_sum(quanta[choice[rows], rows])


def _values(
    working: WorkingSet, spec: AllocationSpec, multipliers: Multipliers
) -> Float32Array:
    value = working.net - np.float32(multipliers.lam) * working.cost
    value -= multipliers.option_penalty(spec)[:, None]
    return value


def _extrapolate(
    dual_at: Callable[[Multipliers], float],
    start: Multipliers,
    end: Multipliers,
    dual: float,
) -> tuple[Multipliers, float]:
    """Return the best of ``end`` and steps along ``end - start`` by the dual."""
    best, best_dual = end, dual
    for step in _EXTRAPOLATION_STEPS:
        trial = Multipliers(
            max(0.0, end.lam + step * (end.lam - start.lam)),
            np.maximum(end.mu + step * (end.mu - start.mu), 0.0),
            np.maximum(end.nu + step * (end.nu - start.nu), 0.0),
        )
        trial_dual = dual_at(trial)
        if trial_dual >= best_dual:
            break
        best, best_dual = trial, trial_dual
    return best, best_dual


def _full_budget_multiplier(
    blocks: BlockMap, spec: AllocationSpec, multipliers: Multipliers, width: float
) -> tuple[float, Usage]:
    """Return the smallest ``lam`` whose best responses fit the budget, and their use.

    Regula falsi on the exact budget use: the bracket starts ``width`` (relative)
    around the current value and widens until it contains the answer, and the
    Illinois rule keeps the secant steps from stalling on one side.
    """
    budget = spec.budget_cents * COST_QUANTA_PER_CENT
    seen: dict[float, Usage] = {}

    def excess(lam: float) -> int:
        trial = multipliers.with_value(None, 0, lam)
        seen[lam] = Usage.total(blocks.map(best_usage, spec, trial))
        return seen[lam].quanta - budget

    current = multipliers.lam
    if current <= 0:
        if excess(0.0) <= 0:
            return 0.0, seen[0.0]
        low, f_low = 0.0, excess(0.0)
        high = 1e-3
        f_high = excess(high)
        while f_high > 0:
            low, f_low, high = high, f_high, high * 4.0
            f_high = excess(high)
    else:
        f_current = excess(current)
        width = width * current
        if f_current <= 0:
            high, f_high = current, f_current
            low = max(current - width, 0.0)
            f_low = excess(low)
            while f_low <= 0:
                if low == 0.0:
                    return 0.0, seen[0.0]
                high, f_high = low, f_low
                width *= 4.0
                low = max(current - width, 0.0)
                f_low = excess(low)
        else:
            low, f_low = current, f_current
            high = current + width
            f_high = excess(high)
            while f_high > 0:
                low, f_low = high, f_high
                width *= 4.0
                high = current + width
                f_high = excess(high)

    retained = 0
    weight_low, weight_high = float(f_low), float(f_high)
    for _ in range(_MAX_BISECTIONS):
        width = high - low
        if width <= _FULL_LAMBDA_RTOL * high:
            break
        middle = high - weight_high * width / (weight_high - weight_low)
        # Keep each step inside the middle 90% so the bracket always shrinks.
        middle = min(max(middle, low + 0.05 * width), high - 0.05 * width)
        f_middle = excess(middle)
        if f_middle > 0:
            low, weight_low = middle, float(f_middle)
            if retained == 1:
                weight_high *= 0.5
            retained = 1
        else:
            high, weight_high = middle, float(f_middle)
            if retained == -1:
                weight_low *= 0.5
            retained = -1
    return high, seen[high]


def _full_count_multiplier(
    blocks: BlockMap,
    working: WorkingSet,
    spec: AllocationSpec,
    multipliers: Multipliers,
    by_offer: bool,
    index: int,
) -> float:
    """Return the exact minimizer of one stock or capacity multiplier over all users.

    It is the ``limit + 1``-th largest margin, or 0 when at most ``limit`` margins
    are positive. Blocks return counts and only the margins inside a window around
    the working set's estimate. A window that misses is widened and tried again,
    and the last try takes every positive margin.
    """
    limit = int(spec.stock[index] if by_offer else spec.capacity[index])
    low, high = _margin_window(working, spec, multipliers, by_offer, index, limit)
    for attempt in range(_MAX_WINDOW_TRIES):
        if attempt == _MAX_WINDOW_TRIES - 1:
            low, high = 0.0, math.inf
        total = Margins.total(
            blocks.map(margins, spec, multipliers, by_offer, index, low, high)
        )
        if total.above_zero <= limit:
            return 0.0
        width = max(high - low, 1e-6) if math.isfinite(high) else 1.0
        if total.above_high > limit:
            low, high = high, high + 4.0 * width
            continue
        if total.above_high + total.window.size <= limit:
            low, high = max(low - 4.0 * width, 0.0), low
            continue
        # The (limit + 1)-th largest margin lies in the window.
        position = total.window.size - (limit - total.above_high) - 1
        return float(np.partition(total.window, position)[position])
    raise RuntimeError(f"no multiplier found for limit {index}; this is a solver bug")


def _margin_window(
    working: WorkingSet,
    spec: AllocationSpec,
    multipliers: Multipliers,
    by_offer: bool,
    index: int,
    limit: int,
) -> tuple[float, float]:
    """Return margins around the working set's estimate of the full-data threshold.

    The working set's rank of the threshold is about ``limit * scale``, give or take
    a binomial standard deviation, so the window spans that rank plus and minus
    ``_WINDOW_SIGMAS`` deviations, with a little slack in value.
    """
    value = _values(working, spec, multipliers)
    n_rows = working.n_rows
    grouped = value.reshape(spec.n_offers, spec.n_channels, n_rows)
    per_group = grouped.max(axis=1) if by_offer else grouped.max(axis=0)
    own = multipliers.mu[index] if by_offer else multipliers.nu[index]
    others = np.delete(per_group, index, axis=0).max(axis=0, initial=0.0)
    margin = np.sort(per_group[index].astype(np.float64) + own - others)[::-1]
    positive = int((margin > 0).sum())
    rank = limit * working.scale
    spread = _WINDOW_SIGMAS * math.sqrt(rank + 1.0) + 2.0
    upper_rank = math.floor(rank - spread)
    lower_rank = math.ceil(rank + spread)
    high = float(margin[upper_rank]) if upper_rank >= 0 else math.inf
    low = float(margin[lower_rank]) if lower_rank < positive else 0.0
    slack = 0.01 * (abs(high - low) if math.isfinite(high) else abs(low)) + 1e-6
    return max(low - slack, 0.0), high + slack
