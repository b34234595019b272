"""Campaign allocation: score offers, choose one per user under a budget, store plans.

A campaign run (the allocate_campaign DAG) solves the full problem: offer x channel x
send hour per user, with budget, stock, channel capacity and cost, and eligibility.
It calls :func:`score_channels`, :func:`send_hours_for`, :func:`at_send_hours`,
:func:`build_eligibility`, :func:`allocate_campaign` (which calls
:func:`solve_allocation`; :func:`solve_allocation_dask` solves inputs larger than
memory), :func:`plan_rows` and :func:`write_allocation`. :func:`solve_budget` and
:func:`assign_campaign` are the budget-only problem of coupon design and the
baselines.
"""

from couponflow.allocation.baselines import likeliest_buyers, oracle, random_targeting
from couponflow.allocation.campaign import (
    HOLDOUT,
    PLAN_COLUMNS,
    TREATMENT,
    assign_campaign,
    draw_holdout,
)
from couponflow.allocation.channels import (
    ChannelRules,
    ChannelScores,
    at_send_hours,
    score_channels,
    send_hours_for,
)
from couponflow.allocation.dask_solver import solve_allocation_dask
from couponflow.allocation.eligibility import (
    EligibilityRules,
    build_eligibility,
    exposure_history,
)
from couponflow.allocation.exact import ExactSolution, solve_allocation_exact
from couponflow.allocation.lagrangian import (
    Allocation,
    SolverParams,
    dual_bound,
    solve_allocation,
)
from couponflow.allocation.options import (
    NO_OPTION,
    UNLIMITED,
    AllocationSpec,
    NpyPartition,
    UserOptions,
    expand_over_channels,
    write_partitions,
)
from couponflow.allocation.policy import (
    RandomizedAllocation,
    allocate_campaign,
    draw_groups,
    fit_explore_fraction,
    plan_rows,
)
from couponflow.allocation.scoring import (
    ConversionModel,
    OfferScores,
    expected_basket_cents,
    score_offers,
    score_users,
)
from couponflow.allocation.send_hours import (
    SendHours,
    activity_from_features,
    channel_reach,
    choose_send_hours,
)
from couponflow.allocation.solver import (
    NO_OFFER,
    LPSolution,
    Solution,
    solve_budget,
    solve_budget_lp,
)
from couponflow.allocation.storage import (
    current_version,
    read_current_allocation,
    write_allocation,
)

__all__ = [
    "HOLDOUT",
    "NO_OFFER",
    "NO_OPTION",
    "PLAN_COLUMNS",
    "TREATMENT",
    "UNLIMITED",
    "Allocation",
    "AllocationSpec",
    "ChannelRules",
    "ChannelScores",
    "ConversionModel",
    "EligibilityRules",
    "ExactSolution",
    "LPSolution",
    "NpyPartition",
    "OfferScores",
    "RandomizedAllocation",
    "SendHours",
    "Solution",
    "SolverParams",
    "UserOptions",
    "activity_from_features",
    "allocate_campaign",
    "at_send_hours",
    "assign_campaign",
    "build_eligibility",
    "channel_reach",
    "choose_send_hours",
    "current_version",
    "draw_groups",
    "draw_holdout",
    "dual_bound",
    "expand_over_channels",
    "expected_basket_cents",
    "exposure_history",
    "fit_explore_fraction",
    "likeliest_buyers",
    "oracle",
    "plan_rows",
    "random_targeting",
    "read_current_allocation",
    "score_channels",
    "score_offers",
    "score_users",
    "send_hours_for",
    "solve_allocation",
    "solve_allocation_dask",
    "solve_allocation_exact",
    "solve_budget",
    "solve_budget_lp",
    "write_allocation",
    "write_partitions",
]
