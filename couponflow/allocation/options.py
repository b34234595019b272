"""Inputs of the full allocation problem: users x offers x channels, and the limits.

Each user's send hour is chosen per channel before the solver (see ``send_hours``),
so the solver takes one score per (user, offer, channel), stored as float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from couponflow.schemas import CHANNELS

IntArray = npt.NDArray[np.int64]
Float32Array = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]

# No option chosen, in arrays of option indices.
NO_OPTION = -1
# Budget accounting is exact integer arithmetic on costs rounded up to 2**-16 cents,
# so totals do not depend on the order or partitioning of users, and a total that
# fits in quanta also fits in real cents.
COST_QUANTA_PER_CENT = 2**16
# With this cap a quantized cost is below 2**44, so the sum over one chunk of at most
# 2**18 users stays below 2**62 and fits in int64.
MAX_COST_CENTS = 2**28
# A limit this large never binds.
UNLIMITED = 2**62


@dataclass(frozen=True)
class AllocationSpec:
    """Offers, channels and the limits of one campaign.

    ``stock[j]`` is the number of grants of ``offer_ids[j]``, ``capacity[c]`` the
    number of messages ``channels[c]`` may send, ``message_cost_cents[c]`` the cost
    of one message, subtracted from profit, and ``budget_cents`` the limit on the
    total expected discount cost. Option ``k`` of the solver is offer
    ``k // n_channels`` sent through channel ``k % n_channels``.
    """

    offer_ids: tuple[str, ...]
    budget_cents: int
    stock: IntArray
    channels: tuple[str, ...] = CHANNELS
    capacity: IntArray = field(
        default_factory=lambda: np.full(len(CHANNELS), UNLIMITED)
    )
    message_cost_cents: IntArray = field(
        default_factory=lambda: np.zeros(len(CHANNELS), dtype=np.int64)
    )

    def __post_init__(self) -> None:
        offer_ids = tuple(str(o) for o in self.offer_ids)
        channels = tuple(str(c) for c in self.channels)
        if not offer_ids or len(set(offer_ids)) != len(offer_ids):
            raise ValueError(f"offer_ids must be unique and non-empty, got {offer_ids}")
        if not channels or len(set(channels)) != len(channels):
            raise ValueError(f"channels must be unique and non-empty, got {channels}")
        object.__setattr__(self, "offer_ids", offer_ids)
        object.__setattr__(self, "channels", channels)
        object.__setattr__(
            self, "budget_cents", _count("budget_cents", self.budget_cents)
        )
        for name, size in (
            ("stock", len(offer_ids)),
            ("capacity", len(channels)),
            ("message_cost_cents", len(channels)),
        ):
            object.__setattr__(self, name, _counts(name, getattr(self, name), size))

    @property
    def n_offers(self) -> int:
        return len(self.offer_ids)

    @property
    def n_channels(self) -> int:
        return len(self.channels)

    @property
    def n_options(self) -> int:
        return self.n_offers * self.n_channels

    @property
    def option_offer(self) -> IntArray:
        """Offer index of each option."""
        return np.repeat(np.arange(self.n_offers), self.n_channels)

    @property
    def option_channel(self) -> IntArray:
        """Channel index of each option."""
        return np.tile(np.arange(self.n_channels), self.n_offers)

    def with_limits(
        self, budget_cents: int, stock: npt.ArrayLike, capacity: npt.ArrayLike
    ) -> AllocationSpec:
        """Return a copy with other limits, for example what is left after a draw."""
        return AllocationSpec(
            offer_ids=self.offer_ids,
            budget_cents=budget_cents,
            stock=np.asarray(stock),
            channels=self.channels,
            capacity=np.asarray(capacity),
            message_cost_cents=self.message_cost_cents,
        )


@dataclass(frozen=True)
class UserOptions:
    """Scores of every (user, offer, channel) for a block of users, in expected cents.

    ``profit_cents`` is the incremental margin minus the expected discount cost,
    before the channel's message cost. ``cost_cents`` is the expected discount cost,
    which counts against the budget. ``eligible`` marks the options a user may get.
    All three are ``(n_users, n_offers, n_channels)``; the score arrays are stored as
    float32, so pass float32 to avoid a copy. ``first_user`` is the row of user 0 of
    this block in the whole problem, which keeps tie-breaking global when users are
    split into blocks or partitions.
    """

    profit_cents: Float32Array
    cost_cents: Float32Array
    eligible: BoolArray
    first_user: int = 0

    def __post_init__(self) -> None:
        profit = np.asarray(self.profit_cents, dtype=np.float32)
        cost = np.asarray(self.cost_cents, dtype=np.float32)
        eligible = np.asarray(self.eligible, dtype=bool)
        if profit.ndim != 3:
            raise ValueError(
                "profit_cents must have shape (n_users, n_offers, n_channels), got "
                f"{profit.shape}"
            )
        for name, array in (("cost_cents", cost), ("eligible", eligible)):
            if array.shape != profit.shape:
                raise ValueError(
                    f"{name} has shape {array.shape} but profit_cents has shape "
                    f"{profit.shape}"
                )
        if self.first_user < 0:
            raise ValueError(f"first_user must be >= 0, got {self.first_user}")
        object.__setattr__(self, "profit_cents", profit)
        object.__setattr__(self, "cost_cents", cost)
        object.__setattr__(self, "eligible", eligible)

    @property
    def n_users(self) -> int:
        return int(self.profit_cents.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        n_users, n_offers, n_channels = self.profit_cents.shape
        return int(n_users), int(n_offers), int(n_channels)

    def rows(self, start: int, stop: int) -> UserOptions:
        """Return users ``start`` to ``stop`` as a block that shares memory."""
        return UserOptions(
            self.profit_cents[start:stop],
            self.cost_cents[start:stop],
            self.eligible[start:stop],
            first_user=self.first_user + start,
        )

    def take(self, users: npt.ArrayLike) -> UserOptions:
        """Return the given rows, in the given order, as a new problem of their own."""
        index = np.asarray(users, dtype=np.int64)
        return UserOptions(
            self.profit_cents[index], self.cost_cents[index], self.eligible[index]
        )

    def check_spec(self, spec: AllocationSpec) -> None:
        """Raise ``ValueError`` unless the offer and channel axes match ``spec``."""
        _, n_offers, n_channels = self.shape
        if (n_offers, n_channels) != (spec.n_offers, spec.n_channels):
            raise ValueError(
                f"scores cover {n_offers} offers x {n_channels} channels but the spec "
                f"has {spec.n_offers} x {spec.n_channels}; build both from the same "
                "offer and channel lists"
            )


@dataclass(frozen=True)
class NpyPartition:
    """Loader of one partition written by :func:`write_partitions`, memory-mapped."""

    folder: Path

    def __call__(self) -> UserOptions:
        return UserOptions(
            np.load(self.folder / "profit_cents.npy", mmap_mode="r"),
            np.load(self.folder / "cost_cents.npy", mmap_mode="r"),
            np.load(self.folder / "eligible.npy", mmap_mode="r"),
        )


def write_partitions(
    options: UserOptions, folder: Path, n_partitions: int
) -> list[NpyPartition]:
    """Split users into ``n_partitions`` contiguous parts saved as .npy files.

    Returns one loader per part, in user order, for :func:`solve_allocation_dask`.
    """
    if n_partitions < 1:
        raise ValueError(f"n_partitions must be >= 1, got {n_partitions}")
    bounds = np.linspace(0, options.n_users, n_partitions + 1).astype(np.int64)
    loaders = []
    for number, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        part_folder = Path(folder) / f"part-{number:05d}"
        part_folder.mkdir(parents=True, exist_ok=True)
        part = options.rows(int(start), int(stop))
        np.save(part_folder / "profit_cents.npy", part.profit_cents)
        np.save(part_folder / "cost_cents.npy", part.cost_cents)
        np.save(part_folder / "eligible.npy", part.eligible)
        loaders.append(NpyPartition(part_folder))
    return loaders


def expand_over_channels(
    profit_cents: npt.ArrayLike,
    cost_cents: npt.ArrayLike,
    reach: npt.ArrayLike,
    chunk_users: int = 1 << 18,
) -> tuple[Float32Array, Float32Array]:
    """Scale per-offer scores by each channel's reach into users x offers x channels.

    ``profit_cents`` and ``cost_cents`` are ``(n_users, n_offers)`` scores for a user
    who sees the message. ``reach`` is ``(n_users, n_channels)``, the probability that
    the message sent at the user's chosen hour is seen. A message that is not seen
    changes nothing and costs no discount, so both scores scale by the reach.
    """
    profit = np.asarray(profit_cents)
    cost = np.asarray(cost_cents)
    seen = np.asarray(reach, dtype=np.float32)
    if profit.ndim != 2 or cost.shape != profit.shape:
        raise ValueError(
            "profit_cents and cost_cents must both be (n_users, n_offers), got "
            f"{profit.shape} and {cost.shape}"
        )
    if seen.ndim != 2 or seen.shape[0] != profit.shape[0]:
        raise ValueError(
            f"reach must be (n_users, n_channels) for {profit.shape[0]} users, got "
            f"{seen.shape}"
        )
    if seen.size and (seen.min() < 0 or seen.max() > 1):
        raise ValueError("reach must contain probabilities in [0, 1]")
    n_users, n_offers = profit.shape
    shape = (n_users, n_offers, seen.shape[1])
    profit_out = np.empty(shape, dtype=np.float32)
    cost_out = np.empty(shape, dtype=np.float32)
    for start in range(0, n_users, chunk_users):
        stop = min(start + chunk_users, n_users)
        weights = seen[start:stop, None, :]
        np.multiply(
            profit[start:stop, :, None].astype(np.float32),
            weights,
            out=profit_out[start:stop],
        )
        np.multiply(
            cost[start:stop, :, None].astype(np.float32),
            weights,
            out=cost_out[start:stop],
        )
    return profit_out, cost_out


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer number, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def _counts(name: str, values: npt.ArrayLike | Sequence[int], size: int) -> IntArray:
    array = np.asarray(values)
    if array.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},), got {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {array.dtype}")
    if (array < 0).any():
        raise ValueError(f"{name} must be >= 0, got {array.tolist()}")
    return np.minimum(array.astype(np.int64), UNLIMITED)
