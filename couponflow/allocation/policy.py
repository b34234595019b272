"""The randomized campaign policy of the full problem: holdout, exploration, solver.

Each user is drawn into the holdout, the exploration share or the optimized group
from a hash of the seed and the user id, so the draws do not depend on row order
or partitioning. The propensity of each recorded choice is its exact probability
under this policy, given the solved allocation.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import numpy.typing as npt
import pandas as pd

from couponflow.allocation.blocks import quantize
from couponflow.allocation.campaign import HOLDOUT, PLAN_COLUMNS, TREATMENT
from couponflow.allocation.lagrangian import Allocation, SolverParams, solve_allocation
from couponflow.allocation.options import (
    COST_QUANTA_PER_CENT,
    NO_OPTION,
    AllocationSpec,
    IntArray,
    UserOptions,
)
from couponflow.allocation.send_hours import SendHours
from couponflow.schemas import CONTROL_ARM, UTC_TS

log = logging.getLogger(__name__)

OPTIMIZED = "optimized"
EXPLORE = "explore"
# Group codes of RandomizedAllocation.group, and their names in the plan's
# assignment column.
GROUP_OPTIMIZED, GROUP_HOLDOUT, GROUP_EXPLORE = 0, 1, 2
ASSIGNMENTS: tuple[str, ...] = (OPTIMIZED, HOLDOUT, EXPLORE)


@dataclass(frozen=True)
class RandomizedAllocation:
    """Each user's recorded choice under the randomized policy, with its propensity.

    ``policy_option`` is the solver's choice for every user, ``option`` the recorded
    one (-1 for control): nothing for the holdout, a uniform draw among the user's
    ``n_choices`` eligible options for exploration, and the solver's choice for the
    optimized group. ``reserved`` is what the exploration draws use: cost quanta,
    grants per offer and messages per channel.
    """

    solution: Allocation
    group: npt.NDArray[np.int8]
    option: npt.NDArray[np.int16]
    propensity: npt.NDArray[np.float64]
    n_choices: IntArray
    holdout_fraction: float
    explore_fraction: float
    reserved_quanta: int
    reserved_grants: IntArray
    reserved_messages: IntArray

    @property
    def policy_option(self) -> npt.NDArray[np.int16]:
        return self.solution.option


def draw_groups(
    user_ids: Sequence[str] | pd.Series,
    holdout_fraction: float,
    explore_fraction: float,
    seed: int,
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float64]]:
    """Return each user's group code and a uniform draw for the exploration choice.

    A user is in the holdout with probability ``holdout_fraction``, in exploration
    with ``explore_fraction`` and optimized otherwise, independently of every other
    user. Both draws come from a keyed hash of the user id, so the same id and seed
    always draw the same.
    """
    validate_fractions(holdout_fraction, explore_fraction)
    ids = np.asarray(pd.Series(user_ids, dtype="string").to_numpy(), dtype=object)
    group_draw = _uniform(ids, seed, "group")
    choice_draw = _uniform(ids, seed, "explore")
    group = np.full(ids.size, GROUP_OPTIMIZED, dtype=np.int8)
    group[group_draw < holdout_fraction] = GROUP_HOLDOUT
    explore = (group_draw >= holdout_fraction) & (
        group_draw < holdout_fraction + explore_fraction
    )
    group[explore] = GROUP_EXPLORE
    return group, choice_draw


def allocate_campaign(
    options: UserOptions,
    spec: AllocationSpec,
    user_ids: Sequence[str] | pd.Series,
    holdout_fraction: float,
    explore_fraction: float,
    seed: int,
    params: SolverParams | None = None,
) -> RandomizedAllocation:
    """Draw the groups, reserve the exploration draws, solve, and log propensities.

    Exploration users get an option drawn uniformly among their eligible options
    whose offer has stock and whose channel has capacity. What those draws use is
    taken off the limits first, and the solver then allocates every user within
    what is left, so the recorded choices never exceed a limit. The solver's
    choices for holdout and exploration users are not sent, so their share of the
    limits stays unspent.

    The propensity of a recorded option ``a`` of a user with ``K`` eligible options
    and solver choice ``s`` is ``h * [a is control] + e * q(a) + (1 - h - e) * [a ==
    s]``, where ``h`` and ``e`` are the fractions and ``q(a)`` is ``1 / K`` (or 1 for
    control when ``K`` is 0). Raises ``ValueError`` when the exploration draws alone
    exceed a limit, since dropping draws would change the propensities.
    """
    options.check_spec(spec)
    ids = pd.Series(user_ids, dtype="string")
    if len(ids) != options.n_users:
        raise ValueError(
            f"got {len(ids)} user_ids for {options.n_users} users of options; pass the "
            "ids in row order"
        )
    if ids.isna().any() or (ids == "").any() or ids.duplicated().any():
        raise ValueError("user_ids must be unique, non-empty strings")
    open_options = _open_options(options, spec)
    n_choices = open_options.sum(axis=1)
    group, explorers, explored = _exploration_draws(
        ids, open_options, holdout_fraction, explore_fraction, seed
    )
    # NOTE: the solver's choices depend on the draws through what they reserve, so
    # each propensity is exact given the solved allocation, not over all draws.
    reserved = _reserve(options, spec, explorers, explored)
    remaining = spec.with_limits(
        budget_cents=spec.budget_cents - math.ceil(reserved[0] / COST_QUANTA_PER_CENT),
        stock=spec.stock - reserved[1],
        capacity=spec.capacity - reserved[2],
    )
    solution = solve_allocation(options, remaining, params)

    option = solution.option.copy()
    option[group == GROUP_HOLDOUT] = NO_OPTION
    option[explorers] = explored
    propensity = _propensity(
        option, solution.option, n_choices, holdout_fraction, explore_fraction
    )
    log.info(
        "randomized allocation: %d users, %d holdout, %d exploring, %d granted",
        options.n_users,
        int((group == GROUP_HOLDOUT).sum()),
        explorers.size,
        int((option != NO_OPTION).sum()),
    )
    return RandomizedAllocation(
        solution=solution,
        group=group,
        option=option,
        propensity=propensity,
        n_choices=n_choices,
        holdout_fraction=holdout_fraction,
        explore_fraction=explore_fraction,
        reserved_quanta=reserved[0],
        reserved_grants=reserved[1],
        reserved_messages=reserved[2],
    )


def fit_explore_fraction(
    options: UserOptions,
    spec: AllocationSpec,
    user_ids: Sequence[str] | pd.Series,
    holdout_fraction: float,
    explore_fraction: float,
    seed: int,
    max_share: float = 0.2,
) -> float:
    """Return the largest of ``explore_fraction``, its half, quarter, ... or 0 whose
    exploration draws use at most ``max_share`` of the budget, of each offer's
    stock and of each channel's capacity.

    The draws at a fraction are exactly those :func:`allocate_campaign` makes with
    it, so the returned fraction never makes it raise. A fraction that draws no
    user, or is below 1e-4, counts as 0.
    """
    validate_fractions(holdout_fraction, explore_fraction)
    if not 0.0 <= max_share <= 1.0:
        raise ValueError(f"max_share must be in [0, 1], got {max_share}")
    options.check_spec(spec)
    ids = pd.Series(user_ids, dtype="string")
    open_options = _open_options(options, spec)
    fraction = explore_fraction
    while fraction >= 1e-4:
        _, explorers, explored = _exploration_draws(
            ids, open_options, holdout_fraction, fraction, seed
        )
        if explorers.size == 0:
            # A fraction too small to draw anyone explores nothing.
            return 0.0
        usage = _usage(options, spec, explorers, explored)
        over = _over_share(spec, max_share, *usage)
        if not over:
            return fraction
        log.info(
            "exploration at %.4g would use %s; trying half of it",
            fraction,
            "; ".join(over),
        )
        fraction /= 2.0
    return 0.0


def plan_rows(
    randomized: RandomizedAllocation,
    options: UserOptions,
    user_ids: Sequence[str] | pd.Series,
    send_hours: SendHours,
    send_after: datetime | pd.Timestamp,
    uplift: npt.ArrayLike | None = None,
) -> pd.DataFrame:
    """Build one campaign plan row per user, the columns of ``PLAN_COLUMNS`` and
    ``assignment`` (optimized, holdout or explore).

    ``arm``, ``expected_profit_cents`` (net of the message cost) and
    ``expected_cost_cents`` belong to the recorded option, 0 for control. Holdout
    rows carry the ``policy_arm``, channel, send time and ``score_uplift`` of the
    solver's option for them, and other rows have ``policy_arm`` equal to ``arm``.
    ``send_at`` is the first time at the (user, channel) send hour at or after
    ``send_after``, or ``send_after`` for a row without a channel.
    ``uplift`` is either ``(n_users, n_offers)``, the predicted uplift of an offer
    seen by the user, which is scaled by the channel's reach, or ``(n_users,
    n_offers, n_channels)``, taken as it is; ``score_uplift`` is 0 when not given.
    """
    spec = randomized.solution.spec
    n_users = options.n_users
    ids = pd.Series(user_ids, dtype="string")
    if len(ids) != n_users or send_hours.hour.shape != (n_users, spec.n_channels):
        raise ValueError(
            f"user_ids and send_hours must cover the {n_users} users and "
            f"{spec.n_channels} channels of the allocation"
        )
    start = pd.Timestamp(send_after)
    if start.tzinfo is None:
        raise ValueError(f"send_after must be timezone-aware, got {send_after!r}")

    recorded = randomized.option
    holdout = randomized.group == GROUP_HOLDOUT
    displayed = np.where(holdout, randomized.policy_option, recorded)
    users = np.flatnonzero(displayed != NO_OPTION)
    offer = displayed[users] // spec.n_channels
    channel = displayed[users] % spec.n_channels

    channel_name = np.full(n_users, None, dtype=object)
    channel_name[users] = np.asarray(spec.channels, dtype=object)[channel]
    send_at = np.full(
        n_users, start.tz_convert("UTC").as_unit("ns").value, dtype=np.int64
    )
    times = send_hours.send_times(start).astype(np.int64)
    send_at[users] = times[users, channel]
    score = np.zeros(n_users)
    if uplift is not None:
        predicted = np.asarray(uplift, dtype=np.float64)
        if predicted.shape == (n_users, spec.n_offers, spec.n_channels):
            score[users] = predicted[users, offer, channel]
        elif predicted.shape == (n_users, spec.n_offers):
            score[users] = predicted[users, offer] * send_hours.reach[users, channel]
        else:
            raise ValueError(
                f"uplift must be ({n_users}, {spec.n_offers}) or ({n_users}, "
                f"{spec.n_offers}, {spec.n_channels}), got {predicted.shape}"
            )

    sent = np.flatnonzero(recorded != NO_OPTION)
    sent_offer = recorded[sent] // spec.n_channels
    sent_channel = recorded[sent] % spec.n_channels
    profit = np.zeros(n_users)
    cost = np.zeros(n_users)
    profit[sent] = (
        options.profit_cents[sent, sent_offer, sent_channel].astype(np.float64)
        - spec.message_cost_cents[sent_channel]
    )
    cost[sent] = options.cost_cents[sent, sent_offer, sent_channel]
    offer_ids = np.asarray(spec.offer_ids, dtype=object)
    arm = np.full(n_users, CONTROL_ARM, dtype=object)
    arm[sent] = offer_ids[sent_offer]
    # The policy's arm before the holdout draw: the recorded arm for treatment rows,
    # the withheld offer (or control) for holdout rows.
    policy_arm = np.full(n_users, CONTROL_ARM, dtype=object)
    policy_arm[users] = offer_ids[offer]

    plan = pd.DataFrame(
        {
            "user_id": pd.array(ids.to_numpy(dtype=object), dtype="string"),
            "group_name": pd.array(
                np.where(holdout, HOLDOUT, TREATMENT), dtype="string"
            ),
            "arm": pd.array(arm, dtype="string"),
            "policy_arm": pd.array(policy_arm, dtype="string"),
            "channel": pd.array(channel_name, dtype="string"),
            "send_at": pd.to_datetime(send_at, utc=True).astype(UTC_TS),
            "propensity": randomized.propensity,
            "score_uplift": score,
            "expected_profit_cents": np.floor(profit + 0.5).astype(np.int64),
            "expected_cost_cents": np.floor(cost + 0.5).astype(np.int64),
        }
    )
    plan["assignment"] = pd.array(
        np.asarray(ASSIGNMENTS, dtype=object)[randomized.group], dtype="string"
    )
    return plan[[*PLAN_COLUMNS, "assignment"]]


def validate_fractions(holdout_fraction: float, explore_fraction: float) -> None:
    """Raise ``ValueError`` unless both fractions are >= 0 and sum to below 1."""
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    # The tolerance keeps 0.95 + 0.05, which sums to just below 1 in floating
    # point, from passing.
    if not (0.0 <= explore_fraction and holdout_fraction + explore_fraction < 1 - 1e-9):
        raise ValueError(
            f"explore_fraction must be in [0, 1 - holdout_fraction), got "
            f"{explore_fraction} with holdout_fraction {holdout_fraction}"
        )


def _uniform(
    ids: npt.NDArray[np.object_], seed: int, purpose: str
) -> npt.NDArray[np.float64]:
    # pandas hashes with SipHash under a 16-byte key, derived here from the seed.
    key = hashlib.sha256(f"couponflow.allocation:{purpose}:{seed}".encode()).hexdigest()
    hashed = pd.util.hash_array(ids, hash_key=key[:16], categorize=False)
    return (hashed >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _open_options(options: UserOptions, spec: AllocationSpec) -> npt.NDArray[np.bool_]:
    is_open = (spec.stock[spec.option_offer] > 0) & (
        spec.capacity[spec.option_channel] > 0
    )
    eligible = options.eligible.reshape(options.n_users, spec.n_options)
    return eligible & is_open


def _draw_options(
    mask: npt.NDArray[np.bool_], draw: npt.NDArray[np.float64]
) -> npt.NDArray[np.int16]:
    """Return the ``floor(draw * K)``-th allowed option of each row, or -1 if K is 0."""
    counts = mask.sum(axis=1)
    position = np.minimum(np.floor(draw * counts), np.maximum(counts - 1, 0))
    rank = np.cumsum(mask, axis=1) - 1
    hit = mask & (rank == position[:, None].astype(np.int64))
    chosen = hit.argmax(axis=1)
    return np.where(counts > 0, chosen, NO_OPTION).astype(np.int16)


def _reserve(
    options: UserOptions,
    spec: AllocationSpec,
    explorers: IntArray,
    explored: npt.NDArray[np.int16],
) -> tuple[int, IntArray, IntArray]:
    usage = _usage(options, spec, explorers, explored)
    over = _over_share(spec, 1.0, *usage)
    if over:
        raise ValueError(
            f"the exploration draws use {'; '.join(over)}, over the limit; lower "
            "explore_fraction or raise the limit"
        )
    return usage


def _exploration_draws(
    ids: pd.Series,
    open_options: npt.NDArray[np.bool_],
    holdout_fraction: float,
    explore_fraction: float,
    seed: int,
) -> tuple[npt.NDArray[np.int8], IntArray, npt.NDArray[np.int16]]:
    """Return each user's group, the exploring users and the option each draws."""
    group, choice_draw = draw_groups(ids, holdout_fraction, explore_fraction, seed)
    explorers = np.flatnonzero(group == GROUP_EXPLORE)
    explored = _draw_options(open_options[explorers], choice_draw[explorers])
    return group, explorers, explored


