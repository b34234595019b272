"""Ingest raw batches; Great Expectations checks each, bad rows go to quarantine.

Accepted rows land in the offline store (parquet partitioned by UTC date). A batch
that fails as a whole (a missing column, no rows) fails its task, and nothing
downstream runs.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import dag, task
from airflow.sdk.exceptions import AirflowSkipException
from couponflow_airflow.assets import LAKE, OUTCOMES
from couponflow_airflow.defaults import DEFAULT_ARGS, START_DATE, TAGS

BEHAVIOUR_TABLES = ("users", "coupons", "events")
CAMPAIGN_TABLES = ("exposures", "outcomes")


@task
def ingest_table(table: str) -> dict[str, Any]:
    from couponflow import pipeline

    return pipeline.ingest_table(table)


@task(outlets=[LAKE])
def publish_lake(summaries: list[dict[str, Any]]) -> int:
    accepted = sum(s["rows_accepted"] for s in summaries)
    if accepted == 0:
        raise AirflowSkipException("no new users, coupons or events were accepted")
    return accepted


@task(outlets=[OUTCOMES])
def publish_outcomes(summaries: list[dict[str, Any]]) -> int:
    accepted = sum(s["rows_accepted"] for s in summaries)
    if accepted == 0:
        raise AirflowSkipException("no new exposures or outcomes were accepted")
    return accepted


@dag(
    schedule="@hourly",
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=TAGS,
    doc_md=__doc__,
)
def ingest_events() -> None:
    # Tables in dependency order: later tables refer to ids of earlier ones.
    behaviour = []
    previous = None
    for table in BEHAVIOUR_TABLES + CAMPAIGN_TABLES:
        summary = ingest_table.override(task_id=f"ingest_{table}")(table)
        if previous is not None:
            previous >> summary
        previous = summary
        behaviour.append(summary)
    publish_lake(behaviour[: len(BEHAVIOUR_TABLES)])
    publish_outcomes(behaviour[len(BEHAVIOUR_TABLES) :])


ingest_events()
