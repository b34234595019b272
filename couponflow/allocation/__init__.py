"""Campaign allocation: score offers, choose one per user under a budget, store plans.

A campaign run calls :func:`score_offers`, :func:`solve_budget`,
:func:`assign_campaign` and :func:`write_allocation` in that order.
"""

from couponflow.allocation.baselines import likeliest_buyers, oracle, random_targeting
from couponflow.allocation.campaign import (
    HOLDOUT,
    PLAN_COLUMNS,
    TREATMENT,
    assign_campaign,
    draw_holdout,
)
from couponflow.allocation.scoring import OfferScores, score_offers
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
    "PLAN_COLUMNS",
    "TREATMENT",
    "LPSolution",
    "OfferScores",
    "Solution",
    "assign_campaign",
    "current_version",
    "draw_holdout",
    "likeliest_buyers",
    "oracle",
    "random_targeting",
    "read_current_allocation",
    "score_offers",
    "solve_budget",
    "solve_budget_lp",
    "write_allocation",
]
