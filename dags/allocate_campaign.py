"""Allocate a campaign: at most one coupon, channel and send hour per user.

Loads the `champion` response model and scores every user x offer x channel. Each
user's send hour per channel comes from their active hours; eligibility from the
offer rules and past exposures. The solver keeps the budget, each coupon's stock and
each channel's capacity, net of message costs. A randomized holdout and an
exploration share are drawn, and every assignment is stored with its propensity.
Trigger it from the UI to set the campaign, budget, offers, send time, holdout,
exploration, channel costs and capacities, and seed.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import Param, dag, task
from couponflow_airflow.assets import ALLOCATIONS, MODELS
from couponflow_airflow.defaults import DEFAULT_ARGS, START_DATE, TAGS

# Per-channel amounts of the Params: the channels of couponflow.schemas.CHANNELS,
# spelled out because the DAG file must not import pandas (tested).
CHANNEL_COUNTS = {
    channel: {"type": "integer", "minimum": 0} for channel in ("email", "push", "sms")
}


@task
def score_offers(
    params: dict[str, Any] | None = None, run_id: str | None = None
) -> dict[str, Any]:
    from couponflow import pipeline

    assert params is not None
    # The Params are checked before any scoring, so a bad value fails in seconds.
    request = pipeline.check_request(dict(params), run_id)
    return pipeline.score_campaign(request)


@task(outlets=[ALLOCATIONS])
def solve_allocation(scores: dict[str, Any]) -> dict[str, Any]:
    from couponflow import pipeline

    return pipeline.solve_campaign(scores)


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
            maximum=10**15,
            description=(
                "Budget for the expected discount cost, in cents; message costs "
                "come on top and are in the summary."
            ),
        ),
        "offers": Param(
            [],
            type="array",
            description=(
                "Coupon ids to consider, each valid at the send time. Empty means "
                "every coupon valid then, less those the newest trustworthy "
                "experiment marked drop."
            ),
        ),
        "send_after": Param(
            "",
            type="string",
            description=(
                "Earliest send time, ISO 8601 with a time zone; each message goes at "
                "the user's hour after it. Empty means the latest feature snapshot."
            ),
        ),
        "holdout_fraction": Param(
            0.1,
            type="number",
            minimum=0,
            exclusiveMaximum=1,
            description="Share of users drawn into the holdout, who get nothing.",
        ),
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
            properties=CHANNEL_COUNTS,
            additionalProperties=False,
            description=(
                "Cost of one message per channel (email, push, sms), in cents; a "
                "channel left out keeps its default."
            ),
        ),
        "channel_capacity": Param(
            {},
            type="object",
            properties=CHANNEL_COUNTS,
            additionalProperties=False,
            description=(
                "Most messages per channel (email, push, sms); a channel left out "
                "has no limit."
            ),
        ),
        "seed": Param(
            11,
            type="integer",
            description=(
                "Seed of the holdout and exploration draws; the same seed keeps "
                "each user in the same group across versions."
            ),
        ),
    },
)
def allocate_campaign() -> None:
    solve_allocation(score_offers())


allocate_campaign()
