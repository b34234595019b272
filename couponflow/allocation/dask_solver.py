"""The full allocation solver over user partitions on a Dask cluster.

Each partition is loaded on a worker only when a step needs its raw scores, and the
candidate blocks stay on the workers. Only totals, multipliers and short lists
travel to the client, so the input may be larger than any one machine's memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import numpy as np

from couponflow.allocation.blocks import (
    CandidateBlock,
    Float32Array,
    Multipliers,
    ScreenResult,
    dual_sum,
    screen_block,
    usable_values,
)
from couponflow.allocation.lagrangian import Allocation, SolverParams, solve_blocks
from couponflow.allocation.options import AllocationSpec, IntArray, UserOptions

if TYPE_CHECKING:
    # Only for annotations, so importing the allocation package does not load
    # distributed.
    from distributed import Client, Future

log = logging.getLogger(__name__)

Loader = Callable[[], UserOptions]


def solve_allocation_dask(
    partitions: Sequence[Loader],
    spec: AllocationSpec,
    client: Client,
    params: SolverParams | None = None,
) -> Allocation:
    """Solve the problem of :func:`solve_allocation` over partitions of users.

    ``partitions`` are picklable callables that each return one partition's
    :class:`UserOptions`, in user order (for example the loaders of
    :func:`write_partitions`). Workers compute best responses, margins and
    candidate lists per partition, and the client updates the multipliers from
    their exact totals and runs the same repair and fill. The allocation equals that of
    :func:`solve_allocation` on the concatenated users with the same ``params``.
    """
    params = params or SolverParams()
    blocks = DaskBlocks(client, partitions, spec)
    log.info(
        "solving %d users in %d partitions on Dask", blocks.n_users, len(partitions)
    )
    return solve_blocks(blocks, spec, params)


class DaskBlocks:
    """The blocks interface of the solver, with one future of blocks per partition."""

    def __init__(
        self, client: Client, partitions: Sequence[Loader], spec: AllocationSpec
    ) -> None:
        if not partitions:
            raise ValueError("partitions must contain at least one loader")
        self.client = client
        self.loaders = list(partitions)
        sizes = client.gather(
            [client.submit(_partition_size, loader, spec) for loader in self.loaders]
        )
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.n_users = int(self.offsets[-1])
        self.parts: list[Future] = []

    def rows(
        self, spec: AllocationSpec, users: IntArray
    ) -> tuple[Float32Array, Float32Array]:
        """Return usable net profit and cost of the given sorted global rows."""
        bounds = np.searchsorted(users, self.offsets)
        futures = [
            self.client.submit(
                _partition_rows,
                loader,
                users[bounds[number] : bounds[number + 1]] - self.offsets[number],
                spec,
                pure=False,
            )
            for number, loader in enumerate(self.loaders)
        ]
        pieces = self.client.gather(futures)
        net = np.concatenate([p[0] for p in pieces])
        cost = np.concatenate([p[1] for p in pieces])
        return net, cost

    def screen(
        self, spec: AllocationSpec, multipliers: Multipliers, n_candidates: int
    ) -> list[ScreenResult]:
        screened = [
            self.client.submit(
                _screen_partition,
                loader,
                int(self.offsets[number]),
                spec,
                multipliers,
                n_candidates,
                pure=False,
            )
            for number, loader in enumerate(self.loaders)
        ]
        self.parts = [self.client.submit(itemgetter(0), f) for f in screened]
        return list(
            self.client.gather([self.client.submit(itemgetter(1), f) for f in screened])
        )

    def dual_sum(self, spec: AllocationSpec, multipliers: Multipliers) -> float:
        futures = [
            self.client.submit(
                _partition_dual_sum,
                loader,
                int(self.offsets[number]),
                spec,
                multipliers,
                pure=False,
            )
            for number, loader in enumerate(self.loaders)
        ]
        return float(sum(self.client.gather(futures)))

    def map(self, function: Callable[..., Any], *args: Any) -> list[Any]:
        futures = [
            self.client.submit(_map_blocks, part, function, args, pure=False)
            for part in self.parts
        ]
        return [result for results in self.client.gather(futures) for result in results]

    def update(self, function: Callable[..., Any], *args: Any) -> list[Any]:
        updated = [
            self.client.submit(_update_blocks, part, function, args, pure=False)
            for part in self.parts
        ]
        self.parts = [self.client.submit(itemgetter(0), f) for f in updated]
        results = self.client.gather(
            [self.client.submit(itemgetter(1), f) for f in updated]
        )
        return [result for part in results for result in part]


def _partition_size(loader: Loader, spec: AllocationSpec) -> int:
    options = loader()
    options.check_spec(spec)
    return options.n_users


def _partition_rows(
    loader: Loader, rows: IntArray, spec: AllocationSpec
) -> tuple[Float32Array, Float32Array]:
    return usable_values(loader().take(rows), spec)


def _screen_partition(
    loader: Loader,
    first_user: int,
    spec: AllocationSpec,
    multipliers: Multipliers,
    n_candidates: int,
) -> tuple[list[CandidateBlock], ScreenResult]:
    options = replace(loader(), first_user=first_user)
    return screen_block(options, spec, multipliers, n_candidates)


def _partition_dual_sum(
    loader: Loader, first_user: int, spec: AllocationSpec, multipliers: Multipliers
) -> float:
    return dual_sum(replace(loader(), first_user=first_user), spec, multipliers)


def _map_blocks(
    blocks: list[CandidateBlock], function: Callable[..., Any], args: tuple[Any, ...]
) -> list[Any]:
    return [function(block, *args) for block in blocks]


def _update_blocks(
    blocks: list[CandidateBlock], function: Callable[..., Any], args: tuple[Any, ...]
) -> tuple[list[CandidateBlock], list[Any]]:
    results = [function(block, *args) for block in blocks]
    return [block for block, _ in results], [result for _, result in results]
