"""Tests of the Dask-partitioned allocation path against the in-memory one."""

from __future__ import annotations

import numpy as np
import pytest

from couponflow.allocation import (
    AllocationSpec,
    SolverParams,
    UserOptions,
    solve_allocation,
    solve_allocation_dask,
    write_partitions,
)
from couponflow.dask_cluster import dask_client
from couponflow.settings import Settings


def _instance(seed: int, n_users: int) -> tuple[UserOptions, AllocationSpec]:
    rng = np.random.default_rng(seed)
    shape = (n_users, 4, 3)
    options = UserOptions(
        profit_cents=rng.normal(5.0, 30.0, shape).astype(np.float32),
        cost_cents=rng.uniform(1.0, 50.0, shape).astype(np.float32),
        eligible=rng.random(shape) < 0.7,
    )
    spec = AllocationSpec(
        offer_ids=("a", "b", "c", "d"),
        budget_cents=6 * n_users,
        stock=np.array([n_users // 10, n_users // 5, n_users, n_users // 20]),
        capacity=np.array([n_users, n_users // 6, n_users // 12]),
        message_cost_cents=np.array([0, 1, 5]),
    )
    return options, spec


@pytest.mark.parametrize(
    "params",
    [
        SolverParams(threads=2, chunk_users=97),
        # A sampled working set also runs the polish over all partitions.
        SolverParams(threads=1, chunk_users=256, working_users=700),
    ],
    ids=["every-user", "sampled"],
)
def test_four_partitions_match_in_memory(tmp_path, params: SolverParams) -> None:
    options, spec = _instance(5, 3_000)
    loaders = write_partitions(options, tmp_path / "parts", 4)

    in_memory = solve_allocation(options, spec, params)
    with dask_client(Settings(home=tmp_path)) as client:
        partitioned = solve_allocation_dask(loaders, spec, client, params)

    assert len(loaders) == 4
    assert in_memory.n_granted > 0
    np.testing.assert_array_equal(partitioned.option, in_memory.option)
    assert partitioned.multipliers.lam == in_memory.multipliers.lam
    np.testing.assert_array_equal(partitioned.multipliers.mu, in_memory.multipliers.mu)
    np.testing.assert_array_equal(partitioned.multipliers.nu, in_memory.multipliers.nu)
    assert partitioned.objective_cents == in_memory.objective_cents


def test_partitions_reject_mismatched_spec(tmp_path) -> None:
    options, spec = _instance(6, 40)
    loaders = write_partitions(options, tmp_path / "parts", 2)
    other = AllocationSpec(offer_ids=("a",), budget_cents=5, stock=np.array([1]))

    with dask_client(Settings(home=tmp_path)) as client:
        with pytest.raises(ValueError, match="scores cover 4 offers"):
            solve_allocation_dask(loaders, other, client)
