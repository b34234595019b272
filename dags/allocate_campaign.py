"""Allocate a campaign: at most one coupon per user, within budget, with a holdout.

Loads the `champion` response model, scores every user x offer, solves the budgeted
choice, draws a randomized holdout and stores each assignment with its propensity.
Trigger it from the UI to set the campaign, budget, offers, holdout and seed.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import Param, dag, task
from couponflow_airflow.assets import ALLOCATIONS, MODELS
from couponflow_airflow.defaults import DEFAULT_ARGS, START_DATE, TAGS


@task
def score_offers(
    params: dict[str, Any] | None = None, run_id: str | None = None
) -> dict[str, Any]:
    from couponflow import pipeline

    assert params is not None
    return pipeline.score_campaign(
        campaign_id=pipeline.campaign_id_or_default(params["campaign_id"], run_id),
        offers=list(params["offers"]),
    )


@task(outlets=[ALLOCATIONS])
def solve_allocation(
    scores: dict[str, Any], params: dict[str, Any] | None = None
) -> dict[str, Any]:
    from couponflow import pipeline

    assert params is not None
    return pipeline.solve_campaign(
        scores=scores,
        budget_cents=int(params["budget_cents"]),
        holdout_fraction=float(params["holdout_fraction"]),
        seed=int(params["seed"]),
    )


@dag(
    schedule=[MODELS],
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=TAGS,
    doc_md=__doc__,
    params={
        "campaign_id": Param(
            "",
            type="string",
            description="Campaign id; empty derives one from the run id.",
        ),
        "budget_cents": Param(
            50_000_00,
            type="integer",
            minimum=0,
            description="Budget for expected discount cost, in cents.",
        ),
        "offers": Param(
            [],
            type="array",
            description="Coupon ids to consider; empty means the whole catalogue.",
        ),
        "holdout_fraction": Param(0.1, type="number", minimum=0, exclusiveMaximum=1),
        "seed": Param(11, type="integer"),
    },
)
def allocate_campaign() -> None:
    solve_allocation(score_offers())


allocate_campaign()