def _over_share(
    spec: AllocationSpec,
    max_share: float,
    quanta: int,
    grants: IntArray,
    messages: IntArray,
) -> list[str]:
    """Describe each limit of which the draws use more than ``max_share``."""
    over = []
    if quanta > max_share * spec.budget_cents * COST_QUANTA_PER_CENT:
        over.append(
            f"{quanta / COST_QUANTA_PER_CENT:.0f} of the budget's "
            f"{spec.budget_cents} cents"
        )
    for kind, names, used, limit in (
        ("stock", spec.offer_ids, grants, spec.stock),
        ("capacity", spec.channels, messages, spec.capacity),
    ):
        for j in np.flatnonzero(used > max_share * limit):
            over.append(f"{int(used[j])} of the {kind} {int(limit[j])} of {names[j]!r}")
    return over


def _usage(
    options: UserOptions,
    spec: AllocationSpec,
    explorers: IntArray,
    explored: npt.NDArray[np.int16],
) -> tuple[int, IntArray, IntArray]:
    """Return the cost quanta, grants per offer and messages per channel of draws."""
    drawn = explored != NO_OPTION
    users, option = explorers[drawn], explored[drawn].astype(np.int64)
    cost = options.cost_cents.reshape(options.n_users, spec.n_options)[users, option]
    quanta = int(quantize(cost).sum())
    grants = np.bincount(spec.option_offer[option], minlength=spec.n_offers)
    messages = np.bincount(spec.option_channel[option], minlength=spec.n_channels)
    return quanta, grants, messages


def _propensity(
    recorded: npt.NDArray[np.int16],
    solved: npt.NDArray[np.int16],
    n_choices: IntArray,
    holdout_fraction: float,
    explore_fraction: float,
) -> npt.NDArray[np.float64]:
    control = recorded == NO_OPTION
    explore_share = np.where(
        n_choices > 0,
        np.where(control, 0.0, 1.0 / np.maximum(n_choices, 1)),
        control.astype(np.float64),
    )
    optimized_share = (recorded == solved).astype(np.float64)
    return (
        holdout_fraction * control
        + explore_fraction * explore_share
        + (1.0 - holdout_fraction - explore_fraction) * optimized_share
    )
