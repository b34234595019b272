"""Analyze campaigns whose outcomes arrived: every arm against the randomized holdout.

Writes an HTML report with plots and a machine-readable summary per campaign, and
logs the same metrics to MLflow. The next allocation reads the summary.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import Param, dag, task
from couponflow_airflow.assets import OUTCOMES
from couponflow_airflow.defaults import DEFAULT_ARGS, START_DATE, TAGS


@task
def find_campaigns(params: dict[str, Any] | None = None) -> list[str]:
    from couponflow import pipeline

    assert params is not None
    return pipeline.campaigns_to_analyze(params["campaign_id"] or None)


@task
def analyze_campaigns(campaign_ids: list[str]) -> list[dict[str, Any]]:
    from couponflow import pipeline

    return [pipeline.analyze_campaign(campaign_id) for campaign_id in campaign_ids]


@dag(
    schedule=[OUTCOMES],
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
            description="Campaign to analyze; empty means every one with outcomes.",
        )
    },
)
def analyze_experiment() -> None:
    analyze_campaigns(find_campaigns())


analyze_experiment()
