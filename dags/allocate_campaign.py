"""Allocate a campaign: at most one coupon, channel and send hour per user.

Loads the `champion` response model and scores every user x offer x channel. Each
user's send hour per channel comes from their active hours; eligibility from the
offer rules and past exposures. The solver keeps the budget, each coupon's stock and
each channel's capacity, net of message costs; a randomized holdout and an
exploration share are drawn and every assignment is stored with its propensity.
Trigger it from the UI to set the campaign, budget, offers, holdout, exploration,
channel costs and capacities, and seed.
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
        explore_fraction=float(params["explore_fraction"]),
        message_cost_cents=dict(params["message_cost_cents"]),
        channel_capacity=dict(params["channel_capacity"]),
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
        "explore_fraction": Param(
            0.05,
            type="number",
            minimum=0,
            exclusiveMaximum=1,
            description=(
                "Share of users given a uniformly drawn eligible option; lowered "
                "when its draws would use over a fifth of a limit."
            ),
        ),
        "message_cost_cents": Param(
            {"email": 0, "push": 0, "sms": 5},
            type="object",
            additionalProperties={"type": "integer", "minimum": 0},
            description="Cost of one message per channel, in cents.",
        ),
        "channel_capacity": Param(
            {},
            type="object",
            additionalProperties={"type": "integer", "minimum": 0},
            description="Most messages per channel; a channel left out has no limit.",
        ),
        "seed": Param(11, type="integer"),
    },
)
def allocate_campaign() -> None:
    solve_allocation(score_offers())


allocate_campaign()
